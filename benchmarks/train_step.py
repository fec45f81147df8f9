"""Peak memory of one UniSD* training step, logits path against fused-linear path.

``python -m benchmarks.train_step --shape qwen0.5b --layers 2`` runs each ``--paths`` entry in
its own process (so one path's freed memory never flatters the other) and prints a table.
Each process builds the model from its config with random weights (nothing is downloaded),
a separate EMA teacher, fixed random prompts and completions (no sampling), and times
``--steps`` full optimizer steps of ``unisd_fast.train.step.accumulate`` (teacher, K views,
negative, student forward and backward), clip, AdamW and the EMA update.

Memory: CUDA ``max_memory_allocated`` during the step; CPU the process's peak resident set
during the step (VmHWM reset at the step's start, glibc's mmap threshold pinned at 64 KiB so
freed tensors leave the resident set). ``step_mb`` is the peak minus the memory held when
the step began (weights, optimizer state, EMA teacher).

Shapes: ``tiny`` is the default run's model (llama, hidden 128, 2 layers, character vocab,
full fine-tuning, batch 32, 3 completion tokens); ``qwen0.5b`` is Qwen2.5-0.5B's config
(hidden 896, 24 layers unless ``--layers``, vocab 151936, 14 heads, 2 kv heads, intermediate
4864, tied embeddings) with LoRA r 64, batch 8 and 256 completion tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import time

import torch

SHAPES = {
    "tiny": dict(batch=32, tokens=3, prompt=24, lora_r=0),
    "qwen0.5b": dict(batch=8, tokens=256, prompt=48, lora_r=64),
}


def build_model(shape: str, layers: int | None, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if shape == "tiny":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
            num_hidden_layers=layers or 2, num_attention_heads=4, num_key_value_heads=4,
            tie_word_embeddings=False,
        )
    else:
        config = Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864,
            num_hidden_layers=layers or 24, num_attention_heads=14, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=4096,
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def measure(args) -> dict:
    from unisd_fast.train.config import TrainConfig
    from unisd_fast.train.data import Item
    from unisd_fast.train.distributed import Parallel, clip_grad_norm
    from unisd_fast.train.loop import Context
    from unisd_fast.train.models.load import add_lora
    from unisd_fast.train.models.tiny import build_tokenizer
    from unisd_fast.train.step import StepSetup, accumulate
    from unisd_fast.train.teachers import EMATeacher, Runner, Scorer

    from .measure import SMALL_MMAP, CudaMemory, RssMemory, pin_malloc

    device = torch.device(args.device)
    if device.type == "cpu":
        pin_malloc(SMALL_MMAP)
    spec = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    tokenizer = build_tokenizer()
    model = build_model(args.shape, args.layers, tokenizer).to(device=device, dtype=dtype)
    vocab = model.config.vocab_size
    cfg = TrainConfig(method="unisd_star", lora_r=spec["lora_r"], loss_path=args.loss_path,
                      batch_size=spec["batch"], lora_dropout=0.0)
    ema = EMATeacher(Runner(copy.deepcopy(model)), 0.98, 1)
    student = add_lora(model, cfg) if cfg.lora_r else model
    runner = Runner(student)
    rng = random.Random(0)

    def ids(n):
        return [rng.randrange(4, vocab) for _ in range(n)]

    p = spec["prompt"]
    items = [Item(i, ids(p), ids(2 * p), ids(2 * p), ids(4)) for i in range(spec["batch"])]
    views = [[ids(2 * p) for _ in range(cfg.num_views)] for _ in items]
    completions = [ids(spec["tokens"]) for _ in items]
    ctx = Context(cfg, runner, tokenizer, None, device, tokenizer.pad_token_id,
                  [tokenizer.eos_token_id], None, None)
    setup = StepSetup(
        runner, Scorer(ema.model), cfg.loss_config(), Parallel(), args.loss_path,
        sampler=lambda pos, its: completions,
        views=lambda pos: [views[b][k] for k in range(cfg.num_views) for b in pos],
    )
    params = [q for q in runner.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    memory = CudaMemory(device) if device.type == "cuda" else RssMemory()
    steps = []
    for _ in range(args.steps):
        start = memory.reset()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        record = accumulate(ctx, setup, [(list(range(len(items))), items)])
        clip_grad_norm(params, 1.0)
        optimizer.step()
        ema.update(runner)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak = memory.peak()
        steps.append({"peak_mb": peak / 2**20, "step_mb": (peak - start) / 2**20,
                      "time_s": time.perf_counter() - t0, "loss": record["loss"]})
    return {"shape": args.shape, "layers": model.config.num_hidden_layers,
            "loss_path": args.loss_path, "device": args.device, "dtype": args.dtype,
            "batch": spec["batch"], "tokens": spec["tokens"], "vocab": vocab, "steps": steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (shape's default)")
    ap.add_argument("--paths", default="logits,linear")
    ap.add_argument("--loss-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.loss_path is not None:
        print(json.dumps(measure(args)))
        return 0
    results = []
    for path in args.paths.split(","):
        cmd = [sys.executable, "-m", "benchmarks.train_step", "--loss-path", path,
               "--shape", args.shape, "--steps", str(args.steps), "--device", args.device,
               "--dtype", args.dtype] + (["--layers", str(args.layers)] if args.layers else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first = results[0]
    print(f"UniSD* step, shape {first['shape']} ({first['layers']} layers, vocab {first['vocab']}),"
          f" batch {first['batch']} x {first['tokens']} completion tokens, {first['device']},"
          f" {first['dtype']}; the last of {args.steps} steps")
    print("| loss path | peak MiB | step MiB (peak - start) | step s | loss |")
    print("|---|---|---|---|---|")
    for r in results:
        s = r["steps"][-1]
        print(f"| {r['loss_path']} | {s['peak_mb']:.0f} | {s['step_mb']:.0f} | "
              f"{s['time_s']:.1f} | {s['loss']:.6f} |")
    if len(results) == 2:
        a, b = (r["steps"][-1] for r in results)
        step_ratio = b["step_mb"] / max(a["step_mb"], 1e-9)
        print(f"ratio {results[1]['loss_path']}/{results[0]['loss_path']}: peak "
              f"{b['peak_mb'] / a['peak_mb']:.2f}, step {step_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
