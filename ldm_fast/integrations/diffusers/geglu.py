"""diffusers ``GEGLU`` (the transformer blocks' feed-forward gate): the ``geglu`` patch.

:class:`GEGLUForward` is diffusers' ``GEGLU.forward`` (0.30-0.42): ``proj``, then ``hidden *
gelu(gate)`` as one :func:`ldm_fast.functional.geglu` kernel reading the projection in place (3F
elements a row instead of 5F, one launch instead of two) on the Triton backend; diffusers' own
forward elsewhere, under torch.compile (Inductor fuses the two itself) and for the deprecated
``scale`` argument. ``proj`` is always called, so a LoRA layer on it is honoured.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn

from ... import backend, functional
from ..._fusion import class_method
from ...optimize.patch import Context, InstallPatch
from .supported import is_diffusers, known


class GEGLUForward:
    """diffusers ``GEGLU.forward`` with the gate in one kernel; the module's instance ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.diffusers_forward = self.cls.forward

    def __repr__(self) -> str:
        return "<ldm_fast GEGLU.forward: the gate in one kernel>"

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        forward = class_method(module, self.cls, "forward", self.diffusers_forward)  # (a class swapped or patched since)
        if (forward is not self.diffusers_forward or args or kwargs or torch.compiler.is_compiling()
                or not backend.kernel_ok(hidden_states)):
            return forward(module, hidden_states, *args, **kwargs)
        return functional.geglu(module._modules["proj"](hidden_states))


class GEGLUPatch(InstallPatch):
    """diffusers ``GEGLU``: :class:`GEGLUForward` as the module's instance ``forward``."""

    name = "geglu"
    doc = "diffusers GEGLU: the gate (gelu(gate) * hidden) in one kernel reading the projection in place"

    def candidates(self, ctx: Context):
        return (m for m in ctx.modules() if is_diffusers(m, "GEGLU"))

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(module)
        reason = known(cls, [("GEGLU.forward", cls.forward), ("GEGLU.gelu", getattr(cls, "gelu", None))])
        if isinstance(reason, str):
            return reason
        if "forward" in module.__dict__ or "gelu" in module.__dict__:
            return "the module has an instance-level forward or gelu"
        npu = getattr(sys.modules.get(cls.__module__), "is_torch_npu_available", None)
        if callable(npu) and npu():
            return "torch_npu is available: diffusers runs its own npu_geglu there"
        return None

    def make(self, module: nn.Module, ctx: Context) -> Any:
        return GEGLUForward(module)

    def summary(self, count: int) -> str:
        return f"{count} diffusers GEGLU gates run ldm_fast.functional.geglu (one kernel; Triton backend)"
