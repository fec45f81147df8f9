"""Inputs of the sparse-support tests and the comparison against the float64 reference."""

import torch

import unisd_fast as usd

GRAD_SCALE = 1.7


def given_support(teacher_logits, k, tau, perturb=True):
    """A teacher server's answer: the teacher's top-k indices (shuffled within each row) and
    its log-probs there at temperature tau, and its label-independent full log-probs."""
    lp = torch.log_softmax(teacher_logits.double() / tau, dim=-1)
    index = lp.topk(k, dim=-1).indices
    if perturb:
        index = index.gather(-1, torch.rand(index.shape).argsort(-1))
    return index, lp.gather(-1, index).float(), lp


def options_inputs(case, cfg):
    """The optional inputs a config needs, from a case of ``loss_inputs.make_inputs``."""
    kw = {}
    if cfg.needs_views:
        kw["view_logits"] = case["view_logits"]
    if cfg.needs_negative:
        kw["negative_logits"] = case["negative_logits"]
    if cfg.needs_hidden:
        kw["student_hidden"] = case["student_hidden"]
        kw["teacher_hidden"] = case["teacher_hidden"]
    return kw


def as64(kw):
    def one(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.double()
        if isinstance(x, list):
            return [one(v) for v in x]
        return x
    return {k: one(v) for k, v in kw.items()}


def run(fn, z, differentiable, *args, **kw):
    """(output, gradients) of GRAD_SCALE * loss wrt the tensors ``differentiable`` (names
    of kw, besides ``z`` the first positional)."""
    leaf = z.detach().clone().requires_grad_()
    kw = dict(kw)
    leaves = [leaf]
    for name in differentiable:
        kw[name] = kw[name].detach().clone().requires_grad_()
        leaves.append(kw[name])
    out = fn(leaf, *args, **kw)
    (GRAD_SCALE * out.loss).backward()
    return out, [t.grad for t in leaves]


def rel_errors(got, exp):
    """(relative error of the loss, largest relative error of the gradients, each relative
    to its largest magnitude)."""
    (out, grads), (ref, ref_grads) = got, exp
    loss = abs(out.loss.double().item() - ref.loss.item()) / max(abs(ref.loss.item()), 1e-12)
    worst = 0.0
    for g, e in zip(grads, ref_grads, strict=True):
        worst = max(worst, ((g.double() - e).abs().max() / e.abs().max().clamp(min=1e-12))
                    .item())
    return loss, worst


def assert_close(got, exp, loss_tol=2e-6, grad_tol=2e-5):
    (out, _), (ref, _) = got, exp
    for name in ("loss", "kd", "contrastive", "feature", "token_divergence", "token_weight"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name).double(),
                                   atol=loss_tol, rtol=loss_tol * 10,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(out.clipped, ref.clipped)
    loss_err, grad_err = rel_errors(got, exp)
    assert loss_err <= loss_tol * 10 and grad_err <= grad_tol, (loss_err, grad_err)


def config(**fields):
    return usd.UniSDConfig(**fields)
