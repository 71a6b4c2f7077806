"""Drop-in modules backed by the fused kernels.

:class:`GroupNorm` and :class:`GroupNorm32` subclass their ``torch.nn`` counterpart with the same
parameters, so a checkpoint saved from the torch module loads unchanged (and back), and
``isinstance(m, torch.nn.GroupNorm)`` holds. :class:`CrossAttention` and
:class:`SpatialSelfAttention` are the CompVis attention blocks with the CompVis submodule names, so
a CompVis state dict loads into them strictly.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import functional
from ._fusion import gemm_like_conv, intercepted
from .ops._common import needs_grad
from .ops.group_norm import ACTIVATIONS as GROUP_NORM_ACTIVATIONS

__all__ = ["CrossAttention", "GroupNorm", "GroupNorm32", "SpatialSelfAttention"]


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

    _upcast = False  # (functional.group_norm's ``upcast``: GroupNorm32's eager rounding)

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
        # self.weight/bias read from _parameters (nn.Module.__getattr__ costs ~0.5 µs a name, on every
        # call); as attributes where a reparametrization (torch.nn.utils.weight_norm, spectral_norm,
        # prune, parametrize) keeps one outside them, computed by its hook or property
        p = self._parameters
        try:
            weight, bias = p["weight"], p["bias"]
        except KeyError:
            weight, bias = self.weight, self.bias
        return functional.group_norm(input, self.num_groups, weight, bias, self.eps, activation=self.activation,
                                     upcast=self._upcast, shift=shift)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, activation={self.activation!r}" if self.activation is not None else text


class GroupNorm32(GroupNorm):
    """The SD U-Net's ``GroupNorm32`` (``normalization(ch)`` = ``GroupNorm32(32, ch)``, eps 1e-5):
    statistics and affine computed in fp32, the result cast back to the input's dtype, i.e.
    ``super().forward(x.float()).type(x.dtype)``, then the activation if any (as ``GroupNorm32``
    followed by ``nn.SiLU``). The Triton kernels compute in fp32 for every input dtype, so only the
    eager path differs from :class:`GroupNorm` (its forward, with ``upcast=True``).
    """

    _upcast = True


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
    submodule is not the plain module (a hook, a LoRA wrapper, another class), or an fp32 input on a
    GPU whose TF32 settings differ for matmuls and cuDNN convolutions (the GEMMs would not compute what
    the 1x1 convolutions compute), the block calls the submodules one by one instead: ``norm(x)``, ``q(h)``, ``k(h)``, ``v(h)``, the attention on their
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
        if not self._fusable() or not gemm_like_conv(x):  # (fp32 where TF32 differs for GEMMs and convolutions)
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
