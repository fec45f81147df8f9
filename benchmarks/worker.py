"""One benchmark unit (a provider on a case), and the CPU worker process that runs them.

On CPU the sweep starts ``python -m benchmarks.worker JOB.json`` once per provider (and once
for the float64 references), so that each provider's peak RSS is its own. The worker prints
one JSON record per case on stdout, prefixed with ``RECORD``. On GPU the sweep calls
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
from .measure import errors, measure, pin_malloc

PREFIX = "RECORD "


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc).lower()


def run_unit(name: str, case: Case, inputs: dict, job: dict, ref: dict | None) -> dict:
    """Measure provider ``name`` on ``inputs``; a record with metrics or a status note."""
    device = torch.device(job["device"])
    cfg = config_for(case.preset)
    rec = {"provider": name, "case": case.to_dict(), "status": "ok", "note": "", "metrics": {},
           "errors": {}}
    why = providers.unavailable(name, cfg, device, case.tokens * case.vocab,
                                job.get("interpret_max", 0))
    if why:
        rec.update(status="skipped", note=why)
        return rec
    reps, warmup = job["reps"], job["warmup"]
    if name in providers.INTERPRETED and device.type != "cuda":
        reps, warmup = 1, 0
        rec["note"] = "Triton interpreter on CPU: a correctness run, its time means nothing"
    try:
        fn = providers.make(name, cfg)
        metrics, loss, grads = measure(fn, inputs, job["modes"], reps, warmup, device)
        for mode, m in metrics.items():
            m["bytes"] = byte_budget(inputs, mode)
        rec["metrics"] = metrics
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
    device = torch.device(job["device"])
    name = job["provider"]
    for index, cd in enumerate(job["cases"]):
        case = Case.from_dict(cd)
        cfg = config_for(case.preset)
        if job.get("deadline") and time.time() > job["deadline"]:
            print(PREFIX + json.dumps({"provider": name, "case": cd, "status": "skipped",
                                       "note": "time budget exhausted"}), flush=True)
            continue
        ref = None
        variant = "token" if providers.reference_config(name, cfg) != cfg else "base"
        path = ref_path(job["ref_dir"], index, variant) if job.get("ref_dir") else None
        inputs = make_inputs(case, device)
        if path and os.path.exists(path):
            ref = _LazyRef(path)
        rec = run_unit(name, case, inputs, job, ref)
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
    pin_malloc(32 * 2**20)
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job["kind"] == "reference":
        _reference_job(job)
    else:
        _provider_job(job)


if __name__ == "__main__":
    main()
