"""Fused-linear benchmark: ``python -m benchmarks.linear [--device cpu|cuda] [...]``.

Hidden states and an lm_head in; forward+backward of every provider of
``benchmarks/linear_providers.py`` on the same inputs, side by side in one run, for each
preset and head (frozen: gradient for the hidden states only; trainable: also the weight).
Metrics: median time (forward, backward, their sum) and peak memory above the inputs, raw and
without the gradients every provider must return (d hidden, and d weight when trainable);
the loss and d hidden of each provider against materialise-eager's. On CPU each provider runs
each case in a worker process of its own (``--worker``): warm-up, the memory repetition under
a small mmap threshold (as in benchmarks/measure.py), then the timed repetitions. Writes
results.csv, table.md and machine.md (with the load average before and after) to --out.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import torch

from . import linear_providers as lp
from .inputs import config_for
from .output import add_output_arguments, output_dir

PREFIX = "RECORD "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "materialise-eager"
MB = 2**20


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.linear", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--providers", default=",".join(lp.PROVIDERS))
    ap.add_argument("--presets", default="sd,unisd_star")
    ap.add_argument("--heads", default="frozen,trainable")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                    help="default cpu fp32, cuda bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-bytes", type=int, default=None,
                    help="unisd_linear_loss chunk budget (default: its own)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interleave", action="store_true",
                    help="times only: all providers of a case in one process, interleaved "
                         "repetition by repetition (fair on a machine whose load drifts); "
                         "no memory figures")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: no worker processes (memory figures then only approximate)")
    add_output_arguments(ap, "<device>-linear")
    ap.add_argument("--worker", metavar="JOB", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cases(opts) -> list[lp.LinearCase]:
    return [lp.LinearCase(p, h, opts.batch, opts.seq, opts.hidden, opts.vocab, opts.views,
                          opts.dtype) for p in _names(opts.presets) for h in _names(opts.heads)]


def grad_file(grad_dir: str, provider: str, preset: str, head: str) -> str:
    """Where a provider's d hidden of a case is kept for the error columns."""
    return os.path.join(grad_dir, f"{provider}_{preset.replace('/', '+')}_{head}.pt")


def _one_rep(fn, inputs, memory, clock):
    for t in lp.grad_leaves(inputs):
        t.grad = None
    clock.sync()
    base = memory.reset()
    t0 = clock.mark()
    loss = fn(inputs)
    t1 = clock.mark()
    loss.backward()
    t2 = clock.mark()
    clock.sync()
    peak = memory.peak() - base
    grads = sum(t.grad.numel() * t.grad.element_size() for t in lp.grad_leaves(inputs))
    return {"fwd_ms": clock.ms(t0, t1), "bwd_ms": clock.ms(t1, t2), "peak": peak,
            "grad_bytes": grads, "loss": float(loss.detach())}


def memory_unit(name, case, opts) -> dict:
    """Peak memory above the inputs of provider ``name`` on ``case`` (one repetition after
    the warm-up ones), and the bytes of the gradients it returned."""
    from .measure import tools_for, trim_heap

    device = torch.device(opts["device"])
    cfg = config_for(case.preset)
    rec = {"provider": name, "case": case.to_dict(), "status": "ok", "note": ""}
    why = lp.unavailable(name, cfg)
    if why:
        rec.update(status="skipped", note=why)
        return rec
    clock, memory = tools_for(device)
    inputs = lp.make_inputs(case, device)
    try:
        fn = lp.make(name, cfg, opts.get("chunk_bytes"))
        for _ in range(opts["warmup"]):
            _one_rep(fn, inputs, memory, clock)
        for t in lp.grad_leaves(inputs):
            t.grad = None
        gc.collect()
        trim_heap()
        r = _one_rep(fn, inputs, memory, clock)
        rec.update(peak=max(r["peak"], 0), grad_bytes=r["grad_bytes"])
    except Exception as exc:  # a failing provider must not stop the run
        _failed(rec, exc)
    finally:
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def _failed(rec, exc) -> None:
    oom = isinstance(exc, (torch.OutOfMemoryError, MemoryError))
    rec.update(status="oom" if oom else "error",
               note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")


def time_case(name, case, opts, grad_dir) -> dict:
    """Median times of provider ``name`` on ``case`` over ``opts["reps"]`` repetitions after
    ``opts["warmup"]`` untimed ones; saves its d hidden for the error column."""
    from .measure import tools_for

    device = torch.device(opts["device"])
    cfg = config_for(case.preset)
    clock, memory = tools_for(device)
    inputs = lp.make_inputs(case, device)
    rec = {"provider": name, "case": case.to_dict(), "status": "ok", "note": ""}
    why = lp.unavailable(name, cfg)
    if why:
        rec.update(status="skipped", note=why)
        return rec
    try:
        fn = lp.make(name, cfg, opts.get("chunk_bytes"))
        for _ in range(opts["warmup"]):
            _one_rep(fn, inputs, memory, clock)
        reps = [_one_rep(fn, inputs, memory, clock) for _ in range(max(opts["reps"], 1))]
    except Exception as exc:  # noqa: BLE001 - reported in the record
        _failed(rec, exc)
        return rec
    if grad_dir:
        torch.save(inputs["student_hidden"].grad.float().cpu(),
                   grad_file(grad_dir, name, case.preset, case.head))
    for key in ("fwd_ms", "bwd_ms"):
        rec[key] = sorted(r[key] for r in reps)[len(reps) // 2]
    rec["fwd_bwd_ms"] = sorted(r["fwd_ms"] + r["bwd_ms"] for r in reps)[len(reps) // 2]
    rec["loss"] = reps[-1]["loss"]
    return rec


def time_interleaved(names, case, opts) -> list[dict]:
    """Times of the providers ``names`` on one set of inputs: each warmed up, then every
    repetition runs each provider once in turn, so that a drifting load weighs on all alike;
    medians."""
    from .measure import tools_for

    device = torch.device(opts["device"])
    cfg = config_for(case.preset)
    clock, memory = tools_for(device)
    inputs = lp.make_inputs(case, device)
    recs, fns = {}, {}
    for name in names:
        recs[name] = {"provider": name, "case": case.to_dict(), "status": "ok", "note": "",
                      "reps": []}
        why = lp.unavailable(name, cfg)
        if why:
            recs[name].update(status="skipped", note=why)
            continue
        fns[name] = lp.make(name, cfg, opts.get("chunk_bytes"))
        for _ in range(opts["warmup"]):
            _one_rep(fns[name], inputs, memory, clock)
    for _ in range(max(opts["reps"], 1)):
        for name, fn in fns.items():
            recs[name]["reps"].append(_one_rep(fn, inputs, memory, clock))
            if opts.get("grad_dir"):
                torch.save(inputs["student_hidden"].grad.float().cpu(),
                           grad_file(opts["grad_dir"], name, case.preset, case.head))
    for name in fns:
        rs = recs[name].pop("reps")
        for key in ("fwd_ms", "bwd_ms"):
            recs[name][key] = sorted(r[key] for r in rs)[len(rs) // 2]
        recs[name]["fwd_bwd_ms"] = sorted(r["fwd_ms"] + r["bwd_ms"] for r in rs)[len(rs) // 2]
        recs[name]["loss"] = rs[-1]["loss"]
    return [recs[n] for n in names]


def worker(job_path: str) -> None:
    """One provider on one case: the warm-up and the memory repetition under a 64 KiB mmap
    threshold set at the process start (as in benchmarks/measure.py), then the timed
    repetitions under glibc's usual threshold (already warm: no second warm-up)."""
    from .measure import GLIBC_MMAP, SMALL_MMAP, pin_malloc

    pin_malloc(SMALL_MMAP)
    with open(job_path) as f:
        job = json.load(f)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    case, name = lp.LinearCase(**job["case"]), job["provider"]
    if job.get("interleave"):
        pin_malloc(GLIBC_MMAP)
        for rec in time_interleaved(job["providers"], case, job):
            print(PREFIX + json.dumps(rec), flush=True)
        return
    mem = memory_unit(name, case, job)
    if mem["status"] == "ok":
        pin_malloc(GLIBC_MMAP)
        rec = time_case(name, case, {**job, "warmup": 0}, job["grad_dir"])
        if rec["status"] == "ok":
            rec.update(peak=mem["peak"], grad_bytes=mem["grad_bytes"])
        mem = rec
    print(PREFIX + json.dumps(mem), flush=True)


def _subprocess(job: dict, expected: list[dict]) -> list[dict]:
    """Run one worker job; records for what it did not report say why."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.linear", "--worker", f.name],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    os.unlink(f.name)
    got = [json.loads(line[len(PREFIX):]) for line in proc.stdout.splitlines()
           if line.startswith(PREFIX)]
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return got + [{**e, "status": "error", "note": f"worker exit {proc.returncode}: {tail}"}
                  for e in expected[len(got):]]


def _run_all(opts, cases, providers, grad_dir, flush) -> list[dict]:
    """Case by case, provider by provider: on CPU a worker process for each (its own peak
    memory), on CUDA (or --in-process) in this process. ``flush(records)`` after each."""
    job = {"device": opts.device, "warmup": opts.warmup, "reps": opts.reps,
           "chunk_bytes": opts.chunk_bytes, "threads": opts.threads, "grad_dir": grad_dir}
    isolated = opts.device == "cpu" and not opts.in_process
    records = []
    for case in cases:
        if opts.interleave:
            print(f"{case.label}: {', '.join(providers)} interleaved", flush=True)
            expected = [{"provider": n, "case": case.to_dict()} for n in providers]
            job_case = {**job, "interleave": True, "provider": None, "providers": providers,
                        "case": case.to_dict()}
            records += (_subprocess(job_case, expected) if isolated
                        else time_interleaved(providers, case, job))
            flush(records)
            continue
        for name in providers:
            print(f"{case.label}: {name}", flush=True)
            if isolated:
                expected = {"provider": name, "case": case.to_dict()}
                rec = _subprocess({**job, "provider": name, "case": case.to_dict()},
                                  [expected])[0]
            else:
                rec = memory_unit(name, case, job)
                if rec["status"] == "ok":
                    mem = rec
                    rec = time_case(name, case, {**job, "warmup": 0}, grad_dir)
                    if rec["status"] == "ok":
                        rec.update(peak=mem["peak"], grad_bytes=mem["grad_bytes"])
            records.append(rec)
            flush(records)
    return records


def _errors(records, grad_dir) -> None:
    """Loss and d hidden of each provider against materialise-eager's, same case."""
    base = {(r["case"]["preset"], r["case"]["head"]): r for r in records
            if r["provider"] == BASELINE and r["status"] == "ok"}
    for r in records:
        key = (r["case"]["preset"], r["case"]["head"])
        if (r["status"] != "ok" or key not in base
                or not lp.comparable_loss(r["provider"], config_for(key[0]))):
            continue
        ref = base[key]
        r["loss_rel_err"] = abs(r["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
        g = torch.load(grad_file(grad_dir, r["provider"], *key))
        g0 = torch.load(grad_file(grad_dir, BASELINE, *key))
        r["dh_rel_err"] = float((g - g0).abs().max() / g0.abs().max().clamp_min(1e-30))


def table(records) -> str:
    """Markdown: one row per case and provider, ratios to the baselines of the same case."""
    by = {(r["case"]["preset"], r["case"]["head"], r["provider"]): r for r in records}
    for r in records:
        if r["status"] == "ok" and "peak" in r:
            r["mem"] = max(r["peak"] - r["grad_bytes"], 0)

    def mib(r, key):
        return f"{r[key] / MB:.0f}" if key in r else "-"

    def ratio(r, base, key):
        b = by.get((r["case"]["preset"], r["case"]["head"], base))
        if not b or b["status"] != "ok" or not b.get(key) or r.get(key) is None:
            return "-"
        return f"{r[key] / b[key]:.3f}"

    head = ("| preset | head | provider | fwd+bwd s | fwd s | bwd s | mem MiB (no grads) | "
            "mem MiB raw | time / mat-unisd | time / liger | time / trl | mem / mat-eager | "
            "mem / mat-unisd | mem / trl | loss err | dh err |")
    lines = [head, "|" + "---|" * 16]
    order = {name: i for i, name in enumerate(lp.PROVIDERS)}
    for r in sorted(records, key=lambda r: (r["case"]["preset"], r["case"]["head"],
                                            order.get(r["provider"], 99))):
        c = r["case"]
        if r["status"] != "ok":
            lines.append(f"| {c['preset']} | {c['head']} | {r['provider']} | "
                         f"{r['status']}: {r['note']} |" + " |" * 12)
            continue
        lines.append(
            f"| {c['preset']} | {c['head']} | {r['provider']} | {r['fwd_bwd_ms'] / 1e3:.2f} | "
            f"{r['fwd_ms'] / 1e3:.2f} | {r['bwd_ms'] / 1e3:.2f} | {mib(r, 'mem')} | "
            f"{mib(r, 'peak')} | {ratio(r, 'materialise-unisd', 'fwd_bwd_ms')} | "
            f"{ratio(r, 'liger', 'fwd_bwd_ms')} | {ratio(r, 'trl', 'fwd_bwd_ms')} | "
            f"{ratio(r, BASELINE, 'mem')} | {ratio(r, 'materialise-unisd', 'mem')} | "
            f"{ratio(r, 'trl', 'mem')} | "
            f"{r.get('loss_rel_err', float('nan')):.1e} | "
            f"{r.get('dh_rel_err', float('nan')):.1e} |")
    return "\n".join(lines) + "\n"


def _write_csv(records, path, env) -> None:
    keys = ["provider", "status", "note", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak",
            "grad_bytes", "mem", "loss", "loss_rel_err", "dh_rel_err"]
    case_keys = list(lp.LinearCase.__dataclass_fields__)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(case_keys + keys + ["machine", "torch", "commit", "load_average"])
        for r in records:
            w.writerow([r["case"][k] for k in case_keys] + [r.get(k, "") for k in keys]
                       + [env["machine"], env["torch"], env["commit"], env["load_average"]])


def main(argv=None) -> None:
    opts = parse(argv)
    if opts.worker:
        worker(opts.worker)
        return
    from .env import environment, machine_markdown

    if opts.device is None:
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    opts.dtype = opts.dtype or ("bf16" if opts.device == "cuda" else "fp32")
    opts.out = output_dir(opts, "<device>-linear", opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cases = _cases(opts)
    providers = _names(opts.providers)
    command = "python -m benchmarks.linear " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    env = environment(torch.device(opts.device))
    print(f"{len(cases)} cases x {len(providers)} providers on {env['machine']}, load "
          f"average {env['load_average']}", flush=True)
    start = time.time()

    def flush(records):
        _write_csv(records, os.path.join(opts.out, "results.csv"), env)
        with open(os.path.join(opts.out, "table.md"), "w") as f:
            f.write(table(records))

    with open(os.path.join(opts.out, "machine.md"), "w") as f:
        f.write(machine_markdown(env, command))
    with tempfile.TemporaryDirectory() as grad_dir:
        records = _run_all(opts, cases, providers, grad_dir, flush)
        _errors(records, grad_dir)
    flush(records)
    env["load_average_end"] = environment(torch.device(opts.device))["load_average"]
    env["wall_s"] = f"{time.time() - start:.0f}"
    with open(os.path.join(opts.out, "machine.md"), "w") as f:
        f.write(machine_markdown(env, command))
    print(table(records))
    print(f"load average before {env['load_average']}, after {env['load_average_end']}")


if __name__ == "__main__":
    main()
