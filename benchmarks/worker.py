"""One benchmark unit (a provider on a case), and the CPU worker process that runs them.

On CPU the sweep starts ``python -m benchmarks.worker JOB.json`` once per provider (and once
for the float64 references), so that each provider's peak RSS is its own. The worker prints
``TICK`` after each case's memory run, then one JSON record per case, prefixed with
``RECORD``. On GPU the sweep calls
``run_unit`` in-process instead (the CUDA allocator measures each unit on its own).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

from . import fp64_ref, providers
from .inputs import Case, byte_budget, config_for, make_inputs
from .measure import (
    GLIBC_MMAP,
    SMALL_MMAP,
    errors,
    measure_first,
    measure_memory,
    measure_time,
    pin_malloc,
)

PREFIX = "RECORD "
TICK = "TICK"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()


def run_unit(name: str, case: Case, inputs: dict, job: dict, ref: dict | None,
             phase: str = "all", memory: dict | None = None) -> dict:
    """Measure provider ``name`` on ``inputs``: a record with metrics or a status note.

    phase "memory" measures peak memory only (record["memory"]); "time" times it, takes the
    errors and merges ``memory`` (from an earlier "memory" phase); "all" does both. With
    ``job["first_call"]``, the memory phase measures the process's first call before the
    warm-up (record["first"], see ``measure.measure_first``).
    """
    device = torch.device(job["device"])
    cfg = config_for(case.preset)
    rec = {"provider": name, "case": case.to_dict(), "status": "ok", "note": "", "metrics": {},
           "errors": {}}
    why = providers.unavailable(name, cfg, device, case.tokens * case.vocab,
                                job.get("interpret_max", 0))
    if why:
        rec.update(status="skipped", note=why)
        return rec
    modes, reps, warmup = job["modes"], job["reps"], job["warmup"]
    if name in providers.INTERPRETED and device.type != "cuda":
        reps, warmup = 1, 0
        rec["note"] = "Triton interpreter on CPU: a correctness run, its time means nothing"
    try:
        fn = providers.make(name, cfg)
        if phase in ("memory", "all") and job.get("first_call"):
            rec["first"] = measure_first(fn, inputs, modes, device)
        if phase in ("memory", "all"):
            memory = measure_memory(fn, inputs, modes, warmup, device)
            rec["memory"] = memory
        if phase in ("time", "all"):
            times, loss, grads = measure_time(fn, inputs, modes, reps,
                                              warmup if phase == "time" else 0, device)
            rec["metrics"] = {m: {"time_ms": times[m], "mem_bytes": memory[m],
                                  "bytes": byte_budget(inputs, m)} for m in modes}
            if ref is not None:
                rec["errors"] = errors(loss, grads[0] if grads else None, ref)
            del loss, grads
    except Exception as exc:  # a failing provider must not stop the sweep
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        rec.update(status="oom" if _is_oom(exc) else "error",
                   note=f"{type(exc).__name__}: {first}")
        if rec["status"] == "error":
            traceback.print_exc(file=sys.stderr)
    finally:
        for t in inputs.values():
            if isinstance(t, torch.Tensor):
                t.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def ref_path(ref_dir: str, index: int, variant: str) -> str:
    return os.path.join(ref_dir, f"ref_{index}_{variant}.pt")


def ref_variants(cfg, names) -> dict:
    """{variant: config} of the float64 references the providers ``names`` are judged by."""
    out = {}
    for name in names:
        rc = providers.reference_config(name, cfg)
        out["token" if rc != cfg else "base"] = rc
    return out


def _reference_job(job: dict) -> None:
    device = torch.device(job["device"])
    for index, cd in enumerate(job["cases"]):
        case = Case.from_dict(cd)
        cfg = config_for(case.preset)
        where = fp64_ref.placement(case, device)
        rec = {"provider": "reference", "case": cd, "status": "ok", "note": ""}
        if where is None:
            rec.update(status="skipped", note="float64 reference does not fit in memory")
        else:
            inputs = make_inputs(case, device)
            for variant, rc in ref_variants(cfg, job["providers"]).items():
                torch.save(fp64_ref.reference_result(inputs, rc, where),
                           ref_path(job["ref_dir"], index, variant))
            del inputs
        gc.collect()
        print(PREFIX + json.dumps(rec), flush=True)


def _provider_job(job: dict) -> None:
    """Memory of every case first (small mmap threshold since the process start), then the
    timings and errors (glibc's usual threshold); see benchmarks/measure.py."""
    device = torch.device(job["device"])
    name = job["provider"]
    cases = [Case.from_dict(cd) for cd in job["cases"]]
    first = []
    for case in cases:
        if job.get("deadline") and time.time() > job["deadline"]:
            first.append({"provider": name, "case": case.to_dict(), "status": "skipped",
                          "note": "time budget exhausted"})
        else:
            inputs = make_inputs(case, device)
            first.append(run_unit(name, case, inputs, job, None, phase="memory"))
            del inputs
            gc.collect()
        print(TICK, flush=True)
    pin_malloc(GLIBC_MMAP)
    for index, (case, mem) in enumerate(zip(cases, first, strict=True)):
        if mem["status"] != "ok":
            print(PREFIX + json.dumps(mem), flush=True)
            continue
        cfg = config_for(case.preset)
        variant = "token" if providers.reference_config(name, cfg) != cfg else "base"
        at = index + job.get("ref_offset", 0)
        path = ref_path(job["ref_dir"], at, variant) if job.get("ref_dir") else None
        ref = _LazyRef(path) if path and os.path.exists(path) else None
        inputs = make_inputs(case, device)
        rec = run_unit(name, case, inputs, job, ref, phase="time", memory=mem["memory"])
        if "first" in mem:
            rec["first"] = mem["first"]
        del inputs
        gc.collect()
        print(PREFIX + json.dumps(rec), flush=True)


class _LazyRef(dict):
    """Loads the saved reference only when read, i.e. after the memory has been measured."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def _load(self):
        if not dict.__len__(self):
            self.update(torch.load(self._path))

    def __getitem__(self, key):
        self._load()
        return dict.__getitem__(self, key)

    def get(self, key, default=None):
        self._load()
        return dict.get(self, key, default)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        job = json.load(f)
    pin_malloc(SMALL_MMAP if job["kind"] == "provider" else GLIBC_MMAP)
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job["kind"] == "reference":
        _reference_job(job)
    else:
        _provider_job(job)


if __name__ == "__main__":
    main()
