"""Liger-Kernel's own JSD and KL-divergence tests (test/transformers/test_jsd.py and
test_kl_div.py), re-expressed against ``unisd_loss``: their inputs (log-softmax of N(0, 1)
logits for both sides, temperature 1), their reduction (batchmean: our token mean), their
beta (our jsd_alpha: M = beta p_T + (1 - beta) p_S), the swapped-arguments and
not-last-layer (grad_output 2) cases, and their float32 tolerance (atol 1e-8, rtol 1e-6),
of which our loss and gradient use at most half against float64. Their shapes are GPU-sized;
these are smaller, with a vocabulary that is not a power of two."""

import pytest
import torch
from peer_checks import share_of_tolerance

import unisd_fast as usd

ATOL, RTOL = 1e-8, 1e-6
SHAPES = [(2, 8, 4099), (3, 5, 1271)]


def inputs(B, T, V, seed=42):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g).log_softmax(-1)
    teacher = torch.randn(B, T, V, generator=g).log_softmax(-1)
    return student, teacher, torch.zeros(B, T, dtype=torch.long)


def config(divergence, beta=0.5):
    return usd.UniSDConfig(divergence=divergence, jsd_alpha=beta, temperature=1.0,
                           normalize="token")


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_with_beta(impl, shape, beta):
    student, teacher, labels = inputs(*shape)
    cases = [(student, teacher, 1.0), (student, teacher, 2.0)]
    if beta == 0.5:  # their symmetry case: the arguments swapped
        cases.append((teacher, student, 1.0))
    for z, u, scale in cases:
        shares = share_of_tolerance(z, u, labels, config("jsd", beta), impl, ATOL, RTOL, scale)
        assert max(shares) <= 0.5, shares


@pytest.mark.parametrize("impl", ["torch", "torch-stream"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_div(impl, shape):
    # their target is softmax(N(0, 1)), a teacher whose logits are its log-probabilities
    student, teacher, labels = inputs(*shape)
    shares = share_of_tolerance(student, teacher, labels, config("fkl"), impl, ATOL, RTOL)
    assert max(shares) <= 0.5, shares
