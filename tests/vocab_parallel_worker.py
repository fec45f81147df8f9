"""Run under torchrun (gloo, CPU): every case of a list, each rank on its vocabulary shard of
the heads (or, for the ``logits`` cases, of the logits), against the single-process
``unisd_linear_loss`` on the gathered head (``unisd_loss`` on the gathered logits) and the
float64 reference. Writes {case: {"dense": max rel error, "reference": max rel error}} (the
max over ranks and over the loss, the (B, T) outputs, d hidden, d weight and d bias, or d
logits) to argv[1] on rank 0. Cases: argv[2:] (names of ``CASES``), every case without
them."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from unisd_fast import UniSDConfig, unisd_linear_loss, unisd_loss
from unisd_fast.vocab_parallel import VocabParallel

B, T, H = 2, 5, 16
ROWS_PER_CHUNK = 3
BASE = dict(temperature=0.7)
CASES = {
    "fkl": dict(cfg=dict(divergence="fkl")),
    "rkl": dict(cfg=dict(divergence="rkl")),
    "jsd": dict(cfg=dict(divergence="jsd", jsd_alpha=0.3)),
    "fkl-near": dict(cfg=dict(divergence="fkl"), near=True),
    "rkl-near": dict(cfg=dict(divergence="rkl"), near=True),
    "jsd-near": dict(cfg=dict(divergence="jsd"), near=True),
    "clip": dict(cfg=dict(divergence="fkl", clip=0.05)),
    "clip-quantile": dict(cfg=dict(divergence="rkl", clip_quantile=0.6)),
    "agreement-token": dict(cfg=dict(divergence="jsd", agreement="token"), views=3),
    "agreement-sequence": dict(cfg=dict(agreement="sequence", agreement_stat="range"),
                               views=2),
    "contrastive": dict(cfg=dict(divergence="fkl", contrastive_weight=0.7,
                                 contrastive_margin=2.0), negative=True),
    "contrastive-jsd": dict(cfg=dict(divergence="jsd", contrastive_weight=0.5,
                                     contrastive_margin=3.0), negative=True),
    "feature": dict(cfg=dict(feature_weight=0.3, kd_weight=0.5)),
    "token-items": dict(cfg=dict(normalize="token"), num_items=7.0),
    "token-items-tensor": dict(cfg=dict(normalize="token", divergence="rkl"),
                               num_items=torch.tensor(9.0)),
    "softcap-scale-bias": dict(cfg=dict(divergence="jsd"), softcap=3.0, scale=1.7,
                               bias=True),
    "shared-head": dict(cfg=dict(divergence="fkl"), shared=True, bias=True),
    "grad-out": dict(cfg=dict(divergence="rkl", temperature=1.3), grad_out=-2.5),
    "non-contiguous": dict(cfg=dict(divergence="fkl"), strided=True),
    "all-ignored": dict(cfg=dict(divergence="jsd"), ignored="all"),
    "ignore-index-0": dict(cfg=dict(divergence="fkl", ignore_index=0)),
    "bf16-fkl": dict(cfg=dict(divergence="fkl"), dtype=torch.bfloat16),
    "bf16-jsd-everything": dict(cfg=dict(divergence="jsd", agreement="token",
                                         contrastive_weight=0.5, feature_weight=0.2),
                                views=2, negative=True, dtype=torch.bfloat16, bias=True),
    "triton-jsd": dict(cfg=dict(divergence="jsd", contrastive_weight=0.5), negative=True,
                       impl="triton"),
    "triton-fkl-views": dict(cfg=dict(divergence="fkl", agreement="token"), views=2,
                             impl="triton"),
    "dtensor-fkl": dict(cfg=dict(divergence="fkl"), dtensor=True, bias=True),
    "logits-fkl": dict(cfg=dict(divergence="fkl", clip_quantile=0.5), logits=True),
    "logits-rkl-near": dict(cfg=dict(divergence="rkl"), logits=True, near=True),
    "logits-jsd-everything": dict(cfg=dict(divergence="jsd", agreement="token",
                                           contrastive_weight=0.5, feature_weight=0.2),
                                  views=2, negative=True, logits=True, grad_out=1.7),
    "logits-bf16-sequence": dict(cfg=dict(agreement="sequence", normalize="token"), views=2,
                                 num_items=6.0, logits=True, dtype=torch.bfloat16),
    "logits-all-ignored": dict(cfg=dict(divergence="jsd", agreement="token"), views=2,
                               logits=True, ignored="all"),
    "logits-triton-jsd": dict(cfg=dict(divergence="jsd", contrastive_weight=0.5),
                              negative=True, logits=True, impl="triton"),
}


def uneven_sizes(V: int, world: int) -> list[int]:
    """Shard sizes that differ: rank r gets about V / world, the first ones one row more."""
    return [V // world + (r < V % world) for r in range(world)]


def make_inputs(case: dict, V: int, generator: torch.Generator):
    """The same full-head inputs on every rank (one seeded generator)."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    ws = randn(V, H, scale=0.5)
    wt = ws + randn(V, H, scale=1e-3 if case.get("near") else 0.3)
    hs = randn(B, T, H)
    ht = hs + randn(B, T, H, scale=1e-3 if case.get("near") else 0.2)
    labels = torch.randint(0, V, (B, T), generator=generator)
    cfg = UniSDConfig(**{**BASE, **case["cfg"]})
    if case.get("ignored") == "all":
        labels[:] = cfg.ignore_index
    else:
        labels[0, 1] = labels[1, 3] = labels[1, 4] = cfg.ignore_index
        labels[0, 0] = V - 1
        labels[1, 0] = 0 if cfg.ignore_index != 0 else 1
    inputs = dict(hs=hs, ws=ws, ht=ht, wt=wt, labels=labels, cfg=cfg,
                  bs=randn(V, scale=0.3) if case.get("bias") else None,
                  bt=randn(V, scale=0.3) if case.get("bias") else None)
    if case.get("views"):
        inputs["views"] = ht + randn(case["views"], B, T, H, scale=0.3)
    if case.get("negative"):
        inputs["negative"] = randn(B, T, H)
    return inputs


def loss_and_grads(inputs, case, dtype, rows: slice, vocab_parallel, impl):
    """The loss outputs and the gradients of the rows ``rows`` of the head (all rows, with
    vocab_parallel None): hidden states cast to ``dtype`` on every rank alike."""
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    hs = cast(inputs["hs"])
    if case.get("strided"):
        hs = cast(torch.cat([inputs["hs"], inputs["hs"]], -1))[..., ::2]
    hs = hs.detach().requires_grad_()
    ws = cast(inputs["ws"][rows]).requires_grad_()
    bs = None if inputs["bs"] is None else cast(inputs["bs"][rows]).requires_grad_()
    if case.get("shared"):
        wt, bt = ws, bs
    else:
        wt = cast(inputs["wt"][rows])
        bt = None if inputs["bt"] is None else cast(inputs["bt"][rows])
    heads = (ws, wt, bs, bt)
    if case.get("dtensor") and vocab_parallel is not None:
        from torch.distributed.tensor import DTensor, Shard, init_device_mesh
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        heads = tuple(None if x is None else DTensor.from_local(
            x, mesh, (Shard(0),), shape=(inputs["ws"].shape[0], *x.shape[1:]),
            stride=(1,) if x.dim() == 1 else (x.shape[1], 1)) for x in heads)
        vocab_parallel = None
    ws_in, wt_in, bs_in, bt_in = heads
    if case.get("shared"):
        wt_in, bt_in = ws_in, bs_in
    out = unisd_linear_loss(
        hs, ws_in, cast(inputs["ht"]), wt_in, inputs["labels"], student_bias=bs_in,
        teacher_bias=bt_in, view_hidden=cast(inputs.get("views")),
        negative_hidden=cast(inputs.get("negative")), logit_softcap=case.get("softcap"),
        logit_scale=case.get("scale"), config=inputs["cfg"],
        num_items_in_batch=case.get("num_items"), impl=impl,
        chunk_bytes=ROWS_PER_CHUNK * 2 * max(1, ws.shape[0]) * ws.element_size(),
        vocab_parallel=vocab_parallel)
    (out.loss * case.get("grad_out", 1.0)).backward()
    values = [out.loss, out.kd, out.contrastive, out.feature, out.token_divergence,
              out.token_weight, hs.grad]
    values += [ws.grad] + ([] if bs is None else [bs.grad])  # through from_local, if so
    return [v.detach().double() for v in values]


def logits_loss_and_grads(inputs, case, dtype, rows: slice, vocab_parallel, impl):
    """``loss_and_grads`` of the logits form: the logits of the gathered heads (float64,
    then cast to ``dtype``), the columns ``rows`` of each, and d logits of those."""
    def logits(h, w, b=None):
        x = h @ w.t()
        return (x if b is None else x + b)[..., rows].to(dtype)

    z = logits(inputs["hs"], inputs["ws"]).requires_grad_()
    cfg = inputs["cfg"]
    views, negative = inputs.get("views"), inputs.get("negative")
    hs, ht = inputs["hs"].to(dtype).requires_grad_(), inputs["ht"].to(dtype)
    feature = cfg.feature_weight > 0
    out = unisd_loss(
        z, logits(inputs["ht"], inputs["wt"]), inputs["labels"],
        view_logits=None if views is None else logits(views, inputs["wt"]),
        negative_logits=None if negative is None else logits(negative, inputs["wt"]),
        student_hidden=hs if feature else None, teacher_hidden=ht if feature else None,
        config=cfg, num_items_in_batch=case.get("num_items"), impl=impl,
        vocab_parallel=vocab_parallel)
    (out.loss * case.get("grad_out", 1.0)).backward()
    values = [out.loss, out.kd, out.contrastive, out.feature, out.token_divergence,
              out.token_weight, hs.grad if feature else hs.new_zeros(0), z.grad]
    return [v.detach().double() for v in values]


def rel_error(a: list, b: list) -> float:
    """The largest max|a - b| / max|b| over the tensors (the error of a against b)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        scale = y.abs().max().item() if y.numel() else 0.0
        diff = (x - y).abs().max().item() if y.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def run_case(name: str, case: dict, V: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = uneven_sizes(V, world)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    inputs = make_inputs(case, V, torch.Generator().manual_seed(1234))
    dtype, impl = case.get("dtype", torch.float32), case.get("impl", "torch")
    split = VocabParallel(dist.group.WORLD, vocab_size=V)
    run = logits_loss_and_grads if case.get("logits") else loss_and_grads
    mine = run(inputs, case, dtype, rows, split, impl)
    dense = run(inputs, case, dtype, slice(None), None, impl)
    rounded = {k: v.to(dtype).double() if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in inputs.items()}
    exact = run(rounded, case, torch.float64, slice(None), None, "reference")

    def of_shard(values):  # the gradients' rows (columns of the logits) of this rank
        if case.get("logits"):
            return values[:7] + [values[7][..., rows]]
        return values[:7] + [v[rows] for v in values[7:]]

    errors = torch.tensor([rel_error(mine, of_shard(dense)),
                           rel_error(mine, of_shard(exact)),
                           rel_error(of_shard(dense), of_shard(exact))], dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return dict(zip(("dense", "reference", "dense_vs_reference"), errors.tolist(),
                    strict=True))


def mismatch_raises() -> bool:
    """Whether every rank gets the ValueError when rank 0 ignores one more label than the
    others (the ranks would otherwise cut different chunks and their collectives hang)."""
    V, rank = 20, dist.get_rank()
    sizes = uneven_sizes(V, dist.get_world_size())
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    h = torch.randn(1, 4, H, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, 2, 3, -100 if rank == 0 else 4]])
    raised = 0.0
    try:
        unisd_linear_loss(h, w[rows], h, w[rows], labels, impl="torch",
                          vocab_parallel=dist.group.WORLD)
    except ValueError as e:
        raised = float("the same hidden states and labels" in str(e))
    flag = torch.tensor([raised])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out_path, names = sys.argv[1], sys.argv[2:] or list(CASES)
    V = int(os.environ.get("VOCAB", "37"))
    results = {name: run_case(name, CASES[name], V) for name in names}
    results["_checks"] = {"mismatched labels raise": mismatch_raises()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown, where a C++ thread still joinable at exit
    # aborted a finished rank now and then ("terminate called without an active exception",
    # 2 of 7 launches on the loaded 2-core machine), as in tests/train/test_distributed.py.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
