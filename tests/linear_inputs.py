"""Inputs of the fused-linear tests, and the loss they must equal: ``unisd_loss`` on the
materialised logits (float64 reference when upcast)."""

import torch
import torch.nn.functional as F

import unisd_fast as usd

GRAD_SCALE = 1.7
HEAD_KEYS = ("student_weight", "teacher_weight", "student_bias", "teacher_bias")


def make_case(B=2, T=7, H=16, V=1001, K=3, Ht=None, shared=True, bias=True, dtype=torch.float32):
    """Hidden states with a teacher near the student, K views near the teacher, an unrelated
    negative; heads with logits of std about 2; labels with ignored rows. With ``shared`` the
    teacher head is the student head: the same weight (and bias) tensors."""
    Ht = H if Ht is None else Ht
    if shared and Ht != H:
        raise ValueError("a shared head needs Ht == H")
    hs = torch.randn(B, T, H)
    ht = hs + 0.3 * torch.randn(B, T, H) if Ht == H else torch.randn(B, T, Ht)
    ws = torch.randn(V, H) * (2 / H ** 0.5)
    wt = ws if shared else torch.randn(V, Ht) * (2 / Ht ** 0.5)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < 0.25] = -100
    labels[0, 0] = V - 1
    case = {
        "student_hidden": hs, "student_weight": ws, "teacher_hidden": ht, "teacher_weight": wt,
        "labels": labels,
        "student_bias": torch.randn(V) * 0.5 if bias else None,
        "teacher_bias": None,
        "view_hidden": ht.unsqueeze(0) + 0.5 * torch.randn(K, B, T, Ht),
        "negative_hidden": torch.randn(B, T, Ht),
    }
    if bias:
        case["teacher_bias"] = case["student_bias"] if shared else torch.randn(V) * 0.5
    return cast(case, dtype)


def cast(case, dtype, device=None):
    """Floating tensors to ``dtype`` (all tensors to ``device`` if given); a shared head stays
    one tensor."""
    done = {}

    def one(x):
        if not torch.is_tensor(x):
            return x
        if not x.is_floating_point():
            return x if device is None else x.to(device)
        if id(x) not in done:
            done[id(x)] = x.detach().to(dtype=dtype, device=device)
        return done[id(x)]

    return {k: [one(v) for v in x] if isinstance(x, list) else one(x) for k, x in case.items()}


def leaves(case, trainable):
    """Fresh leaves: the student hidden states always require grad, the student head and
    bias when ``trainable``; a shared teacher weight stays the student's tensor."""
    out = dict(case)
    out["student_hidden"] = case["student_hidden"].clone().requires_grad_()
    ws = case["student_weight"].clone().requires_grad_(trainable)
    shared = case["teacher_weight"] is case["student_weight"]
    out["student_weight"] = ws
    out["teacher_weight"] = ws if shared else case["teacher_weight"]
    if case["student_bias"] is not None:
        out["student_bias"] = case["student_bias"].clone().requires_grad_(trainable)
        if case["teacher_bias"] is case["student_bias"]:
            out["teacher_bias"] = out["student_bias"]
    return out


def grads_of(args):
    return tuple(args[k].grad for k in ("student_hidden", "student_weight", "student_bias")
                 if args[k] is not None)


def logit_map(x, softcap=None, scale=None):
    if scale is not None:
        x = x * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


def run_materialised(case, cfg, impl="reference", trainable=True, upcast=True,
                     grad_scale=GRAD_SCALE, logit_softcap=None, logit_scale=None, **kw):
    """``unisd_loss`` on the logits the heads define (float64 when upcast); returns
    (output, grads of student hidden, weight, bias). Views and negative given as log-probs
    in ``kw`` replace the case's hidden states."""
    args = leaves(cast(case, torch.float64) if upcast else case, trainable)

    def head(h, w, b):
        return logit_map(F.linear(h, w, b), logit_softcap, logit_scale)

    z = head(args["student_hidden"], args["student_weight"], args["student_bias"])
    with torch.no_grad():
        w, b = args["teacher_weight"], args["teacher_bias"]
        u = head(args["teacher_hidden"], w, b)
        if "view_logprobs" not in kw:
            kw["view_logits"] = [head(v, w, b) for v in args["view_hidden"]]
        if "negative_logprobs" not in kw:
            kw["negative_logits"] = head(args["negative_hidden"], w, b)
    out = usd.unisd_loss(z, u, args["labels"], student_hidden=args["student_hidden"],
                         teacher_hidden=args["teacher_hidden"], config=cfg, impl=impl, **kw)
    (out.loss * grad_scale).backward()
    return out, grads_of(args)


def scored(case, cfg, logit_softcap=None, logit_scale=None):
    """The case's views and negative as label log-probs (float64), for the ``*_logprobs``
    inputs."""
    c = cast(case, torch.float64)
    labels = c["labels"]
    mask = labels != cfg.ignore_index
    safe = torch.where(mask, labels, 0).unsqueeze(-1)

    def lp(h, tau):
        x = logit_map(F.linear(h, c["teacher_weight"], c["teacher_bias"]), logit_softcap,
                      logit_scale)
        return torch.where(mask, torch.log_softmax(x / tau, -1).gather(-1, safe).squeeze(-1),
                           0.0)

    return {"view_logprobs": torch.stack([lp(v, cfg.view_temperature)
                                          for v in c["view_hidden"]]).float(),
            "negative_logprobs": lp(c["negative_hidden"], cfg.temperature).float()}


def run_linear(case, cfg, impl="torch", trainable=True, grad_scale=GRAD_SCALE, **kw):
    """``unisd_linear_loss`` forward and backward of grad_scale * loss."""
    args = leaves(case, trainable)
    if "view_logprobs" in kw:
        args["view_hidden"] = None
    if "negative_logprobs" in kw:
        args["negative_hidden"] = None
    out = usd.unisd_linear_loss(**args, config=cfg, impl=impl, **kw)
    (out.loss * grad_scale).backward()
    return out, grads_of(args)
