"""diffusers ``BasicTransformerBlock`` (the ``add_layer_norm`` patch) and ``Transformer2DModel``'s output
layout (part of the ``channels_last`` patch).

:class:`TransformerBlockForward` is diffusers' ``BasicTransformerBlock.forward`` (0.30-0.42) for
``norm_type="layer_norm"`` (SD 1.x/2.x, SDXL), with, on the Triton backend, each residual add that
feeds a LayerNorm (``attn1``'s output into ``norm2``, ``attn2``'s into ``norm3``) and that norm as
one :func:`ldm_fast.functional.add_layer_norm` kernel (under CUDA autocast with the fp32 output
autocast gives), and in inference the feed-forward's residual in its output GEMM
(:func:`ldm_fast._fusion.add_norm_feed_forward`), and each attention called for less host time
(:meth:`TransformerBlockForward.attend`: no per-call ``inspect.signature``, and diffusers'
``AttnProcessor2_0`` or ldm_fast's ``AttnProcessor`` in the plain case as
:func:`.attention.plain_statements`). Per call, each norm,
attention, projection and the feed-forward's output Linear are read instead of called only while
they are the plain modules (a LoRA layer on ``ff.net.2`` or ``to_q``, a hook on ``norm2`` or
``attn1``: that module is called). Off the Triton backend, under torch.compile, with global module
hooks, for 4-d inputs, GLIGEN kwargs and the deprecated ``scale`` kwarg, diffusers' own forward
runs.

:class:`TransformerOutput` is ``Transformer2DModel._get_output_for_continuous_inputs`` with the
``[B, H*W, C] -> [B, C, H, W]`` permute kept in the block input's memory format (no copy to NCHW for
a channels-last U-Net).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ... import backend
from ..._fusion import add_norm, add_norm_feed_forward, class_method, global_module_hooks, inert_dropout, intercepted
from ...optimize.patch import Context, InstallPatch
from .attention import AttnProcessor, plain_statements
from .supported import is_diffusers, known, module_function


class TransformerBlockForward:
    """diffusers ``BasicTransformerBlock.forward`` (``norm_type="layer_norm"``) with the fusions of the
    module docstring; installed as the block's instance ``forward`` by the ``add_layer_norm`` patch.
    ``ff_class`` is the ``FeedForward`` class whose forward was checked (None: no epilogue)."""

    def __init__(self, block: nn.Module, ff_class: Optional[type], attention_forwards: dict,
                 sdpa_processors: dict) -> None:
        self.block = block
        self.cls = type(block)
        self.diffusers_forward = self.cls.forward
        self.ff_class = ff_class
        self.attention_forwards = attention_forwards  # {Attention class: its forward, a known source}
        self.sdpa_processors = sdpa_processors  # {AttnProcessor2_0 class: its __call__, a known source}

    def attend(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states, attention_mask,
               cross_attention_kwargs: dict) -> torch.Tensor:
        """``attn(hidden_states, encoder_hidden_states=..., attention_mask=..., **cross_attention_kwargs)``.
        Without kwargs diffusers' ``Attention.forward`` (0.30-0.42) is the processor's call and nothing
        else (the rest of it filters the kwargs by ``inspect.signature`` of the processor, ~50 µs of host
        time a call): that call is made directly while ``attn`` is of a class whose forward is that
        known source and nothing intercepts its call (the caller checked global module hooks and
        torch.compile). And where that processor is diffusers' ``AttnProcessor2_0`` (its known source)
        or exactly ldm_fast's :class:`.attention.AttnProcessor` on the backend it runs (not its
        fallback) and there is no mask, its statements run without their host cost
        (:func:`.attention.plain_statements`)."""
        cls = attn.__class__
        if (not cross_attention_kwargs and self.attention_forwards.get(cls) is cls.forward
                and not intercepted(attn)):
            processor = attn.processor
            if attention_mask is None:
                kind = processor.__class__
                out = None
                if self.sdpa_processors.get(kind) is kind.__call__:
                    out = plain_statements(attn, hidden_states, encoder_hidden_states)
                elif kind is AttnProcessor and (processor.fallback is None or backend.kernel_ok(hidden_states)):
                    out = plain_statements(attn, hidden_states, encoder_hidden_states, processor)
                if out is not None:
                    return out
            return processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask)
        return attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                    **cross_attention_kwargs)

    def __repr__(self) -> str:
        return ("<ldm_fast BasicTransformerBlock.forward: residual add + LayerNorm in one kernel, feed-forward "
                f"residual in its output GEMM={self.ff_class is not None}>")

    def __call__(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 encoder_attention_mask: Optional[torch.Tensor] = None, timestep=None,
                 cross_attention_kwargs: Optional[dict] = None, class_labels=None,
                 added_cond_kwargs: Optional[dict] = None) -> torch.Tensor:
        block = self.block
        forward = class_method(block, self.cls, "forward", self.diffusers_forward)  # (tomesd swaps the class)
        if (forward is not self.diffusers_forward or hidden_states.ndim != 3 or torch.compiler.is_compiling()
                or not backend.kernel_ok(hidden_states) or global_module_hooks()
                or (cross_attention_kwargs is not None
                    and ("gligen" in cross_attention_kwargs or cross_attention_kwargs.get("scale") is not None))):
            return forward(block, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                           timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
        mods = block._modules

        norm_hidden_states = mods["norm1"](hidden_states)
        attn_output = self.attend(mods["attn1"], norm_hidden_states,
                                  encoder_hidden_states if block.only_cross_attention else None, attention_mask,
                                  cross_attention_kwargs)
        attn2 = mods.get("attn2")
        if attn2 is not None:
            hidden_states, norm_hidden_states = add_norm(attn_output, hidden_states, mods["norm2"])
            attn_output = self.attend(attn2, norm_hidden_states, encoder_hidden_states, encoder_attention_mask,
                                      cross_attention_kwargs)
        ff, norm3 = mods["ff"], mods["norm3"]
        fused = None
        if block._chunk_size is None and type(ff) is self.ff_class and not intercepted(ff):
            net = ff._modules["net"]
            held = net._modules
            if type(net) is nn.ModuleList and len(held) == 3 and not intercepted(net):
                first, dropout, out_proj = held.values()
                inner = first if inert_dropout(dropout) else lambda n: dropout(first(n))
                fused = add_norm_feed_forward(attn_output, hidden_states, norm3, inner, out_proj, (ff, norm3))
        if fused is not None:  # the residual in the feed-forward's output GEMM
            return fused
        hidden_states, norm_hidden_states = add_norm(attn_output, hidden_states, norm3)
        if block._chunk_size is not None:
            chunked = module_function(type(block), "_chunked_feed_forward")
            ff_output = chunked(ff, norm_hidden_states, block._chunk_dim, block._chunk_size)
        else:
            ff_output = ff(norm_hidden_states)
        hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def _feed_forward_class(ff: Optional[nn.Module]) -> Any:
    """``type(ff)`` when it is diffusers' ``FeedForward`` with the known forward and ``net = [activation,
    Dropout, Linear]`` (its output Linear can take the block's residual in its GEMM), else the reason."""
    if ff is None or not is_diffusers(ff, "FeedForward"):
        return f"its ff is a {type(ff).__name__}, not diffusers' FeedForward"
    variants = known(type(ff), [("FeedForward.forward", type(ff).forward)])
    if isinstance(variants, str):
        return variants
    net = getattr(ff, "net", None)
    if not (isinstance(net, nn.ModuleList) and len(net) == 3 and type(net[1]) is nn.Dropout
            and type(net[2]) is nn.Linear):
        return "its FeedForward.net is not [activation, Dropout, Linear] (e.g. a final dropout)"
    return type(ff)


class AddLayerNormPatch(InstallPatch):
    """diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``): :class:`TransformerBlockForward`
    as the block's instance ``forward``."""

    name = "add_layer_norm"
    doc = ("diffusers BasicTransformerBlock: each residual add + LayerNorm in one kernel, the feed-forward's "
           "residual in its output GEMM (the block's forward)")

    def candidates(self, ctx: Context):
        return (m for m in ctx.modules() if is_diffusers(m, "BasicTransformerBlock"))

    def refused(self, block: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(block)
        reason = known(cls, [("BasicTransformerBlock.forward", cls.forward)])
        if isinstance(reason, str):
            return reason
        if "forward" in block.__dict__:
            return "the block has an instance-level forward (e.g. an accelerate hook)"
        if getattr(block, "norm_type", None) != "layer_norm":
            return (f"norm_type={getattr(block, 'norm_type', None)!r}: only 'layer_norm' adds the residual straight "
                    "into a norm")
        if getattr(block, "pos_embed", None) is not None:
            return "it has a positional embedding between the norms and the attention"
        if module_function(cls, "_chunked_feed_forward") is None:
            return f"{cls.__module__} has no _chunked_feed_forward"
        return None

    def make(self, block: nn.Module, ctx: Context) -> Any:
        ff_class = _feed_forward_class(getattr(block, "ff", None))
        if isinstance(ff_class, str):
            ctx.left(self, block.ff, f"the feed-forward's residual stays a separate add: {ff_class}")
            ff_class = None
        attention_forwards, sdpa_processors = {}, {}
        for name in ("attn1", "attn2"):
            attn = getattr(block, name, None)
            if attn is None or not is_diffusers(attn, "Attention"):
                continue
            cls = type(attn)
            if isinstance(known(cls, [("Attention.forward", cls.forward)]), tuple):
                attention_forwards[cls] = cls.forward
            sdpa = module_function(cls, "AttnProcessor2_0")
            if isinstance(sdpa, type) and isinstance(known(sdpa, [("AttnProcessor2_0.__call__", sdpa.__call__)]), tuple):
                sdpa_processors[sdpa] = sdpa.__call__
        return TransformerBlockForward(block, ff_class, attention_forwards, sdpa_processors)

    def summary(self, count: int) -> str:
        return (f"{count} diffusers BasicTransformerBlocks add each residual into the next LayerNorm in one kernel "
                "and the feed-forward's residual in its output GEMM (Triton backend)")


# --- Transformer2DModel: keep the channels-last layout through the block --------------------------


class TransformerOutput:
    """diffusers ``Transformer2DModel._get_output_for_continuous_inputs`` (0.30-0.42), except that the
    ``[B, H*W, C] -> [B, C, H, W]`` permute is made contiguous in the layout of the block's input
    (``residual``): for a channels-last input the permuted view already is channels-last, so no copy
    is made and the U-Net's activations stay channels-last (diffusers' ``.contiguous()`` copies them
    to NCHW after every transformer). The same values; only the strides differ. Installed as the
    module's instance ``_get_output_for_continuous_inputs``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.diffusers_method = self.cls._get_output_for_continuous_inputs

    def __repr__(self) -> str:
        return "<ldm_fast Transformer2DModel output in the input's memory format>"

    def __call__(self, hidden_states, residual, batch_size, height, width, inner_dim):
        module = self.module
        method = class_method(module, self.cls, "_get_output_for_continuous_inputs", self.diffusers_method)
        if method is not self.diffusers_method:  # (the class swapped or patched after optimize)
            return method(module, hidden_states, residual, batch_size, height, width, inner_dim)
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


class ChannelsLastOutputPatch(InstallPatch):
    """diffusers ``Transformer2DModel``: :class:`TransformerOutput` as its instance
    ``_get_output_for_continuous_inputs`` (run by the ``channels_last`` patch, reported under its name)."""

    name = "channels_last"
    attr = "_get_output_for_continuous_inputs"

    def candidates(self, ctx: Context):
        return (m for m in ctx.modules() if is_diffusers(m, "Transformer2DModel"))

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(module)
        fn = getattr(cls, self.attr, None)
        if fn is None:
            return f"{cls.__qualname__} has no {self.attr}"
        reason = known(cls, [("Transformer2DModel._get_output_for_continuous_inputs", fn)])
        if isinstance(reason, str):
            return reason
        if self.attr in module.__dict__:
            return f"the module has an instance-level {self.attr}"
        return None

    def make(self, module: nn.Module, ctx: Context) -> Any:
        return TransformerOutput(module)

    def summary(self, count: int) -> str:
        return f"{count} diffusers Transformer2DModels return their output in their input's layout"
