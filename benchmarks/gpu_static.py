"""Static GPU report of the Triton kernels, made on a machine without a GPU.

    python -m benchmarks.gpu_static [--quick] [--targets 90,80] [--dtypes bf16,fp16]
                                    [--divergences fkl,rkl,jsd] [--json FILE] [--md FILE]

The Triton backend's own launchers (``TritonBackend.row_stats``, ``label_logprob``,
``write_grad``) run on meta tensors (shapes, strides and dtypes, no data) under a stand-in
driver that reports a CUDA target, and each ``kernel[grid](...)`` is compiled ahead of time
instead of launched: the JIT picks exactly the specialisation it would on a GPU (dtypes,
integer widths, 16-divisibility, BLOCK and num_warps from the launcher). Every compiled
kernel then goes through ptxas -v (Triton's bundled ptxas, Triton's flags) for registers and
spill bytes, and cuobjdump -sass for the instructions of each loop.

Per kernel and variant the report gives: registers, spill bytes, CTAs per SM (the occupancy
calculator's register, warp and shared-memory limits), SASS instructions per vocabulary
column in each loop that loads (the loop's body over the columns one thread handles per
iteration), bytes moved per column, and the issue-bound ceiling: bytes per cycle when each
of the SM's four schedulers issues one warp instruction per cycle, times clock and SMs, as
a share of HBM. It is the best case for the instruction stream, not a measurement: a pass
whose ceiling is under the HBM bandwidth cannot reach it, one above it may.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels; before any kernel is decorated
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from benchmarks.output import add_output_arguments, output_dir  # noqa: E402

# Datasheet figures the estimates use: SMs, boost clock (Hz), HBM bandwidths (B/s) by GPU,
# shared memory per SM (bytes).
TARGETS = {
    80: {"arch": "sm_80", "sms": 108, "clock": 1.41e9, "hbm": {"A100": 2.04e12},
         "smem_sm": 167936},
    90: {"arch": "sm_90a", "sms": 132, "clock": 1.98e9,
         "hbm": {"H100": 3.35e12, "H200": 4.8e12}, "smem_sm": 233472},
}
REGS_SM, SCHEDULERS, MAX_WARPS_SM, MAX_CTAS_SM, CTA_SMEM_RESERVED = 65536, 4, 64, 32, 1024
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPES = ("fp32", "bf16", "fp16")
DIVERGENCES = ("fkl", "rkl", "jsd")
# (batch, time, vocab): the headline vocabulary; the full run adds the others the launchers
# see (small vocabularies get smaller tiles and fewer warps; 16384 x 152064 needs int64
# strides; 50257 is not a multiple of 16; T = 1 turns the time stride into a constant).
QUICK_SHAPES = ((4, 256, 151936),)
FULL_SHAPES = QUICK_SHAPES + ((4, 256, 32000), (4, 256, 128256), (4, 256, 262144),
                              (4, 256, 50257), (4, 256, 2048), (4, 256, 1024),
                              (1, 16384, 152064), (1, 1, 152064))


# Tensors of the logits' dtype each kernel's loops read per vocabulary column (docs/kernels.md,
# "Byte budget"): a loop's columns per iteration are its loads over these, so a loop that
# handles two tiles per iteration (or that ptxas unrolled) counts per column all the same.
READS_PER_COLUMN = {"stats": 2, "stats_exact": 2, "grad": 2, "label_logprob": 1}


@dataclass
class Compiled:
    """One compiled kernel as a launcher asked for it."""
    fn: object
    kernel: object
    kwargs: dict
    dtype: str
    shape: tuple


def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@contextlib.contextmanager
def compile_only(capability: int, sink: list):
    """Within: Triton targets CUDA ``capability`` and ``kernel[grid](...)`` compiles (to a
    cubin) instead of launching, appending (fn, kernel, constexpr kwargs) to ``sink``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import jit
    from triton.runtime.driver import driver

    class StandIn(DriverBase):
        def __init__(self):
            pass

        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_current_device(self):
            return capability  # one JIT cache per target

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_device_interface(self):
            return torch.cuda

        def get_benchmarker(self):
            raise RuntimeError("nothing runs here")

        def map_python_to_cpp_type(self, ty):
            return ty

    def getitem(self, grid):
        def compile_(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            sink.append((self, kernel, dict(kwargs)))
        return compile_

    saved = jit.KernelInterface.__getitem__, driver._active
    jit.KernelInterface.__getitem__ = getitem
    driver.set_active(StandIn())
    try:
        yield
    finally:
        jit.KernelInterface.__getitem__, driver._active = saved


def run_launchers(backend, shape, dtype: str, divergences) -> None:
    """Call the backend's launchers once per divergence on meta tensors of ``shape``."""
    import torch

    def meta(shape, dtype):
        return torch.empty(shape, dtype=dtype, device="meta")

    B, T, V = shape
    dt = _torch_dtype(dtype)
    z, u, y = meta((B, T, V), dt), meta((B, T, V), dt), meta((B, T), torch.int64)
    ck, cc = meta((B, T), torch.float32), meta((B, T), torch.float32)
    for div in divergences:
        st = backend.row_stats(z, u, y, divergence=div, tau=0.7, alpha=0.5, ignore_index=-100)
        backend.write_grad(z, u, y, meta((B, T, V), dt), st, ck, cc, divergence=div, tau=0.7,
                           alpha=0.5)
    backend.label_logprob(z, y, tau=1.0, ignore_index=-100)


def compile_all(targets, shapes, dtypes, divergences) -> list[tuple[int, Compiled]]:
    """Every distinct kernel the launchers produce, per target (first shape that asked)."""
    from unisd_fast.backends.triton import TritonBackend

    backend = TritonBackend()
    out = []
    for cap in targets:
        seen = set()
        for shape in shapes:
            for dtype in dtypes:
                launched = []
                with compile_only(cap, launched):
                    run_launchers(backend, shape, dtype, divergences)
                for fn, kernel, kwargs in launched:
                    if kernel.metadata.hash not in seen:
                        seen.add(kernel.metadata.hash)
                        out.append((cap, Compiled(fn, kernel, kwargs, dtype, shape)))
    return out


def ptxas_resources(ptx: str, capability: int, fp_fusion: bool) -> dict:
    """Registers and spill bytes from ptxas -v with the flags Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(capability).path, "-lineinfo", *([] if fp_fusion else
                                                          ["--fmad=false"]),
               "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(capability)}",
               src, "-o", os.path.join(d, "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": sum(int(g) for g in spill.groups()) if spill else None}


SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _access_bits(op: str) -> int:
    for part in reversed(op.split(".")[1:]):
        if part.isdigit():
            return int(part)
        if part in ("U16", "S16"):
            return 16
        if part in ("U8", "S8"):
            return 8
    return 32


def sass_loops(cubin: bytes) -> list[dict]:
    """Each loop of the SASS (a backward branch to a lower address): its instructions, the
    bytes one thread loads and stores from global memory per iteration, and its local-memory
    (spill) accesses."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name],
                              capture_output=True, text=True).stdout
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(SASS.search,
                                                                      text.splitlines()) if m]
    loops = []
    for addr, op, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands) if op.startswith("BRA") else None
        if target is None or int(target.group(1), 16) >= addr:
            continue
        body = [o for a, o, _ in code if int(target.group(1), 16) <= a <= addr]
        ops = Counter(o.split(".")[0] for o in body)
        loops.append({
            "instructions": len(body),
            "load_bytes": sum(_access_bits(o) for o in body if o.startswith("LDG")) / 8,
            "store_bytes": sum(_access_bits(o) for o in body if o.startswith("STG")) / 8,
            "mufu": ops["MUFU"], "barriers": ops["BAR"], "local": ops["LDL"] + ops["STL"]})
    return loops


def ctas_per_sm(registers: int, warps: int, smem: int, capability: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 within each of
    the four schedulers' quarter of the register file; at most 64 warps and 32 CTAs."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (REGS_SM // SCHEDULERS // per_warp) * SCHEDULERS // warps
    by_smem = TARGETS[capability]["smem_sm"] // max(smem + CTA_SMEM_RESERVED, 1)
    return min(by_regs, MAX_WARPS_SM // warps, by_smem, MAX_CTAS_SM)


def kernel_name(fn) -> str:
    name = fn.__name__.strip("_")
    return name[:-len("_kernel")] if name.endswith("_kernel") else name


def record(cap: int, item: Compiled) -> dict:
    """The report's record of one compiled kernel on one target."""
    from unisd_fast.backends.triton.common import DIVERGENCE_CODE

    md = item.kernel.metadata
    warps = md.num_warps
    block = item.kwargs.get("BLOCK")
    threads = 32 * warps
    res = ptxas_resources(item.kernel.asm["ptx"], cap, md.enable_fp_fusion)
    loops = sass_loops(item.kernel.asm["cubin"])
    ctas = ctas_per_sm(res["registers"] or 255, warps, md.shared, cap)
    divergence = {v: k for k, v in DIVERGENCE_CODE.items()}.get(item.kwargs.get("DIV"), "-")
    rec = {"kernel": kernel_name(item.fn), "dtype": item.dtype, "divergence": divergence,
           "block": block, "warps": warps, "target": TARGETS[cap]["arch"], "shape": item.shape,
           **res, "shared_bytes": md.shared, "ctas_per_sm": ctas, "loops": []}
    tile_cols = block / threads  # vocabulary columns one thread handles per tile
    reads = READS_PER_COLUMN.get(rec["kernel"])
    moved = cycles = instr = 0.0
    for lp in loops:
        if not lp["load_bytes"]:
            continue  # zero-fill loops of skipped rows: no reads, not the pass's cost
        cols = lp["load_bytes"] / (reads * ITEMSIZE[item.dtype]) if reads else tile_cols
        lp = {**lp, "tiles_per_iteration": cols / tile_cols,
              "instr_per_column": lp["instructions"] / cols,
              "bytes_per_column": (lp["load_bytes"] + lp["store_bytes"]) / cols}
        rec["loops"].append(lp)
        moved += (lp["load_bytes"] + lp["store_bytes"]) * threads
        cycles += lp["instructions"] * warps / SCHEDULERS
        instr += lp["instr_per_column"]
    t = TARGETS[cap]
    rec["instr_per_column"] = instr or None
    rec["bytes_per_column"] = sum(lp["bytes_per_column"] for lp in rec["loops"]) or None
    rec["ceiling_tbs"] = moved / cycles * t["clock"] * t["sms"] / 1e12 if cycles else None
    rec["ceiling_share"] = {gpu: rec["ceiling_tbs"] * 1e12 / bw if cycles else None
                            for gpu, bw in t["hbm"].items()}
    rec["main_loop_spills"] = sum(lp["local"] for lp in rec["loops"])
    return rec


def markdown(records) -> str:
    """One table row per record; the shape is the first launch that produced the kernel."""
    lines = ["| kernel | dtype | divergence | launch shape | BLOCK / warps | target | registers "
             "| spill B | CTAs/SM | instr/column per loop (total) | bytes/column | issue "
             "ceiling TB/s (share of HBM) |", "|" + "---|" * 12]
    for r in records:
        per_loop = " + ".join(f"{lp['instr_per_column']:.1f}" for lp in r["loops"]) or "-"
        if len(r["loops"]) > 1:
            per_loop += f" ({r['instr_per_column']:.1f})"
        ceil = "-"
        if r["ceiling_tbs"]:
            share = ", ".join(f"{g} {100 * s:.0f}%" for g, s in r["ceiling_share"].items())
            ceil = f"{r['ceiling_tbs']:.2f} ({share})"
        spill = f"**{r['spill_bytes']}**" if r["spill_bytes"] else r["spill_bytes"]
        moved = f"{r['bytes_per_column']:.0f}" if r["bytes_per_column"] else "-"
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['divergence']} | "
                     f"{'x'.join(map(str, r['shape']))} | {r['block']} / {r['warps']} | "
                     f"{r['target']} | {r['registers']} | {spill} | {r['ctas_per_sm']} | "
                     f"{per_loop} | {moved} | {ceil} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the headline vocabulary only (4 x 256 x 151936)")
    ap.add_argument("--targets", default="90,80", help="compute capabilities (90, 80)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--divergences", default=",".join(DIVERGENCES))
    ap.add_argument("--json", default=None, help="write the records here as JSON")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    add_output_arguments(ap, "gpu-static")
    opts = ap.parse_args(argv)
    targets = [int(t) for t in opts.targets.split(",")]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"--targets: expected some of {sorted(TARGETS)}, got {t}")
    dtypes = opts.dtypes.split(",")
    divergences = opts.divergences.split(",")
    for given, known, flag in ((dtypes, DTYPES, "--dtypes"),
                               (divergences, DIVERGENCES, "--divergences")):
        if not set(given) <= set(known):
            ap.error(f"{flag}: expected some of {','.join(known)}, got {','.join(given)}")
    start = time.time()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gpu-static-"))
    compiled = compile_all(targets, QUICK_SHAPES if opts.quick else FULL_SHAPES, dtypes,
                           divergences)
    records = [record(cap, item) for cap, item in compiled]
    records.sort(key=lambda r: (r["kernel"], r["dtype"], r["divergence"], r["block"],
                                r["target"]))
    import triton

    table = markdown(records)
    head = (f"Triton {triton.__version__}, {len(records)} compiled kernels in "
            f"{time.time() - start:.0f} s; `python -m benchmarks.gpu_static"
            f"{' --quick' if opts.quick else ''} --targets {opts.targets}`.\n")
    print(head)
    print(table)
    folder = output_dir(opts, "gpu-static", "cuda") if opts.out or opts.update_results else None
    for path, text in ((opts.md, head + "\n" + table + "\n"),
                       (opts.json, json.dumps(records, indent=1, default=str))):
        if path:
            with open(path, "w") as f:
                f.write(text)
    if folder:
        with open(os.path.join(folder, "report.md"), "w") as f:
            f.write(head + "\n" + table + "\n")
        with open(os.path.join(folder, "report.json"), "w") as f:
            json.dump(records, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
