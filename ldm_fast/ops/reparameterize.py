"""reparameterize: sample a VAE latent and scale it, in one pass (checks, kernel or reference,
autograd, torch.library op, in that order)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import reparameterize as _kernels
from ._common import (apply, check_float, check_like, check_seed, eager_randn, finite_float, first_order,
                      kernel_seed, launch, needs_grad, seed_as_tensor)


def reparameterize(
    mean: Tensor,
    logvar: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """Sample a VAE latent and scale it, in one pass.

    Returns ``(mean + exp(0.5 * clamp(logvar, -30, 20)) * eps - shift) * scale`` with the shape of
    ``mean`` (any shape, typically ``[B, C, H, W]``) and the promoted dtype of mean and logvar. A NaN
    in mean or logvar gives NaN, as torch.clamp does.

    - ``noise``: eps, the same shape as mean. With it the result equals diffusers'
      ``DiagonalGaussianDistribution(moments).sample()`` (then ``* scaling_factor``) up to rounding.
    - ``seed``: with ``noise=None``, eps is drawn inside the kernel (counter-based Philox; the eager
      path uses a torch generator seeded with it) and never stored; the backward draws it again.
      ``None`` draws the seed from torch's default generator, so ``torch.manual_seed`` governs it.
    - ``scale``/``shift``: the latent normalization, e.g. SD v1 ``scale=0.18215``; SD3
      ``scale=1.5305, shift=0.0609``.

    Differentiable in mean and logvar (first order: a double backward raises). Eager equivalent:
    ``(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise - shift) * scale`` in fp32.
    """
    if not (isinstance(mean, Tensor) and mean.is_floating_point()):  # inline: each helper call is host time
        check_float("mean", mean)
    check_like("logvar", logvar, "mean", mean)
    if noise is not None:
        check_like("noise", noise, "mean", mean)
    check_seed(seed)
    scale, shift = finite_float("scale", scale), finite_float("shift", shift)
    if (mean.dtype == logvar.dtype and not (noise is not None and noise.requires_grad)
            and backend.kernel_ok(mean, logvar, noise)):
        seed = kernel_seed(seed, mean) if noise is None else None  # a given noise needs no seed
        if torch.compiler.is_compiling():
            return torch.ops.ldm_fast.reparameterize(mean, logvar, noise, None if seed is None else seed_as_tensor(seed, mean),
                                                     scale, shift)
        if needs_grad(mean, logvar):
            return apply(_ReparameterizeFunction, mean, logvar, noise, seed, scale, shift)
        return launch("reparameterize", _kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)
    if noise is None:
        noise = eager_randn(mean, seed)
    return _kernels.reparameterize_reference(mean, logvar, noise, scale, shift)


def reparameterize_moments(
    moments: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """:func:`reparameterize` on an encoder's moments ``[B, 2C, *spatial]`` (mean = first C channels,
    logvar = last C), read in place without copying the halves. Returns ``[B, C, *spatial]``.

    Eager equivalent: ``reparameterize(*moments.chunk(2, dim=1), ...)``.
    """
    check_float("moments", moments)
    if moments.dim() < 2 or moments.shape[1] % 2:
        raise ValueError(
            f"moments must be [B, 2C, ...] with an even channel count, got shape {tuple(moments.shape)}"
        )
    mean, logvar = moments.chunk(2, dim=1)
    return reparameterize(mean, logvar, noise=noise, seed=seed, scale=scale, shift=shift)


class _ReparameterizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, logvar, noise, seed, scale, shift):
        ctx.save_for_backward(logvar, noise)
        ctx.seed, ctx.scale = seed, scale  # an int, or the device seed tensor (never written after its draw)
        return launch("reparameterize", _kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        logvar, noise = ctx.saved_tensors
        dmean, dlogvar = launch("reparameterize", _kernels.reparameterize_bwd, grad, logvar, noise, ctx.seed, ctx.scale)
        return dmean, dlogvar, None, None, None, None


# torch.compile: one op forward, one backward (seeds as one-element int64 tensors; None with a given noise)


@torch.library.custom_op("ldm_fast::reparameterize", mutates_args=())
def _reparameterize_op(
    mean: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], scale: float, shift: float
) -> Tensor:
    return launch("reparameterize", _kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)


@_reparameterize_op.register_fake
def _(mean, logvar, noise, seed, scale, shift):
    return torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)


@torch.library.custom_op("ldm_fast::reparameterize_backward", mutates_args=())
def _reparameterize_backward_op(
    grad: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Optional[Tensor], scale: float
) -> tuple[Tensor, Tensor]:
    return launch("reparameterize", _kernels.reparameterize_bwd, grad, logvar, noise, seed, scale)


@_reparameterize_backward_op.register_fake
def _(grad, logvar, noise, seed, scale):
    out = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    return out, torch.empty_like(out)


def _reparameterize_setup(ctx, inputs, output):
    _, logvar, noise, seed, scale, _ = inputs
    ctx.save_for_backward(logvar, noise, seed)
    ctx.scale = scale


def _reparameterize_grad(ctx, grad):
    logvar, noise, seed = ctx.saved_tensors
    dmean, dlogvar = _reparameterize_backward_op(grad, logvar, noise, seed, ctx.scale)
    return dmean, dlogvar, None, None, None, None


_reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)
