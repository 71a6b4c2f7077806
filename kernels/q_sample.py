"""Batched forward noising q(x_t | x_0) of DDPM, one pass over the latents.

    a_b = sqrt(abar[t_b]),  s_b = sqrt(1 - abar[t_b])             (fp32, per batch row b)
    eps = noise (given, or drawn in-kernel) + noise_offset * offset[b, c]
    x_t = a_b * x0 + s_b * eps
    target = eps                     (target="eps")
           = a_b * eps - s_b * x0    (target="v", the v-prediction target)

The timestep gather and both square roots happen once per program, in fp32, whatever the data
dtype (public ``add_noise`` implementations cast the schedule to the sample dtype first). Tensors
are R = B rows of K contiguous elements; the offset noise is per (row, channel) with
``K = C * S``.
"""

from __future__ import annotations

import torch

from ._layout import as_rows, row_block, row_blocks
from ._random import randn_row_block, seed_args
from ._triton import DEVICE_ASSERTS, tl, triton
from ._launch import kernel

NUM_WARPS = 4


@kernel
@triton.jit(do_not_specialize=["seed", "t_value"])
def _q_sample_kernel(
    x0_ptr, t_ptr, abar_ptr, noise_ptr, offset_ptr,  # x0/noise [B, K] rows; t [B] (stride t_stride); abar [T]; offset [B, C] fp32
    xt_ptr, target_ptr,                               # [B, K] contiguous
    K, S, C, T, x0_row_stride, noise_row_stride, t_stride, t_value, n_col_blocks,
    seed, seed_ptr, noise_offset,
    HAS_NOISE: tl.constexpr, HAS_OFFSET: tl.constexpr, TARGET_V: tl.constexpr, WRITE_TARGET: tl.constexpr,
    T_FROM_PTR: tl.constexpr, CHECK_T: tl.constexpr, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    i_row, i_col, row, o_col, m_col = row_block(n_col_blocks, K, BLOCK)
    if SEED_FROM_PTR:  # drawn on the device (CUDA-graph replays and compiled graphs draw anew)
        seed = tl.load(seed_ptr)

    if T_FROM_PTR:  # any integer dtype, read in place (a broadcast t has t_stride 0)
        i_t = tl.load(t_ptr + row * t_stride).to(tl.int64)
    else:
        i_t = t_value
    if CHECK_T:  # a t on the device, checked there (launched with debug=True, as torch's index asserts)
        tl.device_assert((i_t >= 0) & (i_t < T), "q_sample: t must lie in [0, len(alphas_cumprod))")
    b_abar = tl.load(abar_ptr + i_t).to(tl.float32)
    b_a = tl.sqrt(b_abar)
    b_s = tl.sqrt(1.0 - b_abar)

    b_x0 = tl.load(x0_ptr + row * x0_row_stride + o_col, mask=m_col).to(tl.float32)
    if HAS_NOISE:
        b_eps = tl.load(noise_ptr + row * noise_row_stride + o_col, mask=m_col).to(tl.float32)
    else:
        b_eps = randn_row_block(seed, i_row, i_col * BLOCK, BLOCK)
    if HAS_OFFSET:
        b_eps += noise_offset * tl.load(offset_ptr + row * C + o_col // S, mask=m_col)
    tl.store(xt_ptr + row * K + o_col, (b_a * b_x0 + b_s * b_eps).to(xt_ptr.dtype.element_ty), mask=m_col)
    if WRITE_TARGET:
        if TARGET_V:
            b_target = b_a * b_eps - b_s * b_x0
        else:
            b_target = b_eps
        tl.store(target_ptr + row * K + o_col, b_target.to(target_ptr.dtype.element_ty), mask=m_col)


def q_sample_fwd(x0, t, alphas_cumprod, noise, offset, seed, noise_offset: float, target_v: bool, *, check_t: bool = False):
    """Launch the kernel; returns ``(x_t, target)``, each ``[B, *rest]`` contiguous in x0's dtype.
    One launch and nothing else on the device: no copy of t, no cast of the table.

    x0: ``[B, *rest]``; t: an int for every row, or an integer tensor ``[B]`` or ``[]`` on x0's
    device (any integer dtype and stride, read in place); its values lie in ``[0, T)``: checked by
    the caller on the host, or with ``check_t`` by a device-side assertion in the kernel (no host
    sync; a bad t then fails the launch as torch's own indexing does). alphas_cumprod: ``[T]`` on
    x0's device, any float dtype (read as fp32); noise: x0's shape or None (drawn in-kernel from
    ``seed``, an int or a one-element int64 tensor on the device; ignored, None included, when
    noise is given); offset: ``[B, C]`` (C =
    ``x0.shape[1]``) or None. When the target is the given noise unchanged (eps target, no offset)
    it is returned as is, not copied (when it has x0's dtype; else written in x0's dtype). Eager equivalent: :func:`q_sample_reference`.
    """
    has_noise, has_offset = noise is not None, offset is not None
    write_target = target_v or has_offset or not has_noise or noise.dtype != x0.dtype
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    target = torch.empty_like(x_t) if write_target else noise
    if x_t.numel() == 0:
        return x_t, target
    rows = x0.shape[0]
    x0, x0_rs = as_rows(x0)
    noise_rows, noise_rs = as_rows(noise) if has_noise else (x0, 0)
    K = x_t.numel() // rows
    C = x0.shape[1] if x0.dim() > 1 else 1
    block, n_col_blocks, n_programs = row_blocks(rows, K)
    t_from_ptr = isinstance(t, torch.Tensor)
    t_ptr, t_stride, t_value = (t, t.stride(0) if t.dim() else 0, 0) if t_from_ptr else (x0, 0, int(t))
    abar = alphas_cumprod if alphas_cumprod.stride(0) == 1 else alphas_cumprod.contiguous()
    offset = offset.contiguous() if has_offset else abar
    seed_value, seed_ptr = seed_args(None if has_noise else seed)  # a given noise: no seed (one variant)
    _q_sample_kernel[(n_programs,)](
        x0, t_ptr, abar, noise_rows, offset,
        x_t, target if write_target else x_t,
        K, K // C, C, abar.shape[0], x0_rs, noise_rs, t_stride, t_value, n_col_blocks,
        seed_value, seed_ptr, float(noise_offset),
        HAS_NOISE=has_noise, HAS_OFFSET=has_offset, TARGET_V=target_v, WRITE_TARGET=write_target,
        T_FROM_PTR=t_from_ptr, CHECK_T=bool(check_t and t_from_ptr), SEED_FROM_PTR=isinstance(seed_ptr, torch.Tensor),
        BLOCK=block, num_warps=NUM_WARPS, **(DEVICE_ASSERTS if check_t and t_from_ptr else {}),
    )
    return x_t, target


def q_sample_reference(x0, t, alphas_cumprod, noise, offset=None, noise_offset: float = 0.0, target_v: bool = False):
    """Eager reference, differentiable by autograd: ``(x_t, target)`` in x0's dtype.

    x0, noise: ``[B, *rest]``; t: ``[B]`` integer; alphas_cumprod: ``[T]``; offset: ``[B, C]`` or
    None. Math in fp32 (fp64 for fp64 x0): the table is cast to the compute dtype before the
    gather and the square roots.
    """
    compute = torch.promote_types(x0.dtype, torch.float32)
    bcast = (x0.shape[0],) + (1,) * (x0.dim() - 1)
    abar = alphas_cumprod.to(device=x0.device, dtype=compute)[t.to(x0.device)]
    a = abar.sqrt().view(bcast)
    s = (1.0 - abar).sqrt().view(bcast)
    x0c = x0.to(compute)
    eps = noise.to(compute)
    if offset is not None:
        eps = eps + noise_offset * offset.to(device=x0.device, dtype=compute).view(offset.shape + (1,) * (x0.dim() - 2))
    x_t = a * x0c + s * eps
    target = a * eps - s * x0c if target_v else eps
    return x_t.to(x0.dtype), target.to(x0.dtype)
