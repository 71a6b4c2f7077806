"""torch.library registrations of the Triton kernels (``torch.ops.ldm_fast.*``).

Each op is a ``torch.library.custom_op`` with a fake implementation (``register_fake``) for
tracing and an autograd formula (``register_autograd``), so ``torch.compile(fullgraph=True)``
traces models that use them without graph breaks, with the kernel opaque inside the graph. The
op bodies call the kernel launchers; :mod:`ldm_fast.functional` validates arguments and decides
whether to call these ops or the eager references.

Random seeds travel as 0-d int64 CPU tensors so that a new seed never recompiles a graph, and so
that the backward can draw the forward's noise again instead of storing it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backend
from .kernels import group_norm as _group_norm_kernels
from .kernels import q_sample as _q_sample_kernels
from .kernels import reparameterize as _reparameterize_kernels


def _launch(op: str, launcher, *args):
    """Call a kernel launcher, counting the launch (tests read the count to prove the kernel ran)."""
    backend.kernel_launches[op] += 1
    return launcher(*args)


# ---------------------------------------------------------------------------------------------
# reparameterize


@torch.library.custom_op("ldm_fast::reparameterize", mutates_args=())
def reparameterize(
    mean: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Tensor, scale: float, shift: float
) -> Tensor:
    return _launch("reparameterize", _reparameterize_kernels.reparameterize_fwd, mean, logvar, noise, int(seed), scale, shift)


@reparameterize.register_fake
def _(mean, logvar, noise, seed, scale, shift):
    return torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)


@torch.library.custom_op("ldm_fast::reparameterize_backward", mutates_args=())
def reparameterize_backward(
    grad: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return _launch("reparameterize", _reparameterize_kernels.reparameterize_bwd, grad, logvar, noise, int(seed), scale)


@reparameterize_backward.register_fake
def _(grad, logvar, noise, seed, scale):
    out = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    return out, torch.empty_like(out)


def _reparameterize_setup(ctx, inputs, output):
    _, logvar, noise, seed, scale, _ = inputs
    ctx.save_for_backward(logvar, noise, seed)
    ctx.scale = scale


def _reparameterize_grad(ctx, grad):
    logvar, noise, seed = ctx.saved_tensors
    dmean, dlogvar = reparameterize_backward(grad, logvar, noise, seed, ctx.scale)
    return dmean, dlogvar, None, None, None, None


reparameterize.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


# ---------------------------------------------------------------------------------------------
# q_sample (forward only: a call whose inputs need gradients runs the eager reference)


@torch.library.custom_op("ldm_fast::q_sample", mutates_args=())
def q_sample(
    x0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    noise: Optional[Tensor],
    offset: Optional[Tensor],
    seed: Tensor,
    noise_offset: float,
    target_v: bool,
) -> tuple[Tensor, Tensor]:
    from .functional import check_timestep_range  # the kernel would read out of bounds: check here, eagerly

    check_timestep_range(t, alphas_cumprod.shape[0])
    x_t, target = _launch(
        "q_sample", _q_sample_kernels.q_sample_fwd, x0, t, alphas_cumprod, noise, offset, int(seed), noise_offset, target_v
    )
    # A custom op may not return one of its inputs: when the target is the given noise unchanged
    # the op returns an empty tensor in its place and ldm_fast.functional.q_sample returns the noise.
    return x_t, x_t.new_empty(0) if target is noise else target


@q_sample.register_fake
def _(x0, t, alphas_cumprod, noise, offset, seed, noise_offset, target_v):
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    writes_target = noise is None or offset is not None or target_v
    return x_t, torch.empty_like(x_t) if writes_target else x_t.new_empty(0)


# ---------------------------------------------------------------------------------------------
# group_norm (forward returns y plus the fp32 mean/rstd [B, G] the backward needs)


@torch.library.custom_op("ldm_fast::group_norm", mutates_args=())
def group_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    channels_last_out: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch(
        "group_norm", _group_norm_kernels.group_norm_fwd,
        x, weight, bias, num_groups, eps, activation or None, channels_last_out,
    )


@group_norm.register_fake
def _(x, weight, bias, num_groups, eps, activation, channels_last_out):
    y = _group_norm_kernels.empty_nc(x.shape, channels_last_out, x.dtype, x.device)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return y, mean, torch.empty_like(mean)


@torch.library.custom_op("ldm_fast::group_norm_backward", mutates_args=())
def group_norm_backward(
    grad: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch(
        "group_norm", _group_norm_kernels.group_norm_bwd,
        grad, x, weight, bias, mean, rstd, num_groups, activation or None,
    )


@group_norm_backward.register_fake
def _(grad, x, weight, bias, mean, rstd, num_groups, activation):
    dx = _group_norm_kernels.empty_nc(x.shape, _group_norm_kernels.is_channels_last(x), x.dtype, x.device)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return dx, dweight, dbias


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, _, activation, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups = num_groups
    ctx.activation = activation
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_grad(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = group_norm_backward(grad, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
    return (
        dx,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        None, None, None, None,
    )


group_norm.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)
