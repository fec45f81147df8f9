"""TRL's own tests of ``generalized_jsd_loss`` (tests/test_distillation_trainer.py,
TestGeneralizedJSDLoss and TestGeneralizedJSDLossIsPinned), re-expressed against
``unisd_loss``: beta 0 and 1 are our fkl and rkl, beta in between our jsd_alpha (M = (1 -
beta) p_S + beta p_T); batchmean with labels is our token mean, without labels the sum over
the batch size (num_items_in_batch = B). Each case holds our loss (and logits gradient) to at
most half the case's tolerance against float64: ``round(x, 5) == 0`` is |x| < 5e-6,
``round(x, 6) == 0`` |x| < 5e-7, and ``torch.testing.assert_close`` in float32 is atol 1e-5,
rtol 1.3e-6. Their exact-equality checks (symmetry at beta 0.5) become the same half
tolerance for both orders."""

import math

import pytest
import torch
from peer_checks import loss_and_grad, share_of_tolerance

import unisd_fast as usd

CLOSE = {"atol": 1e-5, "rtol": 1.3e-6}


def config(beta, temperature=1.0):
    divergence = {0.0: "fkl", 1.0: "rkl"}.get(beta, "jsd")
    return usd.UniSDConfig(divergence=divergence, jsd_alpha=0.5 if beta in (0, 1) else beta,
                           temperature=temperature, normalize="token")


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
def test_edge_cases(impl):
    # two classes, student (0.1, 0.9) and teacher (0.9, 0.1): KL is 0.8 log 9 both ways
    student = torch.log(torch.tensor([[[0.1, 0.9]]]))
    teacher = torch.log(torch.tensor([[[0.9, 0.1]]]))
    labels = torch.zeros(1, 1, dtype=torch.long)
    for beta in (0.0, 1.0):
        loss, _ = loss_and_grad(student, teacher, labels, config(beta), impl)
        assert abs(loss.item() - 0.8 * math.log(9)) <= 2.5e-6, (beta, loss.item())


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
def test_identical_and_uniform_inputs_give_zero(impl):
    logits = torch.randn(2, 3, 5)
    labels = torch.zeros(2, 3, dtype=torch.long)
    for z in (logits, torch.ones(1, 1, 5)):
        for beta in (0.0, 0.5, 1.0):
            loss, _ = loss_and_grad(z, z, labels[:z.shape[0], :z.shape[1]], config(beta), impl)
            assert abs(loss.item()) <= 2.5e-7, (beta, loss.item())


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_pinned_values(impl, beta, use_labels, temperature):
    g = torch.Generator().manual_seed(42)
    student = torch.randn(2, 3, 5, generator=g)
    teacher = torch.randn(2, 3, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 3]])
    kw = {}
    if not use_labels:
        labels, kw = torch.zeros(2, 3, dtype=torch.long), {"num_items_in_batch": 2}
    cfg = config(beta, temperature)
    cases = [(student, teacher), (teacher, student)]  # their symmetry case at beta 0.5
    for z, u in cases[:2 if beta == 0.5 else 1]:
        shares = share_of_tolerance(z, u, labels, cfg, impl, **CLOSE, **kw)
        assert max(shares) <= 0.5, shares
