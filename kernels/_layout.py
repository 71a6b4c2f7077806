"""Row layout shared by the elementwise kernels: a tensor ``[R, *rest]`` as R rows of K elements.

Host side, :func:`as_rows` finds each row's stride (or copies) and :func:`row_blocks` sizes the
grid; device side, :func:`row_block` maps a program to its row and block of columns.
"""

from __future__ import annotations

import functools

import torch

from ._grid import check_grid
from ._triton import cdiv, next_pow2, tl, triton

MAX_BLOCK = 1024


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View ``x`` of shape ``[R, *rest]`` as R rows of ``K = prod(rest)`` contiguous elements.

    Returns ``(x, row_stride)`` when every row is already contiguous (a channel slice of a
    ``[B, 2C, H, W]`` moments tensor is: its rows are ``2*C*H*W`` apart), else a contiguous copy
    and its row stride ``K``. A 1-d tensor is one row.
    """
    if x.dim() <= 1:
        x = x.contiguous()
        return x, x.numel()
    shape, stride = x.shape, x.stride()
    K = 1  # the row's elements so far, from the last dim: what a contiguous row's stride must be
    rows_contiguous = True
    for size, step in zip(reversed(shape[1:]), reversed(stride[1:])):
        if size != 1 and step != K:
            rows_contiguous = False
        K *= size
    if rows_contiguous and shape[0] > 0:
        return x, (stride[0] if shape[0] > 1 else K)
    return x.contiguous(), K


@functools.lru_cache(maxsize=1024)
def row_blocks(rows: int, K: int) -> tuple[int, int, int]:
    """``(BLOCK, column blocks per row, programs)`` for a grid of one program per block of one row.

    BLOCK is at least 16 (a multiple of 4, as the in-kernel noise needs) and at most 1024. The
    programs are one grid axis, below CUDA's 2^31 (ValueError above: 2^31 rows, or 2^41 elements).
    """
    block = min(MAX_BLOCK, max(16, next_pow2(K)))
    n_col_blocks = cdiv(K, block)
    return block, n_col_blocks, check_grid((rows * n_col_blocks,), "row kernel")[0]


@triton.jit
def row_block(n_col_blocks, K, BLOCK: tl.constexpr):
    """This program's ``(i_row, i_col, row, o_col, m_col)``: row index (int32 and int64), column block,
    the block's column offsets and their in-bounds mask."""
    i_pid = tl.program_id(0)
    i_row = i_pid // n_col_blocks
    i_col = i_pid % n_col_blocks
    o_col = i_col * BLOCK + tl.arange(0, BLOCK)
    return i_row, i_col, i_row.to(tl.int64), o_col, o_col < K
