"""Reparameterize-and-scale of VAE latents: one pass from (mean, logvar) to the scaled latent z.

    z = (mean + exp(0.5 * clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)) * eps - shift) * scale

(LOGVAR_MIN, LOGVAR_MAX = -30, 20, as diffusers' DiagonalGaussianDistribution.) A NaN logvar or
mean gives a NaN z, as torch.clamp does (Triton's clamp is told to propagate NaN).

eps is a given tensor, or drawn inside the kernel (counter-based Philox, see ``_random.py``) so it
never touches memory; the backward kernel draws the same eps again from the seed instead of
storing it. Math in fp32 whatever the storage dtype.

Tensors are handled as R rows of K contiguous elements (``as_rows``): a ``[B, C, H, W]`` latent is
B rows of ``C*H*W``, and the mean and logvar halves of a ``[B, 2C, H, W]`` moments tensor are read
in place through their row stride. Offsets are int64.
"""

from __future__ import annotations

import torch

from ._layout import as_rows, row_block, row_blocks
from ._random import randn_row_block, seed_args
from ._triton import tl, triton
from ._launch import kernel

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
NUM_WARPS = 4


@kernel
@triton.jit(do_not_specialize=["seed"])
def _reparameterize_fwd_kernel(
    mean_ptr, logvar_ptr, noise_ptr, z_ptr,  # [R, K] rows, row strides below; z contiguous
    K, mean_row_stride, logvar_row_stride, noise_row_stride, n_col_blocks,
    seed, seed_ptr, scale, shift,
    HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
    LOGVAR_MIN: tl.constexpr, LOGVAR_MAX: tl.constexpr,
):
    i_row, i_col, row, o_col, m_col = row_block(n_col_blocks, K, BLOCK)
    if SEED_FROM_PTR:  # drawn on the device (CUDA-graph replays and compiled graphs draw anew)
        seed = tl.load(seed_ptr)

    b_mean = tl.load(mean_ptr + row * mean_row_stride + o_col, mask=m_col).to(tl.float32)
    b_logvar = tl.load(logvar_ptr + row * logvar_row_stride + o_col, mask=m_col).to(tl.float32)
    if HAS_NOISE:
        b_eps = tl.load(noise_ptr + row * noise_row_stride + o_col, mask=m_col).to(tl.float32)
    else:
        b_eps = randn_row_block(seed, i_row, i_col * BLOCK, BLOCK)
    b_std = tl.exp(0.5 * tl.clamp(b_logvar, LOGVAR_MIN, LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL))
    b_z = (b_mean + b_std * b_eps - shift) * scale
    tl.store(z_ptr + row * K + o_col, b_z.to(z_ptr.dtype.element_ty), mask=m_col)


@kernel
@triton.jit(do_not_specialize=["seed"])
def _reparameterize_bwd_kernel(
    grad_ptr, logvar_ptr, noise_ptr, dmean_ptr, dlogvar_ptr,  # [R, K]; dmean, dlogvar contiguous
    K, grad_row_stride, logvar_row_stride, noise_row_stride, n_col_blocks,
    seed, seed_ptr, scale,
    HAS_NOISE: tl.constexpr, SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
    LOGVAR_MIN: tl.constexpr, LOGVAR_MAX: tl.constexpr,
):
    i_row, i_col, row, o_col, m_col = row_block(n_col_blocks, K, BLOCK)
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)

    b_g = tl.load(grad_ptr + row * grad_row_stride + o_col, mask=m_col).to(tl.float32) * scale
    b_logvar = tl.load(logvar_ptr + row * logvar_row_stride + o_col, mask=m_col).to(tl.float32)
    if HAS_NOISE:
        b_eps = tl.load(noise_ptr + row * noise_row_stride + o_col, mask=m_col).to(tl.float32)
    else:
        b_eps = randn_row_block(seed, i_row, i_col * BLOCK, BLOCK)
    b_std = tl.exp(0.5 * tl.clamp(b_logvar, LOGVAR_MIN, LOGVAR_MAX, propagate_nan=tl.PropagateNan.ALL))
    # clamp passes the gradient where min <= logvar <= max, as torch.clamp's backward does: a NaN
    # logvar is outside (torch gives dlogvar 0 there, and so does this), a NaN grad or eps inside
    # gives a NaN dlogvar.
    m_inside = (b_logvar >= LOGVAR_MIN) & (b_logvar <= LOGVAR_MAX)
    b_dlogvar = tl.where(m_inside, b_g * b_eps * 0.5 * b_std, 0.0)
    tl.store(dmean_ptr + row * K + o_col, b_g.to(dmean_ptr.dtype.element_ty), mask=m_col)
    tl.store(dlogvar_ptr + row * K + o_col, b_dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=m_col)


def reparameterize_fwd(mean, logvar, noise, seed, scale: float, shift: float) -> torch.Tensor:
    """Launch the forward kernel.

    mean, logvar: ``[R, *rest]`` (same shape, same dtype, rows contiguous or copied); noise: the
    same shape or None (then drawn in-kernel from ``seed``: an int, or an int64 tensor of one
    element on the kernel's device, read by the kernel, never by the host; with a noise tensor
    the seed is ignored, None included). Returns z, contiguous,
    ``[R, *rest]``, in mean's dtype. Eager equivalent: :func:`reparameterize_reference`.
    """
    z = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
    if z.numel() == 0:
        return z
    mean, mean_rs = as_rows(mean)
    logvar, logvar_rs = as_rows(logvar)
    has_noise = noise is not None
    noise, noise_rs = as_rows(noise) if has_noise else (mean, 0)
    rows = mean.shape[0] if mean.dim() > 1 else 1
    K = z.numel() // rows
    block, n_col_blocks, n_programs = row_blocks(rows, K)
    seed_value, seed_ptr = seed_args(None if has_noise else seed)  # a given noise: no seed (one variant)
    _reparameterize_fwd_kernel[(n_programs,)](
        mean, logvar, noise, z,
        K, mean_rs, logvar_rs, noise_rs, n_col_blocks,
        seed_value, seed_ptr, float(scale), float(shift),
        HAS_NOISE=has_noise, SEED_FROM_PTR=isinstance(seed_ptr, torch.Tensor), BLOCK=block,
        LOGVAR_MIN=LOGVAR_MIN, LOGVAR_MAX=LOGVAR_MAX, num_warps=NUM_WARPS,
    )
    return z


def reparameterize_bwd(grad, logvar, noise, seed, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel: ``(dmean, dlogvar)``, each ``[R, *rest]`` in logvar's dtype.

    grad: dL/dz, ``[R, *rest]``; logvar and noise (or None with the forward's ``seed``) as in
    :func:`reparameterize_fwd`. dmean = scale * grad;
    dlogvar = scale * grad * eps * 0.5 * std where LOGVAR_MIN <= logvar <= LOGVAR_MAX, else 0
    (0 at a NaN logvar too, as torch.clamp's backward gives).
    """
    dmean = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    dlogvar = torch.empty_like(dmean)
    if dmean.numel() == 0:
        return dmean, dlogvar
    grad, grad_rs = as_rows(grad)
    logvar, logvar_rs = as_rows(logvar)
    has_noise = noise is not None
    noise, noise_rs = as_rows(noise) if has_noise else (logvar, 0)
    rows = logvar.shape[0] if logvar.dim() > 1 else 1
    K = dmean.numel() // rows
    block, n_col_blocks, n_programs = row_blocks(rows, K)
    seed_value, seed_ptr = seed_args(None if has_noise else seed)
    _reparameterize_bwd_kernel[(n_programs,)](
        grad, logvar, noise, dmean, dlogvar,
        K, grad_rs, logvar_rs, noise_rs, n_col_blocks,
        seed_value, seed_ptr, float(scale),
        HAS_NOISE=has_noise, SEED_FROM_PTR=isinstance(seed_ptr, torch.Tensor), BLOCK=block,
        LOGVAR_MIN=LOGVAR_MIN, LOGVAR_MAX=LOGVAR_MAX, num_warps=NUM_WARPS,
    )
    return dmean, dlogvar


def reparameterize_reference(mean, logvar, noise, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Eager reference, differentiable by autograd: the same formula in plain PyTorch.

    mean, logvar, noise: the same shape ``[...]``. Math in fp32 (fp64 for fp64 inputs); the
    result in the promoted dtype of mean and logvar.
    """
    dtype = torch.promote_types(mean.dtype, logvar.dtype)
    compute = torch.promote_types(dtype, torch.float32)
    std = torch.exp(0.5 * logvar.to(compute).clamp(LOGVAR_MIN, LOGVAR_MAX))
    return ((mean.to(compute) + std * noise.to(compute) - shift) * scale).to(dtype)
