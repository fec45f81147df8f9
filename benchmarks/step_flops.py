"""The step ledger in FLOPs: the phases of one optimizer step counted from a model config.

``python -m benchmarks.step_flops`` prints, for Qwen2.5-0.5B and Qwen2.5-7B at full depth
(their configs written out here, nothing downloaded), per method, the FLOPs of each phase of
one step over ``--batch`` sequences of ``--tokens`` completion tokens, with student prompts of
``--prompt`` tokens and teacher, view and negative prompts of ``--teacher-prompt`` tokens.

Counting (multiply-add = 2 FLOPs; matrix products only):
- a decoder token at context c: per layer ``2 (2 H^2 + 2 H kv)`` for the q, o and k, v
  projections (kv = kv heads x head dim), ``6 H I`` for the gated MLP and ``4 c H`` for the
  attention scores and values;
- the head: ``2 H V`` per token; on the fused-linear path the teacher, view and negative
  forwards return hidden states and every head product is in "loss": student, teacher, each
  view and the negative once each, the hidden-state gradient once, and the head's weight
  gradient once more when it trains (full fine-tuning);
- sampling: the prompt's prefill (no head) and ``tokens`` decode steps (decoder + head);
- student backward: twice its forward with full fine-tuning, once with LoRA (activation
  gradients only; the adapters' own products are negligible); for sft also the head's
  gradients (its loss is the logits and cross-entropy forward);
- adaptive agreement at a view-token fraction f: the views' forwards times f, plus the
  selection pass (student and teacher head products once more).
Optimizer and EMA are element-wise (a few FLOPs per weight) and listed as such.
"""

from __future__ import annotations

import argparse

MODELS = {
    "qwen2.5-0.5b": dict(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
                         vocab=151936, tied=True, params=494e6),
    "qwen2.5-7b": dict(hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                       vocab=152064, tied=False, params=7.62e9),
}
METHODS = ("sft", "sd", "gkd", "agreement", "unisd_star", "unisd_star@adaptive")
PHASES = ("sampling", "teacher", "views", "negative", "selection", "student_forward", "loss",
          "student_backward", "optimizer", "ema")


def decoder_flops(m: dict, tokens: int, context_start: int = 0) -> float:
    """FLOPs of ``tokens`` consecutive decoder positions after ``context_start`` others."""
    H, inter, L = m["hidden"], m["intermediate"], m["layers"]
    kv = m["kv_heads"] * H // m["heads"]
    dense = 2 * (2 * H * H + 2 * H * kv) + 6 * H * inter
    # sum of the contexts c = context_start + 1 .. context_start + tokens
    contexts = tokens * context_start + tokens * (tokens + 1) / 2
    return L * (dense * tokens + 4 * H * contexts)


def head_flops(m: dict, tokens: int) -> float:
    return 2 * m["hidden"] * m["vocab"] * tokens


def phases(m: dict, method: str, B: int, P: int, Pt: int, T: int, K: int, lora: bool,
           view_fraction: float, ema_every: int) -> dict:
    """FLOPs per phase of one step of ``method`` (docstring of this module)."""
    name, _, adaptive = method.partition("@")
    views = name in ("agreement", "unisd_star")
    star = name == "unisd_star"
    trainable = 0.01 * m["params"] if lora else m["params"]
    out = dict.fromkeys(PHASES, 0.0)
    student = decoder_flops(m, P + T)
    out["student_forward"] = B * student
    out["student_backward"] = B * student * (1 if lora else 2)
    out["optimizer"] = 10 * trainable
    if name == "sft":  # logits and cross-entropy; their gradients come in the backward
        out["loss"] = B * head_flops(m, T)
        out["student_backward"] += B * head_flops(m, T) * (1 if lora else 2)
        return out
    out["sampling"] = B * (decoder_flops(m, P) + decoder_flops(m, T, P) + head_flops(m, T))
    out["teacher"] = B * decoder_flops(m, Pt + T)
    fraction = view_fraction if adaptive else 1.0
    if views:
        out["views"] = fraction * K * B * decoder_flops(m, Pt + T)
    if star:
        out["negative"] = B * decoder_flops(m, Pt + T)
        out["ema"] = 3 * m["params"] / ema_every
    if adaptive:
        out["selection"] = 2 * B * head_flops(m, T)
    heads = 2 + (fraction * K if views else 0) + (1 if star else 0) + 1 + (0 if lora else 1)
    out["loss"] = heads * B * head_flops(m, T)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_flops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=48, help="student prompt tokens")
    ap.add_argument("--teacher-prompt", type=int, default=96,
                    help="teacher, view and negative prompt tokens")
    ap.add_argument("--tokens", type=int, default=256, help="completion tokens")
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--view-fraction", type=float, default=0.3,
                    help="view-forward tokens adaptive agreement runs (of full agreement's)")
    ap.add_argument("--lora", action="store_true", help="LoRA (else full fine-tuning)")
    ap.add_argument("--ema-every", type=int, default=10)
    args = ap.parse_args(argv)
    print(f"TFLOPs per optimizer step: batch {args.batch} x {args.tokens} completion tokens, "
          f"student prompt {args.prompt}, teacher / view / negative prompts "
          f"{args.teacher_prompt}, K {args.views}, "
          f"{'LoRA' if args.lora else 'full fine-tuning'}; adaptive = view forwards at "
          f"{args.view_fraction:.0%} of their tokens")
    for model, m in MODELS.items():
        print(f"\n{model} ({m['layers']} layers, hidden {m['hidden']}, vocab {m['vocab']})\n")
        head = ["method", *PHASES, "step", "/ sd", "largest phase"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        rows = {meth: phases(m, meth, args.batch, args.prompt, args.teacher_prompt,
                             args.tokens, args.views, args.lora, args.view_fraction,
                             args.ema_every) for meth in METHODS}
        sd = sum(rows["sd"].values())
        for meth, row in rows.items():
            total = sum(row.values())
            top = max(row, key=row.get)
            cells = [meth, *(f"{row[p] / 1e12:.2f}" if row[p] else "-" for p in PHASES),
                     f"{total / 1e12:.2f}", f"{total / sd:.2f}",
                     f"{top} {row[top] / total:.0%}"]
            print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
