"""Every fused implementation against the float64 reference (docs/losses.md).

On CPU "triton" runs in Triton's interpreter and "torch" eagerly (conftest); on CUDA the same
tests run the compiled kernels. "torch-stream" is impl="torch" with its small-input path off
(``small_elements=0``): every test shape is small, so "torch" alone would only run that path.
"""

import pytest
import torch
from loss_inputs import GRAD_SCALE, make_inputs, resolve_impl, run_loss, with_settings

import unisd_fast as usd
from unisd_fast.backends.pytorch import TorchBackend
from unisd_fast.backends.triton import TritonBackend
from unisd_fast.backends.triton.grad import column_chunks

F64 = torch.float64
IMPLS = ["torch", "torch-stream", "triton"]
VOCABS = [7, 257, 1000, 4099]
OPTIONS = [
    {},
    {"divergence": "rkl"},
    {"divergence": "jsd", "jsd_alpha": 0.3},
    {"clip": 0.02},
    {"clip_quantile": 0.6},
    {"agreement": "token", "agreement_gamma": 0.5},
    {"agreement": "token", "agreement_stat": "range", "agreement_quantile": 0.5},
    {"agreement": "sequence", "agreement_gamma": 2.0},
    {"contrastive_weight": 0.5, "contrastive_margin": 0.3},
    {"feature_weight": 0.5},
    {"kd_weight": 0.0, "feature_weight": 1.0},
    {"normalize": "token"},
    {"normalize": "token", "num_items_in_batch": 7},
    "unisd_star",
    "gkd",
]


@pytest.fixture(params=IMPLS)
def impl(request):
    return resolve_impl(request.param)


def option_id(o):
    return o if isinstance(o, str) else ",".join(f"{k}={v}" for k, v in o.items()) or "sd"


def config_and_kwargs(option):
    if isinstance(option, str):
        return usd.UniSDConfig.preset(option), {}
    option = dict(option)
    kw = {"num_items_in_batch": option.pop("num_items_in_batch")} \
        if "num_items_in_batch" in option else {}
    return usd.UniSDConfig(**option), kw


def assert_close_to_reference(inputs, cfg, impl, atol=2e-6, rtol=2e-5, **kw):
    exp, exp_grads = run_loss(inputs, cfg, "reference", upcast=True, **kw)
    got, grads = run_loss(inputs, cfg, impl, **kw)
    for name in ("loss", "kd", "contrastive", "feature", "token_divergence", "token_weight"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(exp, name),
                                   atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(got.clipped, exp.clipped)
    assert grads[0].dtype == inputs["student_logits"].dtype
    for g, e in zip(grads, exp_grads, strict=True):
        if e is None:
            assert g is None or g.abs().max().item() == 0.0
        else:
            torch.testing.assert_close(g.double(), e, atol=atol, rtol=rtol)
    return got


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_matches_reference(impl, vocab, option, device):
    cfg, kw = config_and_kwargs(option)
    inputs = make_inputs(B=3, T=5, V=vocab, device=device)
    assert_close_to_reference(inputs, cfg, impl, **kw)


def test_small_tiles_cover_many_partial_blocks(impl, device):
    impl = with_settings(impl, torch={"chunk_elements_eager": 3000}, triton={"max_block": 256})
    for option in ("unisd_star", {"divergence": "jsd"}, {"divergence": "rkl"}):
        cfg, kw = config_and_kwargs(option)
        assert_close_to_reference(make_inputs(B=2, T=4, V=1000, device=device), cfg, impl)


@pytest.mark.parametrize("target", [1, 10_000])
def test_gradient_grid_whole_rows_or_vocabulary_chunks(target, device):
    # target 1: one program per row (a 1-D grid); 10000: rows split into vocabulary chunks
    assert column_chunks(8, 1000, 256, target) == (1024 if target == 1 else 256)
    backend = TritonBackend(max_block=256, target_programs=target)
    for option in ("unisd_star", {"divergence": "jsd"}, {"divergence": "rkl"}):
        cfg, kw = config_and_kwargs(option)
        assert_close_to_reference(make_inputs(B=2, T=4, V=1000, device=device), cfg, backend)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("one_call", [True, False], ids=["views_in_one_call", "call_per_view"])
def test_views_as_list_tensor_or_logprobs(impl, K, one_call, device):
    if not one_call:
        impl = with_settings(impl, torch={"stack_elements": 0}, triton={"stack_elements": 0})
    cfg = usd.UniSDConfig(agreement="token", agreement_gamma=1.0)
    inputs = make_inputs(B=2, T=4, V=300, K=K, device=device)
    stacked = assert_close_to_reference(inputs, cfg, impl)
    listed = assert_close_to_reference({**inputs, "view_logits": list(inputs["view_logits"])},
                                       cfg, impl)
    assert torch.equal(stacked.token_weight, listed.token_weight)
    mask = inputs["labels"] != -100
    lps = torch.stack([usd.reference.label_logprob(v.double(), inputs["labels"], mask, 1.0)
                       for v in inputs["view_logits"]])
    from_lp = {**inputs, "view_logits": None, "view_logprobs": lps.float()}
    assert_close_to_reference(from_lp, cfg, impl)


def test_negative_as_logprobs(impl, device):
    cfg = usd.UniSDConfig(contrastive_weight=1.0, contrastive_margin=0.2)
    inputs = make_inputs(B=2, T=4, V=300, device=device)
    mask = inputs["labels"] != -100
    lp = usd.reference.label_logprob(inputs["negative_logits"].double(), inputs["labels"], mask,
                                     cfg.temperature)
    assert_close_to_reference({**inputs, "negative_logits": None,
                               "negative_logprobs": lp.float()}, cfg, impl)


def test_all_ignored_and_non_finite_ignored_rows(impl, device):
    cfg = usd.UniSDConfig.preset("unisd_star", clip_quantile=0.5)
    inputs = make_inputs(B=2, T=4, V=300, device=device)
    inputs["labels"][:] = -100
    for key in ("student_logits", "teacher_logits", "negative_logits"):
        inputs[key][0, 1] = float("nan")
        inputs[key][1, 2, 5] = float("inf")
    out, (gz, gh) = run_loss(inputs, cfg, impl)
    assert out.loss.item() == 0.0
    assert gz.abs().max().item() == 0.0 and gh.abs().max().item() == 0.0
    inputs["labels"][0, 0] = 3  # one live token, non-finite values elsewhere only
    out, (gz, gh) = run_loss(inputs, cfg, impl)
    assert torch.isfinite(out.loss) and torch.isfinite(gz).all() and torch.isfinite(gh).all()
    assert gz[0, 0].abs().max().item() > 0.0
    assert_close_to_reference(inputs, cfg, impl)


def test_non_contiguous_inputs(impl, device):
    cfg = usd.UniSDConfig.preset("unisd_star")
    base = make_inputs(B=2, T=6, V=301, H=8, device=device)
    strided = {}
    for key, value in base.items():
        if key == "view_logits":
            strided[key] = [torch.cat([v, v[:, :1]], 1)[:, :-1] for v in value]
        elif key in ("student_logits", "teacher_logits", "negative_logits"):
            # a slice of a longer sequence (non-uniform row stride) and a strided vocab
            padded = torch.cat([value, value[:, :1]], 1)[:, :-1]
            strided[key] = padded if key != "negative_logits" else \
                torch.repeat_interleave(value, 2, dim=-1)[..., ::2]
        elif key == "labels":
            strided[key] = value.t().contiguous().t()
        elif key in ("student_hidden", "teacher_hidden"):
            strided[key] = value.transpose(0, 1).contiguous().transpose(0, 1)
        else:
            strided[key] = value
    assert not strided["student_logits"].is_contiguous()
    assert strided["negative_logits"].stride(-1) == 2
    assert_close_to_reference(strided, cfg, impl)


def test_inplace_backward_writes_the_gradient_into_the_logits(impl, device):
    # logits = h W^T as from an lm_head: the in-place gradient lands in the logits buffer and
    # flows on to h and W exactly as the out-of-place one does.
    cfg = usd.UniSDConfig.preset("unisd_star")
    inputs = make_inputs(B=2, T=4, V=300, device=device)
    kw = {k: v for k, v in inputs.items() if k != "student_logits"}
    h0 = torch.randn(2, 4, 12, device=device)
    w0 = torch.randn(300, 12, device=device) / 4
    results = []
    for inplace in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        logits = h @ w.t()
        logits.retain_grad()
        out = usd.unisd_loss(logits, config=cfg, impl=impl, inplace_backward=inplace, **kw)
        (out.loss * GRAD_SCALE).backward()
        results.append((h.grad, w.grad, logits.grad, logits.detach()))
    (h_ref, w_ref, dlogits, _), (h_in, w_in, _, buffer) = results
    torch.testing.assert_close(h_in, h_ref)
    torch.testing.assert_close(w_in, w_ref)
    torch.testing.assert_close(buffer, dlogits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_eager_error(impl, dtype, device):
    cfg = usd.UniSDConfig.preset("unisd_star")
    inputs = make_inputs(B=2, T=6, V=1000, device=device, dtype=dtype)
    truth, truth_grads = run_loss(inputs, cfg, "reference", upcast=True)
    eager, eager_grads = run_loss(inputs, cfg, "reference")
    got, grads = run_loss(inputs, cfg, impl)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert abs(got.loss.double() - truth.loss).item() <= \
        2 * abs(eager.loss.double() - truth.loss).item() + 1e-6
    for g, e, t in zip(grads, eager_grads, truth_grads, strict=True):
        eager_err = (e.double() - t).abs().max().item()
        assert (g.double() - t).abs().max().item() <= 2 * eager_err + 1e-7


def test_self_distillation_regime_bf16_gradient_relative_error(impl, device):
    cfg = usd.UniSDConfig.preset("unisd_star")
    inputs = make_inputs(B=2, T=8, V=4099, device=device, dtype=torch.bfloat16, noise=0.05)
    _, (truth, _) = run_loss(inputs, cfg, "reference", upcast=True)
    _, (got, _) = run_loss(inputs, cfg, impl)
    rel = ((got.double() - truth).norm() / truth.norm()).item()
    print(f"bf16 self-distillation gradient relative error ({impl}): {rel:.2e}")
    assert rel < 1e-2


def test_chunked_rows_cover_every_row_once():
    ranges = TorchBackend(compile=False).row_ranges(1000, 301)
    covered = torch.zeros(1000, dtype=torch.int64)
    for r0, r1 in ranges:
        covered[r0:r1] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def test_compiler_failure_at_run_time_falls_back_to_eager():
    def broken(graph, example_inputs):
        raise RuntimeError("no C++ compiler")

    backend = TorchBackend(compile=True, compiler=broken, compile_min_elements=0)
    cfg = usd.UniSDConfig.preset("unisd_star")
    with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
        assert_close_to_reference(make_inputs(B=2, T=4, V=300), cfg, backend)
    assert not backend.is_compiled
