"""timestep_embedding: the sinusoidal timestep embedding of the U-Net's ``Timesteps`` module, one
launch (checks, then the kernel or the reference).

No autograd: timesteps carry no gradient in a diffusion model; a timesteps tensor that asks for
one runs the reference, which autograd differentiates. Under torch.compile it traces the eager
reference: Inductor fuses its elementwise chain itself (the issue #16 policy: a fusion steps
aside under compile unless measured faster), so no torch.library op is registered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backend
from ..kernels import timestep_embedding as _kernels
from ._common import finite_float, launch, needs_grad

TIMESTEP_DTYPES = _kernels.TIMESTEP_DTYPES


def timestep_embedding(timesteps: Tensor, dim: int, *, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: float = 10000) -> Tensor:
    """The sinusoidal embedding ``[N, dim]`` fp32 of ``timesteps`` ``[N]`` (one per batch row, any
    integer or floating dtype, fractional values allowed, any stride: ``t.expand(B)`` is read in
    place): ``cat([sin(arg), cos(arg)], -1)`` (cos first with ``flip_sin_to_cos``) with
    ``arg[n, k] = scale * t[n] * exp(-log(max_period) * k / (dim // 2 - downscale_freq_shift))``
    for ``k < dim // 2``, and a zero last column when ``dim`` is odd. One kernel launch (eager
    PyTorch: about ten), with eager's fp32 rounding steps: it differs from eager only by the
    exp/sin/cos implementations (libdevice's on a GPU).

    Eager equivalent (diffusers ``get_timestep_embedding``, bit for bit on the eager backend; SD
    1.5's U-Net calls it with ``flip_sin_to_cos=True, downscale_freq_shift=0``):
    ``ldm_fast.kernels.timestep_embedding.timestep_embedding_reference``.
    """
    dim = _kernels.check_timesteps(timesteps, dim)
    if type(flip_sin_to_cos) is not bool:
        raise TypeError(f"timestep_embedding: flip_sin_to_cos must be a bool, got {type(flip_sin_to_cos).__name__}")
    if not (type(downscale_freq_shift) is float and math.isfinite(downscale_freq_shift)):
        downscale_freq_shift = finite_float("downscale_freq_shift", downscale_freq_shift)
    _kernels.check_shift(dim, downscale_freq_shift)
    if not (type(scale) is float and math.isfinite(scale)):
        scale = finite_float("scale", scale)
    if type(max_period) is not int:
        max_period = finite_float("max_period", max_period)
    if max_period <= 0:
        raise ValueError(f"timestep_embedding: max_period must be positive, got {max_period}")
    if (timesteps.numel() and not torch.compiler.is_compiling() and not needs_grad(timesteps)
            and backend.kernel_ok(timesteps, dtypes=TIMESTEP_DTYPES)):
        return launch("timestep_embedding", _kernels.timestep_embedding_fwd, timesteps, dim, flip_sin_to_cos,
                      downscale_freq_shift, scale, max_period)
    return _kernels.timestep_embedding_reference(timesteps, dim, flip_sin_to_cos, downscale_freq_shift, scale,
                                                 max_period)
