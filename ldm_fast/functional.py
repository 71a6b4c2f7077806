"""Functional API: each op validates its arguments, then runs the fused Triton kernel or the eager reference.

Which one runs is :func:`ldm_fast.backend.select`'s answer; cases a kernel does not cover (dtype,
device, an input that needs a gradient the kernel does not give) run the eager reference, which
is always correct. Bad arguments raise ``TypeError`` or ``ValueError`` naming the argument.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend, ops  # noqa: F401  (ops registers torch.ops.ldm_fast.*)

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["reparameterize", "reparameterize_moments"]


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_float(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def _seed_tensor(seed: Optional[int]) -> Tensor:
    """The seed as a 0-d int64 CPU tensor; drawn from torch's default generator when None."""
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)


def _eager_randn(like: Tensor, seed: Optional[int]) -> Tensor:
    """Standard normal noise of ``like``'s shape for the eager path: torch's generator, seeded when asked."""
    if seed is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def _kernel_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether the Triton kernels can take these tensors (dtype, device) in this process."""
    present = [t for t in tensors if t is not None]
    if any(t.dtype not in KERNEL_DTYPES for t in present):
        return False
    return backend.can_run_kernel(*present)


# ---------------------------------------------------------------------------------------------
# reparameterize


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
    ``mean`` (any shape, typically ``[B, C, H, W]``) and the promoted dtype of mean and logvar.

    - ``noise``: eps, the same shape as mean. With it the result equals diffusers'
      ``DiagonalGaussianDistribution(moments).sample()`` (then ``* scaling_factor``) up to rounding.
    - ``seed``: with ``noise=None``, eps is drawn inside the kernel (counter-based Philox; the eager
      path uses a torch generator seeded with it) and never stored; the backward draws it again.
      ``None`` draws the seed from torch's default generator, so ``torch.manual_seed`` governs it.
    - ``scale``/``shift``: the latent normalization, e.g. SD v1 ``scale=0.18215``; SD3
      ``scale=1.5305, shift=0.0609``.

    Differentiable in mean and logvar. Eager equivalent:
    ``(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise - shift) * scale`` in fp32.
    """
    _check_float("mean", mean)
    _check_float("logvar", logvar)
    _check_same_shape("logvar", logvar, "mean", mean)
    _check_same_device("logvar", logvar, "mean", mean)
    if noise is not None:
        _check_float("noise", noise)
        _check_same_shape("noise", noise, "mean", mean)
        _check_same_device("noise", noise, "mean", mean)
    scale, shift = float(scale), float(shift)

    use_kernel = (
        backend.select(mean, logvar, noise) == "triton"
        and mean.dtype == logvar.dtype
        and not (noise is not None and noise.requires_grad)
        and _kernel_ok(mean, logvar, noise)
    )
    if use_kernel:
        return torch.ops.ldm_fast.reparameterize(mean, logvar, noise, _seed_tensor(seed), scale, shift)
    ref = backend.kernel_module("reparameterize").reparameterize_reference
    if noise is None:
        noise = _eager_randn(mean, seed)
    return ref(mean, logvar, noise, scale, shift)


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
    _check_float("moments", moments)
    if moments.dim() < 2 or moments.shape[1] % 2:
        raise ValueError(
            f"moments must be [B, 2C, ...] with an even channel count, got shape {tuple(moments.shape)}"
        )
    mean, logvar = moments.chunk(2, dim=1)
    return reparameterize(mean, logvar, noise=noise, seed=seed, scale=scale, shift=shift)
