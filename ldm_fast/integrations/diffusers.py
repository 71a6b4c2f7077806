"""diffusers integration: an attention processor that runs :func:`ldm_fast.functional.attention`.

    from ldm_fast.integrations.diffusers import AttnProcessor
    unet.set_attn_processor(AttnProcessor())          # or: ldm_fast.optimize(unet, attention=True)

:class:`AttnProcessor` reproduces diffusers 0.42's ``AttnProcessor2_0.__call__`` statement for
statement (spatial_norm, the 4-d input reshape, group_norm, norm_cross, norm_q/norm_k,
residual_connection, rescale_output_factor) except the attention itself: the ``[B, N, heads * D]``
outputs of ``to_q``/``to_k``/``to_v`` go to :func:`ldm_fast.functional.attention` as they are,
instead of being viewed and transposed to ``[B, heads, N, D]`` for
``F.scaled_dot_product_attention`` and the result transposed back and copied. One more saving:
the division by ``rescale_output_factor`` is skipped when the factor is 1 (``x / 1.0`` is ``x``
bit for bit). And where ``optimize(attention=True)`` packed the module's projection weights
(:class:`PackedProjections`), a self-attention's q, k and v come from one GEMM and a
cross-attention's k and v from one (inference on the Triton backend; see the class).

The cases it does not cover run exactly ``AttnProcessor2_0``'s SDPA statements: an
``attention_mask``; projections whose widths differ (``kv_heads``, ``out_dim``) or do not split
into ``heads``; q/k norms other than the per-head ones (``LayerNorm``/``RMSNorm``/``LpNorm`` over
``dim_head``, which are applied to the ``[B, N, heads, D]`` view, the same rows as
``AttnProcessor2_0``'s ``[B, heads, N, D]``). Like ``AttnProcessor2_0`` it ignores ``attn.scale``
(the scale is ``D**-0.5``), ``upcast_attention`` and ``upcast_softmax`` (the kernel's softmax
runs in fp32).

The rest of ldm_fast's diffusers knowledge lives here too, for :func:`ldm_fast.optimize`: which
attention processors it may replace (:func:`attention_swap_refused`), and the fused
``ResnetBlock2D`` forward (:class:`FusedResnetForward`, applied only to the diffusers forward it
reproduces, checked by :func:`resnet_block_unfusable`), the fused ``GEGLU`` gate
(:class:`FusedGEGLUForward`) and the fused ``BasicTransformerBlock`` forward
(:class:`FusedTransformerBlockForward`: the residual adds that feed a LayerNorm and that norm in one
kernel, checked by :func:`transformer_block_unfusable`; the feed-forward residual in its output
GEMM, :func:`feed_forward_epilogue_refused`), the channels-last-keeping ``Transformer2DModel``
output (:class:`ChannelsLastTransformerOutput`), the one-kernel ``Timesteps`` forward
(:class:`FusedTimestepsForward`) and the packed attention projections (:class:`PackedProjections`).
The model-agnostic pieces these use (weight packing, the shortcut GEMM, the add + LayerNorm
helpers, the shared time-embedding SiLU) live in :mod:`ldm_fast.nn`.

diffusers is imported only to emit its deprecation warning for the ``scale`` argument; importing
this module does not import it.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import sys
import textwrap
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend, functional
from ..nn import (PackedLinears, PackedTimeProjections, ShortcutGemm, add_norm, add_norm_feed_forward,
                  global_module_hooks, intercepted, linear_unpackable, shared_silu)
from ..nn import storage_key as _storage_key

__all__ = ["AttnProcessor", "ChannelsLastTransformerOutput", "FusedGEGLUForward", "FusedResnetForward",
           "FusedTimestepsForward", "FusedTransformerBlockForward", "PACK_ATTR", "PackedProjections",
           "attention_swap_refused", "feed_forward_epilogue_refused", "geglu_unfusable", "is_diffusers_class",
           "packs_query", "projections_unpackable", "resnet_block_unfusable", "shortcut_gemm_refused",
           "timesteps_unfusable", "transformer_block_unfusable", "transformer_output_unkept"]

_SCALE_DEPRECATION = (
    "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error "
    "in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via "
    "`cross_attention_kwargs`."
)

#: norm_q/norm_k modules that normalize each row of the last dim on its own (diffusers' ``qk_norm``
#: "layer_norm", "fp32_layer_norm", "rms_norm", "l2"): applied to ``[B, N, heads, D]`` they give the
#: rows AttnProcessor2_0 gets from ``[B, heads, N, D]``.
_ROWWISE_DIFFUSERS_NORMS = ("FP32LayerNorm", "RMSNorm", "LpNorm")


def _rowwise_norm(norm: Optional[torch.nn.Module], head_dim: int) -> bool:
    """Whether ``norm`` (None, or attn.norm_q/norm_k) acts on each ``head_dim`` row on its own."""
    if norm is None:
        return True
    cls = type(norm)
    if cls is torch.nn.LayerNorm:
        return tuple(norm.normalized_shape) == (head_dim,)
    if cls.__name__ not in _ROWWISE_DIFFUSERS_NORMS or not (cls.__module__ or "").startswith("diffusers."):
        return False
    if cls.__name__ == "LpNorm":
        return getattr(norm, "dim", None) in (-1, 3)
    weight = getattr(norm, "weight", None)
    return weight is None or tuple(weight.shape) == (head_dim,)


class AttnProcessor:
    """A diffusers attention processor (``Attention.set_processor``) computing attention with
    :func:`ldm_fast.functional.attention` on the ``[B, N, heads * D]`` projections, otherwise
    statement for statement diffusers 0.42's ``AttnProcessor2_0`` (see the module docstring for the
    cases that run ``AttnProcessor2_0``'s own SDPA statements).

    ``impl`` is passed to :func:`ldm_fast.functional.attention` (``"auto"``: SDPA unless a GPU
    measurement says the Triton kernel is faster; ``LDM_FAST_ATTENTION`` overrides it). Stateless:
    one instance may serve every ``Attention`` of a model.

    Eager equivalent: ``diffusers.models.attention_processor.AttnProcessor2_0()``.
    """

    def __init__(self, impl: str = "auto") -> None:
        if impl not in backend.ATTENTION_IMPLS:
            raise ValueError(f"AttnProcessor: impl must be one of {backend.ATTENTION_IMPLS}, got {impl!r}")
        self.impl = impl

    def __repr__(self) -> str:
        return f"ldm_fast.integrations.diffusers.AttnProcessor(impl={self.impl!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            from diffusers.utils import deprecate

            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be
            # (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        pack = attn.__dict__.get(PACK_ATTR)
        if pack is not None and not pack.usable(attn, hidden_states, encoder_hidden_states):
            pack = None
        if pack is not None and encoder_hidden_states is None and pack.with_q:
            # ldm_fast: a self-attention's q, k and v from one GEMM on the packed weights (views of [B, N, 3C])
            query, key, value = F.linear(hidden_states, pack.weight, pack.bias).split(pack.width, dim=-1)
        else:
            query = attn.to_q(hidden_states)

            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

            if pack is not None:  # ldm_fast: k and v from one GEMM on the packed weights
                key, value = F.linear(encoder_hidden_states, pack.kv_weight, pack.kv_bias).split(pack.width, dim=-1)
            else:
                key = attn.to_k(encoder_hidden_states)
                value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        if attention_mask is None and self._covered(attn, query, key, value, batch_size, head_dim):
            # ldm_fast: the [B, N, heads * D] projections as they are; out [B, N, heads * D]
            if attn.norm_q is not None:
                query = attn.norm_q(query.view(batch_size, -1, attn.heads, head_dim)).flatten(2)
            if attn.norm_k is not None:
                key = attn.norm_k(key.view(batch_size, -1, attn.heads, head_dim)).flatten(2)
            hidden_states = functional.attention(query, key, value, heads=attn.heads, impl=self.impl)
        else:  # AttnProcessor2_0's statements
            query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

            # the output of sdp = (batch, num_heads, seq_len, head_dim)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        if attn.rescale_output_factor != 1.0:  # x / 1.0 is x, bit for bit: skip the launch
            hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    @staticmethod
    def _covered(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_size: int,
                 head_dim: int) -> bool:
        """Whether functional.attention on the [B, N, heads * D] projections computes what
        AttnProcessor2_0's view/transpose/SDPA statements compute for this call."""
        inner_dim = key.shape[-1]
        return (
            query.dim() == 3 and key.dim() == 3 and value.dim() == 3
            and head_dim > 0 and inner_dim == head_dim * attn.heads
            and query.shape[-1] == inner_dim and value.shape[-1] == inner_dim
            and query.shape[0] == key.shape[0] == value.shape[0] == batch_size
            and key.shape[1] == value.shape[1]
            and _rowwise_norm(attn.norm_q, head_dim) and _rowwise_norm(attn.norm_k, head_dim)
        )


#: The instance attribute of a diffusers ``Attention`` holding its :class:`PackedProjections`.
PACK_ATTR = "_ldm_fast_packed_projections"


class PackedProjections(PackedLinears):
    """The ``to_q``/``to_k``/``to_v`` weights of one diffusers ``Attention`` packed
    (:class:`PackedLinears`), so :class:`AttnProcessor` computes the three projections of a
    self-attention with one GEMM (``F.linear(x, weight, bias)`` -> ``[B, N, 3C]``, split into views)
    and the key and value of a cross-attention with one (``kv_weight``, the buffer's last 2C rows),
    in inference on the Triton backend while every projection is intact (:meth:`usable`).

    ``weight`` ``[n * C, K]`` (n = 3 with q, else 2), ``bias`` ``[n * C]`` or None; ``width`` = C.
    """

    def __init__(self, modules: tuple, with_q: bool) -> None:
        super().__init__(modules)  # (to_q, to_k, to_v) or (to_k, to_v)
        self.with_q = with_q
        self.names = ("to_q", "to_k", "to_v") if with_q else ("to_k", "to_v")
        self.width = modules[-1].out_features
        self.kv_weight = self.weight[-2 * self.width:]
        self.kv_bias = None if self.bias is None else self.bias[-2 * self.width:]

    def __repr__(self) -> str:
        return f"<ldm_fast packed {'q/k/v' if self.with_q else 'k/v'} projections: {tuple(self.weight.shape)}>"

    def usable(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]) -> bool:
        """Whether the packed GEMMs compute what ``attn``'s projection modules compute for this call."""
        if not self.inference(hidden_states, encoder_hidden_states):
            return False
        held = attn._modules  # (not attn.to_q: nn.Module.__getattr__ costs ~1 µs a name)
        for i, (name, m) in enumerate(zip(self.names, self.modules)):
            if held.get(name) is not m or not self.intact(i):
                return False
        return True


def projections_unpackable(attn: nn.Module) -> Optional[str]:
    """None when ``attn``'s key and value projections (and its query's, see :func:`packs_query`) can
    be packed into one buffer (:class:`PackedProjections`), else why not."""
    mods = {name: getattr(attn, name, None) for name in ("to_q", "to_k", "to_v")}
    for name, m in mods.items():
        reason = linear_unpackable(m, name)
        if reason is not None:
            return reason
    k, v = mods["to_k"], mods["to_v"]
    if not _same_linear(k, v):
        return "its to_k and to_v differ in shape, dtype, device or bias"
    return None


def _same_linear(a: nn.Linear, b: nn.Linear) -> bool:
    return (a.weight.shape == b.weight.shape and a.weight.dtype == b.weight.dtype
            and a.weight.device == b.weight.device and (a.bias is None) == (b.bias is None))


def packs_query(attn: nn.Module) -> bool:
    """Whether ``to_q`` packs with ``to_k``/``to_v`` (a self-attention: the same input width)."""
    return _same_linear(attn.to_q, attn.to_k)


# ---------------------------------------------------------------------------------------------
# what ldm_fast.optimize knows of diffusers


def is_diffusers_class(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and (cls.__module__ or "").startswith("diffusers.")


# The ResnetBlock2D.forward sources (sha256 of the AST dump, so formatting and comments do not
# matter) that FusedResnetForward reproduces: diffusers 0.42.
_RESNET_FORWARD_AST_SHA256 = {
    "c33728fbb237b59e99dd24791db1920b1269b7ec3b67122f8feefa028cf56ecb",  # diffusers 0.42.1
}


_AST_SHA256: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # function -> digest (no leak)


def _function_ast_sha256(fn) -> Optional[str]:
    if fn not in _AST_SHA256:
        try:
            source = textwrap.dedent(inspect.getsource(fn))
            _AST_SHA256[fn] = hashlib.sha256(ast.dump(ast.parse(source)).encode()).hexdigest()
        except (OSError, TypeError, SyntaxError):
            _AST_SHA256[fn] = None
    return _AST_SHA256[fn]


def _source_unknown(cls: type, what: str, fns: tuple, known: set) -> Optional[str]:
    """None when the AST digests of ``fns`` (``what``: their names, for the message) are a known
    tuple of ``known`` (a single digest when one function), else why not."""
    digests = tuple(None if fn is None else _function_ast_sha256(fn) for fn in fns)
    if None in digests:
        return f"the source of {cls.__qualname__}.{what} is not available to check"
    if (digests if len(digests) > 1 else digests[0]) not in known:
        return f"{cls.__module__}.{cls.__qualname__}.{what} differs from the diffusers 0.42 source ldm_fast reproduces"
    return None


class FusedResnetForward:
    """diffusers 0.42 ``ResnetBlock2D.forward``, statement for statement, except that a fused norm
    (``norm1``; ``norm2`` when ``fuse_norm2``) applies the SiLU itself (``activation="silu"``), so
    ``nonlinearity`` is not called after it; with ``fuse_shift`` (``time_embedding_norm="default"``,
    norm2 an ldm_fast GroupNorm without hooks) the time embedding is added inside norm2's kernel
    (``norm2(h, shift=temb)``: the sum ``h + temb`` is never written; the eager path computes exactly
    ``norm2(h + temb)``); the time embedding's SiLU is computed once for all the blocks of a step
    (:func:`ldm_fast.nn.shared_silu`, inference only); and the division by ``output_scale_factor`` is skipped when
    it is 1 (bit for bit the same). Installed as the block's instance-level ``forward``."""

    def __init__(self, block: nn.Module, fuse_norm1: bool, fuse_norm2: bool, fuse_shift: bool = False) -> None:
        self.block = block
        self.fuse_norm1 = fuse_norm1
        self.fuse_norm2 = fuse_norm2
        self.fuse_shift = fuse_shift
        self.shortcut_gemm = shortcut_gemm_refused(block) is None
        self.time_pack: Optional[PackedTimeProjections] = None  # set by optimize when it packs time_emb_proj
        self._shortcut = ShortcutGemm()

    def __repr__(self) -> str:
        return (f"<ldm_fast fused ResnetBlock2D.forward: norm1 fused={self.fuse_norm1}, "
                f"norm2 fused={self.fuse_norm2}, temb add fused into norm2={self.fuse_shift}, "
                f"1x1 shortcut as a GEMM onto conv2={self.shortcut_gemm}>")

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self_ = self.block
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate = sys.modules[type(self_).__module__].deprecate
            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)

        hidden_states = input_tensor

        hidden_states = self_.norm1(hidden_states)
        if not self.fuse_norm1:
            hidden_states = self_.nonlinearity(hidden_states)

        if self_.upsample is not None:
            # upsample_nearest_nhwc fails with large batch sizes. see https://github.com/huggingface/diffusers/issues/984
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self_.upsample(input_tensor)
            hidden_states = self_.upsample(hidden_states)
        elif self_.downsample is not None:
            input_tensor = self_.downsample(input_tensor)
            hidden_states = self_.downsample(hidden_states)

        hidden_states = self_.conv1(hidden_states)

        if self_.time_emb_proj is not None:
            if not self_.skip_time_act:
                temb = shared_silu(self_.nonlinearity, temb)
            projected = None if self.time_pack is None else self.time_pack.project(self_.time_emb_proj, temb)
            temb = (self_.time_emb_proj(temb) if projected is None else projected)[:, :, None, None]

        fused2 = False
        if self_.time_embedding_norm == "default":
            if (self.fuse_shift and temb is not None and temb.dtype == hidden_states.dtype
                    and temb.shape == hidden_states.shape[:2] + (1, 1)):
                hidden_states = self_.norm2(hidden_states, shift=temb)  # the add inside the norm's pass
            else:
                if temb is not None:
                    hidden_states = hidden_states + temb
                hidden_states = self_.norm2(hidden_states)
            fused2 = self.fuse_norm2
        elif self_.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self_.time_embedding_norm}"
                )
            if self.fuse_norm2:  # fused for another time_embedding_norm: never apply the SiLU before the modulation
                raise RuntimeError("ldm_fast.optimize fused this ResnetBlock2D's norm2 when its time_embedding_norm "
                                   "was not 'scale_shift'; it was changed since: call ldm_fast.restore first")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self_.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
        else:
            hidden_states = self_.norm2(hidden_states)
            fused2 = self.fuse_norm2

        if not fused2:
            hidden_states = self_.nonlinearity(hidden_states)

        hidden_states = self_.dropout(hidden_states)
        output_tensor = None
        if self.shortcut_gemm and self_.conv_shortcut is not None:  # the shortcut as a GEMM onto conv2's output
            output_tensor = self._shortcut(self_.conv2, hidden_states, self_.conv_shortcut, input_tensor)
        if output_tensor is None:  # diffusers' statements
            hidden_states = self_.conv2(hidden_states)

            if self_.conv_shortcut is not None:
                # Only use contiguous() during training to avoid DDP gradient stride mismatch warning.
                if self_.training:
                    input_tensor = input_tensor.contiguous()
                input_tensor = self_.conv_shortcut(input_tensor)

            output_tensor = input_tensor + hidden_states
        # x / 1.0 is x, bit for bit: skip the launch (under torch.compile the graph stays diffusers' own:
        # Inductor fuses the divide, and compile with ldm_fast traces what compile without it traces)
        if self_.output_scale_factor != 1.0 or torch.compiler.is_compiling():
            output_tensor = output_tensor / self_.output_scale_factor

        return output_tensor


def shortcut_gemm_refused(block: nn.Module) -> Optional[str]:
    """None when ``block``'s ``conv_shortcut`` is a plain 1x1 convolution (stride 1, no padding, one
    group) that :class:`FusedResnetForward` may run as a GEMM onto ``conv2``'s output, else why not."""
    short, conv2 = getattr(block, "conv_shortcut", None), getattr(block, "conv2", None)
    if short is None:
        return "it has no conv_shortcut"
    for name, m in (("conv_shortcut", short), ("conv2", conv2)):
        if type(m) is not nn.Conv2d:
            return f"its {name} is a {type(m).__name__}, not an nn.Conv2d"
        if m.padding_mode != "zeros":
            return f"its {name} pads with {m.padding_mode!r}"
    if not (short.kernel_size == (1, 1) and short.stride == (1, 1) and short.padding in ((0, 0), "valid")
            and short.dilation == (1, 1) and short.groups == 1):
        return "its conv_shortcut is not a 1x1, stride-1, unpadded, one-group convolution"
    return None


def resnet_block_unfusable(block: nn.Module) -> Optional[str]:
    """None when FusedResnetForward expresses ``block`` exactly, else why not."""
    cls = type(block)
    digest = _function_ast_sha256(cls.forward)
    if digest is None:
        return f"the source of {cls.__qualname__}.forward is not available to check"
    if digest not in _RESNET_FORWARD_AST_SHA256:
        return (f"{cls.__module__}.{cls.__qualname__}.forward differs from the diffusers 0.42 forward "
                f"ldm_fast reproduces (AST sha256 {digest[:12]}...)")
    if "forward" in block.__dict__:
        return "the block has an instance-level forward (e.g. an accelerate hook)"
    act = getattr(block, "nonlinearity", None)
    if type(act) is not nn.SiLU:
        return f"its nonlinearity is {type(act).__name__}, not nn.SiLU"
    if intercepted(act):
        return "its nonlinearity module has hooks or an instance-level forward (it would be called less often)"
    if not isinstance(getattr(block, "time_embedding_norm", None), str):
        return f"time_embedding_norm={getattr(block, 'time_embedding_norm', None)!r} is not a string"
    return None


#: diffusers' default processors (``diffusers.models.attention_processor``) that the ldm_fast
#: AttnProcessor replaces: it is AttnProcessor2_0 statement for statement; AttnProcessor computes
#: the same math with baddbmm/softmax/bmm (and honours attn.scale, checked before the swap).
_DIFFUSERS_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_DIFFUSERS_PROCESSOR_MODULE = "diffusers.models.attention_processor"


def attention_swap_refused(attn: nn.Module, processor: Any) -> Optional[str]:
    """None when ``attn``'s processor (its ``processor`` attribute; None: it has none) may become the
    ldm_fast AttnProcessor, else why not."""
    if processor is None:
        held = attn._modules.get("processor")
        if held is not None:
            return (f"its processor {type(held).__module__}.{type(held).__qualname__} is an nn.Module "
                    "(trained weights of its own, e.g. IP-Adapter): it computes its own attention")
        return "it has no processor attribute"
    cls = type(processor)
    if cls is AttnProcessor:
        return "its processor already is ldm_fast's AttnProcessor"
    if cls.__name__ not in _DIFFUSERS_DEFAULT_PROCESSORS or cls.__module__ != _DIFFUSERS_PROCESSOR_MODULE:
        return (f"a custom processor {cls.__module__}.{cls.__qualname__} (not diffusers' default "
                f"{' or '.join(_DIFFUSERS_DEFAULT_PROCESSORS)}): it computes its own attention")
    if cls.__name__ == "AttnProcessor":
        heads, inner = getattr(attn, "heads", None), getattr(attn, "inner_dim", None)
        scale = getattr(attn, "scale", None)
        if not (isinstance(heads, int) and isinstance(inner, int) and heads > 0 and inner % heads == 0
                and isinstance(scale, float) and math.isclose(scale, (inner // heads) ** -0.5, rel_tol=1e-12)):
            return (f"AttnProcessor with attn.scale={scale!r} (e.g. scale_qk=False), not D**-0.5 as "
                    "ldm_fast's processor (like AttnProcessor2_0) computes")
    return None


# The GEGLU.forward / GEGLU.gelu sources FusedGEGLUForward reproduces: diffusers 0.42.1.
_GEGLU_AST_SHA256 = {
    ("dd7ddb4f856d3276d38275d22e0e2c0219da64d018076a65df4496a23224c5ca",
     "77cba12125f7e8a77853f97537af6423bc6c2243bb3216d8190556f1f858917e"),  # diffusers 0.42.1
}


class FusedGEGLUForward:
    """diffusers 0.42 ``GEGLU.forward`` (``proj``, then ``hidden * gelu(gate)``) with the gate in one
    kernel: :func:`ldm_fast.functional.geglu` reads the projection in place (3F elements a row
    instead of 5F; bit for bit diffusers' statements on the eager backend and under torch.compile).
    Installed as the module's instance-level ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __repr__(self) -> str:
        return "<ldm_fast fused GEGLU.forward>"

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate = sys.modules[type(module).__module__].deprecate
            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)
        return functional.geglu(module.proj(hidden_states))


def geglu_unfusable(module: nn.Module) -> Optional[str]:
    """None when :class:`FusedGEGLUForward` computes what ``module`` (a diffusers GEGLU) does, else why not."""
    cls = type(module)
    reason = _source_unknown(cls, "forward/gelu", (cls.forward, getattr(cls, "gelu", None)), _GEGLU_AST_SHA256)
    if reason is not None:
        return reason
    if "forward" in module.__dict__ or "gelu" in module.__dict__:
        return "the module has an instance-level forward or gelu"
    if not isinstance(getattr(module, "proj", None), nn.Linear):
        return f"its proj is a {type(getattr(module, 'proj', None)).__name__}, not an nn.Linear"
    npu = getattr(sys.modules.get(cls.__module__), "is_torch_npu_available", None)
    if callable(npu) and npu():
        return "torch_npu is available: diffusers runs its own npu_geglu there"
    return None


# --- the transformer block's residual stream: add + LayerNorm in one kernel -----------------------

# The BasicTransformerBlock.forward source FusedTransformerBlockForward reproduces: diffusers 0.42.1.
_BASIC_TRANSFORMER_AST_SHA256 = {
    "be4ad00abdf3b62d4d9b98341468e828b059ea80f554721b5e76566382119702",  # diffusers 0.42.1
}
_KWARGS_SCALE_WARNING = "Passing `scale` to `cross_attention_kwargs` is deprecated. `scale` will be ignored."


class FusedTransformerBlockForward:
    """diffusers 0.42 ``BasicTransformerBlock.forward`` for ``norm_type="layer_norm"`` (SD 1.x/2.x,
    SDXL), statement for statement, except that each residual add that feeds a LayerNorm (after
    ``attn1`` into ``norm2``, after ``attn2`` into ``norm3``) and that norm run as one
    :func:`ldm_fast.functional.add_layer_norm` kernel: the sum is written once and normalized from
    registers, one launch and one read of the stream fewer each; and in inference on the Triton
    backend the feed-forward's residual goes into its output GEMM
    (:func:`ldm_fast.nn.add_norm_feed_forward`; diffusers' ``FeedForward`` checked by
    :func:`feed_forward_epilogue_refused`, unchunked). On the eager backend (a CPU) it is diffusers'
    statements bit for bit; a 4-d input, GLIGEN kwargs and torch.compile (Inductor fuses the add and
    the norm itself) run diffusers' own forward. Installed as the block's instance-level
    ``forward``."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.diffusers_forward = type(block).forward  # (torch.compile traces a function, not type(x).forward)
        self.ff_epilogue = feed_forward_epilogue_refused(getattr(block, "ff", None)) is None

    def __repr__(self) -> str:
        return ("<ldm_fast fused BasicTransformerBlock.forward: residual add + LayerNorm in one kernel, "
                f"feed-forward residual in its output GEMM={self.ff_epilogue}>")

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 encoder_attention_mask: Optional[torch.Tensor] = None, timestep=None,
                 cross_attention_kwargs: Optional[dict] = None, class_labels=None,
                 added_cond_kwargs: Optional[dict] = None) -> torch.Tensor:
        block = self.block
        if (hidden_states.ndim != 3 or torch.compiler.is_compiling()
                or (cross_attention_kwargs is not None and "gligen" in cross_attention_kwargs)):
            return self.diffusers_forward(block, hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                       added_cond_kwargs)
        if cross_attention_kwargs is not None and cross_attention_kwargs.get("scale", None) is not None:
            sys.modules[type(block).__module__].logger.warning(_KWARGS_SCALE_WARNING)
        cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}

        norm_hidden_states = block.norm1(hidden_states)
        attn_output = block.attn1(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states if block.only_cross_attention else None,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )
        if block.attn2 is not None:
            hidden_states, norm_hidden_states = add_norm(attn_output, hidden_states, block.norm2)
            attn_output = block.attn2(
                norm_hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **cross_attention_kwargs,
            )
        ff, fused = block.ff, None
        if self.ff_epilogue and block._chunk_size is None:  # the residual in the feed-forward's output GEMM
            fused = add_norm_feed_forward(attn_output, hidden_states, block.norm3, ff,
                                          lambda n: ff.net[1](ff.net[0](n)), ff.net[2])
        if fused is not None:
            hidden_states = fused
        else:
            hidden_states, norm_hidden_states = add_norm(attn_output, hidden_states, block.norm3)
            if block._chunk_size is not None:
                chunked = sys.modules[type(block).__module__]._chunked_feed_forward
                ff_output = chunked(block.ff, norm_hidden_states, block._chunk_dim, block._chunk_size)
            else:
                ff_output = block.ff(norm_hidden_states)
            hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


# The FeedForward.forward source FusedTransformerBlockForward's feed-forward epilogue reproduces: diffusers 0.42.1.
_FEED_FORWARD_AST_SHA256 = {
    "c306bf425d21a05ce4750d998658e536695e70b535852997865b8eba8e6a8242",  # diffusers 0.42.1
}


def feed_forward_epilogue_refused(ff: Optional[nn.Module]) -> Optional[str]:
    """None when ``ff`` is diffusers' ``FeedForward`` running ``net = [activation, Dropout, Linear]``
    in sequence, so its output Linear can take the block's residual in its GEMM, else why not."""
    if ff is None or not is_diffusers_class(ff, "FeedForward"):
        return f"its ff is a {type(ff).__name__}, not diffusers' FeedForward"
    reason = _source_unknown(type(ff), "forward", (type(ff).forward,), _FEED_FORWARD_AST_SHA256)
    if reason is not None:
        return reason
    net = getattr(ff, "net", None)
    if not (isinstance(net, nn.ModuleList) and len(net) == 3 and type(net[1]) is nn.Dropout
            and type(net[2]) is nn.Linear):
        return "its FeedForward.net is not [activation, Dropout, Linear] (e.g. a final dropout)"
    return None


def transformer_block_unfusable(block: nn.Module) -> Optional[str]:
    """None when :class:`FusedTransformerBlockForward` computes what ``block`` (a diffusers
    BasicTransformerBlock) does, else why not."""
    cls = type(block)
    digest = _function_ast_sha256(cls.forward)
    if digest is None:
        return f"the source of {cls.__qualname__}.forward is not available to check"
    if digest not in _BASIC_TRANSFORMER_AST_SHA256:
        return (f"{cls.__module__}.{cls.__qualname__}.forward differs from the diffusers 0.42 forward "
                f"ldm_fast reproduces (AST sha256 {digest[:12]}...)")
    if "forward" in block.__dict__:
        return "the block has an instance-level forward (e.g. an accelerate hook)"
    if getattr(block, "norm_type", None) != "layer_norm":
        return f"norm_type={getattr(block, 'norm_type', None)!r}: only 'layer_norm' adds the residual straight into a norm"
    if getattr(block, "pos_embed", None) is not None:
        return "it has a positional embedding between the norms and the attention"
    names = ("norm1", "norm2", "norm3") if getattr(block, "attn2", None) is not None else ("norm1", "norm3")
    for name in names:
        norm = getattr(block, name, None)
        if type(norm) is not nn.LayerNorm:
            return f"its {name} is a {type(norm).__name__}, not an nn.LayerNorm"
        if len(norm.normalized_shape) != 1:
            return f"its {name} normalizes over {tuple(norm.normalized_shape)}, not the last dimension alone"
        if intercepted(norm):
            return f"its {name} has hooks or an instance-level forward (the fused kernel would not call them)"
    if not hasattr(sys.modules.get(cls.__module__), "_chunked_feed_forward"):
        return f"{cls.__module__} has no _chunked_feed_forward"
    return None


# --- Transformer2DModel: keep the channels-last layout through the block --------------------------

# The Transformer2DModel._get_output_for_continuous_inputs source ChannelsLastTransformerOutput
# reproduces: diffusers 0.42.1.
_TRANSFORMER_OUTPUT_AST_SHA256 = {
    "c1553516aa007684ac32596272b915c6d4b047e40e78b336cb49bf16634ecde5",  # diffusers 0.42.1
}


class ChannelsLastTransformerOutput:
    """diffusers 0.42 ``Transformer2DModel._get_output_for_continuous_inputs``, except that the
    ``[B, H*W, C] -> [B, C, H, W]`` permute is made contiguous in the layout of the block's input
    (``residual``): for a channels-last input the permuted view already is channels-last, so no copy
    is made and the U-Net's activations stay channels-last (diffusers' ``.contiguous()`` copies them
    to NCHW after every transformer, and every later add, norm and convolution then runs on NCHW or
    converts back). The values are the same; only the strides differ. Installed as the module's
    instance-level ``_get_output_for_continuous_inputs`` by ``optimize(channels_last=True)``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __repr__(self) -> str:
        return "<ldm_fast Transformer2DModel output in the input's memory format>"

    def __call__(self, hidden_states, residual, batch_size, height, width, inner_dim):
        module = self.module
        fmt = (torch.channels_last if residual.dim() == 4 and not residual.is_contiguous()
               and residual.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        if not module.use_linear_projection:
            hidden_states = (
                hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
                .contiguous(memory_format=fmt)
            )
            hidden_states = module.proj_out(hidden_states)
        else:
            hidden_states = module.proj_out(hidden_states)
            hidden_states = (
                hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
                .contiguous(memory_format=fmt)
            )
        return hidden_states + residual


def transformer_output_unkept(module: nn.Module) -> Optional[str]:
    """None when :class:`ChannelsLastTransformerOutput` computes what ``module`` (a diffusers
    Transformer2DModel) does, else why not."""
    cls = type(module)
    reason = _source_unknown(cls, "_get_output_for_continuous_inputs",
                             (getattr(cls, "_get_output_for_continuous_inputs", None),), _TRANSFORMER_OUTPUT_AST_SHA256)
    if reason is not None:
        return reason
    if "_get_output_for_continuous_inputs" in module.__dict__:
        return "the module has an instance-level _get_output_for_continuous_inputs"
    return None


# --- Timesteps: the sinusoidal time embedding in one kernel ----------------------------------------

# The Timesteps.forward and get_timestep_embedding sources FusedTimestepsForward reproduces: diffusers 0.42.1.
_TIMESTEPS_AST_SHA256 = {
    ("ad31444f04c9503b9eb9c10124b1c39186e02ce725f60a37c452926500ae332b",
     "98b65e5097dfbdc622dc5b7ee138468ef050697ff9aaa4b59004e3f827f2351f"),  # diffusers 0.42.1
}


class FusedTimestepsForward:
    """diffusers 0.42 ``Timesteps.forward`` (``get_timestep_embedding`` with the module's
    ``num_channels``, ``flip_sin_to_cos``, ``downscale_freq_shift`` and ``scale``) as
    :func:`ldm_fast.functional.timestep_embedding`: one launch instead of about ten (bit for bit
    diffusers' statements on the eager backend and under torch.compile). Installed as the module's
    instance-level ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __repr__(self) -> str:
        return "<ldm_fast fused Timesteps.forward: timestep_embedding in one kernel>"

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        m = self.module
        return functional.timestep_embedding(timesteps, m.num_channels, flip_sin_to_cos=bool(m.flip_sin_to_cos),
                                             downscale_freq_shift=m.downscale_freq_shift, scale=m.scale)


def timesteps_unfusable(module: nn.Module) -> Optional[str]:
    """None when :class:`FusedTimestepsForward` computes what ``module`` (a diffusers Timesteps) does,
    else why not."""
    cls = type(module)
    embed = getattr(sys.modules.get(cls.__module__), "get_timestep_embedding", None)
    reason = _source_unknown(cls, "forward (or get_timestep_embedding)", (cls.forward, embed), _TIMESTEPS_AST_SHA256)
    if reason is not None:
        return reason
    if "forward" in module.__dict__:
        return "the module has an instance-level forward"
    dim = getattr(module, "num_channels", None)
    if not (isinstance(dim, int) and dim > 0):
        return f"its num_channels is {dim!r}, not a positive int"
    for name in ("downscale_freq_shift", "scale"):
        value = getattr(module, name, None)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return f"its {name} is {value!r}, not a finite number"
    if dim // 2 - module.downscale_freq_shift == 0:
        return "dim // 2 - downscale_freq_shift is 0 (a division by zero in diffusers too)"
    return None
