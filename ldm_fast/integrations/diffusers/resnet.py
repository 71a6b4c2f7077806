"""diffusers ``ResnetBlock2D`` (the U-Net's and the VAE's ResNet block): the ``resnet`` patch.

:class:`ResnetForward` is diffusers' ``ResnetBlock2D.forward`` (0.30-0.42) statement for statement,
with, on the Triton backend:

* ``norm1`` and ``nonlinearity`` as one GroupNorm+SiLU kernel; ``norm2``, the time embedding's add
  before it and the SiLU after it as one kernel (``group_norm(h, shift=temb, activation="silu")``;
  ``time_embedding_norm="scale_shift"`` modulates between norm2 and the SiLU: only the norm);
* the time embedding's SiLU computed once for all the blocks of a step
  (:func:`ldm_fast._fusion.shared_silu`) and, with ``pack_weights``, every block's ``time_emb_proj``
  as one GEMM (:class:`ldm_fast._packing.PackedTimeProjections`);
* a 1x1 ``conv_shortcut`` as a GEMM accumulating onto ``conv2``'s output
  (:func:`ldm_fast._fusion.shortcut_gemm`, inference);
* no division by an ``output_scale_factor`` of 1 (bit for bit the same).

Each fusion checks on every call that the modules it reads instead of calling are still the plain
modules it was written for (a LoRA/LoCon layer, a hook, another class: that module is called, as
diffusers calls it). Off the Triton backend (a CPU, ``LDM_FAST_BACKEND=eager``), under
torch.compile, with global module hooks and for the deprecated ``scale`` argument, diffusers' own
forward runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ... import backend, functional
from ..._fusion import (class_method, conv2d, global_module_hooks, inert_dropout, plain_group_norm, plain_silu, shared_silu,
                        shortcut_gemm)
from ...optimize.patch import Context, InstallPatch
from .supported import is_diffusers, known


class ResnetForward:
    """diffusers ``ResnetBlock2D.forward`` with the fusions of the module docstring; installed as the
    block's instance ``forward`` by the ``resnet`` patch. ``contiguous_shortcut`` is the release's
    handling of the shortcut's input (``"never"`` 0.30-0.32, ``"always"`` 0.33-0.36, ``"training"``
    0.37-0.42); ``time_pack`` is set by the ``pack_weights`` patch."""

    def __init__(self, block: nn.Module, contiguous_shortcut: str, shortcut_gemm: bool) -> None:
        self.block = block
        self.cls = type(block)
        self.diffusers_forward = self.cls.forward
        self.contiguous_shortcut = contiguous_shortcut
        self.shortcut_gemm = shortcut_gemm
        self.time_pack = None

    def __repr__(self) -> str:
        return f"<ldm_fast ResnetBlock2D.forward: GroupNorm+SiLU fused, 1x1 shortcut as a GEMM={self.shortcut_gemm}>"

    def __call__(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        block = self.block
        forward = class_method(block, self.cls, "forward", self.diffusers_forward)  # (a class swapped or patched since)
        if (forward is not self.diffusers_forward or args or kwargs or torch.compiler.is_compiling()
                or not backend.kernel_ok(input_tensor) or global_module_hooks()):
            return forward(block, input_tensor, temb, *args, **kwargs)
        mods = block._modules
        act = mods["nonlinearity"]
        silu = plain_silu(act)

        hidden_states = input_tensor

        norm1 = mods["norm1"]
        if silu and plain_group_norm(norm1):
            p = norm1._parameters  # (not norm1.weight: nn.Module.__getattr__ costs ~0.5 µs a name)
            hidden_states = functional.group_norm(hidden_states, norm1.num_groups, p["weight"], p["bias"], norm1.eps,
                                                  activation="silu")
        else:
            hidden_states = norm1(hidden_states)
            hidden_states = act(hidden_states)

        upsample, downsample = mods.get("upsample"), mods.get("downsample")
        if upsample is not None:
            # upsample_nearest_nhwc fails with large batch sizes. see https://github.com/huggingface/diffusers/issues/984
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = upsample(input_tensor)
            hidden_states = upsample(hidden_states)
        elif downsample is not None:
            input_tensor = downsample(input_tensor)
            hidden_states = downsample(hidden_states)

        hidden_states = conv2d(mods["conv1"], hidden_states)

        time_emb_proj = mods.get("time_emb_proj")
        if time_emb_proj is not None:
            if not block.skip_time_act:
                temb = shared_silu(act, temb, time_emb_proj) if silu else act(temb)
            projected = None if self.time_pack is None else self.time_pack.project(time_emb_proj, temb)
            temb = time_emb_proj(temb) if projected is None else projected  # [B, C]: [:, :, None, None] below

        norm2 = mods["norm2"]
        mode = block.time_embedding_norm
        fused2 = silu and mode != "scale_shift" and plain_group_norm(norm2)
        if (mode == "default" and time_emb_proj is not None and fused2 and temb.dtype == hidden_states.dtype
                and temb.dim() == 2 and temb.shape == hidden_states.shape[:2]):
            # the add inside the norm's pass (temb [B, C] the shift), then the SiLU: hidden_states + temb is
            # never written
            p = norm2._parameters
            hidden_states = functional.group_norm(hidden_states, norm2.num_groups, p["weight"], p["bias"], norm2.eps,
                                                  activation="silu", shift=temb)
        else:
            if time_emb_proj is not None:
                temb = temb[:, :, None, None]
            if mode == "scale_shift":
                if temb is None:
                    raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {mode}")
                time_scale, time_shift = torch.chunk(temb, 2, dim=1)
                hidden_states = norm2(hidden_states)
                hidden_states = hidden_states * (1 + time_scale) + time_shift
                hidden_states = act(hidden_states)
            else:
                if mode == "default" and temb is not None:
                    hidden_states = hidden_states + temb
                if fused2:
                    p = norm2._parameters
                    hidden_states = functional.group_norm(hidden_states, norm2.num_groups, p["weight"], p["bias"],
                                                          norm2.eps, activation="silu")
                else:
                    hidden_states = norm2(hidden_states)
                    hidden_states = act(hidden_states)

        dropout = mods["dropout"]
        if not inert_dropout(dropout):  # (a Dropout in eval mode or with p = 0 returns its input: no call)
            hidden_states = dropout(hidden_states)
        conv2, conv_shortcut = mods["conv2"], mods.get("conv_shortcut")
        output_tensor = None
        if self.shortcut_gemm and conv_shortcut is not None:  # the shortcut as a GEMM onto conv2's output
            output_tensor = shortcut_gemm(conv2, hidden_states, conv_shortcut, input_tensor)
        if output_tensor is None:  # diffusers' statements
            hidden_states = conv2d(conv2, hidden_states)
            if conv_shortcut is not None:
                if self.contiguous_shortcut == "always" or (self.contiguous_shortcut == "training" and block.training):
                    input_tensor = input_tensor.contiguous()
                input_tensor = conv_shortcut(input_tensor)
            output_tensor = input_tensor + hidden_states
        if block.output_scale_factor != 1.0:  # x / 1.0 is x, bit for bit: skip the launch
            output_tensor = output_tensor / block.output_scale_factor
        return output_tensor


def shortcut_gemm_refused(block: nn.Module) -> Optional[str]:
    """None when ``block``'s ``conv_shortcut`` is a plain 1x1 convolution (stride 1, no padding, one
    group) that may run as a GEMM onto ``conv2``'s output, else why not."""
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


class ResnetPatch(InstallPatch):
    """diffusers ``ResnetBlock2D``: :class:`ResnetForward` as the block's instance ``forward``."""

    name = "resnet"
    needs = ("group_norm",)
    doc = ("diffusers ResnetBlock2D: GroupNorm+SiLU, the time-embedding add and the 1x1 shortcut fused "
           "(the block's forward)")

    def candidates(self, ctx: Context):
        return (m for m in ctx.modules() if is_diffusers(m, "ResnetBlock2D"))

    def refused(self, block: nn.Module, ctx: Context) -> Optional[str]:
        variants = known(type(block), [("ResnetBlock2D.forward", type(block).forward)])
        if isinstance(variants, str):
            return variants
        if "forward" in block.__dict__:
            return "the block has an instance-level forward (e.g. an accelerate hook)"
        if not isinstance(getattr(block, "time_embedding_norm", None), str):
            return f"time_embedding_norm={getattr(block, 'time_embedding_norm', None)!r} is not a string"
        return None

    def make(self, block: nn.Module, ctx: Context) -> Any:
        (variant,) = known(type(block), [("ResnetBlock2D.forward", type(block).forward)])
        reason = shortcut_gemm_refused(block)
        if reason is not None and block.conv_shortcut is not None:
            ctx.left(self, block.conv_shortcut, f"the 1x1 shortcut stays a convolution: {reason}")
        return ResnetForward(block, variant, reason is None)

    def summary(self, count: int) -> str:
        return (f"{count} diffusers ResnetBlock2Ds run GroupNorm+SiLU (and the time-embedding add) in one kernel "
                "and a 1x1 shortcut as a GEMM onto conv2 (Triton backend)")
