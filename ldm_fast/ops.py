"""How a kernel is called: directly in eager mode, and as a ``torch.library`` op under torch.compile.

Every op has two call paths, chosen by :func:`ldm_fast.functional`'s ops once per call:

* **eager** (the hot path users run): the kernel launcher is called directly, or, when autograd
  must record the call, through a ``torch.autograd.Function`` around the launchers. No
  ``torch.library`` dispatch: a ``custom_op`` costs tens of µs of host time per call, more than
  the kernels themselves at diffusion shapes (benchmarks/results/h100-2026-11-22-baseline-797cde7.md).
* **compiled** (``torch.compiler.is_compiling()``): the ``torch.ops.ldm_fast.*`` custom ops below,
  with fake implementations (``register_fake``) and autograd formulas (``register_autograd``), so
  ``torch.compile(fullgraph=True)`` captures each op as one node without graph breaks.

Random seeds: an int is passed to the kernel by value; a seed drawn on the device (inside a CUDA
graph capture, or in a compiled graph) is a one-element int64 tensor the kernel loads, so every
replay draws new noise without the host reading it. The backward draws the forward's noise again
from the same seed instead of storing it.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import backend
from .kernels import attention as _attention_kernels
from .kernels import group_norm as _group_norm_kernels
from .kernels import q_sample as _q_sample_kernels
from .kernels import reparameterize as _reparameterize_kernels
from .kernels import sampler_step as _sampler_step_kernels

Seed = Union[int, Tensor]


def _launch(op: str, launcher, *args, **kwargs):
    """Call a kernel launcher, counting the call (tests read the count to prove the kernel ran)."""
    backend.kernel_launches[op] += 1
    return launcher(*args, **kwargs)


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# reparameterize


class _ReparameterizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean, logvar, noise, seed, scale, shift):
        ctx.save_for_backward(logvar, noise)
        ctx.seed, ctx.scale = seed, scale  # an int, or the device seed tensor (never written after its draw)
        return _launch("reparameterize", _reparameterize_kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)

    @staticmethod
    def backward(ctx, grad):
        logvar, noise = ctx.saved_tensors
        dmean, dlogvar = _launch(
            "reparameterize", _reparameterize_kernels.reparameterize_bwd, grad, logvar, noise, ctx.seed, ctx.scale
        )
        return dmean, dlogvar, None, None, None, None


def reparameterize(mean: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Seed, scale: float, shift: float) -> Tensor:
    """The kernel call of :func:`ldm_fast.functional.reparameterize` (arguments already checked)."""
    if torch.compiler.is_compiling():
        return torch.ops.ldm_fast.reparameterize(mean, logvar, noise, _seed_as_tensor(seed, mean), scale, shift)
    if _needs_grad(mean, logvar):
        return _ReparameterizeFunction.apply(mean, logvar, noise, seed, scale, shift)
    return _launch("reparameterize", _reparameterize_kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)


def _seed_as_tensor(seed: Seed, like: Tensor) -> Tensor:
    """A seed for the registered ops: a one-element int64 tensor on ``like``'s device."""
    if isinstance(seed, Tensor):
        return seed
    return torch.full((1,), seed, dtype=torch.int64, device=like.device)


@torch.library.custom_op("ldm_fast::reparameterize", mutates_args=())
def _reparameterize_op(
    mean: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Tensor, scale: float, shift: float
) -> Tensor:
    return _launch("reparameterize", _reparameterize_kernels.reparameterize_fwd, mean, logvar, noise, seed, scale, shift)


@_reparameterize_op.register_fake
def _(mean, logvar, noise, seed, scale, shift):
    return torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)


@torch.library.custom_op("ldm_fast::reparameterize_backward", mutates_args=())
def _reparameterize_backward_op(
    grad: Tensor, logvar: Tensor, noise: Optional[Tensor], seed: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return _launch("reparameterize", _reparameterize_kernels.reparameterize_bwd, grad, logvar, noise, seed, scale)


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


# ---------------------------------------------------------------------------------------------
# q_sample (forward only: a call whose inputs need gradients runs the eager reference)


def q_sample(x0, t, alphas_cumprod, noise, offset, seed: Seed, noise_offset: float, target_v: bool,
             check_t: bool) -> tuple[Tensor, Tensor]:
    """The kernel call of :func:`ldm_fast.functional.q_sample` (arguments already checked; t an int
    or an integer tensor on x0's device; ``check_t``: assert t's range on the device)."""
    if torch.compiler.is_compiling():
        t = t if isinstance(t, Tensor) else torch.full((1,), t, dtype=torch.int64, device=x0.device)
        x_t, target = torch.ops.ldm_fast.q_sample(
            x0, t, alphas_cumprod, noise, offset, _seed_as_tensor(seed, x0), noise_offset, target_v, check_t
        )
        # A custom op may not return one of its inputs: when the target is the given noise
        # unchanged the op returns an empty tensor in its place.
        return x_t, (noise if target.numel() == 0 and x_t.numel() else target)
    return _launch(
        "q_sample", _q_sample_kernels.q_sample_fwd, x0, t, alphas_cumprod, noise, offset, seed, noise_offset,
        target_v, check_t=check_t,
    )


@torch.library.custom_op("ldm_fast::q_sample", mutates_args=())
def _q_sample_op(
    x0: Tensor,
    t: Tensor,
    alphas_cumprod: Tensor,
    noise: Optional[Tensor],
    offset: Optional[Tensor],
    seed: Tensor,
    noise_offset: float,
    target_v: bool,
    check_t: bool,
) -> tuple[Tensor, Tensor]:
    x_t, target = _launch(
        "q_sample", _q_sample_kernels.q_sample_fwd, x0, t.expand(x0.shape[0]), alphas_cumprod, noise, offset, seed,
        noise_offset, target_v, check_t=check_t,
    )
    return x_t, x_t.new_empty(0) if target is noise else target


@_q_sample_op.register_fake
def _(x0, t, alphas_cumprod, noise, offset, seed, noise_offset, target_v, check_t):
    x_t = torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)
    writes_target = noise is None or offset is not None or target_v
    return x_t, torch.empty_like(x_t) if writes_target else x_t.new_empty(0)


# ---------------------------------------------------------------------------------------------
# group_norm (forward returns y; the fp32 mean/rstd [B, G] are saved for the backward)


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation, channels_last_out):
        y, mean, rstd = _launch(
            "group_norm", _group_norm_kernels.group_norm_fwd, x, weight, bias, num_groups, eps, activation,
            channels_last_out,
        )
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.activation = num_groups, activation
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _launch(
            "group_norm", _group_norm_kernels.group_norm_bwd, grad, x, weight, bias, mean, rstd, ctx.num_groups,
            ctx.activation,
        )
        return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
                None, None, None, None)


def group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
               activation: Optional[str], channels_last_out: bool) -> Tensor:
    """The kernel call of :func:`ldm_fast.functional.group_norm` (arguments already checked)."""
    if torch.compiler.is_compiling():
        y, _, _ = torch.ops.ldm_fast.group_norm(x, weight, bias, num_groups, eps, activation or "", channels_last_out)
        return y
    if _needs_grad(x, weight, bias):
        return _GroupNormFunction.apply(x, weight, bias, num_groups, eps, activation, channels_last_out)
    y, _, _ = _launch(
        "group_norm", _group_norm_kernels.group_norm_fwd, x, weight, bias, num_groups, eps, activation,
        channels_last_out, stats=False,
    )
    return y


@torch.library.custom_op("ldm_fast::group_norm", mutates_args=())
def _group_norm_op(
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


@_group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, activation, channels_last_out):
    y = _group_norm_kernels.empty_nc(x.shape, channels_last_out, x.dtype, x.device)
    mean = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return y, mean, torch.empty_like(mean)


@torch.library.custom_op("ldm_fast::group_norm_backward", mutates_args=())
def _group_norm_backward_op(
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


@_group_norm_backward_op.register_fake
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
    dx, dweight, dbias = _group_norm_backward_op(grad, x, weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
    return (
        dx,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        None, None, None, None,
    )


_group_norm_op.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)


# ---------------------------------------------------------------------------------------------
# attention (q, k, v [B, H, N, D] views; forward returns out [B, Nq, H, D] and saves the fp32
# base-2 log-sum-exp [B, H, Nq] for the backward)


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = _launch("attention", _attention_kernels.attention_fwd, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _launch(
            "attention", _attention_kernels.attention_bwd, grad.transpose(1, 2), q, k, v, out, lse, ctx.scale
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """The kernel call of :func:`ldm_fast.functional.attention` (arguments checked, kernel chosen):
    q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` views -> out ``[B, Nq, H, D]``."""
    if torch.compiler.is_compiling():
        out, _ = torch.ops.ldm_fast.attention(q, k, v, scale)
        return out
    if _needs_grad(q, k, v):
        return _AttentionFunction.apply(q, k, v, scale)
    out, _ = _launch("attention", _attention_kernels.attention_fwd, q, k, v, scale, lse=False)
    return out


@torch.library.custom_op("ldm_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return _launch("attention", _attention_kernels.attention_fwd, q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    B, H, NQ, D = q.shape
    out = q.new_empty((B, NQ, H, D))
    return out, q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("ldm_fast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _launch("attention", _attention_kernels.attention_bwd, grad, q, k, v, out, lse, scale)


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, scale):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    return q.new_empty((B, NQ, H, D)), k.new_empty((B, NK, H, D)), k.new_empty((B, NK, H, D))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad.transpose(1, 2), q, k, v, out, lse, ctx.scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------
# sampler_step (forward only: sampling needs no gradients; a call whose inputs need them runs eager)


def sampler_step(model_output: Tensor, x: Tensor, coefficients, index, noise: Optional[Tensor], seed: Seed,
                 guidance_scale: Optional[float], clip_sample: Optional[float], add_noise: bool,
                 check_index: bool) -> Tensor:
    """The kernel call of :func:`ldm_fast.functional.sampler_step` (arguments already checked;
    coefficients a ``StepCoefficients`` or a float32 table on x's device with its ``index``)."""
    if torch.compiler.is_compiling():
        table = coefficients if isinstance(coefficients, Tensor) else None
        values = ([0.0] * _sampler_step_kernels.NUM_COEFFICIENTS if table is not None
                  else [float(v) for v in coefficients])
        if table is not None and not isinstance(index, Tensor):
            index = torch.full((1,), index, dtype=torch.int64, device=x.device)
        return torch.ops.ldm_fast.sampler_step(
            model_output, x, noise, table, index if table is not None else None,
            None if seed is None else _seed_as_tensor(seed, x), values,
            guidance_scale, clip_sample, add_noise, check_index,
        )
    return _launch(
        "sampler_step", _sampler_step_kernels.sampler_step_fwd, model_output, x, coefficients, index, noise, seed,
        guidance_scale, clip_sample, add_noise, check_index=check_index,
    )


@torch.library.custom_op("ldm_fast::sampler_step", mutates_args=())
def _sampler_step_op(
    model_output: Tensor,
    x: Tensor,
    noise: Optional[Tensor],
    table: Optional[Tensor],
    index: Optional[Tensor],
    seed: Optional[Tensor],
    values: list[float],
    guidance_scale: Optional[float],
    clip_sample: Optional[float],
    add_noise: bool,
    check_index: bool,
) -> Tensor:
    coefficients = table if table is not None else _sampler_step_kernels.StepCoefficients(*values)
    return _launch(
        "sampler_step", _sampler_step_kernels.sampler_step_fwd, model_output, x, coefficients, index, noise, seed,
        guidance_scale, clip_sample, add_noise, check_index=check_index,
    )


@_sampler_step_op.register_fake
def _(model_output, x, noise, table, index, seed, values, guidance_scale, clip_sample, add_noise, check_index):
    return _sampler_step_kernels.empty_in_memory_order(x, _sampler_step_kernels.memory_order(x))[0]
