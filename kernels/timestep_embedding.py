"""Sinusoidal timestep embedding: the U-Net's ``Timesteps`` module, one launch.

    half     = dim // 2
    freq[k]  = exp(-log(max_period) * k / (half - downscale_freq_shift))     # k = 0 .. half - 1
    arg[n,k] = scale * (float(t[n]) * freq[k])
    out      = cat([sin(arg), cos(arg)], -1)   # [N, 2 * half]; cos first when flip_sin_to_cos
    out      = pad(out, (0, 1)) when dim is odd: the last column 0

(diffusers ``get_timestep_embedding``; SD 1.5's ``Timesteps(320, flip_sin_to_cos=True,
downscale_freq_shift=0)``.) Eager PyTorch runs about ten launches for it (arange, two scalar
ops, exp, the outer product, the scale, sin, cos, one or two cats, the pad); the kernel is one
and writes ``[N, dim]`` fp32 once.

The kernel makes eager's fp32 rounding steps in eager's order, so it differs from eager only by
the exp/sin/cos implementations: ``fl(-log(max_period)) * k`` (an fp32 product, k exact), the
IEEE division by ``fl(half - downscale_freq_shift)`` (``div_rn``: Triton's ``/`` on fp32 is
``div.full``, 2 ulp), exp, ``t.float() * freq`` (timesteps read in their own dtype and converted
in the kernel, int64 rounding to nearest as ``.float()`` does), ``fl(scale) * emb``, sin and cos.
No sum follows a product, so no FMA contraction changes a rounding. The functions, on a GPU:
exp is libdevice's fp64 ``exp`` of the fp32 exponent, rounded once to fp32 (the correctly rounded
expf, as torch's CPU exp nearly is; libdevice's ``expf`` is 2 ulp and ``tl.exp`` is
``ex2.approx``, and ``t * freq`` carries a frequency's error into the argument), sin and cos are
libdevice's ``sinf``/``cosf`` (full range reduction: the arguments reach ``scale * t``, hundreds
of radians, where ``sin.approx`` is far off). Triton's CPU interpreter cannot call libdevice:
there they are ``tl.exp`` (fp64) / ``tl.sin`` / ``tl.cos``, numpy's functions, chosen by the
constexpr ``INTERPRETER_MATH`` that the launcher sets only for CPU tensors. (torch on CUDA
divides by a scalar as ``a * (1 / b)``: there eager's exponent may differ from this one and
from eager's on the CPU by an ulp.)

Plan: each program takes ROWS timesteps x BLOCK frequencies of the ``[N, half]`` argument grid
and stores the sin and the cos of each, at columns ``k`` and ``half + k`` (swapped by ``FLIP``);
the first column block of each row block also writes the odd dim's pad column. BLOCK is the next
power of two >= half (16 to 512), ROWS = TILE / BLOCK, at most the next power of two >= N, four
elements a thread (:func:`_plan`; sm_80/sm_90 audit: no spills, 128-bit stores where aligned).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as TF

from ._grid import check_grid
from ._triton import cdiv, next_pow2, tl, triton
from ._launch import kernel

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - no triton (the stand-in): the kernel never launches
    libdevice = None

#: The timestep dtypes the kernel reads (others, e.g. uint32 or float8, run the eager reference).
TIMESTEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                   torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
TILE = 512  # elements of the [N, half] grid per program: 4 a thread at 4 warps (one 128-bit store per site)
MIN_BLOCK = 16
MAX_BLOCK = 512
ELEMENTS_PER_THREAD = 4  # libdevice's sinf + cosf of 8 a thread spill a few bytes on sm_80 (ptxas)


@kernel
@triton.jit
def _timestep_embedding_kernel(
    t_ptr, out_ptr,  # t [N] in its own dtype (element stride t_stride, 0 for an expanded tensor); out [N, dim] fp32
    N, dim, half, t_stride, neg_log_period, divisor, scale, n_col_blocks,
    FLIP: tl.constexpr, INTERPRETER_MATH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    i_pid = tl.program_id(0)
    i_rows = i_pid // n_col_blocks
    i_col = i_pid % n_col_blocks
    o_row = i_rows.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] timesteps
    o_k = i_col * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] frequencies
    m_row = o_row < N
    m_k = o_k < half
    b_t = tl.load(t_ptr + o_row * t_stride, mask=m_row).to(tl.float32)  # timesteps.float()
    b_exponent = tl.math.div_rn(neg_log_period * o_k.to(tl.float32), divisor)
    # exp in fp64, rounded once to fp32: the correctly rounded expf (torch's is within ~0.5 ulp too;
    # libdevice's expf and numpy's are up to 2 ulp off, and t * freq carries that error to the
    # argument: up to 3x eager's error at t ~ 1000). Only [BLOCK] values a program.
    if INTERPRETER_MATH:
        b_freq = tl.exp(b_exponent.to(tl.float64)).to(tl.float32)
    else:
        b_freq = libdevice.exp(b_exponent.to(tl.float64)).to(tl.float32)
    b_arg = scale * (b_t[:, None] * b_freq[None, :])  # [ROWS, BLOCK]
    if INTERPRETER_MATH:
        b_sin, b_cos = tl.sin(b_arg), tl.cos(b_arg)
    else:
        b_sin, b_cos = libdevice.sin(b_arg), libdevice.cos(b_arg)
    if FLIP:
        b_first, b_second = b_cos, b_sin
    else:
        b_first, b_second = b_sin, b_cos
    p_out = out_ptr + o_row[:, None] * dim + o_k[None, :]
    m = m_row[:, None] & m_k[None, :]
    tl.store(p_out, b_first, mask=m)
    tl.store(p_out + half, b_second, mask=m)
    # the odd dim's zero column: written by each row block's first column block (rows below n_pad)
    n_pad = tl.where((i_col == 0) & (2 * half < dim), N, 0)
    tl.store(out_ptr + o_row * dim + (dim - 1), tl.zeros([ROWS], tl.float32), mask=o_row < n_pad)


@functools.lru_cache(maxsize=1024)
def _plan(N: int, half: int) -> tuple[int, int, int, int, int]:
    """``(ROWS, BLOCK, column blocks, programs, num_warps)`` for the ``[N, half]`` argument grid.

    BLOCK covers ``half`` (the next power of two, 16 to 512: SD's half = 160 takes 256; SDXL's
    1280 / 2 = 640 two blocks of 512), ROWS the rest of a TILE, at most the next power of two >= N
    (a batch of 2 is one program of 2 x 256 at 4 warps); 4 elements a thread, so fewer warps for
    smaller tiles. ``half = 0`` (dim 1) still has one column block: it writes the pad column.
    """
    block = min(MAX_BLOCK, max(MIN_BLOCK, next_pow2(half)))
    rows = min(next_pow2(N), max(1, TILE // block))
    n_col_blocks = max(1, cdiv(half, block))
    num_warps = max(1, min(4, rows * block // (32 * ELEMENTS_PER_THREAD)))
    return rows, block, n_col_blocks, check_grid((cdiv(N, rows) * n_col_blocks,), "timestep_embedding")[0], num_warps


def check_timesteps(timesteps, dim) -> int:
    """``dim`` as an int, after the checks of ``timesteps`` (a 1-D integer or floating-point tensor)
    and ``dim`` (a positive int); TypeError / ValueError naming the argument otherwise."""
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timestep_embedding: timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.dtype == torch.bool or timesteps.is_complex():
        raise TypeError(f"timestep_embedding: timesteps must be an integer or floating-point tensor, "
                        f"got dtype {timesteps.dtype}")
    if timesteps.dim() != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D [N] (one per batch row), "
                         f"got shape {tuple(timesteps.shape)}")
    if type(dim) is not int:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"timestep_embedding: dim must be an int, got {type(dim).__name__}")
        dim = int(dim)
    if dim <= 0:
        raise ValueError(f"timestep_embedding: dim must be positive, got {dim}")
    return dim


def check_shift(dim: int, downscale_freq_shift: float) -> None:
    """The exponent divides by ``dim // 2 - downscale_freq_shift``: ValueError where that is 0 and
    there is a frequency to divide (dim >= 2)."""
    if dim // 2 and dim // 2 - downscale_freq_shift == 0:
        raise ValueError(f"timestep_embedding: downscale_freq_shift must differ from dim // 2 = {dim // 2} "
                         f"(the exponent divides by their difference), got {downscale_freq_shift}")


def timestep_embedding_fwd(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: float = 10000) -> torch.Tensor:
    """Launch the kernel: the ``[N, dim]`` fp32 embedding of ``timesteps`` ``[N]`` (a dtype of
    :data:`TIMESTEP_DTYPES`, any stride: read in place, converted in the kernel); one launch.
    Eager equivalent: :func:`timestep_embedding_reference`. (The public op checks the float
    arguments too: finite, max_period positive.)"""
    dim = check_timesteps(timesteps, dim)
    if timesteps.dtype not in TIMESTEP_DTYPES:
        raise TypeError(f"timestep_embedding: the kernel reads timesteps of {TIMESTEP_DTYPES}, got {timesteps.dtype}")
    check_shift(dim, downscale_freq_shift)
    N, half = timesteps.shape[0], dim // 2
    out = torch.empty((N, dim), dtype=torch.float32, device=timesteps.device)
    if N == 0:
        return out
    rows, block, n_col_blocks, n_programs, num_warps = _plan(N, half)
    divisor = float(half - downscale_freq_shift) if half else 1.0  # dim 1: no frequency (masked lanes kept finite)
    _timestep_embedding_kernel[(n_programs,)](
        timesteps, out, N, dim, half, timesteps.stride(0), -math.log(max_period), divisor, float(scale), n_col_blocks,
        FLIP=bool(flip_sin_to_cos), INTERPRETER_MATH=timesteps.device.type == "cpu", ROWS=rows, BLOCK=block,
        num_warps=num_warps,
    )
    return out


def timestep_embedding_reference(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                                 downscale_freq_shift: float = 1.0, scale: float = 1.0,
                                 max_period: float = 10000) -> torch.Tensor:
    """Eager reference: diffusers' ``get_timestep_embedding`` statement for statement (bit for bit;
    the arguments as the public op checks them). ``[N]`` -> ``[N, dim]`` fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    freq = torch.exp(exponent)
    emb = timesteps[:, None].float() * freq[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = TF.pad(emb, (0, 1, 0, 0))
    return emb
