"""GEGLU: the feed-forward gate of the SD transformer blocks, one pass over the projection.

    hidden, gate = proj.chunk(2, dim=-1)       # proj [..., 2F]: hidden = proj[..., :F], gate = proj[..., F:]
    out = hidden * gelu(gate)                  # [..., F]

(diffusers ``GEGLU.forward`` after its ``proj`` linear layer; ``approximate="tanh"`` for the tanh
gelu.) Eager PyTorch runs a chunk (free), a gelu (read F, write F) and a multiply (read 2F, write F)
per row: 5F elements moved, in three launches for the backward's sake too. The kernel reads both
halves of each row in place, through one pointer and the offset F, and writes F: 3F elements.

Backward, one pass, from the same reads:

    d hidden = grad * gelu(gate)
    d gate   = grad * hidden * gelu'(gate)
    dproj    = cat([d hidden, d gate], -1)     # [..., 2F], written in place of the cat

gelu'(x) = Phi(x) + x * phi(x) for the exact (erf) gelu; for the tanh form, with
u = sqrt(2/pi) * (x + 0.044715 x^3) and t = tanh(u):
gelu'(x) = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2).

Math in fp32 whatever the storage dtype. Tensors are R rows (every leading dimension) of 2F
elements; the last dimension must be contiguous, rows may be strided (a row stride that is not a
single stride over the leading dimensions costs a copy). Each program takes a tile of ROWS rows x
BLOCK columns of 4096 elements (:func:`_plan`); row offsets are int64.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as TF

from ._grid import check_grid
from ._triton import cdiv, next_pow2, tl, triton
from ._launch import kernel

APPROXIMATE = ("none", "tanh")
NUM_WARPS = 8
TILE = 4096  # elements per program: 16 per thread
MIN_BLOCK = 128


@triton.jit
def _gelu_and_grad(b_x, TANH: tl.constexpr, WITH_GRAD: tl.constexpr):
    """``(gelu(x), gelu'(x))`` of an fp32 block (the derivative only when ``WITH_GRAD``, else 0)."""
    if TANH:
        b_u = 0.7978845608028654 * (b_x + 0.044715 * b_x * b_x * b_x)  # sqrt(2/pi) * (x + 0.044715 x^3)
        b_cdf = tl.sigmoid(2.0 * b_u)  # 0.5 * (1 + tanh(u))
        b_gelu = b_x * b_cdf
        if WITH_GRAD:
            # 1 - tanh(u)^2 = 4 sigmoid(2u) sigmoid(-2u): no cancellation where tanh(u) is near +-1
            b_sech2 = 4.0 * b_cdf * tl.sigmoid(-2.0 * b_u)
            b_grad = b_cdf + 0.5 * b_x * b_sech2 * 0.7978845608028654 * (1.0 + 0.134145 * b_x * b_x)
        else:
            b_grad = 0.0
    else:
        b_cdf = 0.5 * (1.0 + tl.math.erf(b_x * 0.7071067811865476))  # Phi(x)
        b_gelu = b_x * b_cdf
        if WITH_GRAD:
            b_grad = b_cdf + b_x * 0.3989422804014327 * tl.exp(-0.5 * b_x * b_x)  # Phi(x) + x phi(x)
        else:
            b_grad = 0.0
    return b_gelu, b_grad


@triton.jit
def _tile(n_col_blocks, R, F, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of ROWS rows x BLOCK columns: ``(o_row [ROWS, 1] int64, o_col [1, BLOCK], mask)``."""
    i_pid = tl.program_id(0)
    i_rows = i_pid // n_col_blocks
    i_col = i_pid % n_col_blocks
    o_row = (i_rows.to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None]
    o_col = (i_col * BLOCK + tl.arange(0, BLOCK))[None, :]
    return o_row, o_col, (o_row < R) & (o_col < F)


@kernel
@triton.jit
def _geglu_fwd_kernel(
    proj_ptr, out_ptr,  # proj [R, 2F] (row stride below, last dim contiguous); out [R, F] contiguous
    R, F, proj_row_stride, n_col_blocks,
    TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    o_row, o_col, m = _tile(n_col_blocks, R, F, ROWS, BLOCK)
    p_hidden = proj_ptr + o_row * proj_row_stride + o_col
    b_hidden = tl.load(p_hidden, mask=m).to(tl.float32)
    b_gate = tl.load(p_hidden + F, mask=m).to(tl.float32)
    b_gelu, _ = _gelu_and_grad(b_gate, TANH, False)
    tl.store(out_ptr + o_row * F + o_col, (b_hidden * b_gelu).to(out_ptr.dtype.element_ty), mask=m)


@kernel
@triton.jit
def _geglu_bwd_kernel(
    grad_ptr, proj_ptr, dproj_ptr,  # grad [R, F], proj [R, 2F] (row strides below); dproj [R, 2F] contiguous
    R, F, grad_row_stride, proj_row_stride, n_col_blocks,
    TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    o_row, o_col, m = _tile(n_col_blocks, R, F, ROWS, BLOCK)
    b_g = tl.load(grad_ptr + o_row * grad_row_stride + o_col, mask=m).to(tl.float32)
    p_hidden = proj_ptr + o_row * proj_row_stride + o_col
    b_hidden = tl.load(p_hidden, mask=m).to(tl.float32)
    b_gate = tl.load(p_hidden + F, mask=m).to(tl.float32)
    b_gelu, b_dgelu = _gelu_and_grad(b_gate, TANH, True)
    p_dhidden = dproj_ptr + o_row * (2 * F) + o_col
    tl.store(p_dhidden, (b_g * b_gelu).to(dproj_ptr.dtype.element_ty), mask=m)
    tl.store(p_dhidden + F, (b_g * b_hidden * b_dgelu).to(dproj_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=1024)
def _plan(R: int, F: int) -> tuple[int, int, int, int]:
    """``(ROWS, BLOCK, column blocks per row, programs)`` for tiles of TILE elements.

    BLOCK is the largest power of two from 128 to TILE that divides F, so no lane is masked off
    (F = 1280: 256; 2560: 512), else the smallest that covers F, up to TILE (F = 77: 128); a tile
    holds ``ROWS = TILE / BLOCK`` rows (16 elements per thread at 8 warps: 128-bit accesses).
    """
    block = min(TILE, max(MIN_BLOCK, next_pow2(F)))
    divisor = block
    while divisor >= MIN_BLOCK and F % divisor:
        divisor //= 2
    if divisor >= MIN_BLOCK:
        block = divisor
    rows = TILE // block
    n_col_blocks = cdiv(F, block)
    return rows, block, n_col_blocks, check_grid((cdiv(R, rows) * n_col_blocks,), "geglu")[0]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(x, row_stride)`` for ``x`` ``[..., K]`` read as R rows of K: in place when the last dim is
    contiguous and the leading dims collapse into one stride, else a contiguous copy."""
    if x.is_contiguous():  # the common case (a Linear's output), without the loop
        return x, x.shape[-1]
    if x.stride(-1) != 1 and x.shape[-1] != 1:
        x = x.contiguous()
    row_stride = None  # the stride of the innermost leading dim of size > 1
    for size, step in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size == 1:
            continue
        if row_stride is None:
            row_stride, expected = step, step * size
        elif step != expected:
            x = x.contiguous()
            return x, x.shape[-1]
        else:
            expected = step * size
    return x, (row_stride if row_stride is not None else x.shape[-1])


def _check(proj, approximate: str) -> int:
    if not isinstance(proj, torch.Tensor):
        raise TypeError(f"geglu: proj must be a torch.Tensor, got {type(proj).__name__}")
    if not proj.is_floating_point():
        raise TypeError(f"geglu: proj must be a floating-point tensor, got {proj.dtype}")
    if proj.dim() < 1 or proj.shape[-1] % 2:
        raise ValueError(f"geglu: proj's last dimension must be even (2F), got shape {tuple(proj.shape)}")
    if approximate not in APPROXIMATE:
        raise ValueError(f"geglu: approximate must be one of {APPROXIMATE}, got {approximate!r}")
    return proj.shape[-1] // 2


def geglu_fwd(proj: torch.Tensor, approximate: str = "none", *, checked: bool = False) -> torch.Tensor:
    """Launch the forward kernel: ``out = proj[..., :F] * gelu(proj[..., F:])``.

    proj: ``[..., 2F]`` floating point, last dim contiguous (rows may be strided: read in place).
    Returns out ``[..., F]``, contiguous, in proj's dtype; one launch. ``checked``: the caller (the
    op) has checked the arguments already. Eager equivalent: :func:`geglu_reference`.
    """
    F = proj.shape[-1] // 2 if checked else _check(proj, approximate)
    out = torch.empty(proj.shape[:-1] + (F,), dtype=proj.dtype, device=proj.device)
    if out.numel() == 0:
        return out
    proj, proj_rs = _rows(proj)
    R = out.numel() // F
    rows, block, n_col_blocks, n_programs = _plan(R, F)
    _geglu_fwd_kernel[(n_programs,)](
        proj, out, R, F, proj_rs, n_col_blocks,
        TANH=approximate == "tanh", ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
    )
    return out


def geglu_bwd(grad: torch.Tensor, proj: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Launch the backward kernel: ``dproj = cat([grad * gelu(gate), grad * hidden * gelu'(gate)], -1)``.

    grad: dL/dout ``[..., F]``; proj: the forward's input ``[..., 2F]`` (both last dim contiguous,
    rows may be strided). Returns dproj ``[..., 2F]``, contiguous, in proj's dtype; one launch.
    """
    F = _check(proj, approximate)
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"geglu: grad must be a torch.Tensor, got {type(grad).__name__}")
    if grad.shape != proj.shape[:-1] + (F,):
        raise ValueError(f"geglu: grad must have shape {tuple(proj.shape[:-1]) + (F,)}, got {tuple(grad.shape)}")
    dproj = torch.empty_like(proj, memory_format=torch.contiguous_format)
    if dproj.numel() == 0:
        return dproj
    grad, grad_rs = _rows(grad)
    proj, proj_rs = _rows(proj)
    R = grad.numel() // F
    rows, block, n_col_blocks, n_programs = _plan(R, F)
    _geglu_bwd_kernel[(n_programs,)](
        grad, proj, dproj, R, F, grad_rs, proj_rs, n_col_blocks,
        TANH=approximate == "tanh", ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
    )
    return dproj


def geglu_reference(proj: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """Eager reference, differentiable by autograd: diffusers' ``hidden * F.gelu(gate)``.

    proj: ``[..., 2F]``; returns ``[..., F]`` in proj's dtype, computed in proj's dtype as diffusers
    does (so at fp16/bf16 it is the eager low-precision result the kernel is judged against; at
    fp64 the exact one).
    """
    _check(proj, approximate)
    hidden, gate = proj.chunk(2, dim=-1)
    return hidden * TF.gelu(gate, approximate=approximate)
