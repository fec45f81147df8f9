"""The loss over a sparse support (the student's top-k, or a given teacher support) against
the float64 reference, on logits and fused-linear, every divergence, tail bucket and
renormalisation, the UniSD options, and the edge cases: k = 1, k = V, ties at the k-th
value, ignored rows, strided inputs, a vocabulary that is no multiple of the tiles."""

import pytest
import torch
from linear_inputs import make_case
from loss_inputs import make_inputs
from sparse_inputs import as64, assert_close, given_support, options_inputs, rel_errors, run

import unisd_fast as usd
from unisd_fast.backends.pytorch import TorchBackend
from unisd_fast.backends.pytorch import sparse as torch_sparse
from unisd_fast.backends.triton import TritonBackend

V = 1001
TILE = 96  # 1001 = 10 * 96 + 41: the top-k merges over 11 tiles
TILED = TorchBackend(cpu_vocab_tile=TILE)
WHOLE_HEAD = TorchBackend(cpu_vocab_tile=None)
TRITON = TritonBackend(max_block=256)  # 1001 = 3 * 256 + 233: four vocabulary tiles
IMPLS = {"torch": "torch", "triton": TRITON}
# Triton's interpreter is slow: the full matrix of its cases is marked slow, and
# test_triton_subset runs a few of every kind by default.
IMPL_PARAMS = ["torch", pytest.param("triton", marks=pytest.mark.slow)]
CHUNK = 3 * 2 * V * 4
DIVERGENCES = [{"divergence": "fkl"}, {"divergence": "rkl"},
               {"divergence": "jsd", "jsd_alpha": 0.3}]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    """Row blocks of 3 rows: every call runs several."""
    monkeypatch.setattr(torch_sparse, "BLOCK_ELEMENTS", 3 * V)


def div_id(d):
    return d["divergence"] + (f"{d['jsd_alpha']}" if "jsd_alpha" in d else "")


def logits_case(B=2, T=6, seed=0, **kw):
    torch.manual_seed(seed)
    return make_inputs(B, T, V, **kw)


def logits_pair(case, cfg, kind, k, impl="torch", extra=None, grad_hidden=False):
    """(fused, reference) runs of unisd_loss on the case, the support ``kind`` "topk" (the
    config's top-k) or "given" (the teacher's top-k as indices and log-probs)."""
    kw = options_inputs(case, cfg)
    kw.update(extra or {})
    if kind == "given":
        index, lp, _ = given_support(case["teacher_logits"], k, cfg.temperature)
        teacher, kw = None, {**kw, "teacher_indices": index, "teacher_logprobs": lp}
    else:
        teacher = case["teacher_logits"]
        cfg = cfg.replace(topk=k)
    differentiable = ["student_hidden"] if grad_hidden and cfg.needs_hidden else []
    got = run(usd.unisd_loss, case["student_logits"], differentiable, teacher,
              case["labels"], config=cfg, impl=impl, **kw)
    exp = run(usd.unisd_loss, case["student_logits"].double(), differentiable,
              None if teacher is None else teacher.double(), case["labels"], config=cfg,
              impl="reference", **as64(kw))
    return got, exp


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
@pytest.mark.parametrize("div", DIVERGENCES, ids=div_id)
@pytest.mark.parametrize("kind", ["topk", "given"])
def test_logits_divergences(kind, div, tail, impl):
    case = logits_case()
    assert_close(*logits_pair(case, usd.UniSDConfig(tail_bucket=tail, **div), kind, 37,
                              impl=IMPLS[impl]))


OPTIONS = [
    {"clip": 0.02},
    {"clip_quantile": 0.6, "divergence": "rkl"},
    {"agreement": "token", "agreement_gamma": 0.5},
    {"agreement": "sequence", "agreement_gamma": 2.0, "agreement_stat": "range"},
    {"contrastive_weight": 0.4, "contrastive_margin": 0.3},
    {"feature_weight": 0.2, "kd_weight": 0.5},
    {"normalize": "token"},
    {"temperature": 1.3, "divergence": "jsd", "jsd_alpha": 0.7},
]


def option_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
@pytest.mark.parametrize("kind", ["topk", "given"])
def test_logits_options(kind, option, impl):
    case = logits_case()
    cfg = usd.UniSDConfig(tail_bucket=True, **option)
    extra = {}
    if kind == "given" and cfg.needs_negative:
        _, _, lp = given_support(case["teacher_logits"], 1, cfg.temperature)
        y = case["labels"].clamp(min=0)
        extra["teacher_label_logprobs"] = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).float()
    got, exp = logits_pair(case, cfg, kind, 29, impl=IMPLS[impl], extra=extra,
                           grad_hidden=True)
    assert_close(got, exp)
    if cfg.clip is not None or cfg.clip_quantile is not None:
        assert exp[0].clipped.any()


@pytest.mark.parametrize("items", [9, "tensor"])
def test_num_items_in_batch(items):
    case = logits_case()
    n = torch.tensor(11.0) if items == "tensor" else items
    cfg = usd.UniSDConfig(normalize="token", feature_weight=0.1)
    assert_close(*logits_pair(case, cfg, "topk", 20, extra={"num_items_in_batch": n},
                              grad_hidden=True))


def test_contrastive_labels_in_given_support():
    """Without teacher_label_logprobs, the label's teacher log-prob is read from the
    support: here the support is the teacher's top-k with each label added."""
    case = logits_case()
    cfg = usd.UniSDConfig(contrastive_weight=0.5, contrastive_margin=0.4, tail_bucket=True)
    lp = torch.log_softmax(case["teacher_logits"].double() / cfg.temperature, -1)
    y = case["labels"].clamp(min=0)
    score = lp.clone().scatter_(-1, y.unsqueeze(-1), 1.0)  # the label first
    index = score.topk(12, dim=-1).indices
    kw = {"teacher_indices": index, "teacher_logprobs": lp.gather(-1, index).float(),
          "negative_logits": case["negative_logits"]}
    got = run(usd.unisd_loss, case["student_logits"], [], None, case["labels"], config=cfg,
              **kw)
    exp = run(usd.unisd_loss, case["student_logits"].double(), [], None, case["labels"],
              config=cfg, impl="reference", **as64(kw))
    assert_close(got, exp)
    assert exp[0].contrastive > 0


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
@pytest.mark.parametrize("kind", ["topk", "given"])
@pytest.mark.parametrize("k", [1, V])
def test_k_extremes(k, kind, tail, impl):
    case = logits_case()
    got, exp = logits_pair(case, usd.UniSDConfig(tail_bucket=tail, divergence="jsd"), kind, k,
                           impl=IMPLS[impl])
    assert_close(got, exp)
    if k == V and not tail:  # the whole vocabulary: the dense loss
        dense = usd.unisd_loss(case["student_logits"].double(),
                               case["teacher_logits"].double(), case["labels"],
                               config=usd.UniSDConfig(divergence="jsd"), impl="reference")
        torch.testing.assert_close(exp[0].loss, dense.loss)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
def test_ties_at_the_kth_value_go_to_the_lower_index(tail, impl):
    """Logits on a grid of 0.5: many columns share the k-th value, across tiles; the
    teacher differs between them, so the loss depends on which are taken."""
    case = logits_case()
    case["student_logits"] = (case["student_logits"] * 2).round() / 2
    assert (case["student_logits"] == 0).any()
    case["student_logits"][0, 0, :5] = -0.0  # -0 and +0 are equal values
    cfg = usd.UniSDConfig(tail_bucket=tail)
    got, exp = logits_pair(case, cfg, "topk", 40, impl=IMPLS[impl])
    assert_close(got, exp)
    # the lower-index rule matters: the higher-index choice gives another loss
    flipped = case["student_logits"].flip(-1)
    other = usd.unisd_loss(flipped.double(), case["teacher_logits"].flip(-1).double(),
                           torch.where(case["labels"] >= 0, V - 1 - case["labels"], -100),
                           config=cfg.replace(topk=40), impl="reference")
    assert abs(other.loss.item() - exp[0].loss.item()) > 1e-6


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_ignored_rows(impl):
    case = logits_case(B=3)
    z = case["student_logits"]
    ignored = case["labels"] == -100
    z[ignored] = float("nan")
    case["teacher_logits"][ignored] = float("inf")
    for kind in ("topk", "given"):
        if kind == "given":
            case["teacher_logits"][ignored] = 0.0
        got, exp = logits_pair(case, usd.UniSDConfig(tail_bucket=True), kind, 30,
                               impl=IMPLS[impl])
        assert_close(got, exp)
        assert torch.all(got[1][0][ignored] == 0)


def test_all_ignored_rows():
    case = logits_case()
    case["labels"][:] = -100
    for kind in ("topk", "given"):
        got, exp = logits_pair(case, usd.UniSDConfig(), kind, 30)
        assert got[0].loss.item() == 0.0 and torch.all(got[1][0] == 0)
        assert_close(got, exp)


def test_server_padding_rows_are_ignored():
    """A server's padding rows: -inf log-probs at index 0 repeated, on ignored labels."""
    case = logits_case()
    index, lp, _ = given_support(case["teacher_logits"], 16, 0.7)
    ignored = case["labels"] == -100
    index[ignored] = 0
    lp[ignored] = float("-inf")
    out = usd.unisd_loss(case["student_logits"], None, case["labels"],
                         teacher_indices=index, teacher_logprobs=lp)
    assert out.loss.isfinite()


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_strided_inputs_and_inplace_backward(impl):
    case = logits_case()
    cfg = usd.UniSDConfig(tail_bucket=True, divergence="rkl")
    wide = torch.randn(2, 6, V + 7)
    wide[..., 3:V + 3] = case["student_logits"]
    strided = wide[..., 3:V + 3]
    assert not strided.is_contiguous()
    case["student_logits"] = strided
    case["teacher_logits"] = case["teacher_logits"].transpose(0, 1).contiguous().transpose(0, 1)
    got, exp = logits_pair(case, cfg, "topk", 25, impl=IMPLS[impl])
    assert_close(got, exp)
    z = strided.contiguous().requires_grad_()
    x = z.detach().clone()
    out = usd.unisd_loss(x.requires_grad_(), case["teacher_logits"], case["labels"],
                         config=cfg.replace(topk=25), inplace_backward=True,
                         impl=IMPLS[impl])
    (1.7 * out.loss).backward()
    torch.testing.assert_close(x.grad.double(), exp[1][0], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- fused-linear form


def linear_pair(case, cfg, kind, k, impl=TILED, trainable=True, **kw):
    """(fused, reference) runs of unisd_linear_loss on the support ``kind``: "topk", "given"
    (the teacher head's top-k, without teacher hidden states or head in the call unless
    features need them) or "dense" (the full vocabulary)."""
    case = dict(case)
    hs, ws = case.pop("student_hidden"), case["student_weight"]
    ht = case["teacher_hidden"]
    args = dict(teacher_hidden=ht, teacher_weight=case["teacher_weight"],
                labels=case["labels"], student_bias=case["student_bias"],
                teacher_bias=case["teacher_bias"], **kw)
    if cfg.needs_views:
        args["view_hidden"] = case["view_hidden"]
    if cfg.needs_negative:
        args["negative_hidden"] = case["negative_hidden"]
    if kind == "given":
        u = torch.nn.functional.linear(ht.double(), case["teacher_weight"].double(),
                                       None if case["teacher_bias"] is None
                                       else case["teacher_bias"].double())
        index, lp, full = given_support(u, k, cfg.temperature)
        args.update(teacher_indices=index, teacher_logprobs=lp)
        if cfg.needs_negative:
            y = case["labels"].clamp(min=0).unsqueeze(-1)
            args["teacher_label_logprobs"] = full.gather(-1, y).squeeze(-1).float()
        if not (cfg.needs_views or cfg.needs_negative):
            args.update(teacher_weight=None, teacher_bias=None)
            if not cfg.needs_hidden:
                args["teacher_hidden"] = None
    elif kind == "topk":
        cfg = cfg.replace(topk=k)

    def call(h, weight, impl, **more):
        a = dict(args, **more)
        if a["teacher_weight"] is ws:
            a["teacher_weight"] = weight
        return usd.unisd_linear_loss(h, weight, a.pop("teacher_hidden"),
                                     a.pop("teacher_weight"), a.pop("labels"), config=cfg,
                                     impl=impl, **a)

    def one(dtype, impl, chunk):
        cast = (lambda x: x) if dtype == torch.float32 else as64
        w = ws.to(dtype).clone().requires_grad_(trainable)
        more = cast({k: v for k, v in args.items() if k not in ("labels", "teacher_indices")})
        if more.get("teacher_bias") is not None and args["teacher_bias"] is args["student_bias"]:
            more["teacher_bias"] = more["student_bias"]
        extra = {} if chunk is None else {"chunk_bytes": chunk}
        return run(lambda h: call(h, w, impl, **more, **extra), hs.to(dtype), []), w

    (got, w32), (exp, w64) = one(torch.float32, impl, CHUNK), one(torch.float64, "reference",
                                                                  None)
    if trainable:
        got[1].append(w32.grad)
        exp[1].append(w64.grad)
    return got, exp


@pytest.mark.parametrize("impl", [TILED, WHOLE_HEAD,
                                  pytest.param(TRITON, marks=pytest.mark.slow)],
                         ids=["tiled", "whole-head", "triton"])
@pytest.mark.parametrize("tail", [False, True], ids=["renorm", "tail"])
@pytest.mark.parametrize("div", DIVERGENCES, ids=div_id)
@pytest.mark.parametrize("kind", ["topk", "given"])
def test_linear_divergences(kind, div, tail, impl):
    case = make_case(V=V)
    assert_close(*linear_pair(case, usd.UniSDConfig(tail_bucket=tail, **div), kind, 37,
                              impl=impl))


LINEAR_OPTIONS = [
    {"clip_quantile": 0.6},
    {"clip": 0.05, "divergence": "rkl"},
    {"agreement": "token", "agreement_gamma": 0.5, "contrastive_weight": 0.3},
    {"feature_weight": 0.2, "normalize": "token"},
]


@pytest.mark.parametrize("option", LINEAR_OPTIONS, ids=option_id)
@pytest.mark.parametrize("kind", ["topk", "given"])
def test_linear_options(kind, option):
    case = make_case(V=V)
    cfg = usd.UniSDConfig(tail_bucket=True, **option)
    assert_close(*linear_pair(case, cfg, kind, 29))


@pytest.mark.parametrize("kind", ["topk", "given"])
def test_linear_separate_frozen_head_softcap_and_ignored(kind):
    case = make_case(V=V, shared=False)
    case["labels"][1] = -100
    cfg = usd.UniSDConfig(tail_bucket=True, divergence="jsd")
    assert_close(*linear_pair(case, cfg, kind, 33, trainable=False, logit_softcap=3.0,
                              logit_scale=0.8))


@pytest.mark.parametrize("kind", ["topk", "given"])
@pytest.mark.parametrize("k", [1, V])
def test_linear_k_extremes(k, kind):
    assert_close(*linear_pair(make_case(V=V), usd.UniSDConfig(tail_bucket=True), kind, k))


def test_linear_ties_across_tiles():
    """Head rows repeated across tiles give equal logits: the lower index is taken."""
    case = make_case(V=V, shared=False)
    w = case["student_weight"]
    w[500:700] = w[100:300]
    cfg = usd.UniSDConfig(tail_bucket=True)
    assert_close(*linear_pair(case, cfg, "topk", 60))


def test_linear_all_ignored():
    case = make_case(V=V)
    case["labels"][:] = -100
    got, exp = linear_pair(case, usd.UniSDConfig(), "topk", 10)
    assert got[0].loss.item() == 0.0
    assert_close(got, exp)


@pytest.mark.parametrize(("kind", "div", "tail", "k"), [
    ("topk", DIVERGENCES[0], True, 37), ("given", DIVERGENCES[2], False, 37),
    ("topk", DIVERGENCES[1], False, V), ("given", DIVERGENCES[0], True, 1)])
def test_triton_subset(kind, div, tail, k):
    """The Triton kernels in the interpreter, on logits (a tied k-th value, an ignored row)
    and fused-linear."""
    case = logits_case(T=4)
    case["student_logits"] = (case["student_logits"] * 4).round() / 4
    cfg = usd.UniSDConfig(tail_bucket=tail, contrastive_weight=0.2, **div)
    extra = {}
    if kind == "given":
        _, _, lp = given_support(case["teacher_logits"], 1, cfg.temperature)
        y = case["labels"].clamp(min=0)
        extra["teacher_label_logprobs"] = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).float()
    assert_close(*logits_pair(case, cfg, kind, k, impl=TRITON, extra=extra))
    lcase = make_case(V=V, T=4)
    assert_close(*linear_pair(lcase, cfg.replace(contrastive_weight=0.0), kind, k,
                              impl=TRITON))


def test_reference_agreement_is_tight():
    """The errors of one float32 call against float64 are at float32 rounding."""
    case = logits_case()
    loss_err, grad_err = rel_errors(*logits_pair(case, usd.UniSDConfig(tail_bucket=True),
                                                 "topk", 37))
    assert loss_err < 1e-5 and grad_err < 1e-5


# ---------------------------------------------------------------- bad input


def _given(case, k=8):
    index, lp, _ = given_support(case["teacher_logits"], k, 0.7)
    return {"teacher_indices": index, "teacher_logprobs": lp}


def _call(case, teacher=None, cfg=None, **kw):
    return usd.unisd_loss(case["student_logits"], teacher, case["labels"],
                          config=cfg or usd.UniSDConfig(), **kw)


def _kept_row(case):
    b, t = (case["labels"] != -100).nonzero()[0].tolist()
    return b, t


@pytest.mark.parametrize("fault,match", [
    ("out_of_range", r"teacher_indices must lie in \[0, 1001\)"),
    ("negative", r"teacher_indices must lie in \[0, 1001\)"),
    ("repeated", "teacher_indices must not repeat"),
    ("positive", "teacher_logprobs must be <= 0"),
    ("nan", "teacher_logprobs must not be NaN"),
    ("mass", "total probability <= 1"),
])
def test_bad_support_values(fault, match):
    case = logits_case()
    given = _given(case)
    b, t = _kept_row(case)
    index, lp = given["teacher_indices"], given["teacher_logprobs"]
    if fault == "out_of_range":
        index[b, t, 3] = V
    elif fault == "negative":
        index[b, t, 0] = -1
    elif fault == "repeated":
        index[b, t, 5] = index[b, t, 2]
    elif fault == "positive":
        lp[b, t, 1] = 0.1
    elif fault == "nan":
        lp[b, t, 4] = float("nan")
    else:
        lp[b, t] = -1.0  # 8 * e^-1 > 1
    with pytest.raises(ValueError, match=match):
        _call(case, **given)
    ignored = (case["labels"] == -100).nonzero()[0].tolist()
    given = _given(case)  # the same fault on an ignored row only: accepted
    given["teacher_indices"][tuple(ignored)] = index[b, t]
    given["teacher_logprobs"][tuple(ignored)] = lp[b, t]
    _call(case, **given)


def test_bad_support_arguments():
    case = logits_case()
    given = _given(case)
    with pytest.raises(ValueError, match="UniSDConfig.topk must be <= the vocabulary size"):
        _call(case, case["teacher_logits"], usd.UniSDConfig(topk=V + 1))
    with pytest.raises(ValueError, match="k <= V=1001"):
        big = torch.arange(V + 1).expand(2, 6, V + 1)
        _call(case, teacher_indices=big, teacher_logprobs=torch.full(big.shape, -10.0))
    with pytest.raises(ValueError, match="teacher_logits or teacher_indices, not both"):
        _call(case, case["teacher_logits"], **given)
    with pytest.raises(ValueError, match="UniSDConfig.topk must be None"):
        _call(case, cfg=usd.UniSDConfig(topk=4), **given)
    with pytest.raises(ValueError, match="teacher_indices needs teacher_logprobs"):
        _call(case, teacher_indices=given["teacher_indices"])
    with pytest.raises(ValueError, match="teacher_logprobs needs teacher_indices"):
        _call(case, case["teacher_logits"], teacher_logprobs=given["teacher_logprobs"])
    with pytest.raises(ValueError, match=r"teacher_logprobs must have shape \(B, T, k\)"):
        _call(case, teacher_indices=given["teacher_indices"],
              teacher_logprobs=given["teacher_logprobs"][..., :-1])
    with pytest.raises(ValueError, match=r"teacher_indices must have shape \(B, T, k\)"):
        _call(case, teacher_indices=given["teacher_indices"][:, :-1],
              teacher_logprobs=given["teacher_logprobs"])
    with pytest.raises(TypeError, match="teacher_indices must be an integer tensor"):
        _call(case, teacher_indices=given["teacher_indices"].float(),
              teacher_logprobs=given["teacher_logprobs"])
    with pytest.raises(ValueError, match="teacher_indices is on meta"):
        _call(case, teacher_indices=given["teacher_indices"].to("meta"),
              teacher_logprobs=given["teacher_logprobs"])
    with pytest.raises(ValueError, match=r"teacher_label_logprobs must have shape \(B, T\)"):
        _call(case, teacher_label_logprobs=torch.zeros(2, 5), **given)
    cfg = usd.UniSDConfig(contrastive_weight=0.1)
    with pytest.raises(ValueError, match="needs teacher_label_logprobs"):
        _call(case, cfg=cfg, negative_logits=case["negative_logits"], **given)
    with pytest.raises(ValueError, match="UniSDConfig.topk must be an int >= 1"):
        usd.UniSDConfig(topk=0)
    with pytest.raises(TypeError, match="UniSDConfig.tail_bucket must be a bool"):
        usd.UniSDConfig(tail_bucket=1)


def test_bad_linear_support_arguments():
    case = make_case(V=V)
    index, lp, _ = given_support(torch.randn(2, 7, V), 8, 0.7)
    base = dict(student_hidden=case["student_hidden"], student_weight=case["student_weight"],
                teacher_hidden=None, teacher_weight=None, labels=case["labels"],
                teacher_indices=index, teacher_logprobs=lp)
    usd.unisd_linear_loss(**base)
    with pytest.raises(ValueError, match="view_hidden needs teacher_weight"):
        usd.unisd_linear_loss(**base, view_hidden=case["view_hidden"],
                              config=usd.UniSDConfig(agreement="token"))
    with pytest.raises(ValueError, match="feature_weight > 0 needs teacher_hidden"):
        usd.unisd_linear_loss(**base, config=usd.UniSDConfig(feature_weight=0.1))
    with pytest.raises(ValueError, match="UniSDConfig.topk must be <= the vocabulary size"):
        usd.unisd_linear_loss(case["student_hidden"], case["student_weight"],
                              case["teacher_hidden"], case["teacher_weight"], case["labels"],
                              config=usd.UniSDConfig(topk=V + 1))


# ---------------------------------------------------------------- importance clip


def _old_logprobs(z, labels, tau):
    """Rollout label log-probs near the student's: ratios on both sides of the clip."""
    lp = torch.log_softmax(z.double() / tau, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    return (lp.squeeze(-1) - 0.8 * torch.randn(labels.shape)).float()


@pytest.mark.parametrize("support", ["dense", "topk", "given"])
def test_importance_clip_on_logits(support):
    case = logits_case()
    cfg = usd.UniSDConfig(importance_clip=1.5, contrastive_weight=0.2, feature_weight=0.1,
                          tail_bucket=True)
    old = _old_logprobs(case["student_logits"], case["labels"], cfg.temperature)
    extra = {"old_logprobs": old}
    if support == "given":
        _, _, lp = given_support(case["teacher_logits"], 1, cfg.temperature)
        y = case["labels"].clamp(min=0)
        extra["teacher_label_logprobs"] = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).float()
    if support == "dense":
        kw = {**options_inputs(case, cfg), **extra}
        got = run(usd.unisd_loss, case["student_logits"], ["student_hidden"],
                  case["teacher_logits"], case["labels"], config=cfg, **kw)
        exp = run(usd.unisd_loss, case["student_logits"].double(), ["student_hidden"],
                  case["teacher_logits"].double(), case["labels"], config=cfg,
                  impl="reference", **as64(kw))
    else:
        got, exp = logits_pair(case, cfg, support, 23, extra=extra, grad_hidden=True)
    assert_close(got, exp)
    unclipped = usd.unisd_loss(case["student_logits"].double(),
                               case["teacher_logits"].double(), case["labels"],
                               config=cfg.replace(importance_clip=None), impl="reference",
                               **as64(options_inputs(case, cfg)))
    if support == "dense":
        assert abs(unclipped.loss.item() - exp[0].loss.item()) > 1e-4


@pytest.mark.parametrize("support", ["dense", "topk", "given"])
def test_importance_clip_on_linear(support):
    case = make_case(V=V)
    cfg = usd.UniSDConfig(importance_clip=2.0, tail_bucket=True)
    z = torch.nn.functional.linear(case["student_hidden"], case["student_weight"],
                                   case["student_bias"])
    old = _old_logprobs(z, case["labels"], cfg.temperature)
    for impl in (TILED, WHOLE_HEAD):
        assert_close(*linear_pair(case, cfg, support, 31, impl=impl, old_logprobs=old))


def test_importance_clip_arguments():
    case = logits_case()
    with pytest.raises(ValueError, match="importance_clip needs old_logprobs"):
        _call(case, case["teacher_logits"], usd.UniSDConfig(importance_clip=2.0))
    with pytest.raises(ValueError, match="old_logprobs needs UniSDConfig.importance_clip"):
        _call(case, case["teacher_logits"], old_logprobs=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(B, T\)"):
        _call(case, case["teacher_logits"], usd.UniSDConfig(importance_clip=2.0),
              old_logprobs=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="UniSDConfig.importance_clip must be > 0"):
        usd.UniSDConfig(importance_clip=0.0)


@pytest.mark.parametrize("kind", ["topk", "given"])
def test_view_mask_on_a_sparse_support(kind):
    """Adaptive agreement: the views scored only where ``view_mask``."""
    case = logits_case()
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=0.7, tail_bucket=True)
    view_mask = torch.rand(case["labels"].shape) < 0.5
    assert_close(*logits_pair(case, cfg, kind, 21, extra={"view_mask": view_mask}))
    lcase = make_case(V=V)
    assert_close(*linear_pair(lcase, cfg, kind, 21, view_mask=torch.rand(2, 7) < 0.5))


def test_linear_second_backward_fails_instead_of_doubling():
    case = make_case(V=V)
    h = case["student_hidden"].clone().requires_grad_()
    out = usd.unisd_linear_loss(h, case["student_weight"], case["teacher_hidden"],
                                case["teacher_weight"], case["labels"],
                                config=usd.UniSDConfig(topk=9))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("kind", ["topk", "given"])
def test_linear_when_every_row_meets_the_head(kind, monkeypatch):
    """CUDA's schedule (every row through the head, ignored ones with zero coefficients),
    run on CPU; the given support's padding rows hold a server's -inf and repeated ids."""
    from unisd_fast.ops import linear_chunks

    monkeypatch.setattr(linear_chunks, "ALL_ROWS_DEVICES", frozenset({"cpu"}))
    case = make_case(V=V)
    case["labels"][1, 2:] = -100
    cfg = usd.UniSDConfig(tail_bucket=True, clip_quantile=0.7)
    assert_close(*linear_pair(case, cfg, kind, 21, impl=WHOLE_HEAD))
