"""Shared pieces of the row kernels: int64 row addressing and the launch geometry."""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK = 4096
DIVERGENCE_CODE = {"fkl": 0, "rkl": 1, "jsd": 2}
FKL = tl.constexpr(DIVERGENCE_CODE["fkl"])
RKL = tl.constexpr(DIVERGENCE_CODE["rkl"])


# Row r of a (B, T, ...) tensor with strides (sb, st) starts at (r // T) * sb + (r % T) * st.
# r is promoted to int64 first, so tokens x vocab above 2^31 elements address correctly.
@triton.jit
def row_offset(row, T, stride_b, stride_t):
    row = row.to(tl.int64)
    return (row // T) * stride_b + (row % T) * stride_t


# float32 -> bfloat16 with round-to-nearest-even on the bit pattern: add 0x7FFF plus the
# lowest kept bit, keep the high half. Triton's interpreter truncates in .to(bfloat16); the
# compiled cast rounds to nearest even, so both paths give the same bits this way.
@triton.jit
def to_bf16_rne(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def launch_geometry(vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a power-of-two vocabulary tile of at most MAX_BLOCK columns."""
    block = min(MAX_BLOCK, triton.next_power_of_2(vocab))
    if block >= 4096:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps


def strides_bt(x) -> tuple[int, int]:
    """Batch and time strides of a (B, T, ...) tensor."""
    return x.stride(0), x.stride(1)
