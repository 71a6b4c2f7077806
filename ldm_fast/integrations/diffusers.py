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
bit for bit).

The cases it does not cover run exactly ``AttnProcessor2_0``'s SDPA statements: an
``attention_mask``; projections whose widths differ (``kv_heads``, ``out_dim``) or do not split
into ``heads``; q/k norms other than the per-head ones (``LayerNorm``/``RMSNorm``/``LpNorm`` over
``dim_head``, which are applied to the ``[B, N, heads, D]`` view, the same rows as
``AttnProcessor2_0``'s ``[B, heads, N, D]``). Like ``AttnProcessor2_0`` it ignores ``attn.scale``
(the scale is ``D**-0.5``), ``upcast_attention`` and ``upcast_softmax`` (the kernel's softmax
runs in fp32).

diffusers is imported only to emit its deprecation warning for the ``scale`` argument; importing
this module does not import it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backend, functional

__all__ = ["AttnProcessor"]

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

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

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
