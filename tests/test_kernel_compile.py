"""The Triton kernels compile ahead of time for an H100 (sm_90) on any machine: the full
pipeline to a cubin (frontend, MLIR passes, ptxas from the triton wheel), no GPU needed.
The interpreter runs the kernels' semantics; this catches what only the compiler rejects.
It runs in a fresh interpreter, since under TRITON_INTERPRET=1 nothing is compiled."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from unisd_fast.backends.triton import grad, stats
    from unisd_fast.backends.triton.common import DIVERGENCE_CODE

    ROW = {"T": "i32", "V": "i32"}

    def strides(*names):
        return {f"{n}_{s}": t for n in names for s, t in (("sb", "i64"), ("st", "i32"))}

    def compile_kernel(fn, signature, constexprs):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": 16})
        assert "cubin" in kernel.asm

    for divergence, div in DIVERGENCE_CODE.items():
        for dtype in ("fp32", "bf16", "fp16"):
            logits = {"z_ptr": f"*{dtype}", "u_ptr": f"*{dtype}", "y_ptr": "*i64"}
            rows = {f"{n}_ptr": "*fp32" for n in ("lse_s", "lse_t", "d", "aux")}
            grad_rows = {f"{n}_ptr": "*fp32" for n in ("lse_s", "lse_t", "gap", "d", "aux")}
            stats_args = {
                **logits, **rows, "s_lab_ptr": "*fp32", "t_lab_ptr": "*fp32",
                "gap_ptr": "*fp32", "redo_ptr": "*i32", **ROW,
                **strides("z", "u", "y"), "inv_tau": "fp32", "alpha": "fp32"}
            compile_kernel(stats._stats_kernel, {**stats_args, "ignore_index": "i32"},
                           {"DIV": div, "BLOCK": 4096})
            compile_kernel(stats._stats_exact_kernel, stats_args, {"DIV": div, "BLOCK": 2048})
            # one kernel for both grids: COLS (columns per program) is a run-time argument
            compile_kernel(grad._grad_kernel, {
                **logits, "g_ptr": f"*{dtype}", **grad_rows, "ck_ptr": "*fp32",
                "cc_ptr": "*fp32", **ROW, "COLS": "i32", **strides("z", "u", "y", "g"),
                "inv_tau": "fp32", "alpha": "fp32"},
                {"DIV": div, "BF16_OUT": dtype == "bf16", "BLOCK": 4096})
            compile_kernel(stats._label_logprob_kernel, {
                "x_ptr": f"*{dtype}", "y_ptr": "*i64", "out_ptr": "*fp32", **ROW,
                **strides("x", "y"), "inv_tau": "fp32", "ignore_index": "i32"},
                {"BLOCK": 1024})
            print("compiled", divergence, dtype)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines compile for real")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 9
