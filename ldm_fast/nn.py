"""Drop-in modules backed by the fused kernels.

:class:`GroupNorm` and :class:`GroupNorm32` subclass their ``torch.nn`` counterpart with the same
parameters, so a checkpoint saved from the torch module loads unchanged (and back), and
``isinstance(m, torch.nn.GroupNorm)`` holds. :class:`CrossAttention` and
:class:`SpatialSelfAttention` are the CompVis attention blocks with the CompVis submodule names, so
a CompVis state dict loads into them strictly.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, functional
from .ops._common import needs_grad
from .ops.group_norm import ACTIVATIONS as GROUP_NORM_ACTIVATIONS

__all__ = ["CrossAttention", "GroupNorm", "GroupNorm32", "PackedLinears", "PackedTimeProjections", "ShortcutGemm",
           "SpatialSelfAttention", "add_norm",
           "add_norm_feed_forward", "global_module_hooks", "intercepted", "linear_unpackable",
           "shared_silu", "storage_key"]


def _torch_group_norm_takes_bias() -> bool:
    """Whether ``torch.nn.GroupNorm.__init__`` has the ``bias`` argument (torch >= 2.12)."""
    return "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with an optional fused SiLU: ``activation=None`` or ``"silu"``.

    Input ``[B, C, *spatial]`` (NCHW or channels-last), output the same shape, dtype and layout;
    ``forward(x, shift=None)``: ``shift`` ``[B, C]`` is added to x before the statistics, in the same
    pass (:func:`ldm_fast.functional.group_norm`).
    The state dict is torch's (``weight`` and ``bias`` ``[C]`` when affine). Forward and backward
    run :func:`ldm_fast.functional.group_norm`: the Triton kernels on CUDA, the eager
    ``F.silu(F.group_norm(...))`` elsewhere or with ``LDM_FAST_BACKEND=eager``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        activation: Optional[str] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        if activation not in GROUP_NORM_ACTIVATIONS:
            raise ValueError(f"activation must be one of {GROUP_NORM_ACTIVATIONS}, got {activation!r}")
        if _torch_group_norm_takes_bias():
            super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        else:  # torch < 2.12: no ``bias`` argument; an affine norm without bias drops it as torch does
            super().__init__(num_groups, num_channels, eps, affine, device, dtype)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.activation = activation

    def forward(self, input: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        return functional.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation, shift=shift
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, activation={self.activation!r}" if self.activation is not None else text


class GroupNorm32(GroupNorm):
    """The SD U-Net's ``GroupNorm32`` (``normalization(ch)`` = ``GroupNorm32(32, ch)``, eps 1e-5):
    statistics and affine computed in fp32, the result cast back to the input's dtype, i.e.
    ``super().forward(x.float()).type(x.dtype)``, then the activation if any (as ``GroupNorm32``
    followed by ``nn.SiLU``). The Triton kernels compute in fp32 for every input dtype, so only the
    eager path differs from :class:`GroupNorm`.
    """

    def forward(self, input: Tensor, shift: Optional[Tensor] = None) -> Tensor:
        return functional.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation, upcast=True,
            shift=shift,
        )


# ---------------------------------------------------------------------------------------------
# attention blocks
#
# Both blocks read their projection weights as ONE matrix where the math allows (q, k and v of a
# self-attention from the same input: one GEMM), without copying them per call: the weights are
# stored back to back in one storage (``_pack``: each Parameter object stays, its ``.data`` becomes
# a slice of the shared storage; redone after ``.to()``/``.half()``, ``load_state_dict(assign=True)``,
# copy and pickle), and ``_joined`` reads them as a view. When autograd needs the weights' gradients,
# under torch.compile, or when the storage was split (a parameter re-assigned), ``_joined`` falls
# back to ``torch.cat`` (one small extra launch; gradients flow to each Parameter). A view of the
# live storage sees in-place updates (optimizer steps, ``load_state_dict``), also from a CUDA graph.


def intercepted(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: forward hooks or pre-hooks, or
    an instance-level forward (e.g. an accelerate hook). A fusion that does not call the module steps
    aside then."""
    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def _plain_module(module: torch.nn.Module, cls: type) -> bool:
    """``module`` is exactly ``cls`` and calling it does nothing but its class's forward (no hooks,
    no instance-level forward), so reading its parameters directly computes what calling it would."""
    return type(module) is cls and not intercepted(module)


def _is_pointwise(conv: torch.nn.Module, channels: int) -> bool:
    """A plain ``Conv2d(channels, channels, 1)`` with bias: a per-pixel ``[C, C]`` linear map."""
    return (_plain_module(conv, torch.nn.Conv2d) and conv.bias is not None
            and tuple(conv.weight.shape) == (channels, channels, 1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1)


def _packed(tensors: Sequence[Optional[Tensor]]) -> Optional[Tensor]:
    """``tensors`` (one shape ``[rows, *rest]``) stacked along dim 0 as one ``[n * rows, prod(rest)]``
    matrix (1-d tensors: one vector), as a view without a copy, when they lie back to back in one
    storage (as :func:`_pack` leaves them); else None. The view is detached (no autograd)."""
    first = tensors[0]
    if first is None or first.numel() == 0 or first.device.type == "meta" or not first.is_contiguous():
        return None
    numel, size, ptr = first.numel(), first.element_size(), first.data_ptr()
    for i, t in enumerate(tensors[1:], 1):
        if (t is None or t.dtype != first.dtype or t.shape != first.shape or t.device != first.device
                or not t.is_contiguous() or t.data_ptr() != ptr + i * numel * size):
            return None
    # back-to-back data pointers inside first's own storage: the same memory (storages never overlap)
    if first.untyped_storage().nbytes() < (first.storage_offset() + len(tensors) * numel) * size:
        return None
    if first.dim() == 1:
        return first.detach().as_strided((len(tensors) * numel,), (1,))
    cols = numel // first.shape[0]
    return first.detach().as_strided((len(tensors) * first.shape[0], cols), (cols, 1))


def _pack(tensors: Sequence[Optional[Tensor]]) -> None:
    """Store parameters of one shape, dtype and device back to back in one new storage, each
    Parameter object kept (its ``.data`` becomes a slice), so :func:`_packed` reads them without a
    copy. Nothing happens when they already are packed, differ, or live on the meta device."""
    if len(tensors) < 2 or any(t is None for t in tensors):
        return
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.device != first.device for t in tensors):
        return
    if first.device.type == "meta" or first.numel() == 0 or _packed(tensors) is not None:
        return
    numel = first.numel()
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        for i, t in enumerate(tensors):
            t.data = flat[i * numel:(i + 1) * numel].view(t.shape)


def _joined(tensors: Sequence[Tensor]) -> Tensor:
    """``tensors`` (weights ``[out, in]``/``[out, in, 1, 1]``, or biases ``[out]``) concatenated along
    dim 0 as one ``[sum out, in]`` matrix (or vector): a view of their storage when they are packed
    and autograd does not need their gradients (no launch), else ``torch.cat`` (differentiable)."""
    if not torch.compiler.is_compiling() and not needs_grad(*tensors):
        view = _packed(tensors)
        if view is not None:
            return view
    return torch.cat([t.reshape(t.shape[0], -1) if t.dim() > 1 else t for t in tensors])


def _repack_after_load(module: torch.nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: ``assign=True`` replaces the parameters; pack the new ones."""
    module._pack_parameters()


class _PackedProjections(torch.nn.Module):
    """Keeps the projection weights listed by ``_packed_groups`` packed (see the section comment)."""

    def _packed_groups(self) -> list:
        raise NotImplementedError

    def _pack_parameters(self) -> None:
        for group in self._packed_groups():
            _pack(group)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): each parameter gets its own new storage
        super()._apply(fn, recurse)
        self._pack_parameters()
        return self

    def __setstate__(self, state) -> None:  # copy.deepcopy and pickle clone each parameter on its own
        super().__setstate__(state)
        self._pack_parameters()


class CrossAttention(_PackedProjections):
    """The SD U-Net's multi-head attention (CompVis ``ldm.modules.attention.CrossAttention``), with its
    submodules and state dict keys: ``to_q``, ``to_k``, ``to_v`` (``Linear`` without bias, ``[heads *
    dim_head, dim]``) and ``to_out`` = ``Sequential(Linear(heads * dim_head, query_dim), Dropout)``
    (keys ``to_out.0.weight``/``to_out.0.bias``).

    ``forward(x, context=None, mask=None)``: x ``[B, N, query_dim]``, context ``[B, L, context_dim]``
    (None: self-attention over x, which needs ``context_dim == query_dim``) -> ``[B, N, query_dim]``.

    The projections ``[B, N, heads * dim_head]`` go to :func:`ldm_fast.functional.attention` as they
    are (heads split inside it: no transposes, no copies). Self-attention computes q, k and v with
    one GEMM over the three weights (packed back to back, read as one ``[3 * inner, query_dim]``
    matrix), and q/k/v are column slices of its output; cross-attention computes q, then k and v with
    one GEMM over ``context``. Launches: 1 GEMM (self) or 2 (cross), the attention, ``to_out``'s
    GEMM (bias in its epilogue) and, in training, the dropout. If ``to_q``/``to_k``/``to_v`` are not
    plain ``nn.Linear`` without bias (a LoRA/PEFT wrapper, a hook), they are called one by one.

    ``mask`` (CompVis's: a bool tensor ``[B, L]`` or ``[B, ...]`` flattened to L context tokens, True =
    attend) runs the eager CompVis formula instead (unfused: ``masked_fill`` with ``-finfo.max``,
    softmax, two batched matmuls), as CompVis computes it, fully masked rows included (uniform).

    Eager equivalent (CompVis, with einops' rearranges written as reshapes)::

        q, k, v = to_q(x), to_k(context or x), to_v(context or x)        # [B, N|L, h*d]
        q, k, v = (t.reshape(B, -1, h, d).transpose(1, 2) for t in (q, k, v))
        out = softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v     # [B, h, N, d]
        to_out(out.transpose(1, 2).reshape(B, N, h*d))
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = torch.nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner_dim, query_dim), torch.nn.Dropout(dropout))
        self._pack_parameters()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _packed_groups(self) -> list:
        q, k, v = (getattr(getattr(self, name, None), "weight", None) for name in ("to_q", "to_k", "to_v"))
        if q is not None and k is not None and q.shape == k.shape:
            return [[q, k, v]]  # context_dim == query_dim: q, k, v together (k, v adjacent within)
        return [[k, v]]

    def _fusable(self) -> bool:
        """to_q, to_k, to_v are plain bias-free Linears: their weights can be read directly."""
        return all(_plain_module(m, torch.nn.Linear) and m.bias is None for m in (self.to_q, self.to_k, self.to_v))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        if mask is not None:
            return self._masked_forward(x, context, mask)
        inner = self.heads * self.dim_head
        fusable = self._fusable()
        if not fusable or (context is None and self.to_q.weight.shape != self.to_k.weight.shape):
            q = self.to_q(x)  # (self-attention with context_dim != query_dim: to_k raises, as CompVis's)
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        elif context is None:  # one GEMM: [B, N, 3 * inner], q/k/v its column slices
            w_qkv = _joined([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, w_qkv).split(inner, dim=-1)
        else:  # q, then k and v with one GEMM over the context
            q = F.linear(x, self.to_q.weight)
            k, v = F.linear(context, _joined([self.to_k.weight, self.to_v.weight])).split(inner, dim=-1)
        out = functional.attention(q, k, v, heads=self.heads, scale=self.scale)  # [B, N, inner]
        return self.to_out(out)

    def _masked_forward(self, x: Tensor, context: Optional[Tensor], mask: Tensor) -> Tensor:
        """CompVis's forward with a mask, as CompVis writes it (eager, unfused)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"CrossAttention: mask must be a bool tensor [B, L] (True = attend), got "
                            f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}")
        h, d = self.heads, self.dim_head
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        batch = q.shape[0]
        q, k, v = (t.reshape(batch, -1, h, d).transpose(1, 2).reshape(batch * h, -1, d) for t in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        mask = mask.reshape(batch, -1)
        mask = mask[:, None, None, :].expand(batch, h, 1, mask.shape[-1]).reshape(batch * h, 1, -1)
        sim.masked_fill_(~mask, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        out = out.reshape(batch, h, -1, d).transpose(1, 2).reshape(batch, -1, h * d)
        return self.to_out(out)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}"


class SpatialSelfAttention(_PackedProjections):
    """The SD VAE's single-head attention block (CompVis ``AttnBlock`` in
    ``ldm/modules/diffusionmodules/model.py``, ``SpatialSelfAttention`` in ``ldm/modules/attention.py``)
    with their submodules and state dict keys: ``norm`` (:class:`GroupNorm` ``(32, C, eps=1e-6)``),
    ``q``, ``k``, ``v``, ``proj_out`` (``Conv2d(C, C, 1)`` with bias), so a CompVis state dict loads
    strictly.

    ``forward(x)``: x ``[B, C, H, W]`` (NCHW or channels-last) -> ``[B, C, H, W]`` in x's layout:
    ``x + proj_out(attention over the H*W pixels of norm(x), one head of dim C, scale C**-0.5)``.

    Launch sequence (inference; on CUDA):

    1. ``functional.group_norm(x, ..., out_memory_format=torch.channels_last)``: the GroupNorm kernel
       writes h channels-last, so the tokens ``[B, HW, C]`` are a view of it.
    2. ``F.linear(tokens, W_qkv, b_qkv)``: q, k and v in ONE GEMM ``[B*HW, C] x [C, 3C]`` (bias in
       the GEMM's epilogue) -> ``[B, HW, 3C]``. ``W_qkv``/``b_qkv`` are views of the packed
       ``q``/``k``/``v`` parameters (no launch; with autograd on the weights: two ``torch.cat``).
    3. ``functional.attention(q, k, v)`` with q, k, v the column slices of that output, read in
       place -> ``a [B, HW, C]``.
    4. ``proj_out`` as a GEMM with the residual x as its accumulator input (``beta=1``):
       ``torch.addmm(x_tokens, a, Wp^T)`` for channels-last x (x's ``[B*HW, C]`` view), else
       ``torch.baddbmm(x.view(B, C, HW), Wp expanded over B (batch stride 0), a^T)``: the output
       in x's layout, with no transposing copy.
    5. ``out.add_(proj_out.bias)``: the bias, in place (a GEMM takes one input term; the residual is
       the larger one).

    Five launches, where the eager formula below takes about fifteen. Under autocast, or when x's
    dtype differs from the weights', step 4 takes the bias and the residual is added out of place
    (``x + ...``), so the result's dtype follows type promotion as in the eager formula. If a
    submodule is not the plain module (a hook, a LoRA wrapper, another class), the block calls the
    submodules one by one instead: ``norm(x)``, ``q(h)``, ``k(h)``, ``v(h)``, the attention on their
    ``[B, HW, C]`` views, ``proj_out``, ``x + ...``.

    Eager equivalent (CompVis ``AttnBlock.forward``)::

        h = norm(x); q, k, v = q(h), k(h), v(h)                          # [B, C, H, W]
        w = softmax(q.reshape(B, C, HW).transpose(1, 2) @ k.reshape(B, C, HW) * C**-0.5, dim=2)
        h = (v.reshape(B, C, HW) @ w.transpose(1, 2)).reshape(B, C, H, W)
        x + proj_out(h)
    """

    def __init__(self, channels: int, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = channels
        self.scale = channels ** -0.5
        self.norm = GroupNorm(num_groups, channels, eps=eps)
        self.q = torch.nn.Conv2d(channels, channels, kernel_size=1)
        self.k = torch.nn.Conv2d(channels, channels, kernel_size=1)
        self.v = torch.nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = torch.nn.Conv2d(channels, channels, kernel_size=1)
        self._pack_parameters()
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _packed_groups(self) -> list:
        convs = [getattr(self, name, None) for name in ("q", "k", "v")]
        return [[getattr(m, "weight", None) for m in convs], [getattr(m, "bias", None) for m in convs]]

    def _fusable(self) -> bool:
        norm, c = self.norm, self.channels
        return (type(norm) in (GroupNorm, torch.nn.GroupNorm) and getattr(norm, "activation", None) is None
                and not intercepted(norm) and all(_is_pointwise(m, c) for m in (self.q, self.k, self.v, self.proj_out)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"SpatialSelfAttention({self.channels}): x must be [B, {self.channels}, H, W], "
                             f"got shape {tuple(x.shape)}")
        batch, c, height, width = x.shape
        n = height * width
        if not self._fusable():
            h = self.norm(x)
            q, k, v = (t.flatten(2).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))  # [B, HW, C] views
            a = functional.attention(q, k, v, scale=self.scale)
            return x + self.proj_out(a.transpose(1, 2).reshape(batch, c, height, width))
        norm = self.norm
        h = functional.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                  out_memory_format=torch.channels_last)
        tokens = h.permute(0, 2, 3, 1).reshape(batch, n, c)  # a view: h is channels-last
        convs = (self.q, self.k, self.v)
        qkv = F.linear(tokens, _joined([m.weight for m in convs]), _joined([m.bias for m in convs]))  # [B, HW, 3C]
        q, k, v = qkv.split(c, dim=-1)
        a = functional.attention(q, k, v, scale=self.scale)  # [B, HW, C]
        w_out, b_out = self.proj_out.weight.reshape(c, c), self.proj_out.bias
        if torch.is_autocast_enabled(x.device.type) or x.dtype != a.dtype or x.dtype != w_out.dtype:
            out = F.linear(a, w_out, b_out)  # [B, HW, C]: channels-last as [B, C, H, W]
            return x + out.view(batch, height, width, c).permute(0, 3, 1, 2)
        if c > 1 and x.stride(1) == 1:  # channels-last x: [B*HW, C] rows, the output channels-last too
            out = torch.addmm(x.permute(0, 2, 3, 1).reshape(batch * n, c), a.reshape(batch * n, c), w_out.t())
            return out.add_(b_out).view(batch, height, width, c).permute(0, 3, 1, 2)
        out = torch.baddbmm(x.reshape(batch, c, n), w_out.expand(batch, c, c), a.transpose(1, 2))  # [B, C, HW]
        return out.add_(b_out.view(c, 1)).view(batch, c, height, width)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


# --- the transformer block's residual stream (ldm_fast's own blocks and diffusers', via optimize) -------


def global_module_hooks() -> bool:
    """Whether global module hooks (``register_module_forward_hook`` & co.) are registered: a fusion
    that calls fewer modules would change what they see, so it steps aside then."""
    module = torch.nn.modules.module
    return any(bool(getattr(module, name, None)) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


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


def add_norm(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """``(s, norm(s))`` with ``s = x + residual`` (``[..., C]``; ``norm`` an ``nn.LayerNorm`` over C):
    one :func:`ldm_fast.functional.add_layer_norm` pass where its dtype rule is the module's (same
    shapes and dtypes; under autocast the dtypes autocast gives, :func:`autocast_layer_norm_dtype`),
    else the two eager statements. Eager equivalent: ``s = x + residual; s, norm(s)``."""
    if x.shape == residual.shape and x.dtype == residual.dtype:
        out_dtype = autocast_layer_norm_dtype(x.device.type)
        if out_dtype is not _UNKNOWN_AUTOCAST:
            return functional.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, out_dtype=out_dtype)
    hidden = x + residual
    return hidden, norm(hidden)


def add_norm_feed_forward(x: Tensor, residual: Tensor, norm: torch.nn.LayerNorm, ff: torch.nn.Module, inner,
                          out_proj: torch.nn.Linear) -> Optional[Tensor]:
    """``out_proj(inner(norm(s))) + s`` with ``s = x + residual`` (``[..., C]``; ``inner`` the
    feed-forward up to its output Linear ``out_proj``, both held by ``ff``) with the residual in the
    output GEMM: the norm's :func:`ldm_fast.functional.add_layer_norm` writes ``s + out_proj.bias``
    beside ``norm(s)`` and ``addmm`` accumulates ``inner(...) W^T`` onto it: no add launch, no
    feed-forward output tensor. Low-precision rounding: ``(s + b) + g W^T`` instead of
    ``(g W^T + b) + s``. None where it does not apply: not on the Triton backend (the eager backend
    keeps the statements bit for bit), autocast, a gradient to record (training), hooks on ``ff`` or
    ``out_proj`` (they would not be called), global module hooks; the caller then runs its own
    statements."""
    if not (x.shape == residual.shape and x.dtype == residual.dtype == out_proj.weight.dtype
            and backend.kernel_ok(x, residual) and not torch.is_autocast_enabled(x.device.type)):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad
                                    or any(p.requires_grad for p in (*ff.parameters(), *norm.parameters()))):
        return None
    if intercepted(ff) or intercepted(out_proj) or global_module_hooks():
        return None
    s_biased, normed = functional.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, s_bias=out_proj.bias)
    gated = inner(normed)
    C = s_biased.shape[-1]
    return torch.addmm(s_biased.reshape(-1, C), gated.reshape(-1, gated.shape[-1]), out_proj.weight.t()).view(s_biased.shape)


def storage_key(t: Optional[Tensor]) -> Optional[tuple]:
    """(storage, offset, shape) of ``t``: equal exactly while ``t`` is the same view of the same
    storage (cheap: no data pointer, so it also holds on fake tensors)."""
    return None if t is None else (t.untyped_storage()._cdata, t.storage_offset(), t.shape)


class ShortcutGemm:
    """``shortcut(x) + conv(h)`` of a ResNet block whose ``shortcut`` is a 1x1 convolution (stride
    1, unpadded, one group; the channel-changing blocks) as ``conv`` with both biases, then the
    shortcut as a GEMM accumulating onto conv's output: ``addmm`` on the ``[B*H*W, C]`` views of
    channels-last tensors, ``baddbmm`` on the ``[B, C, H*W]`` views of NCHW ones; the shortcut's
    output and the add are never written. The bias sum is cached while both biases are the same
    tensors at the same version (an optimizer step or ``load_state_dict`` is seen). Calling it
    returns None where it does not apply (a gradient to record, the eager backend, torch.compile,
    hooks on either convolution, mixed dtypes, a layout that is neither): the caller runs its own
    statements. Values: the same products and sums, rounded in another order in low precision.
    One instance per block (it holds that block's bias sum).

    Eager equivalent: ``shortcut(x) + conv(h)``.
    """

    def __init__(self) -> None:
        self._bias_sum: Optional[tuple] = None  # (key, conv.bias + shortcut.bias)

    def __call__(self, conv: torch.nn.Conv2d, h: Tensor, shortcut: torch.nn.Conv2d, x: Tensor) -> Optional[Tensor]:
        if (torch.compiler.is_compiling() or not backend.kernel_ok(h, x)
                or (torch.is_grad_enabled() and (conv.weight.requires_grad or shortcut.weight.requires_grad
                                                 or h.requires_grad or x.requires_grad))
                or intercepted(conv) or intercepted(shortcut) or global_module_hooks()
                or not (h.dtype == x.dtype == conv.weight.dtype == shortcut.weight.dtype) or x.dim() != 4):
            return None
        B, C, H, W = x.shape
        last = torch.channels_last
        if x.is_contiguous(memory_format=last) and not x.is_contiguous():
            layout = last
        elif x.is_contiguous():
            layout = torch.contiguous_format
        else:
            return None
        y = F.conv2d(h, conv.weight, self._biases(conv.bias, shortcut.bias), conv.stride, conv.padding,
                     conv.dilation, conv.groups)
        if y.shape[0] != B or y.shape[2:] != x.shape[2:] or not y.is_contiguous(memory_format=layout):
            return y + F.conv2d(x, shortcut.weight)  # conv chose another layout: the GEMM and the add apart
        Co = y.shape[1]
        w = shortcut.weight.view(Co, C)
        if layout is last:  # [B*H*W, C] row views: out = y + x @ w^T
            out = torch.addmm(y.permute(0, 2, 3, 1).reshape(B * H * W, Co), x.permute(0, 2, 3, 1).reshape(B * H * W, C),
                              w.t())
            return out.view(B, H, W, Co).permute(0, 3, 1, 2)
        out = torch.baddbmm(y.view(B, Co, H * W), w.expand(B, Co, C), x.view(B, C, H * W))
        return out.view(B, Co, H, W)

    def _biases(self, b1: Optional[Tensor], b2: Optional[Tensor]) -> Optional[Tensor]:
        """``b1 + b2`` (either may be None), cached while both are the same tensors at the same version."""
        if b1 is None or b2 is None:
            return b1 if b2 is None else b2
        key = (storage_key(b1), b1._version, storage_key(b2), b2._version)
        if self._bias_sum is not None and self._bias_sum[0] == key:
            return self._bias_sum[1]
        total = b1 + b2
        if not (total.is_cuda and torch.cuda.is_current_stream_capturing()):  # (a capture's pool is not ours)
            self._bias_sum = (key, total)
        return total


_SILU_OF: list = [None]  # [(weakref to temb, temb._version, silu(temb))]: the last time embedding's SiLU


def shared_silu(act: torch.nn.SiLU, temb: Tensor) -> Tensor:
    """``act(temb)`` (``act`` an ``nn.SiLU``), computed once for the U-Net's one time embedding, which
    every ResNet block receives and applies the same SiLU to (22 identical launches per SD 1.5 step,
    now 1: diffusers' ResnetBlock2D under optimize, ldm_fast's ResBlock). Reused only while ``temb``
    is the same tensor object at the same version and no gradient is recorded (inference; under
    autograd and torch.compile each block computes its own). Eager equivalent: ``act(temb)``."""
    if act.inplace or torch.compiler.is_compiling() or (torch.is_grad_enabled() and temb.requires_grad):
        return act(temb)
    entry = _SILU_OF[0]
    if entry is not None and entry[0]() is temb and entry[1] == temb._version:
        return entry[2]
    out = act(temb)
    _SILU_OF[0] = (weakref.ref(temb), temb._version, out)
    return out


# --- Linear weights packed for one GEMM (optimize's pack_weights) ------------------------------------


class PackedLinears:
    """The weights (and biases) of ``torch.nn.Linear`` modules of one input width, dtype and device as row
    blocks of one buffer, so one GEMM computes all their outputs side by side.

    Packing sets each Parameter's ``.data`` to its block of the buffer: the Parameter objects, their
    ``requires_grad``, state dict keys and values stay; in-place updates (``load_state_dict``, an
    optimizer step, ``fuse_lora``'s copy) land in the buffer. A packed GEMM may run only while the
    module still holds that view and has no hooks (:meth:`intact`: a few attribute reads, so it is
    checked per call): anything that re-allocates a weight after optimize (``model.to(dtype)``,
    ``.to(device)``) or swaps the module (a LoRA layer) makes the user's own statements run.
    :meth:`unpack` (restore) gives every weight still in the buffer its own storage back. Values:
    the same products; cuBLAS may pick another kernel for the wider GEMM, so low-precision results
    can differ from the separate GEMMs' in the last bit.

    ``weight`` ``[sum of out_features, K]``, ``bias`` ``[sum of out_features]`` or None;
    ``offsets[i]`` the first row of module i's block.
    """

    def __init__(self, modules: tuple) -> None:
        self.modules = modules
        self.offsets = [0]
        for m in modules:
            self.offsets.append(self.offsets[-1] + m.out_features)
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in modules])
            self.bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
            for i, m in enumerate(modules):
                rows = slice(self.offsets[i], self.offsets[i + 1])
                m.weight.data = self.weight[rows]
                if self.bias is not None:
                    m.bias.data = self.bias[rows]
        self.keys = tuple((storage_key(m.weight), storage_key(m.bias)) for m in modules)
        self.params = tuple(p for m in modules for p in (m.weight, m.bias) if p is not None)
        # per module, what intact() reads (the hook dicts and __dict__ are the module's own objects, kept)
        self._checks = tuple((m._forward_hooks, m._forward_pre_hooks, m.__dict__, m._parameters, m.weight, k[0],
                              m.bias, k[1]) for m, k in zip(modules, self.keys))

    def intact(self, i: int) -> bool:
        """Whether module i still computes its block of the packed GEMM: the same weight and bias
        Parameters, still the buffer's views, no hooks, no instance-level forward (per call: ~1 µs)."""
        hooks, pre_hooks, attrs, params, w, w_key, b, b_key = self._checks[i]
        return not (hooks or pre_hooks or "forward" in attrs or params.get("weight") is not w
                    or params.get("bias") is not b or storage_key(w) != w_key
                    or (b is not None and storage_key(b) != b_key))

    def inference(self, *tensors: Optional[Tensor]) -> bool:
        """Whether a packed GEMM may run on these inputs at all: the Triton backend runs (CUDA; the eager
        backend keeps the user's GEMMs bit for bit), no torch.compile, no gradient to record (training
        runs the separate GEMMs, whose weight gradients the Parameters need), no global module hooks."""
        return not (torch.compiler.is_compiling() or not backend.kernel_ok(*tensors)
                    or (torch.is_grad_enabled() and any(p.requires_grad for p in self.params))
                    or global_module_hooks())

    def unpack(self) -> None:
        """Give every weight still in the buffer its own storage (restore)."""
        with torch.no_grad():
            for m, key in zip(self.modules, self.keys):
                for p, k in ((m.weight, key[0]), (m.bias, key[1])):
                    if p is not None and storage_key(p) == k:
                        p.data = p.data.clone()


class PackedTimeProjections(PackedLinears):
    """The time-embedding projections of a U-Net's ResNet blocks packed (:class:`PackedLinears`;
    diffusers' ``ResnetBlock2D.time_emb_proj``, ldm_fast's ``ResBlock.emb_layers[1]``): every block
    of a U-Net projects the same time embedding, so the first block of a step computes
    all the projections with one GEMM (``[B, sum of widths]``) and each block reads its columns as a
    view (the GroupNorm kernel reads the shift's rows in place): SD 1.5 runs 22 GEMMs a step, now 1.
    The result is kept for the next blocks while the input is the same tensor at the same version
    (inference on the Triton backend only; :meth:`project`).
    """

    def __init__(self, modules: tuple) -> None:
        super().__init__(modules)
        self.index = {id(m): i for i, m in enumerate(modules)}
        self._last: Optional[tuple] = None  # (weakref to the input, its _version, the output, weight versions)

    def __repr__(self) -> str:
        return f"<ldm_fast packed time projections of {len(self.modules)} ResNet blocks: {tuple(self.weight.shape)}>"

    def project(self, module: torch.nn.Module, temb: Tensor) -> Optional[Tensor]:
        """``module(temb)`` (``module`` one of the packed Linears) as columns of the packed GEMM's
        output, or None where the packed GEMM does not apply (the caller calls the module)."""
        i = self.index.get(id(module))
        if i is None or not self.inference(temb) or self.modules[i] is not module or not self.intact(i):
            return None  # (inference first: it steps aside under torch.compile before any storage is read)
        last = self._last
        if last is not None and last[0]() is temb and last[1] == temb._version and last[3][i] == self._version(i):
            out = last[2]  # (the same input, and this block's weights not updated in place since)
        else:
            out = F.linear(temb, self.weight, self.bias)
            self._last = (weakref.ref(temb), temb._version, out, [self._version(j) for j in range(len(self.modules))])
        return out[..., self.offsets[i]:self.offsets[i + 1]]

    def _version(self, i: int) -> tuple:
        """Module i's weight and bias version counters (an in-place update, e.g. an optimizer step or
        load_state_dict, bumps them)."""
        m = self.modules[i]
        return (m.weight._version, None if m.bias is None else m.bias._version)


def linear_unpackable(m: Optional[torch.nn.Module], name: str) -> Optional[str]:
    """None when ``m`` (the module's ``name``) is a plain ``torch.nn.Linear`` a :class:`PackedLinears` may
    hold, else why not."""
    if type(m) is not torch.nn.Linear:
        return f"its {name} is a {type(m).__name__}, not an nn.Linear (e.g. a LoRA layer)"
    if intercepted(m):
        return f"its {name} has hooks or an instance-level forward (the packed GEMM would not call them)"
    if not m.weight.is_floating_point():
        return f"its {name} weight is {m.weight.dtype}, not a floating dtype"
    return None
