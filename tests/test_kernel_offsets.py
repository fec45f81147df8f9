"""The int64 row addressing of the kernels, checked cheaply: offsets past 2^31 elements
(8 x 4096 tokens x 151936 vocab) computed by the kernels' own helper, no big tensor needed."""

import torch
import triton
import triton.language as tl

from unisd_fast.backends.triton.common import row_offset


@triton.jit
def _offsets_kernel(rows_ptr, out_ptr, T, stride_b, stride_t, N: tl.constexpr):
    i = tl.arange(0, N)
    rows = tl.load(rows_ptr + i)
    tl.store(out_ptr + i, row_offset(rows, T, stride_b, stride_t))


def test_row_offsets_beyond_int32(device):
    B, T, V = 8, 4096, 151936
    stride_b, stride_t = T * V, V
    rows = torch.tensor([0, 1, T - 1, T, 3 * T + 5, 5 * T + 17, 7 * T + 100, B * T - 1],
                        dtype=torch.int32, device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    _offsets_kernel[(1,)](rows, out, T, stride_b, stride_t, N=8)
    expected = [(r // T) * stride_b + (r % T) * stride_t for r in rows.tolist()]
    assert max(expected) > 2**31
    assert out.tolist() == expected


def test_row_offsets_of_a_sliced_sequence(device):
    # logits[:, :-1] of a (B, T + 1, V) tensor: batch stride (T + 1) V, time stride V
    T, V = 3000, 151936
    rows = torch.tensor([0, T - 1, T, 2 * T + 7, 4 * T + 2999, 5 * T, 6 * T + 1, 6 * T + 2],
                        dtype=torch.int32, device=device)
    out = torch.empty(8, dtype=torch.int64, device=device)
    _offsets_kernel[(1,)](rows, out, T, (T + 1) * V, V, N=8)
    assert out.tolist() == [(r // T) * (T + 1) * V + (r % T) * V for r in rows.tolist()]
