"""GroupNorm (+SiLU) over ``[B, C, *spatial]``, forward and backward, NCHW or channels-last.

    x'   = x + shift[b, c]         (optional shift [B, C]; else x' = x)
    mean[b, g], var[b, g] = mean and biased variance of x'[b, channels of group g, all positions]
    xhat = (x' - mean[b, g(c)]) * rstd[b, g(c)],   rstd = 1 / sqrt(var + eps)
    z    = xhat * weight[c] + bias[c]
    y    = z                       (activation None)
         = z * sigmoid(z)          (activation "silu", fused in the same pass)

The shift is diffusers' ResnetBlock2D ``h = conv1(h) + temb[:, :, None, None]; h = norm2(h)``
with the add folded in: it is added in fp32 to x as each tile is loaded (before the statistics,
x' is never stored), and in the backward dshift[b, c] = sum_s dx[b, c, s].

Notation: B batch, C channels, G groups, CG = C // G channels per group, S = prod(spatial)
positions (H*W for images, T*H*W for video latents), N = CG * S elements per group.

Layouts. Inside one batch item, element (s, c) lies at ``c * S + s`` (NCHW-contiguous) or at
``s * C + c`` (channels-last: NHWC, NDHWC). Every kernel works on ``[BLOCK_S, BLOCK_C]`` tiles of
positions x channels (the split forward's NCHW statistics on 1-d runs of a group), and one
constexpr flag per tensor (``X_CL``, ``Y_CL``, ...) picks its address formula; the fast axis is S for NCHW and C for channels-last, and Triton's coalescing turns it into
128-bit accesses (an NCHW input written channels-last is transposed through shared memory by the
compiler). Any other layout is made NCHW-contiguous on the host.

Numerics. Statistics and math in fp32 whatever the storage dtype; variance by two passes over
registers within a tile and the parallel (Chan) combination across tiles, never E[x^2] - E[x]^2.
Output in x's dtype; weight and bias may be fp32, fp16 or bf16 independently of x. Offsets that
scale with the tensor are int64.

Two paths, chosen per call by the padded size of one group:

* one pass (:func:`one_pass_fits`: ``next_pow2(S) * (BLOCK_C + BLOCK_C2) <= ONE_PASS_MAX``, the
  group's channels held as two power-of-two pieces, e.g. 10 = 8 + 2; or, with x and y NCHW, up to
  ``ONE_PASS_MAX_BYTES`` of x and 20480 elements: the U-Net's 640x32x32 groups): a
  program per (group, block of batch items) loads each of its groups once into registers (up to
  16384 values over 16 warps, 20480 over 32), computes the statistics and writes y. Traffic: x
  read once, y written once; weight and bias read once per batch block (blocks of several batch
  items only while that leaves at least ``ONE_PASS_MIN_PROGRAMS`` programs).
* split (larger groups; at batch 1 a 32-group norm has only 32 groups for 132 SMs), two
  launches: a statistics kernel over ``[chunk, group, batch]`` programs (about
  ``TARGET_PROGRAMS`` of them, each looping over its chunk's tiles: 1-d tiles of ``TILE``
  elements of the group's contiguous run of CG * S for NCHW, ``[TILE // next_pow2(CG),
  next_pow2(CG)]`` positions x channels for channels-last) writes the (mean, M2) of its chunk of
  its group to ``[2, B, G, chunks]``; an apply kernel over ``[S-chunk, channel block, batch]``
  programs first merges the chunk partials of the groups its channels belong to (Chan's
  combination; the chunk-0 program of a group writes its mean/rstd for the backward), then
  normalizes its tiles. Traffic: x read twice, y written once, plus the partials (8 bytes per
  chunk of a group, re-read by each apply program of the group). Apply tiles are
  ``[min(next_pow2(S), 1024), TILE // that]`` when every tensor is NCHW (long contiguous rows
  of S) and ``[TILE // 64, 64]`` channels otherwise.

Backward (dy = dL/dy; dz = dy * silu'(z) with silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z), the
derivative taken at z AFTER the affine transform; dz = dy without activation):

    dbias[c]   = sum_{b, s} dz
    dweight[c] = sum_{b, s} dz * xhat
    dx         = rstd * (dz * weight[c] - c1[b, g] - xhat * c2[b, g])
    c1[b, g]   = mean over the group of dz * weight,  c2[b, g] = mean over the group of dz * weight * xhat
    dshift[b, c] = sum_s dx = rstd * (weight[c] * sum_s dz - S * c1 - c2 * sum_s xhat)

The per-channel sums sum_s dz and sum_s dz * xhat of each (batch block or chunk) go to an fp32
partial buffer; c1/c2 and the weight/bias gradients are reductions of that buffer in a fixed order
(deterministic: no atomics). The same two paths: one pass per (group, batch block) under
``ONE_PASS_MAX_BWD`` (x and dy held in registers), else statistics -> finalize -> apply.
With a shift, the one-pass kernel sums its dx per channel in registers; the split statistics
kernel also sums xhat per channel (a third partial plane) and the finalize writes dshift from the
formula above: no extra launch and no extra pass over a full tensor either way.

The module constants below are read at every launch, so tests can force the split path, small
tiles and several tiles per program at small sizes by setting them.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._grid import MAX_GRID_YZ, axis_launches
from ._triton import cdiv, next_pow2, tl, triton
from ._launch import kernel

#: Largest group (next_pow2(S) x the channel pieces, elements) the one-pass forward holds on chip
#: in any layout and dtype (16 warps).
ONE_PASS_MAX = 16384
#: Above ONE_PASS_MAX, the largest group in bytes of x the one-pass forward holds when x and y are
#: both NCHW, further capped at 20480 elements by :func:`_one_pass_big_warps` (the shapes and
#: warps checked free of spills with ptxas on sm_80 and sm_90; channels-last spills).
ONE_PASS_MAX_BYTES = 81920
#: The same for the one-pass backward, which holds both x and dy.
ONE_PASS_MAX_BWD = 8192
#: Fewest one-pass programs worth keeping when batch items are grouped into one program.
ONE_PASS_MIN_PROGRAMS = 64
#: Elements of one [BLOCK_S, BLOCK_C] tile of the split kernels.
TILE = 4096
#: Programs the split statistics and apply kernels aim for; a program loops over tiles above that.
TARGET_PROGRAMS = 1024
SPLIT_WARPS = 8
#: Rows of the partial buffer a finalize / column-sum program reads per step.
REDUCE_BLOCK = 2048
#: Chunk partials of one group the forward apply kernel merges per step.
MERGE_BLOCK = 256

ACTIVATIONS = (None, "silu")
#: Most channels the kernels take: groups (the split statistics) and channel blocks (the split
#: apply kernels) sit on grid axis 1, which CUDA caps at 65,535 programs (kernels/_grid.py); more
#: channels run the eager reference (:func:`ldm_fast.functional.group_norm` checks). The batch has no
#: limit: the split kernels take it in slabs of 65,535, the one-pass kernels in blocks that keep
#: axis 1 small (:func:`_batches_per_program`).
MAX_CHANNELS = MAX_GRID_YZ


# ---------------------------------------------------------------------------------------------
# kernels
#
# Addresses: inside one batch item (base ``b * C * S``, int64) a tile's element offsets are
# ``s * C + c`` (channels-last) or ``s + c * S`` (NCHW); each kernel computes the form its layout
# flags ask for. A missing weight or bias (HAS_W / HAS_B false) reads as ones / zeros in-kernel,
# so the launcher allocates and fills nothing for it.
# SiLU is written out as z / (1 + exp(-z)) and its derivative as s * (1 + z * (1 - s)).


@triton.jit
def _load_param(ptr, o_c, m_c, HAS: tl.constexpr, FILL: tl.constexpr):
    """A weight or bias ``[C]`` at channels o_c as fp32 (0 where masked); FILL (1.0 for the
    weight, 0.0 for the bias) everywhere when the parameter is None (HAS false)."""
    b_p = tl.where(m_c, FILL, 0.0)
    if HAS:
        b_p = tl.load(ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    return b_p


@triton.jit
def _load_shift(shift_ptr, i_b, row_stride, o_c, m_c):
    """shift[i_b, o_c] of a ``[B, C]`` shift (rows ``row_stride`` apart, channels contiguous) as fp32
    (0 where masked)."""
    return tl.load(shift_ptr + i_b * row_stride + o_c, mask=m_c, other=0.0).to(tl.float32)


@kernel
@triton.jit(do_not_specialize=["batches_per_program"])
def _group_norm_fwd_one_pass_kernel(
    x_ptr, y_ptr,  # [B, C, S], layouts X_CL and Y_CL; y written
    w_ptr, b_ptr,  # [C]
    shift_ptr,  # [B, C] (rows shift_stride apart, channels contiguous), read when HAS_SHIFT (None otherwise)
    mean_ptr, rstd_ptr,  # [B, G] fp32, written when WRITE_STATS (what the backward needs)
    B, C, S, G, batches_per_program, eps, shift_stride,
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_C2: tl.constexpr,
    X_CL: tl.constexpr, Y_CL: tl.constexpr, SILU: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_STATS: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Program (group, batch block): for each of its batches, the whole group [S, CG] in registers,
    read once. Weight and bias are loaded once for the batch block.

    The group's channels are held as two power-of-two pieces, channels [0, BLOCK_C) and
    [BLOCK_C, BLOCK_C + BLOCK_C2) of the group (BLOCK_C2 = 0: one piece), so that 10 channels take
    8 + 2 columns rather than 16 and 20 take 16 + 4 rather than 32: the registers hold the group
    itself, not its padding to a power of two."""
    i_g = tl.program_id(0)
    i_bb = tl.program_id(1)
    o_s = tl.arange(0, BLOCK_S)
    m_s = o_s < S
    n = S * CG * 1.0
    # piece 1: channels i_g * CG + [0, BLOCK_C)
    o_k = tl.arange(0, BLOCK_C)
    o_c = i_g * CG + o_k
    m_c = o_k < CG
    m = m_s[:, None] & m_c[None, :]
    o_cl = o_s.to(tl.int64)[:, None] * C + o_c[None, :]
    o_nc = o_s[:, None] + o_c.to(tl.int64)[None, :] * S
    b_w = _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    b_bias = _load_param(b_ptr, o_c, m_c, HAS_B, 0.0)
    if BLOCK_C2 > 0:  # piece 2: channels i_g * CG + BLOCK_C + [0, BLOCK_C2)
        o_k2 = BLOCK_C + tl.arange(0, BLOCK_C2)
        o_c2 = i_g * CG + o_k2
        m_c2 = o_k2 < CG
        m2 = m_s[:, None] & m_c2[None, :]
        o_cl2 = o_s.to(tl.int64)[:, None] * C + o_c2[None, :]
        o_nc2 = o_s[:, None] + o_c2.to(tl.int64)[None, :] * S
        b_w2 = _load_param(w_ptr, o_c2, m_c2, HAS_W, 1.0)
        b_bias2 = _load_param(b_ptr, o_c2, m_c2, HAS_B, 0.0)

    b_begin = i_bb * batches_per_program
    for i_i in range(0, tl.minimum(batches_per_program, B - b_begin)):
        i_b = b_begin + i_i
        o_batch = i_b.to(tl.int64) * C * S
        b_x = tl.load(x_ptr + o_batch + (o_cl if X_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        if HAS_SHIFT:  # x' = x + shift[b, c] (padding lanes stay 0)
            b_x = tl.where(m, b_x + _load_shift(shift_ptr, i_b, shift_stride, o_c, m_c)[None, :], 0.0)
        b_sum = tl.sum(b_x)
        if BLOCK_C2 > 0:
            b_x2 = tl.load(x_ptr + o_batch + (o_cl2 if X_CL else o_nc2), mask=m2, other=0.0).to(tl.float32)
            if HAS_SHIFT:
                b_x2 = tl.where(m2, b_x2 + _load_shift(shift_ptr, i_b, shift_stride, o_c2, m_c2)[None, :], 0.0)
            b_sum += tl.sum(b_x2)
        b_mean = b_sum / n
        # two passes over registers: the variance from the deviations
        b_d = tl.where(m, b_x - b_mean, 0.0)
        b_m2 = tl.sum(b_d * b_d)
        if BLOCK_C2 > 0:
            b_d2 = tl.where(m2, b_x2 - b_mean, 0.0)
            b_m2 += tl.sum(b_d2 * b_d2)
        b_rstd = tl.rsqrt(b_m2 / n + eps)
        b_y = b_d * (b_rstd * b_w)[None, :] + b_bias[None, :]
        if SILU:
            b_y = b_y / (1.0 + tl.exp(-b_y))
        tl.store(y_ptr + o_batch + (o_cl if Y_CL else o_nc), b_y.to(y_ptr.dtype.element_ty), mask=m)
        if BLOCK_C2 > 0:
            b_y2 = b_d2 * (b_rstd * b_w2)[None, :] + b_bias2[None, :]
            if SILU:
                b_y2 = b_y2 / (1.0 + tl.exp(-b_y2))
            tl.store(y_ptr + o_batch + (o_cl2 if Y_CL else o_nc2), b_y2.to(y_ptr.dtype.element_ty), mask=m2)
        if WRITE_STATS:
            tl.store(mean_ptr + i_b * G + i_g, b_mean)
            tl.store(rstd_ptr + i_b * G + i_g, b_rstd)


@kernel
@triton.jit(do_not_specialize=["n_chunks", "tiles_per_chunk", "part_plane", "b_offset"])
def _group_norm_fwd_stats_kernel(
    x_ptr,  # [B, C, S], layout X_CL
    shift_ptr,  # [B, C] (rows shift_stride apart, channels contiguous), read when HAS_SHIFT (None otherwise)
    part_ptr,  # [2, B, G, n_chunks] fp32, written: mean and M2 of each chunk of each group
    C, S, G, n_chunks, tiles_per_chunk, part_plane, shift_stride, b_offset,  # b_offset: this launch's first batch
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, X_CL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """Program (chunk, group, batch): mean and M2 of one chunk of one group, over its tiles.

    Chunks are tiles_per_chunk * BLOCK_S units long (a multiple of the tile, so tiles stay aligned
    for 128-bit loads). NCHW: a group is one contiguous run of N = CG * S elements, chunk i is
    elements [i * chunk_len, (i + 1) * chunk_len), read in 1-d tiles of BLOCK_S. Channels-last:
    chunk i is positions [i * chunk_len, (i + 1) * chunk_len) of the group's CG channels, read in
    [BLOCK_S, BLOCK_C] tiles. Tiles are merged by Chan's update (two passes within a tile). With
    HAS_SHIFT the statistics are of x + shift[b, c] (NCHW: element u of the group is in channel
    i_g * CG + u // S)."""
    i_n = tl.program_id(0)
    i_g = tl.program_id(1)
    i_b = tl.program_id(2) + b_offset
    n_units = S * CG if not X_CL else S  # elements (NCHW) or positions (channels-last) of the group
    u_begin = i_n * tiles_per_chunk * BLOCK_S
    u_end = tl.minimum(u_begin + tiles_per_chunk * BLOCK_S, n_units)
    if X_CL:
        o_base = i_b.to(tl.int64) * C * S + i_g * CG
        o_k = tl.arange(0, BLOCK_C)
        m_k = o_k < CG
        if HAS_SHIFT:
            b_shift = _load_shift(shift_ptr, i_b, shift_stride, i_g * CG + o_k, m_k)
    else:
        o_base = i_b.to(tl.int64) * C * S + i_g.to(tl.int64) * CG * S

    b_n = 0.0
    b_mean = 0.0
    b_m2 = 0.0
    for u0 in range(u_begin, u_end, BLOCK_S):
        o_u = u0 + tl.arange(0, BLOCK_S)
        m_u = o_u < u_end
        if X_CL:
            m = m_u[:, None] & m_k[None, :]
            b_x = tl.load(x_ptr + o_base + o_u.to(tl.int64)[:, None] * C + o_k[None, :], mask=m, other=0.0)
            t_n = (tl.minimum(u_end - u0, BLOCK_S) * CG).to(tl.float32)
        else:
            m = m_u
            b_x = tl.load(x_ptr + o_base + o_u, mask=m, other=0.0)
            t_n = tl.minimum(u_end - u0, BLOCK_S).to(tl.float32)
        b_x = b_x.to(tl.float32)
        if HAS_SHIFT:
            if X_CL:
                b_x = tl.where(m, b_x + b_shift[None, :], 0.0)
            else:
                b_x = tl.where(m, b_x + _load_shift(shift_ptr, i_b, shift_stride, i_g * CG + o_u // S, m), 0.0)
        t_mean = tl.sum(b_x) / t_n
        b_d = tl.where(m, b_x - t_mean, 0.0)
        t_m2 = tl.sum(b_d * b_d)
        n_new = b_n + t_n
        b_delta = t_mean - b_mean
        b_mean += b_delta * (t_n / n_new)
        b_m2 += t_m2 + b_delta * b_delta * (b_n * t_n / n_new)
        b_n = n_new

    o_part = (i_b * G + i_g) * n_chunks + i_n
    tl.store(part_ptr + o_part, b_mean)
    tl.store(part_ptr + part_plane + o_part, b_m2)


@triton.jit
def _merge_chunks(p_part, part_plane, n_chunks, chunk_count, N, BLOCK_N: tl.constexpr):
    """``(mean, M2)`` of a whole group from its n_chunks chunk partials (mean at ``p_part + i``, M2
    ``part_plane`` further): chunk i holds min(chunk_count, N - i * chunk_count) elements. Each lane
    merges the chunks it visits (Chan's update), then the lanes are combined exactly:
    mean = sum n_l mean_l / N, M2 = sum M2_l + n_l (mean_l - mean)^2."""
    b_n = tl.zeros([BLOCK_N], tl.float32)
    b_mean = tl.zeros([BLOCK_N], tl.float32)
    b_m2 = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(0, n_chunks, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m = o_n < n_chunks
        t_mean = tl.load(p_part + o_n, mask=m, other=0.0)
        t_m2 = tl.load(p_part + part_plane + o_n, mask=m, other=0.0)
        t_n = tl.where(m, tl.minimum(chunk_count, N - o_n * chunk_count).to(tl.float32), 0.0)
        n_new = b_n + t_n
        b_ratio = t_n / tl.maximum(n_new, 1.0)  # 0 on lanes that hold no partial yet
        b_delta = t_mean - b_mean
        b_mean += b_delta * b_ratio
        b_m2 += t_m2 + b_delta * b_delta * b_n * b_ratio
        b_n = n_new
    g_mean = tl.sum(b_n * b_mean) / N
    b_d = b_mean - g_mean
    return g_mean, tl.sum(b_m2 + b_n * b_d * b_d)


@kernel
@triton.jit(do_not_specialize=["tiles_per_program", "n_chunks", "chunk_count", "part_plane", "b_offset"])
def _group_norm_fwd_apply_kernel(
    x_ptr, y_ptr,  # [B, C, S], layouts X_CL and Y_CL; y written
    w_ptr, b_ptr,  # [C]
    shift_ptr,  # [B, C] (rows shift_stride apart, channels contiguous), read when HAS_SHIFT (None otherwise)
    part_ptr,  # [2, B, G, n_chunks] fp32 from the statistics kernel
    mean_ptr, rstd_ptr,  # [B, G] fp32, written when WRITE_STATS (each group by one program)
    C, S, G, tiles_per_program, n_chunks, chunk_count, part_plane, eps, shift_stride, b_offset,
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    X_CL: tl.constexpr, Y_CL: tl.constexpr, SILU: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_STATS: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Program (chunk, channel block, batch): first the statistics of the groups its channels belong
    to, from their chunk partials (the finalize, done here so the split path is two launches; the
    partials are a few hundred bytes per group), then y = act((x - mean) * rstd * w + bias) over
    tiles_per_program tiles. The chunk-0 program holding a group's first channel writes its
    mean/rstd for the backward."""
    i_n = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2) + b_offset
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_cg = o_c // CG
    N = S * CG
    b_mean = tl.zeros([BLOCK_C], tl.float32)
    b_rstd = tl.zeros([BLOCK_C], tl.float32)
    c_first = i_c * BLOCK_C
    for i_g in range(c_first // CG, (tl.minimum(c_first + BLOCK_C, C) - 1) // CG + 1):
        g_mean, g_m2 = _merge_chunks(part_ptr + (i_b * G + i_g) * n_chunks, part_plane, n_chunks, chunk_count, N,
                                     BLOCK_N)
        g_rstd = tl.rsqrt(g_m2 / N + eps)
        b_mean = tl.where(o_cg == i_g, g_mean, b_mean)
        b_rstd = tl.where(o_cg == i_g, g_rstd, b_rstd)
        if WRITE_STATS:
            m_write = (i_n == 0) & (i_g * CG >= c_first)
            tl.store(mean_ptr + i_b * G + i_g, g_mean, mask=m_write)
            tl.store(rstd_ptr + i_b * G + i_g, g_rstd, mask=m_write)

    if HAS_SHIFT:  # x + shift - mean: the shift folded into the per-channel mean
        b_mean -= _load_shift(shift_ptr, i_b, shift_stride, o_c, m_c)
    o_batch = i_b.to(tl.int64) * C * S
    b_a = b_rstd * _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    b_bias = _load_param(b_ptr, o_c, m_c, HAS_B, 0.0)
    s_begin = i_n * tiles_per_program * BLOCK_S
    n_tiles = tl.minimum(tiles_per_program, (S - s_begin + BLOCK_S - 1) // BLOCK_S)

    for i_t in range(0, n_tiles):
        o_s = s_begin + i_t * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (o_s < S)[:, None] & m_c[None, :]
        o_cl = o_s.to(tl.int64)[:, None] * C + o_c[None, :]
        o_nc = o_s[:, None] + o_c.to(tl.int64)[None, :] * S
        b_x = tl.load(x_ptr + o_batch + (o_cl if X_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_y = (b_x - b_mean[None, :]) * b_a[None, :] + b_bias[None, :]
        if SILU:
            b_y = b_y / (1.0 + tl.exp(-b_y))
        tl.store(y_ptr + o_batch + (o_cl if Y_CL else o_nc), b_y.to(y_ptr.dtype.element_ty), mask=m)


@kernel
@triton.jit(do_not_specialize=["batches_per_program", "part_plane"])
def _group_norm_bwd_one_pass_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [B, C, S], layouts X_CL, DY_CL, DX_CL; dx written
    w_ptr, b_ptr,  # [C]
    shift_ptr, dshift_ptr,  # [B, C] contiguous, read / written when HAS_SHIFT (None otherwise)
    mean_ptr, rstd_ptr,  # [B, G] fp32 from the forward
    part_ptr,  # [2, cdiv(B, batches_per_program), C] fp32, written: per-channel sum dz and sum dz * xhat
    B, C, S, G, batches_per_program, part_plane,
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    X_CL: tl.constexpr, DY_CL: tl.constexpr, DX_CL: tl.constexpr, SILU: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Program (group, batch block): for each of its batches, x and dy of the group in registers,
    read once; the weight/bias gradient partials summed over the batch block; with HAS_SHIFT,
    dshift[b, c] = sum_s dx from the registers."""
    i_g = tl.program_id(0)
    i_bb = tl.program_id(1)
    o_s = tl.arange(0, BLOCK_S)
    o_k = tl.arange(0, BLOCK_C)
    o_c = i_g * CG + o_k
    m_c = o_k < CG
    m = (o_s < S)[:, None] & m_c[None, :]
    o_cl = o_s.to(tl.int64)[:, None] * C + o_c[None, :]
    o_nc = o_s[:, None] + o_c.to(tl.int64)[None, :] * S
    b_w = _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    b_bias = _load_param(b_ptr, o_c, m_c, HAS_B, 0.0)
    n = S * CG * 1.0

    b_sdz = tl.zeros([BLOCK_C], tl.float32)
    b_sdzx = tl.zeros([BLOCK_C], tl.float32)
    b_begin = i_bb * batches_per_program
    for i_i in range(0, tl.minimum(batches_per_program, B - b_begin)):
        i_b = b_begin + i_i
        o_batch = i_b.to(tl.int64) * C * S
        b_mean = tl.load(mean_ptr + i_b * G + i_g)
        b_rstd = tl.load(rstd_ptr + i_b * G + i_g)
        b_x = tl.load(x_ptr + o_batch + (o_cl if X_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_dz = tl.load(dy_ptr + o_batch + (o_cl if DY_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        if HAS_SHIFT:
            b_x += _load_shift(shift_ptr, i_b, C, o_c, m_c)[None, :]
        b_xhat = tl.where(m, (b_x - b_mean) * b_rstd, 0.0)
        if SILU:  # dz = dy * silu'(z) at z = xhat * w + bias, after the affine
            b_z = b_xhat * b_w[None, :] + b_bias[None, :]
            b_sig = 1.0 / (1.0 + tl.exp(-b_z))
            b_dz = b_dz * b_sig * (1.0 + b_z * (1.0 - b_sig))
        t_sdz = tl.sum(b_dz, axis=0)
        t_sdzx = tl.sum(b_dz * b_xhat, axis=0)
        b_c1 = tl.sum(b_w * t_sdz) / n
        b_c2 = tl.sum(b_w * t_sdzx) / n
        b_dx = b_rstd * (b_dz * b_w[None, :] - b_c1 - b_xhat * b_c2)
        tl.store(dx_ptr + o_batch + (o_cl if DX_CL else o_nc), b_dx.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_SHIFT:
            t_dshift = tl.sum(tl.where(m, b_dx, 0.0), axis=0)
            tl.store(dshift_ptr + i_b * C + o_c, t_dshift.to(dshift_ptr.dtype.element_ty), mask=m_c)
        b_sdz += t_sdz
        b_sdzx += t_sdzx

    o_part = i_bb.to(tl.int64) * C + o_c
    tl.store(part_ptr + o_part, b_sdz, mask=m_c)
    tl.store(part_ptr + part_plane + o_part, b_sdzx, mask=m_c)


@kernel
@triton.jit(do_not_specialize=["n_chunks", "tiles_per_program", "part_plane", "b_offset"])
def _group_norm_bwd_stats_kernel(
    x_ptr, dy_ptr,  # [B, C, S], layouts X_CL, DY_CL
    w_ptr, b_ptr,  # [C]
    shift_ptr,  # [B, C] contiguous, read when HAS_SHIFT (None otherwise)
    mean_ptr, rstd_ptr,  # [B, G] fp32
    part_ptr,  # [2 (3 with HAS_SHIFT), B, n_chunks, C] fp32, written: per-channel sum dz, sum dz * xhat
    C, S, G, n_chunks, tiles_per_program, part_plane, b_offset,  # (and sum xhat) of each chunk
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    X_CL: tl.constexpr, DY_CL: tl.constexpr, SILU: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Program (chunk, channel block, batch): per-channel sums over tiles_per_program tiles."""
    i_n = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2) + b_offset
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_batch = i_b.to(tl.int64) * C * S
    o_g = i_b * G + o_c // CG
    b_mean = tl.load(mean_ptr + o_g, mask=m_c, other=0.0)
    b_rstd = tl.load(rstd_ptr + o_g, mask=m_c, other=0.0)
    if HAS_SHIFT:  # x + shift - mean: the shift folded into the per-channel mean
        b_mean -= _load_shift(shift_ptr, i_b, C, o_c, m_c)
    b_w = _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    b_bias = _load_param(b_ptr, o_c, m_c, HAS_B, 0.0)
    s_begin = i_n * tiles_per_program * BLOCK_S
    n_tiles = tl.minimum(tiles_per_program, (S - s_begin + BLOCK_S - 1) // BLOCK_S)

    b_sdz = tl.zeros([BLOCK_C], tl.float32)
    b_sdzx = tl.zeros([BLOCK_C], tl.float32)
    b_sx = tl.zeros([BLOCK_C], tl.float32)
    for i_t in range(0, n_tiles):
        o_s = s_begin + i_t * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (o_s < S)[:, None] & m_c[None, :]
        o_cl = o_s.to(tl.int64)[:, None] * C + o_c[None, :]
        o_nc = o_s[:, None] + o_c.to(tl.int64)[None, :] * S
        b_x = tl.load(x_ptr + o_batch + (o_cl if X_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_dz = tl.load(dy_ptr + o_batch + (o_cl if DY_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_xhat = tl.where(m, (b_x - b_mean[None, :]) * b_rstd[None, :], 0.0)
        if SILU:
            b_z = b_xhat * b_w[None, :] + b_bias[None, :]
            b_sig = 1.0 / (1.0 + tl.exp(-b_z))
            b_dz = b_dz * b_sig * (1.0 + b_z * (1.0 - b_sig))
        b_sdz += tl.sum(b_dz, axis=0)
        b_sdzx += tl.sum(b_dz * b_xhat, axis=0)
        if HAS_SHIFT:
            b_sx += tl.sum(b_xhat, axis=0)

    o_part = (i_b.to(tl.int64) * n_chunks + i_n) * C + o_c
    tl.store(part_ptr + o_part, b_sdz, mask=m_c)
    tl.store(part_ptr + part_plane + o_part, b_sdzx, mask=m_c)
    if HAS_SHIFT:
        tl.store(part_ptr + 2 * part_plane + o_part, b_sx, mask=m_c)


@kernel
@triton.jit(do_not_specialize=["B", "n_chunks", "part_plane"])
def _group_norm_bwd_finalize_kernel(
    part_ptr,  # [2 (3 with HAS_SHIFT), B, n_chunks, C] fp32 from the statistics kernel
    w_ptr,  # [C]
    c1_ptr, c2_ptr,  # [B, G] fp32, written
    dw_ptr, db_ptr,  # [C] (their own dtypes), written when HAS_W / HAS_B
    rstd_ptr, dshift_ptr,  # [B, G] fp32 and [B, C] (shift's dtype, written) when HAS_SHIFT (None otherwise)
    B, C, S, G, n_chunks, part_plane,
    CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """One program per group g, over every batch item in order: for each b,
    c1[b, g] = sum_c w * sum dz / N and c2[b, g] = sum_c w * sum dz * xhat / N; then the group's
    weight and bias gradients dweight[c] = sum_{b, chunk} sum dz * xhat, dbias[c] = sum_{b, chunk} sum dz
    (a fixed order: deterministic, and no separate column-sum launch). With HAS_SHIFT also
    dshift[b, c] = sum_s dx = rstd * (w * sum dz - S * c1 - c2 * sum xhat)."""
    i_g = tl.program_id(0)
    o_k = tl.arange(0, BLOCK_C)
    o_c = i_g * CG + o_k
    m_c = o_k < CG
    b_w = _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    n = S * CG * 1.0

    b_col1 = tl.zeros([BLOCK_C], tl.float32)
    b_col2 = tl.zeros([BLOCK_C], tl.float32)
    for i_b in range(0, B):
        o_batch = i_b * n_chunks * C  # the partial buffer is small: int32
        b_acc1 = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        b_acc2 = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        b_acc3 = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for n0 in range(0, n_chunks, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m = (o_n < n_chunks)[:, None] & m_c[None, :]
            p_part = part_ptr + o_batch + o_n.to(tl.int64)[:, None] * C + o_c[None, :]
            b_acc1 += tl.load(p_part, mask=m, other=0.0)
            b_acc2 += tl.load(p_part + part_plane, mask=m, other=0.0)
            if HAS_SHIFT:
                b_acc3 += tl.load(p_part + 2 * part_plane, mask=m, other=0.0)
        t_sdz = tl.sum(b_acc1, axis=0)
        t_sdzx = tl.sum(b_acc2, axis=0)
        g_c1 = tl.sum(t_sdz * b_w) / n
        g_c2 = tl.sum(t_sdzx * b_w) / n
        tl.store(c1_ptr + i_b * G + i_g, g_c1)
        tl.store(c2_ptr + i_b * G + i_g, g_c2)
        if HAS_SHIFT:
            g_rstd = tl.load(rstd_ptr + i_b * G + i_g)
            t_dshift = g_rstd * (b_w * t_sdz - S * g_c1 - g_c2 * tl.sum(b_acc3, axis=0))
            tl.store(dshift_ptr + i_b * C + o_c, t_dshift.to(dshift_ptr.dtype.element_ty), mask=m_c)
        b_col1 += t_sdz
        b_col2 += t_sdzx
    if HAS_W:
        tl.store(dw_ptr + o_c, b_col2.to(dw_ptr.dtype.element_ty), mask=m_c)
    if HAS_B:
        tl.store(db_ptr + o_c, b_col1.to(db_ptr.dtype.element_ty), mask=m_c)


@kernel
@triton.jit(do_not_specialize=["tiles_per_program", "b_offset"])
def _group_norm_bwd_apply_kernel(
    x_ptr, dy_ptr, dx_ptr,  # [B, C, S], layouts X_CL, DY_CL, DX_CL; dx written
    w_ptr, b_ptr,  # [C]
    shift_ptr,  # [B, C] contiguous, read when HAS_SHIFT (None otherwise)
    mean_ptr, rstd_ptr, c1_ptr, c2_ptr,  # [B, G] fp32
    C, S, G, tiles_per_program, b_offset,
    CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
    X_CL: tl.constexpr, DY_CL: tl.constexpr, DX_CL: tl.constexpr, SILU: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr,
):
    """Program (chunk, channel block, batch): dx = rstd * (dz * w - c1 - xhat * c2) over
    tiles_per_program tiles, the per-channel factors loaded once."""
    i_n = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2) + b_offset
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_batch = i_b.to(tl.int64) * C * S
    o_g = i_b * G + o_c // CG
    b_mean = tl.load(mean_ptr + o_g, mask=m_c, other=0.0)
    b_rstd = tl.load(rstd_ptr + o_g, mask=m_c, other=0.0)
    b_c1 = tl.load(c1_ptr + o_g, mask=m_c, other=0.0)
    b_c2 = tl.load(c2_ptr + o_g, mask=m_c, other=0.0)
    if HAS_SHIFT:
        b_mean -= _load_shift(shift_ptr, i_b, C, o_c, m_c)
    b_w = _load_param(w_ptr, o_c, m_c, HAS_W, 1.0)
    b_bias = _load_param(b_ptr, o_c, m_c, HAS_B, 0.0)
    s_begin = i_n * tiles_per_program * BLOCK_S
    n_tiles = tl.minimum(tiles_per_program, (S - s_begin + BLOCK_S - 1) // BLOCK_S)

    for i_t in range(0, n_tiles):
        o_s = s_begin + i_t * BLOCK_S + tl.arange(0, BLOCK_S)
        m = (o_s < S)[:, None] & m_c[None, :]
        o_cl = o_s.to(tl.int64)[:, None] * C + o_c[None, :]
        o_nc = o_s[:, None] + o_c.to(tl.int64)[None, :] * S
        b_x = tl.load(x_ptr + o_batch + (o_cl if X_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_dz = tl.load(dy_ptr + o_batch + (o_cl if DY_CL else o_nc), mask=m, other=0.0).to(tl.float32)
        b_xhat = (b_x - b_mean[None, :]) * b_rstd[None, :]
        if SILU:
            b_z = b_xhat * b_w[None, :] + b_bias[None, :]
            b_sig = 1.0 / (1.0 + tl.exp(-b_z))
            b_dz = b_dz * b_sig * (1.0 + b_z * (1.0 - b_sig))
        b_dx = b_rstd[None, :] * (b_dz * b_w[None, :] - b_c1[None, :] - b_xhat * b_c2[None, :])
        tl.store(dx_ptr + o_batch + (o_cl if DX_CL else o_nc), b_dx.to(dx_ptr.dtype.element_ty), mask=m)


@kernel
@triton.jit(do_not_specialize=["R", "part_plane"])
def _column_sum_kernel(
    part_ptr,  # [2, R, C] fp32, rows contiguous: plane 0 sum dz, plane 1 sum dz * xhat
    dw_ptr, db_ptr,  # [C] (their own dtypes), written when HAS_W / HAS_B
    R, C, part_plane,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    """dbias[c] = sum_r part[0, r, c] and dweight[c] = sum_r part[1, r, c], in a fixed order
    (deterministic weight and bias gradients), both in one launch."""
    i_c = tl.program_id(0)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_acc1 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    b_acc2 = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m = (o_r < R)[:, None] & m_c[None, :]
        p_part = part_ptr + o_r.to(tl.int64)[:, None] * C + o_c[None, :]
        if HAS_B:
            b_acc1 += tl.load(p_part, mask=m, other=0.0)
        if HAS_W:
            b_acc2 += tl.load(p_part + part_plane, mask=m, other=0.0)
    if HAS_W:
        tl.store(dw_ptr + o_c, tl.sum(b_acc2, axis=0).to(dw_ptr.dtype.element_ty), mask=m_c)
    if HAS_B:
        tl.store(db_ptr + o_c, tl.sum(b_acc1, axis=0).to(db_ptr.dtype.element_ty), mask=m_c)


# ---------------------------------------------------------------------------------------------
# host side: layouts, tiles, launchers


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` ``[B, C, *spatial]`` is stored channels-last (channels fastest, then the
    spatial dims in order: NHWC, NDHWC) and is not also NCHW-contiguous."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    if x.dim() in (4, 5):  # torch's own check: no view to build (host µs matter per call)
        return x.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.movedim(1, -1).is_contiguous()


def empty_nc(shape, channels_last: bool, dtype: torch.dtype, device, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An uninitialized ``[B, C, *spatial]`` tensor, NCHW-contiguous or channels-last (channels
    fastest, then the spatial dims in order: ``torch.channels_last`` for 4-d, ``channels_last_3d``
    for 5-d, the same strides for other ranks); a fresh tensor, never a view. ``like``: a tensor on
    ``device`` (made with ``torch.empty_like`` when it has this shape and dtype)."""
    shape = tuple(shape)
    if len(shape) == 4 and like is not None and like.dtype == dtype and like.shape == shape:
        # (empty_like: half the host time of torch.empty(shape, dtype=, device=))
        return torch.empty_like(like, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if not channels_last or len(shape) < 3:
        return torch.empty(shape, dtype=dtype, device=device)
    if len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    strides = [1] * len(shape)  # channels stride 1, then the spatial dims from the last, then batch
    step = shape[1]
    for d in [*range(len(shape) - 1, 1, -1), 0]:
        strides[d] = step
        step *= shape[d]
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


def _canonical(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(x, channels_last)`` with x NCHW-contiguous or channels-last (copied to NCHW otherwise)."""
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _channel_pieces(CG: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_C2) of the one-pass forward: the group's CG channels as a power of two
    BLOCK_C <= CG and the rest padded to a power of two (0 when CG is a power of two)."""
    block_c = 1 << (CG.bit_length() - 1)
    rest = CG - block_c
    return block_c, (next_pow2(rest) if rest else 0)


def _one_pass_elements(S: int, CG: int, backward: bool) -> int:
    """Elements one group occupies on chip in the one-pass kernel (padded to its blocks)."""
    if backward:
        return next_pow2(S) * next_pow2(CG)
    return next_pow2(S) * sum(_channel_pieces(CG))


def one_pass_fits(shape, num_groups: int, *, backward: bool = False, dtype=None, channels_last: bool = False) -> bool:
    """Whether a group of an input of ``shape`` ``[B, C, *spatial]`` takes the one-pass path.

    Forward: ``dtype`` is x's dtype and ``channels_last`` whether x or y is channels-last; without
    a dtype only the layout- and dtype-independent ``ONE_PASS_MAX`` is considered."""
    S = math.prod(tuple(shape)[2:])
    CG = shape[1] // num_groups
    elements = _one_pass_elements(S, CG, backward)
    if backward:
        return elements <= ONE_PASS_MAX_BWD
    if elements <= ONE_PASS_MAX:
        return True
    return (not channels_last and dtype is not None and elements * dtype.itemsize <= ONE_PASS_MAX_BYTES
            and _one_pass_big_warps(S, CG) > 0)


def _one_pass_big_warps(S: int, CG: int) -> int:
    """Warps of a one-pass forward program for a group above ONE_PASS_MAX (0: none spill-free).

    ptxas -v, sm_80 and sm_90, fp16/bf16/fp32: up to 20480 elements (640x32x32: [1024, 16 + 4])
    32 warps hold the group in <= 64 registers a thread; up to 40960 in rows of S with at most 8+8
    channel columns (320x64x64: [4096, 8 + 2]) 16 warps needed exactly 128 registers with triton
    3.8 and spilled 16-28 bytes on sm_90 with triton 3.9, so groups above 20480 take the split path:
    a kernel at the register limit is one compiler release away from spilling."""
    return 32 if _one_pass_elements(S, CG, False) <= 20480 else 0


def _batches_per_program(B: int, G: int) -> int:
    """Batch items per one-pass program: doubled while G * cdiv(B, n) stays >= ONE_PASS_MIN_PROGRAMS,
    so weight and bias are read once per batch block rather than once per (batch, group)."""
    n = 1
    while n * 2 <= B and G * cdiv(B, n * 2) >= ONE_PASS_MIN_PROGRAMS:
        n *= 2
    return n


def _one_pass_warps(tile: int) -> int:
    return max(4, min(16, next_pow2(tile) // 512))


def _split_tile(C: int, S: int, any_channels_last: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of the split kernels: long S rows for NCHW, 64-channel rows otherwise."""
    if any_channels_last:
        block_c = min(64, next_pow2(C))
        block_s = max(1, min(TILE // block_c, next_pow2(S)))
    else:
        block_s = min(1024, TILE, next_pow2(S))
        block_c = max(1, min(TILE // block_s, next_pow2(C)))
    return block_s, block_c


def _chunks(B: int, S: int, n_c: int, block_s: int) -> tuple[int, int]:
    """(tiles per program, S-chunks) of a split kernel over [chunk, channel block, batch]: about
    TARGET_PROGRAMS programs in all, each looping over its chunk's tiles."""
    n_tiles = cdiv(S, block_s)
    tiles_per_program = max(1, (B * n_c * n_tiles) // max(1, TARGET_PROGRAMS))
    return tiles_per_program, cdiv(n_tiles, tiles_per_program)


def _reduce_block(rows: int, C: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C) for reading an fp32 [rows, C] partial buffer."""
    block_c = next_pow2(C)
    return max(1, min(next_pow2(rows), REDUCE_BLOCK // block_c)), block_c


def _activation_flag(activation) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "silu"


def _too_many_channels(x: torch.Tensor) -> None:
    raise ValueError(f"group_norm kernels take at most {MAX_CHANNELS} channels (CUDA's grid axis 1), got "
                     f"C = {x.shape[1]}: run the eager reference")


def _check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or not (out.is_contiguous() or is_channels_last(out)):
        raise ValueError(
            f"out must be {tuple(x.shape)} {x.dtype}, NCHW-contiguous or channels-last; got "
            f"{tuple(out.shape)} {out.dtype} with strides {out.stride()}"
        )


def _check_shift(shift, x: torch.Tensor, rows: bool = False) -> Optional[torch.Tensor]:
    """The shift ``[B, C]`` made contiguous, or with ``rows`` (the forward kernels take a row stride)
    only its channels (a column slice of a wider ``[B, N]`` tensor is read in place); None stays
    None; a clear error for anything else."""
    if shift is None:
        return None
    if not isinstance(shift, torch.Tensor):
        raise TypeError(f"shift must be a torch.Tensor or None, got {type(shift).__name__}")
    if not shift.is_floating_point():
        raise TypeError(f"shift must be a floating-point tensor, got {shift.dtype}")
    if tuple(shift.shape) != tuple(x.shape[:2]):
        raise ValueError(f"shift must have the shape [B, C] = {tuple(x.shape[:2])}, got {tuple(shift.shape)}")
    if shift.device != x.device:
        raise ValueError(f"shift is on {shift.device}, x on {x.device}")
    return shift if rows and shift.stride(1) == 1 else shift.contiguous()


def _tuning() -> tuple:
    """The module's tuning constants, part of every plan's cache key (tests change them)."""
    return (ONE_PASS_MAX, ONE_PASS_MAX_BYTES, ONE_PASS_MAX_BWD, ONE_PASS_MIN_PROGRAMS, TILE, TARGET_PROGRAMS,
            SPLIT_WARPS, REDUCE_BLOCK, MERGE_BLOCK)


class _SplitGrid(NamedTuple):
    """A split kernel's [S-chunk, channel block, batch] grid and its tiles."""
    grid: tuple[int, int, int]
    tiles_per_program: int
    n_chunks: int
    BLOCK_S: int
    BLOCK_C: int


def _split_grid(B: int, C: int, S: int, any_channels_last: bool) -> _SplitGrid:
    block_s, block_c = _split_tile(C, S, any_channels_last)
    n_c = cdiv(C, block_c)
    tiles_per_program, n_chunks = _chunks(B, S, n_c, block_s)
    return _SplitGrid((n_chunks, n_c, B), tiles_per_program, n_chunks, block_s, block_c)


class _StatsChunks(NamedTuple):
    """The forward statistics kernel's [chunk, group, batch] grid: chunks of ``chunk_len`` units
    (elements of the group for NCHW, positions for channels-last) read in tiles of
    ``[BLOCK_S, BLOCK_C]``; ``chunk_count`` elements per full chunk."""
    grid: tuple[int, int, int]
    n_chunks: int
    chunk_len: int
    chunk_count: int
    BLOCK_S: int
    BLOCK_C: int


def _stats_chunks(B: int, G: int, S: int, CG: int, x_cl: bool) -> _StatsChunks:
    if x_cl:
        block_c = next_pow2(CG)
        block_s, units = max(1, TILE // block_c), S
    else:  # a group is one contiguous run of CG * S elements
        block_c, block_s, units = 1, TILE, S * CG
    n_tiles = cdiv(units, block_s)
    tiles_per_chunk = cdiv(n_tiles, min(n_tiles, max(1, TARGET_PROGRAMS // (B * G))))
    chunk_len = tiles_per_chunk * block_s
    n_chunks = cdiv(units, chunk_len)
    return _StatsChunks((n_chunks, G, B), n_chunks, chunk_len, chunk_len * (CG if x_cl else 1), block_s, block_c)


class _FwdPlan(NamedTuple):
    """Every shape-dependent choice of one forward call, decided once per (shape, dtype, layouts)."""
    one_pass: bool
    batches_per_program: int  # one pass
    grid: tuple  # one pass
    meta: dict  # one pass: constexprs and num_warps
    stats: Optional[_StatsChunks] = None  # split
    apply: Optional[_SplitGrid] = None
    BLOCK_N: int = 0  # split: chunk partials the apply kernel merges at a time


@functools.lru_cache(maxsize=1024)
def _fwd_plan(B: int, C: int, S: int, G: int, dtype: torch.dtype, x_cl: bool, y_cl: bool, tuning: tuple) -> _FwdPlan:
    CG = C // G
    if one_pass_fits((B, C, S), G, dtype=dtype, channels_last=x_cl or y_cl):
        bpp = _batches_per_program(B, G)
        block_c, block_c2 = _channel_pieces(CG)
        elements = _one_pass_elements(S, CG, False)
        warps = _one_pass_warps(elements) if elements <= ONE_PASS_MAX else _one_pass_big_warps(S, CG)
        meta = dict(CG=CG, BLOCK_S=next_pow2(S), BLOCK_C=block_c, BLOCK_C2=block_c2, num_warps=warps)
        return _FwdPlan(True, bpp, (G, cdiv(B, bpp)), meta)
    stats = _stats_chunks(B, G, S, CG, x_cl)
    block_n = min(next_pow2(stats.n_chunks), MERGE_BLOCK)
    return _FwdPlan(False, 0, (), {}, stats, _split_grid(B, C, S, x_cl or y_cl), block_n)


#: The one-pass forward launches of :func:`group_norm_fwd` calls from the op (``checked``), by call
#: signature (x's shape, strides and dtype, the groups, the options, which of weight/bias/shift are
#: given, the tuning constants): ``(y's memory format, grid, (B, C, S, G, batches per program), the
#: kernel's constexprs and num_warps)``, what every choice made from those facts came to. Filled by a
#: signature's first call (the full path), read by its repeats (:func:`_one_pass_call`).
_ONE_PASS_CALLS: dict = {}
MAX_PLANNED_CALLS = 1024
#: ``(y.dim(), y is channels-last)`` -> the memory format ``torch.empty_like`` gives y.
_MEMORY_FORMATS = {(3, False): torch.contiguous_format, (4, False): torch.contiguous_format,
                   (5, False): torch.contiguous_format, (4, True): torch.channels_last,
                   (5, True): torch.channels_last_3d}


def _vectors(x: torch.Tensor, weight, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' weight and bias arguments: each at unit stride (as is, or a contiguous copy), and
    x in place of one that is None (a pointer the HAS_W / HAS_B flags keep unread)."""
    return (x if weight is None else weight if weight.stride(0) == 1 else weight.contiguous(),
            x if bias is None else bias if bias.stride(0) == 1 else bias.contiguous())


def _param_grads(x: torch.Tensor, weight, bias, shift) -> tuple:
    """The backward's unwritten ``(dweight, dbias, dshift)``: ``[C]`` in each parameter's dtype, or an
    empty ``[0]`` where it is None; ``[B, C]`` like the (contiguous) shift, or None."""
    return (torch.empty_like(weight) if weight is not None else x.new_empty((0,)),
            torch.empty_like(bias) if bias is not None else x.new_empty((0,)),
            None if shift is None else torch.empty_like(shift))


def _remember(calls: dict, key: tuple, call: tuple) -> None:
    """Keep a planned call (:data:`_ONE_PASS_CALLS`, :data:`_ONE_PASS_BWD_CALLS`), at most
    :data:`MAX_PLANNED_CALLS` a cache (shapes without end: it starts over)."""
    if len(calls) >= MAX_PLANNED_CALLS:
        calls.clear()
    calls[key] = call


def _one_pass_call(call: tuple, x: torch.Tensor, weight, bias, eps: float, shift, stats: bool, out_dtype,
                   outputs: Optional[tuple] = None):
    """:func:`group_norm_fwd`'s one-pass launch, as ``call`` (an entry of :data:`_ONE_PASS_CALLS`)
    says: the per-call work only (the vectors' and the shift's strides; y and mean/rstd unless
    ``outputs`` gives ``(y, mean, rstd)``). The one launch site of the one-pass forward."""
    fmt, grid, (B, C, S, G, batches_per_program), constants = call
    if outputs is None:
        y = torch.empty_like(x, dtype=out_dtype, memory_format=fmt)
        mean = torch.empty((B, G), dtype=torch.float32, device=x.device) if stats else None
        rstd = torch.empty((B, G), dtype=torch.float32, device=x.device) if stats else None
    else:
        y, mean, rstd = outputs
    mean_p, rstd_p = (mean, rstd) if stats else (y, y)
    w, b = _vectors(x, weight, bias)
    shift_stride = 0
    if shift is not None:
        if shift.stride(1) != 1:
            shift = shift.contiguous()
        shift_stride = shift.stride(0)
    _group_norm_fwd_one_pass_kernel[grid](x, y, w, b, shift, mean_p, rstd_p, B, C, S, G, batches_per_program, eps,
                                          shift_stride, **constants)
    return y, mean, rstd


def group_norm_fwd(
    x: torch.Tensor,
    weight,
    bias,
    num_groups: int,
    eps: float,
    activation=None,
    channels_last_out=None,
    *,
    out=None,
    stats: bool = True,
    shift=None,
    out_dtype: Optional[torch.dtype] = None,
    checked: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the forward: ``(y, mean, rstd)``. One launch on the one-pass path, two on the split
    path (statistics per chunk of each group; apply, which first merges its groups' chunks); no
    other kernel (no fills for a missing weight or bias).

    x: ``[B, C, *spatial]``, NCHW-contiguous or channels-last (any other layout is copied to
    NCHW); weight, bias: ``[C]`` contiguous or None, any float dtype; ``C % num_groups == 0`` (the
    caller checks). y: ``[B, C, *spatial]`` in x's dtype (or ``out_dtype``: fp32 is what CUDA
    autocast's group_norm returns), channels-last when ``channels_last_out`` (None: x's layout), or
    written into ``out`` (NCHW-contiguous or channels-last: its layout decides). mean, rstd: ``[B, G]`` fp32, what the backward needs; None with ``stats=False``
    (inference: neither allocated nor written). ``checked``: the caller (the op) has checked the
    channels and the shift (and a signature's repeats then launch as planned by its first call:
    :data:`_ONE_PASS_CALLS`). shift: ``[B, C]`` any float dtype (channels
    contiguous, rows any stride: e.g. a column slice of one wider projection), or None: y is
    the norm of ``x + shift[:, :, None, ...]`` (added in fp32 as x is read; the sum is never
    stored), and mean/rstd are that sum's.
    Eager equivalent: :func:`group_norm_reference` (mean/rstd: ``torch.ops.aten.native_group_norm``
    of ``x + shift[:, :, None, ...]``).
    """
    key = None
    if checked and out is None:  # a repeat of a signature already planned: straight to the launch
        key = (x.shape, x.stride(), x.dtype, num_groups, activation, channels_last_out, stats, out_dtype,
               weight is None, bias is None, shift is None, _tuning())
        call = _ONE_PASS_CALLS.get(key)
        if call is not None:
            return _one_pass_call(call, x, weight, bias, eps, shift, stats, out_dtype)
    silu = _activation_flag(activation)
    if checked:  # the op checked x's channels and the shift already
        if shift is not None and shift.stride(1) != 1:
            shift = shift.contiguous()
    else:
        if x.shape[1] > MAX_CHANNELS:
            _too_many_channels(x)
        shift = _check_shift(shift, x, rows=True)
    shift_stride = 0 if shift is None else shift.stride(0)
    x_in = x
    x, x_cl = _canonical(x)
    B, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    G = num_groups
    if out is None:
        out = empty_nc(x.shape, x_cl if channels_last_out is None else bool(channels_last_out),
                       x.dtype if out_dtype is None else out_dtype, x.device, like=x)
    else:
        _check_out(out, x)
    y, y_cl = out, is_channels_last(out)
    mean = torch.empty((B, G), dtype=torch.float32, device=x.device) if stats else None
    rstd = torch.empty((B, G), dtype=torch.float32, device=x.device) if stats else None
    if x.numel() == 0:
        return y, mean, rstd
    flags = dict(SILU=silu, HAS_W=weight is not None, HAS_B=bias is not None, WRITE_STATS=stats,
                 HAS_SHIFT=shift is not None)
    plan = _fwd_plan(B, C, S, G, x.dtype, x_cl, y_cl, _tuning())

    if plan.one_pass:
        call = (_MEMORY_FORMATS.get((y.dim(), y_cl)), plan.grid, (B, C, S, G, plan.batches_per_program),
                dict(X_CL=x_cl, Y_CL=y_cl, **flags, **plan.meta))
        if key is not None and x is x_in and call[0] is not None:  # (x was NCHW or channels-last already)
            _remember(_ONE_PASS_CALLS, key, call)
        return _one_pass_call(call, x, weight, bias, eps, shift, stats, out_dtype, (y, mean, rstd))

    w, b = _vectors(x, weight, bias)
    mean_p, rstd_p = (mean, rstd) if stats else (y, y)

    st, ap = plan.stats, plan.apply
    part = torch.empty((2, B, G, st.n_chunks), dtype=torch.float32, device=x.device)
    part_plane = B * G * st.n_chunks
    for grid, b_offset in axis_launches(st.grid, 2):  # batch on axis 2: one launch per 65,535
        _group_norm_fwd_stats_kernel[grid](
            x, shift, part, C, S, G, st.n_chunks, st.chunk_len // st.BLOCK_S, part_plane, shift_stride, b_offset,
            CG=C // G, BLOCK_S=st.BLOCK_S, BLOCK_C=st.BLOCK_C, X_CL=x_cl, HAS_SHIFT=shift is not None,
            num_warps=SPLIT_WARPS,
        )
    for grid, b_offset in axis_launches(ap.grid, 2):
        _group_norm_fwd_apply_kernel[grid](
            x, y, w, b, shift, part, mean_p, rstd_p, C, S, G, ap.tiles_per_program, st.n_chunks, st.chunk_count,
            part_plane, eps, shift_stride, b_offset, CG=C // G, BLOCK_S=ap.BLOCK_S, BLOCK_C=ap.BLOCK_C,
            BLOCK_N=plan.BLOCK_N, X_CL=x_cl, Y_CL=y_cl, **flags, num_warps=SPLIT_WARPS,
        )
    return y, mean, rstd


class _BwdPlan(NamedTuple):
    """Every shape-dependent choice of one backward call, decided once per (shape, layouts)."""
    one_pass: bool
    batches_per_program: int  # one pass: batch items per program
    rows: int  # rows of the partial buffer [2, rows, C]
    grid: tuple  # one pass
    meta: dict  # one pass: constexprs and num_warps; split: the finalize's
    sum_grid: tuple = ()  # one pass: the column sum's grid
    sum_meta: Optional[dict] = None  # one pass: the column sum's constexprs and num_warps
    stats: Optional[_SplitGrid] = None  # split
    apply: Optional[_SplitGrid] = None


@functools.lru_cache(maxsize=1024)
def _bwd_plan(B: int, C: int, S: int, G: int, x_cl: bool, dy_cl: bool, dx_cl: bool, tuning: tuple) -> _BwdPlan:
    CG = C // G
    block_s, block_c = next_pow2(S), next_pow2(CG)
    if block_s * block_c <= ONE_PASS_MAX_BWD:
        bpp = _batches_per_program(B, G)
        rows = cdiv(B, bpp)
        meta = dict(CG=CG, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=_one_pass_warps(2 * block_s * block_c))
        block_r, block_sum = _reduce_block(rows, min(C, 128))
        sum_meta = dict(BLOCK_R=block_r, BLOCK_C=block_sum, num_warps=4)
        return _BwdPlan(True, bpp, rows, (G, rows), meta, (cdiv(C, block_sum),), sum_meta)
    stats = _split_grid(B, C, S, x_cl or dy_cl)
    block_n, block_cg = _reduce_block(stats.n_chunks, CG)
    meta = dict(CG=CG, BLOCK_N=block_n, BLOCK_C=block_cg, num_warps=4)
    return _BwdPlan(False, 0, B * stats.n_chunks, (), meta, (), None, stats, _split_grid(B, C, S, x_cl or dy_cl or dx_cl))


#: The one-pass backward launches of :func:`group_norm_bwd` calls from the op (``checked``), by call
#: signature (x's shape, strides and dtype, dy's strides and dtype, the groups, the activation, which of
#: weight/bias/shift are given, the tuning constants): ``(dx's memory format, grid, (B, C, S, G,
#: batches per program), the kernel's constexprs and num_warps, the partials' rows, the column sum's
#: grid (None without parameters) and constexprs)``. Filled by a signature's first call, read by its
#: repeats (:func:`_one_pass_bwd_call`), as :data:`_ONE_PASS_CALLS` for the forward.
_ONE_PASS_BWD_CALLS: dict = {}


def _one_pass_bwd_call(call: tuple, dy: torch.Tensor, x: torch.Tensor, weight, bias, mean: torch.Tensor,
                       rstd: torch.Tensor, shift, dx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """:func:`group_norm_bwd`'s one-pass launches, as ``call`` (an entry of :data:`_ONE_PASS_BWD_CALLS`)
    says: the per-call work only (the outputs unless ``dx`` is given, the vectors' and statistics'
    strides). The one launch site of the one-pass backward."""
    fmt, grid, (B, C, S, G, batches_per_program), constants, rows, sum_grid, sum_constants = call
    if dx is None:
        dx = torch.empty_like(x, memory_format=fmt)
    if shift is not None and not shift.is_contiguous():
        shift = shift.contiguous()
    dw, db, dshift = _param_grads(x, weight, bias, shift)
    w, b = _vectors(x, weight, bias)
    if not (mean.is_contiguous() and rstd.is_contiguous()):
        mean, rstd = mean.contiguous(), rstd.contiguous()
    part = torch.empty((2, rows, C), dtype=torch.float32, device=x.device)
    part_plane = rows * C
    _group_norm_bwd_one_pass_kernel[grid](
        x, dy, dx, w, b, shift, dshift, mean, rstd, part, B, C, S, G, batches_per_program, part_plane, **constants)
    if sum_grid is not None:
        _column_sum_kernel[sum_grid](part, dw, db, rows, C, part_plane, **sum_constants)
    return (dx, dw, db, dshift) if shift is not None else (dx, dw, db)


def group_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight,
    bias,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation=None,
    *,
    out=None,
    shift=None,
    checked: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward: ``(dx, dweight, dbias)``, and ``dshift`` fourth when ``shift`` is given. Two launches on the one-pass path (the
    kernel, then one column sum for both parameter gradients; one without parameters), three on
    the split path (statistics, finalize with the parameter gradients, apply).

    dy, x: ``[B, C, *spatial]``, each NCHW-contiguous or channels-last (else copied to NCHW);
    weight, bias: ``[C]`` or None as in the forward; mean, rstd: ``[B, G]`` fp32 from
    :func:`group_norm_fwd`. dx: ``[B, C, *spatial]`` in x's dtype and layout (or written into
    ``out``); dweight, dbias: ``[C]`` in the weight's / bias's dtype, or empty ``[0]`` tensors when
    that parameter is None. shift: the forward's ``[B, C]`` or None; then mean/rstd are the
    statistics of ``x + shift`` (as the forward returns them) and dshift ``[B, C]`` in shift's
    dtype is ``dx.sum(spatial)``, computed in fp32 by the kernels that compute dx (no extra
    launch). ``checked``: the caller (the op's backward) passes the shift the op checked (``[B, C]``
    on x's device), and a signature's repeats launch as its first call planned them
    (:data:`_ONE_PASS_BWD_CALLS`). Eager equivalent: autograd through :func:`group_norm_reference`
    (``shift=``).
    """
    key = None
    if checked and out is None:  # a repeat of a signature already planned: straight to the launches
        key = (x.shape, x.stride(), dy.stride(), x.dtype, dy.dtype, num_groups, activation, weight is None,
               bias is None, shift is None, _tuning())
        call = _ONE_PASS_BWD_CALLS.get(key)
        if call is not None:
            return _one_pass_bwd_call(call, dy, x, weight, bias, mean, rstd, shift)
    silu = _activation_flag(activation)
    if x.shape[1] > MAX_CHANNELS:
        _too_many_channels(x)
    if not checked:
        shift = _check_shift(shift, x)
    elif shift is not None and not shift.is_contiguous():  # (the op's [B, C] shift, checked)
        shift = shift.contiguous()
    has_shift = shift is not None
    x_in, dy_in = x, dy
    x, x_cl = _canonical(x)
    dy, dy_cl = _canonical(dy)
    B, C = x.shape[0], x.shape[1]
    S = math.prod(x.shape[2:])
    G = num_groups
    if out is None:
        out = empty_nc(x.shape, x_cl, x.dtype, x.device, like=x)
    else:
        _check_out(out, x)
    dx, dx_cl = out, is_channels_last(out)
    has_w, has_b = weight is not None, bias is not None
    if x.numel() == 0:
        dw = torch.zeros_like(weight) if has_w else x.new_empty((0,))
        db = torch.zeros_like(bias) if has_b else x.new_empty((0,))
        return (dx, dw, db) + ((torch.zeros_like(shift),) if has_shift else ())
    flags = dict(SILU=silu, HAS_W=has_w, HAS_B=has_b)
    plan = _bwd_plan(B, C, S, G, x_cl, dy_cl, dx_cl, _tuning())

    if plan.one_pass:
        call = (_MEMORY_FORMATS.get((x.dim(), x_cl)), plan.grid, (B, C, S, G, plan.batches_per_program),
                dict(X_CL=x_cl, DY_CL=dy_cl, DX_CL=dx_cl, HAS_SHIFT=has_shift, **flags, **plan.meta), plan.rows,
                plan.sum_grid if has_w or has_b else None, dict(HAS_W=has_w, HAS_B=has_b, **plan.sum_meta))
        if key is not None and x is x_in and dy is dy_in and call[0] is not None and dx_cl == x_cl:
            _remember(_ONE_PASS_BWD_CALLS, key, call)
        return _one_pass_bwd_call(call, dy, x, weight, bias, mean, rstd, shift, dx)

    dw, db, dshift = _param_grads(x, weight, bias, shift)
    w, b = _vectors(x, weight, bias)
    if not (mean.is_contiguous() and rstd.is_contiguous()):
        mean, rstd = mean.contiguous(), rstd.contiguous()
    # a third plane (sum xhat per channel and chunk) for the split path's dshift
    part = torch.empty((3 if has_shift else 2, plan.rows, C), dtype=torch.float32, device=x.device)
    part_plane = plan.rows * C

    st, ap = plan.stats, plan.apply
    for grid, b_offset in axis_launches(st.grid, 2):  # batch on axis 2: one launch per 65,535
        _group_norm_bwd_stats_kernel[grid](
            x, dy, w, b, shift, mean, rstd, part, C, S, G, st.n_chunks, st.tiles_per_program, part_plane, b_offset,
            CG=C // G, BLOCK_S=st.BLOCK_S, BLOCK_C=st.BLOCK_C, X_CL=x_cl, DY_CL=dy_cl, HAS_SHIFT=has_shift, **flags,
            num_warps=SPLIT_WARPS,
        )
    c1 = torch.empty((B, G), dtype=torch.float32, device=x.device)
    c2 = torch.empty((B, G), dtype=torch.float32, device=x.device)
    _group_norm_bwd_finalize_kernel[(G,)](
        part, w, c1, c2, dw, db, rstd if has_shift else None, dshift, B, C, S, G, st.n_chunks, part_plane,
        HAS_W=has_w, HAS_B=has_b, HAS_SHIFT=has_shift, **plan.meta,
    )
    for grid, b_offset in axis_launches(ap.grid, 2):
        _group_norm_bwd_apply_kernel[grid](
            x, dy, dx, w, b, shift, mean, rstd, c1, c2, C, S, G, ap.tiles_per_program, b_offset,
            CG=C // G, BLOCK_S=ap.BLOCK_S, BLOCK_C=ap.BLOCK_C, X_CL=x_cl, DY_CL=dy_cl, DX_CL=dx_cl,
            HAS_SHIFT=has_shift, **flags, num_warps=SPLIT_WARPS,
        )
    return (dx, dw, db, dshift) if has_shift else (dx, dw, db)


# ---------------------------------------------------------------------------------------------
# eager reference


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight=None,
    bias=None,
    eps: float = 1e-5,
    activation=None,
    *,
    upcast: bool = False,
    shift=None,
) -> torch.Tensor:
    """Eager reference, differentiable by autograd: ``F.group_norm`` then ``F.silu`` when asked.

    x: ``[B, C, *spatial]``; weight, bias: ``[C]`` or None; shift: ``[B, C]`` or None, first added
    as diffusers' ResnetBlock2D adds its time embedding: ``x + shift[:, :, None, None]`` (cast to
    x's dtype, so the sum is rounded to it). Returns ``[B, C, *spatial]`` in x's dtype. ``upcast=True`` is the SD U-Net's GroupNorm32: ``F.group_norm(x.float(), ...)`` cast
    back to x's dtype, then the activation in x's dtype (as ``GroupNorm32`` followed by ``nn.SiLU``).
    Bit-for-bit what plain PyTorch gives.
    """
    if shift is not None:
        x = x + shift.to(x.dtype).reshape(tuple(shift.shape) + (1,) * (x.dim() - 2))
    if upcast:
        y = F.group_norm(x.float(), num_groups, weight, bias, eps).type(x.dtype)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    if activation == "silu":
        y = F.silu(y)
    return y
