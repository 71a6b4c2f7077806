"""add_layer_norm: the residual add and the LayerNorm after it, one pass over each row (checks,
kernel or reference, autograd, in that order).

Under torch.compile it traces the eager reference: Inductor fuses the add and the layer norm
itself (the issue #16 policy: a fusion steps aside under compile unless measured faster), so no
torch.library op is registered.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import add_layer_norm as _kernels
from ._common import ArgumentError, apply, check_float, finite_float, first_order, launch, needs_grad

MAX_C = _kernels.MAX_C


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, *, s_bias: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``(s, out)`` with ``s = x + residual`` and ``out = F.layer_norm(s, (C,), weight, bias, eps)``:
    x and residual ``[..., C]`` of one floating dtype (any strides: ``[B, N, C]`` views are read in
    place, e.g. the permuted view of an NCHW convolution's output), weight and bias ``[C]`` or None. Both outputs are new contiguous tensors in x's dtype;
    ``out`` is normalized from the rounded ``s`` with fp32 statistics. The kernel reads x and
    residual once and writes s and out (4C elements a row against eager's 5C, one launch against
    two). Differentiable in x, residual, weight and bias (first order; the layer norm's backward is
    aten's, from the saved ``s``, mean and rstd).

    ``s_bias`` ``[C]`` or None, floating: the first output is ``s + s_bias`` instead of ``s``
    (rounded again to x's dtype, as eager's second add rounds it), ``out`` unchanged (the layer norm
    of the unbiased ``s``). It lets the caller fold a later ``linear(g) + s`` into the GEMM:
    ``torch.addmm(s_biased, g, W.t())`` with s_bias = the Linear's bias. One more ``[C]`` read a
    program, nothing more. The kernel path with s_bias is inference-only: when any input requires
    grad the call runs the eager reference below (autograd through torch ops).

    ``out_dtype`` (a floating dtype, or None: x's) is the dtype of ``out``, the norm computed on
    ``s.to(out_dtype)``: ``torch.float32`` is what CUDA autocast's layer_norm (on its fp32 list)
    returns for a low-precision ``s`` (the sum stays in x's dtype), so a block under CUDA autocast
    fuses too (``ldm_fast._fusion.add_norm``); the backward casts as autocast's does.

    Eager equivalent (diffusers ``BasicTransformerBlock``'s residual stream, bit for bit on the
    eager backend): ``s = x + residual; out = F.layer_norm(s, (C,), weight, bias, eps)``, and
    with s_bias ``return s + s_bias, out`` (s_bias in x's dtype; another dtype is cast as
    ``F.layer_norm`` would cast a bias and the sum cast back to x's dtype).
    """
    # the checks inline, the common case first: each helper call is host time (issue #24)
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        check_float("x", x)
    if not (isinstance(residual, Tensor) and residual.is_floating_point()):
        check_float("residual", residual)
    shape = x.shape
    if not shape:
        raise ValueError("add_layer_norm: x must be [..., C], got a 0-dim tensor")
    if residual.shape != shape:
        raise ArgumentError(f"add_layer_norm: residual must have the shape of x {tuple(shape)}, "
                            f"got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"add_layer_norm: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    C = shape[-1]
    if weight is not None and not (isinstance(weight, Tensor) and weight.shape == (C,) and weight.is_floating_point()):
        _check_vector("weight", weight, C)
    if bias is not None and not (isinstance(bias, Tensor) and bias.shape == (C,) and bias.is_floating_point()):
        _check_vector("bias", bias, C)
    if s_bias is not None and not (isinstance(s_bias, Tensor) and s_bias.shape == (C,) and s_bias.is_floating_point()):
        _check_vector("s_bias", s_bias, C)
    if type(eps) is not float or not 0.0 <= eps < math.inf:
        eps = finite_float("eps", eps)
        if eps < 0:
            raise ValueError(f"add_layer_norm: eps must be >= 0, got {eps}")
    if out_dtype is not None:
        if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"add_layer_norm: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
        if out_dtype == x.dtype:
            out_dtype = None
    # kernel_ok: the backend, the dtypes, and every tensor on one device (else the reference, whose
    # torch ops raise torch's device error)
    if (0 < C <= MAX_C and x.numel() and not torch.compiler.is_compiling()
            and backend.kernel_ok(x, residual, weight, bias, s_bias)):
        if not needs_grad(x, residual, weight, bias, s_bias):
            s, out, _, _ = launch("add_layer_norm", _kernels.add_layer_norm_fwd, x, residual, weight, bias, eps, s_bias,
                                  out_dtype, stats=False, checked=True)
            return s, out
        if s_bias is None:
            return apply(_AddLayerNormFunction, x, residual, weight, bias, eps, out_dtype)
        # with s_bias and a gradient wanted: the reference below (the s_bias kernel is forward only)
    return _kernels.add_layer_norm_reference(x, residual, weight, bias, eps, s_bias, out_dtype)


def _check_vector(name: str, p, C: int) -> None:
    if not (isinstance(p, Tensor) and p.is_floating_point()):
        check_float(name, p)
    if p.shape != (C,):
        raise ArgumentError(f"add_layer_norm: {name} must have shape ({C},) (x's last dim), got {tuple(p.shape)}")


class _AddLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, out_dtype):
        s, out, mean, rstd = launch("add_layer_norm", _kernels.add_layer_norm_fwd, x, residual, weight, bias, eps,
                                    None, out_dtype, checked=True)
        ctx.save_for_backward(s, mean, rstd, weight, bias)
        ctx.set_materialize_grads(False)
        return s, out

    @staticmethod
    @first_order
    def backward(ctx, grad_s, grad_out):
        s, mean, rstd, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        ds, dweight, dbias = _kernels.add_layer_norm_bwd(
            grad_s, grad_out, s, mean, rstd, weight, bias, (need[0] or need[1], need[2], need[3]))
        return (ds if need[0] else None), (ds if need[1] else None), dweight, dbias, None, None
