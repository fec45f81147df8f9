"""``VocabShards``: the per-row statistics of a head split by vocabulary rows, combined over
the ranks of its group with one all-gather of 8 floats per row (two collectives for jsd),
so that every rank holds the statistics of the whole vocabulary and none ever holds a row of
it. docs/kernels.md, "Vocabulary-parallel heads", gives the math and why it equals the dense
loss."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..protocol import RowStats
from .jsd import BLOCK_ELEMENTS, jsd_partial_sums
from .layout import ShardLayout

# Labels of rows whose label another rank holds, in shard-local ids.
ELSEWHERE = -1


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """(world, *x.shape): every rank's x, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def log_mean_exp(w: torch.Tensor, x: torch.Tensor):
    """(log E_w[e^x], log E_w[e^(x - E_w x)]) over dim 0, for shard weights w summing to 1:
    the second is the first minus E_w[x], formed without that cancellation (float64 in)."""
    x = torch.where(w > 0, x, 0.0)
    mean = (w * x).sum(0)
    spread = torch.log((w * torch.exp(x - mean)).sum(0))
    return mean + spread, spread


# Per rank r (gathered in float64): local lse^r_S, lse^r_T (of z / tau, u / tau over its
# shard), the local divergence D^r of the shard's own softmaxes, gap^r = lse^r_S - lse^r_T
# (formed without cancellation by the backend) and the label log-probs where the shard
# holds the label.
# Combined in float64, with w_r = exp(lse^r - lse) the mass of shard r under p:
#   lse = log sum_r exp(lse^r);  lse_S - lse_T = log E_{w_T}[e^gap^r];
#   fkl: D = sum_r w_T,r D^r + KL(w_T || w_S),  KL(w_T || w_S) = log E_{w_T}[e^(g - E g)]
#   rkl: D = sum_r w_S,r D^r + KL(w_S || w_T),  with -g under w_S
#   (the chain rule of the KL divergence: within shards, then between the shard masses);
#   lp(y) = lp^r(y) + log w_r on the rank r that holds y.
# jsd does not split so (its mixture weights differ per shard): the shards' terms of KL(p_T
# || M) and KL(p_S || M) under the combined normalisers are summed by an all-reduce
# (``jsd.jsd_partial_sums``).
def combine_rows(parts: torch.Tensor, divergence: str):
    """The combined (lse_S, lse_T, D, lp_S(y), lp_T(y), gap), float64, from the gathered
    (world, 8, ...) stack of each rank's ``RowStats`` and its label-holding flag."""
    lse_s_r, lse_t_r, d_r, _, s_lab, t_lab, gap_r, holds = parts.double().unbind(1)
    lse_s, lse_t = torch.logsumexp(lse_s_r, 0), torch.logsumexp(lse_t_r, 0)
    log_ws, log_wt = lse_s_r - lse_s, lse_t_r - lse_t
    ws, wt = log_ws.exp(), log_wt.exp()
    if divergence == "rkl":
        neg_gap, between = log_mean_exp(ws, -gap_r)
        gap, d = -neg_gap, torch.where(ws > 0, ws * d_r, 0.0).sum(0) + between
    else:
        gap, between = log_mean_exp(wt, gap_r)
        d = torch.where(wt > 0, wt * d_r, 0.0).sum(0) + between
    held = holds > 0
    s_y = torch.where(held, s_lab + log_ws, 0.0).sum(0)
    t_y = torch.where(held, t_lab + log_wt, 0.0).sum(0)
    return lse_s, lse_t, d, s_y, t_y, gap


class VocabShards:
    """This rank's shard of a head split over ``group`` by ``layout``."""

    def __init__(self, group, layout: ShardLayout):
        self.group = group
        self.layout = layout

    def local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Full-vocab label ids as ids of this shard, ``ELSEWHERE`` where another rank (or
        none, for an ignored label) holds the label."""
        mine = (labels >= self.layout.start) & (labels < self.layout.stop)
        return torch.where(mine, labels - self.layout.start, ELSEWHERE)

    def row_stats(self, backend, z, u, labels, *, divergence: str, tau: float,
                  alpha: float) -> RowStats:
        """The backend's ``row_stats`` of the whole vocabulary's rows from this shard's (B, T,
        V_r) logits z, u and (B, T) shard-local labels (every row kept)."""
        holds = labels != ELSEWHERE
        local = backend.row_stats(z, u, labels.clamp(min=0),
                                  divergence="fkl" if divergence == "jsd" else divergence,
                                  tau=tau, alpha=alpha, ignore_index=ELSEWHERE)
        parts = _gather(torch.stack((*(x.double() for x in local), holds.double())),
                        self.group)
        lse_s, lse_t, d, s_y, t_y, gap = combine_rows(parts, divergence)
        aux = torch.zeros_like(d)
        if divergence == "jsd":
            sums = torch.stack([jsd_partial_sums(z[b], u[b], lse_s[b], lse_t[b], gap[b], tau,
                                                 alpha) for b in range(z.shape[0])], 1)
            dist.all_reduce(sums, group=self.group)
            d, aux = (alpha * sums[0] + (1 - alpha) * sums[1]).view_as(d), sums[1].view_as(d)
        # the log-sum-exps in the backend's dtype (float64 from the PyTorch one), the rest
        # float32 as the backend's
        lse = local.lse_s.dtype
        return RowStats(lse_s.to(lse), lse_t.to(lse),
                        *(x.float() for x in (d, aux, s_y, t_y, gap)))

    def score(self, x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
              tau: float) -> torch.Tensor:
        """log softmax(x / tau)[y] over the whole vocabulary from this shard's (B, T, V_r)
        logits and (B, T) shard-local labels, float32, 0 where ``keep`` is False: the
        shard's float64 log-sum-exps and label logits, combined (``label_logprobs``)."""
        lse = torch.empty(x.shape[:2], dtype=torch.float64, device=x.device)
        label = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        at = labels.clamp(min=0).unsqueeze(-1)
        rows = max(1, BLOCK_ELEMENTS // x.shape[-1])
        for b in range(x.shape[0]):
            for t0 in range(0, x.shape[1], rows):
                s = x[b, t0:t0 + rows].float() / tau
                lse[b, t0:t0 + rows] = torch.logsumexp(s.double(), -1)
                label[b, t0:t0 + rows] = s.gather(-1, at[b, t0:t0 + rows]).squeeze(-1)
        lp = self.label_logprobs(lse, label, labels != ELSEWHERE)
        return torch.where(keep, lp, 0.0)

    def label_logprobs(self, lse: torch.Tensor, label: torch.Tensor,
                       holds: torch.Tensor) -> torch.Tensor:
        """log softmax[y] over the whole vocabulary from this shard's float64 log-sum-exps,
        label logits (valid where ``holds``) and flags; NaN where the lse is not finite."""
        parts = _gather(torch.stack((lse, label.double(), holds.double())), self.group)
        total = torch.logsumexp(parts[:, 0], 0)
        value = torch.where(parts[:, 2] > 0, parts[:, 1], 0.0).sum(0)
        return torch.where(total.isfinite(), value - total, float("nan")).float()

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the group, in place."""
        dist.all_reduce(x, group=self.group)
        return x
