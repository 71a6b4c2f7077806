"""The pieces of fused block forwards, shared by ldm_fast's own models and the diffusers integration.

A fused forward computes what a block's own statements compute while calling fewer modules: it
reads a submodule's parameters instead of calling it, or lets one kernel do the work of two
modules. That is exact only while calling those modules would do nothing but their class's
forward, so every fused path here checks, per call, what it relies on and returns None (the
caller runs its own statements) otherwise:

* :func:`intercepted` - a module's call runs more than its class's forward (hooks of any kind, an
  instance-level forward such as an accelerate hook); :func:`global_module_hooks` - any module's
  call does;
* the modules a fused forward reads instead of calling are read from their parent on every call
  and must be exactly the plain class it was written for (a LoRA/LoCon layer swapped in, or any
  module replaced by another class, makes the block call that module on that call), with the
  parameters it reads registered (``torch.nn.utils.weight_norm``, ``spectral_norm`` and ``prune``
  turn a weight into a plain attribute their hook computes: the module is called);
* nothing derived from weights is cached across calls: a value computed from parameters (a bias
  sum) is computed on every call, so in-place updates that do not bump a version counter
  (``p.data.copy_()``, an EMA's ``copy_to``) are always seen, CUDA graphs included.

Costs per call: identity and emptiness checks, well under a microsecond a module.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backend, functional
from . import nn as _ldm_nn  # (a cycle: ldm_fast.nn imports intercepted; its classes are read at call time)

__all__ = ["add_norm", "add_norm_feed_forward", "autocast_layer_norm_dtype", "class_method", "conv2d",
           "gemm_like_conv", "global_module_hooks", "inert_dropout", "intercepted", "linear", "plain_group_norm",
           "plain_silu", "readable", "shared_silu", "shortcut_gemm"]

_module_globals = torch.nn.modules.module


def intercepted(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: forward or backward hooks or
    pre-hooks, or an instance-level forward (e.g. an accelerate hook). A fusion that does not call
    the module steps aside then."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def global_module_hooks() -> bool:
    """Whether global module hooks (``register_module_forward_hook`` & co.) are registered: a fusion
    that calls fewer modules would change what they see, so it steps aside then."""
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


@torch.compiler.assume_constant_result
def _class_holds(cls: type, name: str, original) -> bool:
    return cls.__dict__.get(name) is original


def class_method(module: nn.Module, cls: type, name: str, original):
    """The method ``name`` that ``module``'s class runs now: ``original`` (the function a fused forward
    reproduces) while the class is still ``cls`` holding it, else the current one (a class swapped
    after optimize, as tomesd swaps the transformer blocks', or the class attribute reassigned).
    Under torch.compile the class attribute is read when the graph is traced (as Dynamo reads a
    module's code: a class patched after compiling needs a recompile, with or without ldm_fast)."""
    current = module.__class__
    if current is cls and _class_holds(cls, name, original):
        return original
    return getattr(current, name)


def readable(module: nn.Module) -> bool:
    """Whether reading ``module._parameters`` computes what calling ``module`` computes (global module
    hooks aside: the callers check those once): nothing intercepts its call (:func:`intercepted`)
    and its ``weight`` and ``bias`` are registered (Parameters, or None). ``torch.nn.utils.weight_norm``,
    ``spectral_norm`` and ``prune`` keep a weight outside ``_parameters``, a plain attribute their
    pre-hook computes; a tensor assigned after ``del module.weight`` is one without a hook."""
    p = module._parameters
    return "weight" in p and "bias" in p and not intercepted(module)


def plain_group_norm(norm: nn.Module) -> bool:
    """``norm`` is an ldm_fast GroupNorm (what the ``group_norm`` patch makes of a torch GroupNorm)
    without an activation of its own, with its parameters registered, and nothing intercepts its
    call: reading its parameters computes what calling it computes (global module hooks aside: the
    caller checks those once)."""
    return (type(norm) in (_ldm_nn.GroupNorm, _ldm_nn.GroupNorm32) and norm.__dict__.get("activation") is None
            and readable(norm))


def plain_silu(act: nn.Module) -> bool:
    """``act`` is an ``nn.SiLU`` and nothing intercepts its call (global module hooks aside: the
    caller checks those once)."""
    return type(act) is nn.SiLU and not intercepted(act)


def needs_grad_of(tensors: Sequence[Optional[Tensor]], params) -> bool:
    """Whether autograd records a call on ``tensors`` or on the Parameters ``params`` (an iterable,
    read only while gradients are enabled: a generator over modules' parameters costs nothing in
    inference)."""
    return torch.is_grad_enabled() and (any(t is not None and t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in params))


def inert_dropout(module: nn.Module) -> bool:
    """``module`` is an ``nn.Dropout`` in eval mode or with ``p == 0`` (diffusers' default, in training
    too) that nothing intercepts: calling it returns its input, the same tensor object, without
    drawing random numbers (``F.dropout(x, p, training=False)`` and ``F.dropout(x, 0.0, True)`` are
    ``x``: aten's dropout returns its input for either), so a fused forward may skip the call (global
    module hooks aside: the caller checks those once)."""
    return type(module) is nn.Dropout and (not module.training or module.p == 0) and not intercepted(module)


# --- the transformer block's residual stream ----------------------------------------------------

_UNKNOWN_AUTOCAST = object()


def autocast_layer_norm_dtype(device_type: str):
    """The ``out_dtype`` for :func:`ldm_fast.functional.add_layer_norm` that reproduces
    ``F.layer_norm`` under the autocast state of ``device_type``: None (the input's dtype) without
    autocast, ``torch.float32`` under CUDA autocast (layer_norm is on its fp32 list: the norm of the
    low-precision sum in fp32, output fp32); an opaque marker for another device's autocast, CPU's
    included (CPU autocast keeps layer_norm in the input's dtype, and the kernels' backward upcasts
    there: the caller runs the eager statements, the reference machine's exact behaviour)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.float32 if device_type == "cuda" else _UNKNOWN_AUTOCAST


def _plain_layer_norm(norm: nn.Module) -> bool:
    return (type(norm) is nn.LayerNorm and readable(norm) and len(norm.normalized_shape) == 1
            and not global_module_hooks())


def add_norm(x: Tensor, residual: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """``(s, norm(s))`` with ``s = x + residual`` (``[..., C]``; ``norm`` an ``nn.LayerNorm`` over C):
    one :func:`ldm_fast.functional.add_layer_norm` pass where its dtype rule is the module's (same
    shapes and dtypes; under autocast the dtypes autocast gives, :func:`autocast_layer_norm_dtype`)
    and ``norm`` is a plain LayerNorm (not intercepted), else the two eager statements. Eager
    equivalent: ``s = x + residual; s, norm(s)``."""
    if x.shape == residual.shape and x.dtype == residual.dtype and _plain_layer_norm(norm):
        out_dtype = autocast_layer_norm_dtype(x.device.type)
        if out_dtype is not _UNKNOWN_AUTOCAST:
            p = norm._parameters  # (not norm.weight: nn.Module.__getattr__ costs ~0.5 µs a name)
            return functional.add_layer_norm(x, residual, p["weight"], p["bias"], norm.eps, out_dtype=out_dtype)
    hidden = x + residual
    return hidden, norm(hidden)


def add_norm_feed_forward(x: Tensor, residual: Tensor, norm: nn.LayerNorm, inner, out_proj: nn.Linear,
                          modules: Sequence[nn.Module]) -> Optional[Tensor]:
    """``out_proj(inner(norm(s))) + s`` with ``s = x + residual`` (``[..., C]``; ``inner`` the
    feed-forward up to its output Linear ``out_proj``; ``modules`` the feed-forward and the norm,
    whose Parameters decide whether a gradient is recorded) with the residual in the output GEMM: the norm's
    :func:`ldm_fast.functional.add_layer_norm` writes ``s + out_proj.bias`` beside ``norm(s)`` and
    ``addmm_`` accumulates ``inner(...) W^T`` onto that tensor in place: no add launch, no
    feed-forward output tensor. Low-precision rounding: ``(s + b) + g W^T`` instead of
    ``(g W^T + b) + s``. None where it does not apply: not on the Triton backend (the eager backend
    keeps the statements bit for bit), autocast, a gradient to record (training), torch.compile,
    ``norm``/``out_proj`` not plain (another class, e.g. a LoRA layer, or intercepted); the caller
    then runs its own statements. The caller checks that ``inner`` is what the feed-forward computes
    before ``out_proj``."""
    if type(out_proj) is not nn.Linear or not readable(out_proj):
        return None
    w = out_proj._parameters
    if not (x.shape == residual.shape and x.dtype == residual.dtype and w["weight"].dtype == x.dtype
            and _plain_layer_norm(norm) and not torch.compiler.is_compiling()
            and backend.kernel_ok(x, residual) and not torch.is_autocast_enabled(x.device.type)
            and not needs_grad_of((x, residual), (p for m in modules for p in m.parameters()))):
        return None
    n = norm._parameters
    s_biased, normed = functional.add_layer_norm(x, residual, n["weight"], n["bias"], norm.eps, s_bias=w["bias"])
    gated = inner(normed)
    C = s_biased.shape[-1]
    # s_biased is ours (fresh): accumulate in place (an out-of-place addmm would copy it first)
    s_biased.view(-1, C).addmm_(gated.reshape(-1, gated.shape[-1]), w["weight"].t())
    return s_biased


# --- plain modules called without the module call --------------------------------------------


def conv2d(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)``: for a plain ``nn.Conv2d`` (zero padding mode, nothing intercepting its call;
    global module hooks aside: the caller checks those once) its forward's one statement,
    ``F.conv2d`` on its parameters, without the module call (~3 µs of host time a call); any other
    module is called. The same convolution, bit for bit."""
    if type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and readable(conv):
        p = conv._parameters  # (not conv.weight: nn.Module.__getattr__ costs ~0.5 µs a name)
        return F.conv2d(x, p["weight"], p["bias"], conv.stride, conv.padding, conv.dilation, conv.groups)
    return conv(x)


def linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``: for a plain ``nn.Linear`` (nothing intercepting its call; global module hooks
    aside: the caller checks those once) its forward's one statement, ``F.linear`` on its
    parameters, without the module call; any other module (a LoRA layer) is called. Bit for bit."""
    if type(module) is nn.Linear and readable(module):
        p = module._parameters
        return F.linear(x, p["weight"], p["bias"])
    return module(x)


# --- the ResNet block's 1x1 shortcut as a GEMM ---------------------------------------------------


def gemm_like_conv(x: Tensor) -> bool:
    """Whether a GEMM computes with the precision a convolution of ``x`` would: fp16/bf16 always;
    fp32 on CUDA only when the user's TF32 settings for matmuls and cuDNN convolutions agree
    (by default convolutions use TF32 and matmuls do not)."""
    if x.dtype != torch.float32 or not x.is_cuda:
        return True
    return torch.backends.cudnn.allow_tf32 == torch.backends.cuda.matmul.allow_tf32


def shortcut_gemm(conv: nn.Module, h: Tensor, shortcut: nn.Module, x: Tensor) -> Optional[Tensor]:
    """``shortcut(x) + conv(h)`` of a ResNet block whose ``shortcut`` is a 1x1 convolution (stride
    1, unpadded, one group, zero padding mode: the caller guarantees it) as ``conv`` with both
    biases, then the shortcut as a GEMM accumulating onto conv's output in place: ``addmm_`` on the
    ``[B*H*W, C]`` views of channels-last tensors, ``baddbmm_`` on the ``[B, C, H*W]`` views of NCHW
    ones; the shortcut's output and the add are never written. The bias sum is computed on every
    call (a ``[C]`` add; a cache would miss ``p.data.copy_()`` updates). Returns None where it does
    not apply (either module not exactly an ``nn.Conv2d`` or intercepted, a gradient to record, the
    eager backend, torch.compile, mixed dtypes, a layout that is neither, fp32 with TF32 settings
    that differ between matmuls and convolutions): the caller runs its own statements. Values: the
    same products and sums, rounded in another order in low precision.

    Eager equivalent: ``shortcut(x) + conv(h)``.
    """
    if type(conv) is not nn.Conv2d or type(shortcut) is not nn.Conv2d or not (readable(conv) and readable(shortcut)):
        return None
    p1, p2 = conv._parameters, shortcut._parameters  # (not conv.weight: nn.Module.__getattr__ costs ~0.5 µs a name)
    w1, b1, w2, b2 = p1["weight"], p1["bias"], p2["weight"], p2["bias"]
    if (torch.compiler.is_compiling() or not backend.kernel_ok(h, x)
            or x.dim() != 4 or not (h.dtype == x.dtype == w1.dtype == w2.dtype)
            or needs_grad_of((h, x), (w1, w2)) or global_module_hooks() or not gemm_like_conv(x)):
        return None
    B, C, H, W = x.shape
    last = torch.channels_last
    if x.is_contiguous(memory_format=last) and not x.is_contiguous():
        layout = last
    elif x.is_contiguous():
        layout = torch.contiguous_format
    else:
        return None
    bias = b1 if b2 is None else b2 if b1 is None else b1 + b2
    y = F.conv2d(h, w1, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if y.shape[0] != B or y.shape[2:] != x.shape[2:] or not y.is_contiguous(memory_format=layout):
        return y + F.conv2d(x, w2)  # conv chose another layout: the GEMM and the add apart
    Co = y.shape[1]
    w = w2.view(Co, C)
    if layout is last:  # [B*H*W, C] row views: y += x @ w^T
        y.permute(0, 2, 3, 1).view(B * H * W, Co).addmm_(x.permute(0, 2, 3, 1).view(B * H * W, C), w.t())
    else:  # [B, C, H*W] views: y += w @ x
        y.view(B, Co, H * W).baddbmm_(w.expand(B, Co, C), x.view(B, C, H * W))
    return y


# --- the time embedding's SiLU, once per step -----------------------------------------------------


def _version(t: Tensor):
    """``t``'s version counter, or None for an inference tensor (it has none: made in
    ``torch.inference_mode``, it cannot be changed in place outside it)."""
    return None if t.is_inference() else t._version


class _LastSiLU:
    """The last ``silu(temb)`` computed by :func:`shared_silu`: (weakref to temb, its version, the
    output, the output's version)."""

    entry: Optional[tuple] = None


def shared_silu(act: nn.Module, temb: Tensor, consumer: nn.Module) -> Tensor:
    """``act(temb)`` (``act`` an ``nn.SiLU``), computed once for the U-Net's one time embedding, which
    every ResNet block receives and applies the same SiLU to (22 identical launches per SD 1.5 step,
    now 1: diffusers' ResnetBlock2D under optimize, ldm_fast's ResBlock), then given to ``consumer``
    (the block's time projection). Shared only where nothing can change the shared tensor: the
    consumer is a plain ``nn.Linear`` (no hook, no adapter: ``F.linear`` reads its input), ``temb`` is
    the same tensor object at the same version, and the output still has its version (inference
    tensors have none: made in ``torch.inference_mode``, where only a hook could change them, and a
    hooked consumer takes its own); no gradient is recorded (under autograd and torch.compile each
    block computes its own). Nothing derived from weights is kept. Eager equivalent: ``act(temb)``."""
    if (type(act) is not nn.SiLU or act.inplace or intercepted(act) or type(consumer) is not nn.Linear
            or intercepted(consumer) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and temb.requires_grad) or global_module_hooks()):
        return act(temb)
    entry = _LastSiLU.entry
    if entry is not None and entry[0]() is temb and entry[1] == _version(temb) and entry[3] == _version(entry[2]):
        return entry[2]
    out = act(temb)
    _LastSiLU.entry = (weakref.ref(temb), _version(temb), out, _version(out))
    return out
