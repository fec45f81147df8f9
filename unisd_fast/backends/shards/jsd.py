"""The jsd sums of one vocabulary shard under the normalisers of the whole vocabulary."""

from __future__ import annotations

import torch

from ..stable import log1p_minus_w

BLOCK_ELEMENTS = 1 << 20


# With the combined log-sum-exps, r = lp_T - lp_S = (u - z) / tau + (lse_S - lse_T) per
# column and M = a p_T + (1 - a) p_S. Since sum (M - p) = 0 over the whole vocabulary,
#   KL(p_T || M) = sum p_T (M / p_T - 1 - log(M / p_T)) = -sum p_T log1p_minus_w(w_T),
#   KL(p_S || M) = -sum p_S log1p_minus_w(w_S),
# with w_T = M / p_T - 1 = (1 - a) expm1(-r) and w_S = M / p_S - 1 = a expm1(r). Every
# column's term is >= 0, so the shards' partial sums add up without cancellation (D = a
# KL(p_T || M) + (1 - a) KL(p_S || M) of the dense jsd). Columns with p = 0 add nothing.
# Returns the float64 (2, rows) partial sums (KL(p_T || M), KL(p_S || M)) of this shard.
def jsd_partial_sums(z, u, lse_s, lse_t, gap, tau: float, alpha: float) -> torch.Tensor:
    n, V = z.shape
    out = torch.empty((2, n), dtype=torch.float64, device=z.device)
    rows = max(1, BLOCK_ELEMENTS // V)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        zf, uf = z[r0:r1].float(), u[r0:r1].float()
        p_s = torch.exp(zf / tau - lse_s[r0:r1, None])
        p_t = torch.exp(uf / tau - lse_t[r0:r1, None])
        r = (uf - zf) / tau + gap[r0:r1, None]  # the difference first, as the dense pass
        term_t = -p_t * log1p_minus_w((1 - alpha) * torch.expm1(-r))
        term_s = -p_s * log1p_minus_w(alpha * torch.expm1(r))
        out[0, r0:r1] = torch.where(p_t > 0, term_t, 0.0).sum(-1, dtype=torch.float64)
        out[1, r0:r1] = torch.where(p_s > 0, term_s, 0.0).sum(-1, dtype=torch.float64)
    return out
