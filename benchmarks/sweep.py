"""The sweep: cases x providers, run in worker processes (CPU) or in-process (GPU), to rows.

Cases form a "star" around an anchor shape by default: every vocab size at the anchor token
count and every token count at the anchor vocab size; ``cross`` runs the full product.
``extra`` shapes are added as given (on CPU, a tiny one where the Triton-interpreted
providers can run beside the others). Anchor cases run first, so a time budget cuts the
least important.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from .inputs import Case, make_inputs
from .worker import PREFIX, TICK, ref_variants, run_unit

METRIC_UNITS = {"time_ms": "ms", "mem_mb": "MiB", "gbps": "GB/s", "first_time_ms": "ms",
                "first_mem_mb": "MiB", "loss_abs_err": "",
                "loss_rel_err": "", "grad_abs_err": "", "grad_rel_err": ""}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_cases(presets, vocabs, tokens, *, batch=4, dtype="fp32", hidden=256, views=3,
                grid="star", anchor_vocab=None, anchor_tokens=None, extra=()) -> list[Case]:
    """The sweep's cases in run order (anchors first, then by size)."""
    for t in list(tokens) + [t for t, _ in extra]:
        if t % batch:
            raise ValueError(f"token count {t} is not a multiple of --batch {batch}")
    av = anchor_vocab or max(vocabs)
    at = anchor_tokens or max(tokens)
    if grid == "cross":
        shapes = {(t, v) for t in tokens for v in vocabs}
    else:
        shapes = {(at, v) for v in vocabs} | {(t, av) for t in tokens}
    shapes |= set(extra)
    order = sorted(shapes, key=lambda s: (s != (at, av), s[0] * s[1], s))
    cases = []
    for rank, (t, v) in enumerate(order):
        for p in presets:
            cases.append((rank, Case(p, batch, t // batch, v, dtype, hidden, views)))
    cases.sort(key=lambda rc: (rc[0] > 0, rc[0]))
    return [c for _, c in cases]


def _records_to_rows(rec: dict, env: dict) -> list[dict]:
    case = Case.from_dict(rec["case"])
    base = {"date": env["date"], "machine": env["machine"], "device": env["device"],
            "torch": env["torch"], "triton": env["triton"], "liger": env["liger"],
            "commit": env["commit"], "preset": case.preset, "provider": rec["provider"],
            "batch": case.batch, "seq": case.seq, "tokens": case.tokens, "vocab": case.vocab,
            "hidden": case.hidden, "views": case.views, "dtype": case.dtype}
    rows = []
    modes = rec.get("modes", [])
    if rec["status"] != "ok":
        for mode in modes:
            rows.append({**base, "mode": mode, "metric": "status", "value": "", "unit": "",
                         "status": rec["status"], "note": rec["note"]})
        return rows
    err_mode = "fwd_bwd" if "fwd_bwd" in rec["metrics"] else modes[0]
    for mode, m in rec["metrics"].items():
        values = {"time_ms": m["time_ms"], "mem_mb": m["mem_bytes"] / 2**20,
                  "gbps": m["bytes"] / (m["time_ms"] * 1e-3) / 1e9}
        if "first" in rec:
            values.update(first_time_ms=rec["first"]["time"][mode],
                          first_mem_mb=rec["first"]["mem"][mode] / 2**20)
        if mode == err_mode:
            values.update(rec.get("errors", {}))
        for metric, value in values.items():
            rows.append({**base, "mode": mode, "metric": metric, "value": value,
                         "unit": METRIC_UNITS[metric], "status": "ok", "note": rec["note"]})
    return rows


def _flush(rows: list[dict], opts) -> None:
    """Rewrite results.csv after every record, so that a run cut short keeps what it did."""
    from .report import write_csv

    write_csv(rows, os.path.join(opts.out, "results.csv"))


def _job(opts, **extra) -> dict:
    job = {"device": opts.device, "modes": opts.modes, "reps": opts.reps,
           "warmup": opts.warmup, "interpret_max": opts.interpret_max,
           "threads": opts.threads, "first_call": opts.first_call,
           "deadline": opts.deadline}
    job.update(extra)
    return job


def _run_worker(job: dict, log_path: str, on_record, on_tick=None) -> None:
    """Run one worker process; call on_record for each record it prints (on_tick for each
    progress tick)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        job_path = f.name
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # CPU workers: Triton only in its interpreter
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    seen = 0
    try:
        with open(log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", job_path],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                    text=True)
            for line in proc.stdout:
                if on_tick is not None and line.strip() == TICK:
                    on_tick()
                elif line.startswith(PREFIX):
                    on_record(json.loads(line[len(PREFIX):]))
                    seen += 1
            rc = proc.wait()
    finally:
        os.unlink(job_path)
    if seen < len(job["cases"]):  # the worker died (OOM killer, crash): report the rest
        name = job.get("provider", "reference")
        for cd in job["cases"][seen:]:
            on_record({"provider": name, "case": cd, "status": "error",
                       "note": f"worker exited with code {rc}; see {os.path.basename(log_path)}"})


def run_isolated(cases, names, opts, env: dict) -> list[dict]:
    """CPU: one worker process for the references, then one per provider (per provider and
    case with ``opts.first_call``, so that every case's first call is a process's first)."""
    rows = []
    ref_units = len(cases) if opts.errors else 0
    # a provider's case counts twice: its memory run, then its timed runs
    bar = tqdm(total=ref_units + 2 * len(cases) * len(names), desc="sweep", unit="run")
    log_path = os.path.join(opts.out, "worker.log")
    open(log_path, "w").close()
    with tempfile.TemporaryDirectory(prefix="unisd-bench-") as ref_dir:
        def on_ref(rec):
            bar.set_postfix_str(f"reference {Case.from_dict(rec['case']).label}")
            bar.update(1)

        if opts.errors:
            _run_worker(_job(opts, kind="reference", cases=[c.to_dict() for c in cases],
                             providers=names, ref_dir=ref_dir), log_path, on_ref)
        for name in names:
            def on_rec(rec):
                rec["modes"] = opts.modes
                rows.extend(_records_to_rows(rec, env))
                _flush(rows, opts)
                bar.set_postfix_str(f"{rec['provider']} {Case.from_dict(rec['case']).label}")
                bar.update(1)

            groups = [[c] for c in cases] if opts.first_call else [cases]
            for group in groups:
                offset = cases.index(group[0])
                _run_worker(_job(opts, kind="provider", provider=name,
                                 cases=[c.to_dict() for c in group], ref_offset=offset,
                                 ref_dir=ref_dir if opts.errors else None), log_path,
                            on_rec, on_tick=lambda: bar.update(1))
    bar.close()
    return rows


def run_inprocess(cases, names, opts, env: dict) -> list[dict]:
    """GPU (or CPU with --in-process): every provider on the same input tensors."""
    from . import fp64_ref
    from .inputs import config_for

    device = torch.device(opts.device)
    job = _job(opts)
    rows = []
    bar = tqdm(total=len(cases) * len(names), desc="sweep", unit="run")
    for case in cases:
        if opts.deadline and time.time() > opts.deadline:
            for name in names:
                rows.extend(_records_to_rows(
                    {"provider": name, "case": case.to_dict(), "status": "skipped",
                     "note": "time budget exhausted", "modes": opts.modes}, env))
                bar.update(1)
            continue
        try:
            inputs = make_inputs(case, device)
        except Exception as exc:  # inputs alone do not fit
            for name in names:
                rows.extend(_records_to_rows(
                    {"provider": name, "case": case.to_dict(), "status": "oom",
                     "note": f"inputs do not fit: {type(exc).__name__}", "modes": opts.modes},
                    env))
                bar.update(1)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            continue
        refs = {}
        where = fp64_ref.placement(case, device) if opts.errors else None
        cfg = config_for(case.preset)
        if where is not None:
            for variant, rc in ref_variants(cfg, names).items():
                refs[variant] = fp64_ref.reference_result(inputs, rc, where)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for name in names:
            from .providers import reference_config

            variant = "token" if reference_config(name, cfg) != cfg else "base"
            bar.set_postfix_str(f"{name} {case.label}")
            rec = run_unit(name, case, inputs, job, refs.get(variant))
            rec["modes"] = opts.modes
            rows.extend(_records_to_rows(rec, env))
            _flush(rows, opts)
            bar.update(1)
        del inputs, refs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return rows
