"""diffusers ``Attention``: an attention processor that runs :func:`ldm_fast.functional.attention` (the
``attention`` patch swaps it in), and the packed q/k/v projections (the ``pack_weights`` patch).

    from ldm_fast.integrations.diffusers import AttnProcessor
    unet.set_attn_processor(AttnProcessor())          # or: ldm_fast.optimize(unet, attention=True)

:class:`AttnProcessor` reproduces diffusers' ``AttnProcessor2_0.__call__`` (0.30-0.42) statement for
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

Off the Triton backend and under torch.compile, a processor installed by ``optimize`` calls the
processor it replaced (diffusers' own statements).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ... import backend, functional
from ..._fusion import inert_dropout, linear
from ..._packing import PackedLinears, linear_unpackable
from ...optimize.patch import Context, InstallPatch
from .supported import is_diffusers, known

__all__ = ["AttnProcessor", "AttentionPatch", "PACK_ATTR", "PackedProjections", "plain_statements"]

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


#: Attention attributes that take AttnProcessor2_0 off the plain case when set.
_NOT_PLAIN = ("spatial_norm", "group_norm", "norm_q", "norm_k")


def plain_statements(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor],
                     processor: Optional["AttnProcessor"] = None) -> Optional[torch.Tensor]:
    """What ``attn``'s processor computes without an attention mask, temb or extra arguments, in the
    plain case: a ``[B, N, C]`` input, no spatial_norm, group_norm, norm_cross, norm_q, norm_k or
    residual connection, and ``to_out = [Linear, Dropout]``; its statements without their host cost.
    ``processor`` None: diffusers' ``AttnProcessor2_0.__call__`` (0.30-0.42); else ldm_fast's
    :class:`AttnProcessor` (that instance: its ``impl``, and the packed projections where usable).
    ``to_q``/``to_k``/``to_v`` and ``to_out[0]`` run as ``F.linear`` where they are plain Linears (any
    other module, a LoRA layer, is called), a Dropout in eval mode or with p = 0 is skipped (it returns its input),
    no ``.to()`` to the dtype the output has, no division by a ``rescale_output_factor`` of 1
    (``x / 1.0`` is ``x``: a launch fewer). The same values, bit for bit. None outside the plain case
    (the caller calls the processor). The caller checks the processor is exactly that class (an
    ``AttnProcessor2_0`` of the known source), nothing intercepts ``attn``, no global module hooks
    are set, no torch.compile and, for ldm_fast's processor, that it would not call its fallback."""
    d, mods = attn.__dict__, attn._modules
    if hidden_states.ndim != 3 or d.get("residual_connection"):
        return None
    for name in _NOT_PLAIN:  # each a plain attribute when None, a submodule when set
        if d.get(name) is not None or mods.get(name) is not None:
            return None
    if encoder_hidden_states is not None and (d.get("norm_cross") or mods.get("norm_cross") is not None):
        return None
    to_out = mods.get("to_out")
    if type(to_out) is not nn.ModuleList or len(to_out) != 2:
        return None
    out_proj, dropout = to_out._modules.values()
    heads = attn.heads
    batch_size = hidden_states.shape[0]
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    pack = None if processor is None else d.get(PACK_ATTR)
    if pack is not None and not pack.usable(attn, hidden_states, encoder_hidden_states):
        pack = None
    if pack is not None and encoder_hidden_states is None and pack.with_q:  # q, k and v from one GEMM
        query, key, value = pack.qkv(hidden_states)
    else:
        query = linear(mods.get("to_q"), hidden_states)
        if pack is not None:  # k and v from one GEMM
            key, value = pack.kv(context)
        else:
            key = linear(mods.get("to_k"), context)
            value = linear(mods.get("to_v"), context)
    head_dim = key.shape[-1] // heads
    if processor is not None and _projections_covered(heads, query, key, value, batch_size, head_dim):
        hidden_states = functional.attention(query, key, value, heads=heads, impl=processor.impl)
    else:  # AttnProcessor2_0's statements
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    if hidden_states.dtype != query.dtype:
        hidden_states = hidden_states.to(query.dtype)
    hidden_states = linear(out_proj, hidden_states)
    if not inert_dropout(dropout):
        hidden_states = dropout(hidden_states)
    factor = attn.rescale_output_factor
    return hidden_states if factor == 1.0 else hidden_states / factor


def _projections_covered(heads: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_size: int,
                         head_dim: int) -> bool:
    """Whether functional.attention on the ``[B, N, heads * D]`` projections computes what
    AttnProcessor2_0's view/transpose/SDPA statements compute for them (q/k norms aside)."""
    inner_dim = key.shape[-1]
    return (query.dim() == 3 and key.dim() == 3 and value.dim() == 3
            and head_dim > 0 and inner_dim == head_dim * heads
            and query.shape[-1] == inner_dim and value.shape[-1] == inner_dim
            and query.shape[0] == key.shape[0] == value.shape[0] == batch_size
            and key.shape[1] == value.shape[1])


class AttnProcessor:
    """A diffusers attention processor (``Attention.set_processor``) computing attention with
    :func:`ldm_fast.functional.attention` on the ``[B, N, heads * D]`` projections, otherwise
    statement for statement diffusers' ``AttnProcessor2_0`` (see the module docstring for the
    cases that run ``AttnProcessor2_0``'s own SDPA statements).

    ``impl`` is passed to :func:`ldm_fast.functional.attention` (``"auto"``: SDPA unless a GPU
    measurement says the Triton kernel is faster; ``LDM_FAST_ATTENTION`` overrides it). ``fallback``
    (what :func:`ldm_fast.optimize` passes: the processor it replaced) runs instead off the Triton
    backend and under torch.compile, so the module computes there exactly what it computed before.
    Without a fallback one instance may serve every ``Attention`` of a model.

    Eager equivalent: ``diffusers.models.attention_processor.AttnProcessor2_0()``.
    """

    def __init__(self, impl: str = "auto", fallback: Any = None) -> None:
        if impl not in backend.ATTENTION_IMPLS:
            raise ValueError(f"AttnProcessor: impl must be one of {backend.ATTENTION_IMPLS}, got {impl!r}")
        self.impl = impl
        self.fallback = fallback

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
        if self.fallback is not None and (torch.compiler.is_compiling() or not backend.kernel_ok(hidden_states)):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
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
            query, key, value = pack.qkv(hidden_states)
        else:
            query = attn.to_q(hidden_states)

            if encoder_hidden_states is None:
                encoder_hidden_states = hidden_states
            elif attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

            if pack is not None:  # ldm_fast: k and v from one GEMM on the packed weights
                key, value = pack.kv(encoder_hidden_states)
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
        return (_projections_covered(attn.heads, query, key, value, batch_size, head_dim)
                and _rowwise_norm(attn.norm_q, head_dim) and _rowwise_norm(attn.norm_k, head_dim))


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
        self._kv_views()

    def _kv_views(self) -> None:
        """k and v's rows of the buffer, as views (they see every in-place update of the weights), and
        the widths to split a packed GEMM's output into (``split_with_sizes``: one C call)."""
        self.sizes = [self.width] * len(self.modules)
        self.kv_weight = self.weight[-2 * self.width:]
        self.kv_bias = None if self.bias is None else self.bias[-2 * self.width:]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["kv_weight"], state["kv_bias"]  # (a copy would not keep them views of the buffer)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._kv_views()

    def __repr__(self) -> str:
        return f"<ldm_fast packed {'q/k/v' if self.with_q else 'k/v'} projections: {tuple(self.weight.shape)}>"

    def qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A self-attention's q, k and v ``[B, N, C]`` from one GEMM on the whole buffer (views of its
        ``[B, N, 3C]`` output); only where the query is packed (``with_q``)."""
        return F.linear(hidden_states, self.weight, self.bias).split_with_sizes(self.sizes, -1)

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k and v ``[B, M, C]`` from one GEMM on their rows of the buffer (views of its ``[B, M, 2C]``
        output)."""
        return F.linear(context, self.kv_weight, self.kv_bias).split_with_sizes(self.sizes[-2:], -1)

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


#: diffusers' default processors (``diffusers.models.attention_processor``) that the ldm_fast
#: AttnProcessor replaces: it is AttnProcessor2_0 statement for statement; AttnProcessor computes
#: the same math with baddbmm/softmax/bmm (and honours attn.scale, checked before the swap).
_DIFFUSERS_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_DIFFUSERS_PROCESSOR_MODULE = "diffusers.models.attention_processor"
#: The Attention attributes AttnProcessor2_0 (and ldm_fast's processor) read.
_READ = ("spatial_norm", "group_norm", "norm_cross", "norm_q", "norm_k", "heads", "residual_connection",
         "rescale_output_factor", "prepare_attention_mask", "norm_encoder_hidden_states", "to_q", "to_k", "to_v",
         "to_out")


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
    reason = known(cls, [(f"{cls.__name__}.__call__", cls.__call__)])
    if isinstance(reason, str):
        return reason
    missing = [name for name in _READ if not hasattr(attn, name)]
    if missing:
        return f"the module lacks what ldm_fast's processor reads: {', '.join(missing)}"
    if cls.__name__ == "AttnProcessor":
        heads, inner = getattr(attn, "heads", None), getattr(attn, "inner_dim", None)
        scale = getattr(attn, "scale", None)
        if not (isinstance(heads, int) and isinstance(inner, int) and heads > 0 and inner % heads == 0
                and isinstance(scale, float) and math.isclose(scale, (inner // heads) ** -0.5, rel_tol=1e-12)):
            return (f"AttnProcessor with attn.scale={scale!r} (e.g. scale_qk=False), not D**-0.5 as "
                    "ldm_fast's processor (like AttnProcessor2_0) computes")
    return None


class AttentionPatch(InstallPatch):
    """diffusers ``Attention`` with its default processor: :class:`AttnProcessor` (falling back to that
    processor off the Triton backend) as its ``processor``; restore puts the original object back."""

    name = "attention"
    attr = "processor"
    default = False
    doc = ("diffusers Attention: ldm_fast.functional.attention on the [B, N, heads*D] projections, no "
           "transposes (impl 'auto': SDPA until a GPU measurement says the Triton kernel is faster)")

    def candidates(self, ctx: Context):
        for module in ctx.modules():
            cls = type(module)
            if is_diffusers(module, "Attention"):
                yield module
            elif ((cls.__module__ or "").startswith("diffusers.") and cls.__name__.endswith("Attention")
                    and ("processor" in module.__dict__ or "processor" in module._modules)):
                yield module  # refused: not diffusers' Attention

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(module)
        if not is_diffusers(module, "Attention"):
            return (f"{cls.__module__}.{cls.__qualname__} is not diffusers' Attention (its processors are not the "
                    "ones ldm_fast reproduces)")
        return attention_swap_refused(module, module.__dict__.get("processor"))

    def make(self, module: nn.Module, ctx: Context) -> Any:
        return AttnProcessor(fallback=module.__dict__["processor"])

    def summary(self, count: int) -> str:
        return (f"{count} diffusers Attention modules run ldm_fast.functional.attention (impl 'auto': SDPA unless a "
                "GPU measurement says the Triton kernel is faster; LDM_FAST_ATTENTION overrides)")
