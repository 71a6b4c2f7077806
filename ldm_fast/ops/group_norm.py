"""group_norm (+SiLU): checks, kernel or reference, autograd, torch.library ops, in that order."""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import group_norm as _kernels
from ._common import ArgumentError, apply, check_float, check_same_device, first_order, launch, needs_grad

ACTIVATIONS = _kernels.ACTIVATIONS
_CHANNELS_LAST_FORMATS = (torch.channels_last, torch.channels_last_3d)
#: Devices whose autocast runs group_norm in fp32 (on its fp32 list: inputs cast to fp32, the output
#: fp32): CUDA. CPU autocast keeps group_norm in the input's dtype, as the kernel does already.
FP32_AUTOCAST_DEVICES = ("cuda",)
_is_any_autocast_enabled = torch._C._is_any_autocast_enabled


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    out_memory_format: Optional[torch.memory_format] = None,
    upcast: bool = False,
    shift: Optional[Tensor] = None,
) -> Tensor:
    """Group normalization of ``x`` ``[B, C, *spatial]`` (images ``[B, C, H, W]``, video latents
    ``[B, C, T, H, W]``), optionally followed by SiLU in the same pass.

    Statistics per (sample, group of ``C // num_groups`` channels) in fp32 (two-pass variance),
    the affine ``weight``/``bias`` (``[C]``, fp32/fp16/bf16 independently of x) applied in fp32, the
    result in x's dtype; under CUDA autocast in fp32, as torch's group_norm gives it there (autocast
    runs it in fp32: the output, the SiLU after it and the gradient of weight/bias as torch's; x's
    gradient in x's dtype), except with ``upcast`` (GroupNorm32 casts back to x's dtype). x may be NCHW-contiguous or channels-last; ``out_memory_format``:
    ``None`` keeps x's layout, ``torch.channels_last`` (or ``channels_last_3d``) writes the output
    channels-last whatever x's layout, ``torch.contiguous_format`` writes NCHW.
    ``activation``: ``None`` or ``"silu"``. ``upcast``: the eager path computes as the SD U-Net's
    ``GroupNorm32`` (``F.group_norm(x.float(), ...).type(x.dtype)``; the kernel computes in fp32
    either way). ``shift``: ``[B, C]`` (or ``[B, C, 1, ...]``), added to x before the statistics
    without materializing the sum (diffusers' ``ResnetBlock2D`` adds its time embedding so before
    ``norm2``; the kernel adds in fp32, the eager path as ``x + shift`` in x's dtype). Differentiable
    in x, weight, bias and shift (backward in Triton; first order: a double backward raises). Bad arguments raise :class:`ArgumentError` (a ValueError that is also the
    RuntimeError torch's group_norm raises) or TypeError, naming the argument.

    Eager equivalent (what ``LDM_FAST_BACKEND=eager`` runs, bit for bit):
    ``F.silu(F.group_norm(x + shift[:, :, None, None], num_groups, weight, bias, eps))``, without the
    silu when activation is None and without the add when shift is None.
    """
    if not (isinstance(x, Tensor) and x.is_floating_point()):  # the checks inline: each helper call is host time
        check_float("x", x)
    if x.dim() < 2:
        raise ArgumentError(f"group_norm: x must have at least 2 dimensions [B, C, *spatial], got shape {tuple(x.shape)}")
    if type(num_groups) is not int:
        if isinstance(num_groups, bool) or not hasattr(num_groups, "__index__"):
            raise TypeError(f"group_norm: num_groups must be an int, got {type(num_groups).__name__}")
        num_groups = operator.index(num_groups)  # numpy integers, as torch takes them
    channels = x.shape[1]
    if num_groups < 1:
        raise ArgumentError(f"group_norm: num_groups must be positive, got {num_groups}")
    if channels % num_groups:
        raise ArgumentError(f"group_norm: the channel count of x (C={channels}, shape {tuple(x.shape)}) must be "
                            f"divisible by num_groups ({num_groups})")
    for name, param in (("weight", weight), ("bias", bias)):  # (their devices: see kernel_ok below)
        if param is not None:
            if not (isinstance(param, Tensor) and param.is_floating_point()):
                check_float(name, param)
            if param.dim() != 1 or param.shape[0] != channels:
                raise ArgumentError(f"group_norm: {name} must be a vector of C={channels} elements (x's channels), "
                                    f"got shape {tuple(param.shape)}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_memory_format is None or out_memory_format == torch.preserve_format:
        channels_last_out = None
    elif out_memory_format == torch.contiguous_format:
        channels_last_out = False
    elif out_memory_format in _CHANNELS_LAST_FORMATS:
        channels_last_out = True
    else:
        raise ValueError("group_norm: out_memory_format must be None, torch.preserve_format, torch.contiguous_format, "
                         f"torch.channels_last or torch.channels_last_3d, got {out_memory_format!r}")
    if type(eps) is not float:
        eps = float(eps)
    if shift is not None:
        shift = _check_shift(shift, x)

    out_dtype = None
    if _is_any_autocast_enabled() and not upcast and x.dtype != torch.float32:  # one C call when off
        device_type = x.device.type
        if device_type in FP32_AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
            out_dtype = torch.float32  # autocast's fp32 list; the eager path below gets it from torch

    # (kernel_ok also tells that every tensor is on x's device: the clear error for one that is not
    # is raised on the eager path below, where torch would raise its own)
    if x.numel() and channels <= _kernels.MAX_CHANNELS and backend.kernel_ok(x, weight, bias, shift):
        if torch.compiler.is_compiling():  # LDM_FAST_COMPILE: the kernel, or Inductor's own code
            if out_dtype is None and backend.compile_uses_kernel(x.numel() // (x.shape[0] * num_groups)):
                if channels_last_out is None:
                    channels_last_out = _kernels.is_channels_last(x)
                return torch.ops.ldm_fast.group_norm(x, weight, bias, num_groups, eps, activation or "",
                                                     channels_last_out, shift)[0]
        elif needs_grad(x, weight, bias, shift):
            return apply(_GroupNormFunction, x, weight, bias, num_groups, eps, activation, channels_last_out, shift,
                         out_dtype)
        else:
            return launch("group_norm", _kernels.group_norm_fwd, x, weight, bias, num_groups, eps, activation,
                          channels_last_out, stats=False, shift=shift, out_dtype=out_dtype, checked=True)[0]
    for name, param in (("weight", weight), ("bias", bias), ("shift", shift)):
        if param is not None and param.device != x.device:
            check_same_device(name, param, "x", x)
    y = _kernels.group_norm_reference(x, num_groups, weight, bias, eps, activation, upcast=upcast, shift=shift)
    return y if channels_last_out is None else _to_layout(y, channels_last_out)


def _check_shift(shift, x: Tensor) -> Tensor:
    """group_norm's shift as ``[B, C]``: a float tensor ``[B, C]`` or ``[B, C, 1, ...]`` (its device: the
    caller checks)."""
    if not (isinstance(shift, Tensor) and shift.is_floating_point()):
        check_float("shift", shift)
    dims = shift.dim()
    if dims == 2 and shift.shape == x.shape[:2]:  # the common case: [B, C] (its device: see the caller)
        return shift
    batch, channels = x.shape[0], x.shape[1]
    if (dims < 2 or tuple(shift.shape[:2]) != (batch, channels)
            or any(size != 1 for size in shift.shape[2:]) or dims > x.dim()):
        raise ArgumentError(f"group_norm: shift must be [B, C] = [{batch}, {channels}] (or [B, C, 1, ...]), "
                            f"got shape {tuple(shift.shape)}")
    return shift.view(batch, channels)


def _to_layout(y: Tensor, channels_last: bool) -> Tensor:
    """y ``[B, C, *spatial]`` NCHW-contiguous, or channels-last (channels fastest)."""
    if not channels_last or y.dim() < 3:
        return y.contiguous()
    if y.dim() in (4, 5):
        return y.contiguous(memory_format=_CHANNELS_LAST_FORMATS[y.dim() - 4])
    return y.movedim(1, -1).contiguous().movedim(-1, 1)


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation, channels_last_out, shift, out_dtype=None):
        y, mean, rstd = launch("group_norm", _kernels.group_norm_fwd, x, weight, bias, num_groups, eps, activation,
                               channels_last_out, shift=shift, out_dtype=out_dtype, checked=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd, shift)
        ctx.num_groups, ctx.activation = num_groups, activation
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad):
        x, weight, bias, mean, rstd, shift = ctx.saved_tensors
        grads = launch("group_norm", _kernels.group_norm_bwd, grad, x, weight, bias, mean, rstd, ctx.num_groups,
                       ctx.activation, shift=shift, checked=True)
        dx, dweight, dbias = grads[:3]
        dshift = grads[3] if shift is not None else None  # (in shift's dtype)
        return (dx, dweight if weight is not None else None, dbias if bias is not None else None,
                None, None, None, None, dshift, None)


# torch.compile: one op forward (y and the fp32 mean/rstd [B, G]), one backward


@torch.library.custom_op("ldm_fast::group_norm", mutates_args=())
def _group_norm_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    activation: str,
    channels_last_out: bool,
    shift: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    return launch("group_norm", _kernels.group_norm_fwd, x, weight, bias, num_groups, eps, activation or None,
                  channels_last_out, shift=shift)


@_group_norm_op.register_fake
def _(x, weight, bias, num_groups, eps, activation, channels_last_out, shift=None):
    y = _kernels.empty_nc(x.shape, channels_last_out, x.dtype, x.device)
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
    shift: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = launch("group_norm", _kernels.group_norm_bwd, grad, x, weight, bias, mean, rstd, num_groups,
                   activation or None, shift=shift)
    dshift = grads[3] if shift is not None else x.new_empty(0)
    # a custom op may not return an input-aliased or None output: absent gradients are empty tensors
    return grads[0], grads[1] if weight is not None else x.new_empty(0), grads[2] if bias is not None else x.new_empty(0), dshift


@_group_norm_backward_op.register_fake
def _(grad, x, weight, bias, mean, rstd, num_groups, activation, shift=None):
    dx = _kernels.empty_nc(x.shape, _kernels.is_channels_last(x), x.dtype, x.device)
    dweight = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    dshift = torch.empty_like(shift) if shift is not None else x.new_empty(0)
    return dx, dweight, dbias, dshift


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, _, activation, _, shift = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd, shift)
    ctx.num_groups = num_groups
    ctx.activation = activation
    ctx.mark_non_differentiable(mean, rstd)


def _group_norm_grad(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd, shift = ctx.saved_tensors
    dx, dweight, dbias, dshift = _group_norm_backward_op(grad, x, weight, bias, mean, rstd, ctx.num_groups,
                                                         ctx.activation, shift)
    return (dx, dweight if weight is not None else None, dbias if bias is not None else None, None, None, None,
            None, dshift if shift is not None else None)


_group_norm_op.register_autograd(_group_norm_grad, setup_context=_group_norm_setup)
