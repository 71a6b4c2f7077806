"""q_sample: forward diffusion of a batch, one pass (checks, kernel or reference, torch.library op).

Forward only: a call whose inputs need gradients runs the eager reference (autograd through it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import q_sample as _kernels
from ._common import (as_rows_index, assert_index_on_device, check_float, check_index, check_like, check_seed,
                      derived_seed, eager_randn, finite_float, kernel_seed, launch, needs_grad, seed_as_tensor)

TARGETS = ("eps", "v")
_OFFSET_SALT = 0x5DEECE66D


def q_sample(
    x0: Tensor,
    t,
    alphas_cumprod: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    target: str = "eps",
    noise_offset: float = 0.0,
    sync_check: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward diffusion of a batch: ``(x_t, target)`` with x_t and target the shape and dtype of x0.

    ``x_t = sqrt(abar[t_b]) * x0 + sqrt(1 - abar[t_b]) * eps`` for batch row b, where
    ``abar = alphas_cumprod`` (``[T]``) and ``t`` is an int (every row) or an integer tensor of any
    integer dtype, ``[B]`` (or ``[]``/``[1]``: every row), in ``[0, T)``. The gather and square
    roots happen in fp32 whatever x0's dtype.

    - ``noise``: eps, x0's shape. ``None`` draws it in-kernel from ``seed`` (counter-based Philox;
      the eager path uses a torch generator seeded with it); ``seed=None`` takes the seed from
      torch's default generator.
    - ``target``: ``"eps"`` returns eps (the noise actually added) as the second output; ``"v"``
      returns the v-prediction target ``sqrt(abar) * eps - sqrt(1 - abar) * x0``.
    - ``noise_offset``: adds ``noise_offset * randn(B, C)`` per (sample, channel) to eps, the offset
      noise of SD fine-tuning (``C = x0.shape[1]``; drawn with torch's generator).
    - t's range is checked without a host sync: an int or a CPU tensor on the host (ValueError), a
      tensor on the GPU by a device-side assertion (a bad t fails the launch, as torch's indexing
      does; CUDA-graph safe). ``sync_check=True`` reads a GPU t on the host instead (a sync) to
      raise the ValueError. alphas_cumprod on x0's device avoids a copy per call.

    Eager equivalent (diffusers ``DDPMScheduler.add_noise`` in fp32): ``a = abar[t].sqrt()``,
    ``s = (1 - abar[t]).sqrt()`` broadcast over the trailing dims, ``a * x0 + s * noise``.
    """
    for name, value in (("x0", x0), ("alphas_cumprod", alphas_cumprod)):  # inline: each call is host time
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            check_float(name, value)
    if x0.dim() == 0:
        raise ValueError("x0 must have a batch dimension: shape [B, ...], got a scalar")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-d tensor [T], got shape {tuple(alphas_cumprod.shape)}")
    if noise is not None:
        check_like("noise", noise, "x0", x0)
    if target not in TARGETS:
        raise ValueError(f"target must be 'eps' or 'v', got {target!r}")
    check_seed(seed)
    noise_offset = finite_float("noise_offset", noise_offset)
    num_steps = alphas_cumprod.shape[0]
    t, check_t = check_index("t", t, num_steps, x0.shape[0], x0.device, sync_check, "len(alphas_cumprod)")
    if x0.dim() == 1:  # one value per sample: [B] -> [B, 1]
        x0, noise = x0[:, None], None if noise is None else noise[:, None]
        x_t, tgt = _q_sample(x0, t, alphas_cumprod, noise, seed, target == "v", noise_offset, check_t)
        return x_t[:, 0], tgt[:, 0]
    return _q_sample(x0, t, alphas_cumprod, noise, seed, target == "v", noise_offset, check_t)


def _q_sample(x0, t, alphas_cumprod, noise, seed, target_v: bool, noise_offset: float, check_t: bool):
    """The checked call on ``x0`` ``[B, C, ...]``: the kernel, or the eager reference."""
    offset = None
    if noise_offset != 0.0:  # seed None: drawn on x0's device (graph-safe); a seed: a CPU generator, then copied
        if seed is None:
            offset = torch.randn(x0.shape[0], x0.shape[1], device=x0.device)
        else:
            generator = torch.Generator().manual_seed(derived_seed(seed, _OFFSET_SALT))
            offset = torch.randn(x0.shape[0], x0.shape[1], generator=generator).to(x0.device)
    if not needs_grad(x0, noise) and backend.kernel_ok(x0, noise):
        if alphas_cumprod.device != x0.device:
            alphas_cumprod = alphas_cumprod.to(x0.device)
        if isinstance(t, Tensor) and t.dim() and t.shape[0] != x0.shape[0]:
            t = t.view(())  # [1]: every row
        seed = kernel_seed(seed, x0) if noise is None else None  # a given noise needs no seed (no draw)
        if torch.compiler.is_compiling():
            t = t if isinstance(t, Tensor) else torch.full((1,), t, dtype=torch.int64, device=x0.device)
            x_t, tgt = torch.ops.ldm_fast.q_sample(
                x0, t, alphas_cumprod, noise, offset, None if seed is None else seed_as_tensor(seed, x0), noise_offset,
                target_v, check_t
            )
            # A custom op may not return one of its inputs: when the target is the given noise
            # unchanged the op returns an empty tensor in its place.
            return x_t, (noise if tgt.numel() == 0 and x_t.numel() else tgt)
        return launch("q_sample", _kernels.q_sample_fwd, x0, t, alphas_cumprod, noise, offset, seed, noise_offset,
                      target_v, check_t=check_t)
    if check_t:
        assert_index_on_device(t, alphas_cumprod.shape[0], "q_sample: t must lie in [0, len(alphas_cumprod))")
    t = torch.full((x0.shape[0],), t, device=x0.device) if isinstance(t, int) else as_rows_index(t, x0.shape[0])
    if noise is None:
        noise = eager_randn(x0, seed)
    return _kernels.q_sample_reference(x0, t, alphas_cumprod, noise, offset, noise_offset, target_v)


def kernel_call(x0, t, alphas_cumprod, noise, offset, seed, noise_offset: float, target_v: bool, check_t: bool):
    """The bare kernel launch of a checked call (benchmarks time it): ``(x_t, target)``."""
    return launch("q_sample", _kernels.q_sample_fwd, x0, t, alphas_cumprod, noise, offset, seed, noise_offset,
                  target_v, check_t=check_t)


# torch.compile: one op (forward only)


@torch.library.custom_op("ldm_fast::q_sample", mutates_args=())
def _q_sample_op(
    x0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    noise: Optional[Tensor],
    offset: Optional[Tensor],
    seed: Optional[Tensor],
    noise_offset: float,
    target_v: bool,
    check_t: bool,
) -> tuple[Tensor, Tensor]:
    x_t, target = launch(
        "q_sample", _kernels.q_sample_fwd, x0, t.expand(x0.shape[0]), alphas_cumprod, noise, offset, seed,
        noise_offset, target_v, check_t=check_t,
    )
    return x_t, x_t.new_empty(0) if target is noise else target


@_q_sample_op.register_fake
def _(x0, t, alphas_cumprod, noise, offset, seed, noise_offset, target_v, check_t):
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    writes_target = noise is None or offset is not None or target_v or noise.dtype != x0.dtype
    return x_t, torch.empty_like(x_t) if writes_target else x_t.new_empty(0)
