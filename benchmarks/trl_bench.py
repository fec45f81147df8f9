"""SDFTTrainer (full_logits) against UniSDSDFTTrainer, side by side (docs/trl.md).

    PYTHONPATH=. python -m benchmarks.trl_bench                       # tiny model, CPU
    PYTHONPATH=. python -m benchmarks.trl_bench --shape qwen2.5-0.5b --layers 2

Each variant trains in its own subprocess on the same model, data, seed and steps. Per
variant: median seconds per optimizer step, of which the rollout (generation and teacher
prompt building), and the largest peak memory of a timed step above the step's start (see
PeakMemory; the optimizer state exists by then, so this is activations, logits and
gradients).
Variants: ``sdft`` = SDFTTrainer full_logits; ``unisd_logits`` / ``unisd_linear`` = the
subclass with every UniSD mechanism off (the same objective: forward KL via
distillation_alpha=0) on its logits / fused-linear path; ``unisd_star`` = the subclass with
the UniSD* preset (three views, negative, features: more teacher forwards), path "auto".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# "tiny": unisd_fast.train.models.tiny (qwen2 style, hidden 64, vocab of the character
# tokenizer); "qwen2.5-0.5b": hidden, intermediate, heads, kv heads, vocab, layers, tied.
SHAPES = {
    "tiny": (64, None, 4, 4, None, 2, False),
    "qwen2.5-0.5b": (896, 4864, 14, 2, 151936, 24, True),
}
VARIANTS = ("sdft", "unisd_logits", "unisd_linear", "unisd_star")


def build_model(folder: str, shape: str, layers: int | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from unisd_fast.train.models.tiny import build_tiny_model, build_tokenizer

    hidden, inter, heads, kv, vocab, depth, tied = SHAPES[shape]
    tokenizer = build_tokenizer()
    if shape == "tiny":
        model = build_tiny_model(tokenizer, "qwen2", hidden, layers or depth, heads)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return
    config = Qwen2Config(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers or depth,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class PeakMemory:
    """Peak memory of one training step above its start, in MiB: on CUDA from the caching
    allocator's statistics; on CPU the peak resident set, sampled every 0.2 ms by a thread
    (the worker runs with MALLOC_MMAP_THRESHOLD_ fixed, so freed large tensors leave the
    resident set at once)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.running = False

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0002)

    def start(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def stop(self) -> float:
        if self.cuda:
            import torch

            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        self.running = False
        self.thread.join()
        return (max(self.peak, self.rss()) - self.base) / 2**20


def run_variant(opts) -> dict:
    import torch
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from examples.facts_dataset import (
        TEACHER_PROMPT_TEMPLATE,
        facts_dataset,
        tiny_tokenizer,
    )
    from unisd_fast.integrations.trl import UniSDSDFTConfig, UniSDSDFTTrainer

    cuda = opts.device == "cuda"
    common = dict(
        output_dir=opts.tmp,
        max_steps=opts.warmup + opts.steps,
        per_device_train_batch_size=opts.batch,
        num_generations=opts.generations,
        max_completion_length=opts.completion,
        generation_kwargs={"min_new_tokens": opts.completion},
        teacher_prompt_template=TEACHER_PROMPT_TEMPLATE,
        teacher_model_kind="base",
        temperature=0.7,
        distillation_alpha=0.0,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        use_cpu=not cuda,
        bf16=cuda,
        seed=0,
    )
    if opts.variant == "sdft":
        args = SDFTConfig(**common, distillation_mode="full_logits", distillation_is_clip=None)
        trainer_cls = SDFTTrainer
    else:
        unisd = {
            "unisd_logits": {"unisd_loss_path": "logits"},
            "unisd_linear": {"unisd_loss_path": "linear"},
            "unisd_star": {"unisd_preset": "unisd_star", "unisd_num_views": 3},
        }[opts.variant]
        args = UniSDSDFTConfig(**common, distillation_mode="full_logits", **unisd)
        trainer_cls = UniSDSDFTTrainer
    data = facts_dataset(seed=0)
    trainer = trainer_cls(
        opts.model, args, train_dataset=data, processing_class=tiny_tokenizer(opts.model)
    )
    rollout, steps, peaks = [], [], []
    prepare = trainer._prepare_inputs

    def timed_prepare(batch):
        start = time.perf_counter()
        out = prepare(batch)
        rollout[-1] += time.perf_counter() - start
        return out

    trainer._prepare_inputs = timed_prepare
    memory = PeakMemory(cuda)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            memory.start()
            rollout.append(0.0)
            steps.append(-time.perf_counter())

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            steps[-1] += time.perf_counter()
            peaks.append(memory.stop())

    trainer.add_callback(Clock())
    trainer.train()
    timed = slice(opts.warmup, None)
    step = statistics.median(steps[timed])
    return {
        "variant": opts.variant,
        "step_s": step,
        "rollout_s": statistics.median(rollout[timed]),
        "peak_mib": max(peaks[timed]),
        "loss_path": getattr(trainer, "unisd_path", "-"),
    }


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.trl_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="per-device batch (completions)")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--completion", type=int, default=16, help="completion tokens (fixed)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per variant, interleaved; the fastest run of each is kept")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    opts = parse(argv)
    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, opts.shape, opts.layers)
        runs = {}
        for _, variant in itertools.product(range(opts.repeats), opts.variants.split(",")):
            cmd = [sys.executable, "-m", "benchmarks.trl_bench", *(argv or sys.argv[1:]),
                   "--variant", variant, "--model", model, "--tmp", os.path.join(tmp, variant)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.stderr.write(out.stderr[-4000:])
                raise SystemExit(f"variant {variant} failed")
            runs.setdefault(variant, []).append(json.loads(lines[-1][len("RESULT "):]))
            print(f"done: {runs[variant][-1]}", file=sys.stderr, flush=True)
    rows = [min(r, key=lambda x: x["step_s"]) for r in runs.values()]
    first = rows[0]
    layers = opts.layers or SHAPES[opts.shape][5]
    print(f"shape {opts.shape} ({layers} layers), device {opts.device}, batch {opts.batch}, "
          f"completion {opts.completion} tokens, median of {opts.steps} steps after "
          f"{opts.warmup}, fastest of {opts.repeats} interleaved runs")
    print("| variant | loss path | step s | rollout s | train s (step - rollout) | "
          "train / sdft | peak MiB | peak / sdft |")
    print("|---|---|---|---|---|---|---|---|")
    base_train = first["step_s"] - first["rollout_s"]
    for r in rows:
        train = r["step_s"] - r["rollout_s"]
        print(f"| {r['variant']} | {r['loss_path']} | {r['step_s']:.3f} | {r['rollout_s']:.3f} | "
              f"{train:.3f} | {train / base_train:.2f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / max(first['peak_mib'], 1e-9):.2f} |")


if __name__ == "__main__":
    main()
