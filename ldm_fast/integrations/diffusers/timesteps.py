"""diffusers ``Timesteps`` (the U-Net's sinusoidal time embedding): the ``timestep_embedding`` patch.

:class:`TimestepsForward` is diffusers' ``Timesteps.forward`` (0.30-0.42, ``get_timestep_embedding``
with the module's ``num_channels``, ``flip_sin_to_cos``, ``downscale_freq_shift`` and ``scale``) as
:func:`ldm_fast.functional.timestep_embedding`: one launch instead of about ten, on the Triton
backend; diffusers' own forward elsewhere and under torch.compile.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ... import backend, functional
from ..._fusion import class_method
from ...ops.timestep_embedding import TIMESTEP_DTYPES
from ...optimize.patch import Context, InstallPatch
from .supported import is_diffusers, known, module_function


class TimestepsForward:
    """diffusers ``Timesteps.forward`` in one kernel; the module's instance ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.diffusers_forward = self.cls.forward

    def __repr__(self) -> str:
        return "<ldm_fast Timesteps.forward: timestep_embedding in one kernel>"

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        m = self.module
        forward = class_method(m, self.cls, "forward", self.diffusers_forward)  # (a class swapped or patched since)
        if (forward is not self.diffusers_forward or torch.compiler.is_compiling()
                or not backend.kernel_ok(timesteps, dtypes=TIMESTEP_DTYPES)):
            return forward(m, timesteps)
        return functional.timestep_embedding(timesteps, m.num_channels, flip_sin_to_cos=bool(m.flip_sin_to_cos),
                                             downscale_freq_shift=m.downscale_freq_shift, scale=m.scale)


class TimestepsPatch(InstallPatch):
    """diffusers ``Timesteps``: :class:`TimestepsForward` as the module's instance ``forward``."""

    name = "timestep_embedding"
    doc = "diffusers Timesteps: the sinusoidal time embedding in one kernel (about ten launches)"

    def candidates(self, ctx: Context):
        return (m for m in ctx.modules() if is_diffusers(m, "Timesteps"))

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(module)
        reason = known(cls, [("Timesteps.forward", cls.forward),
                             ("get_timestep_embedding", module_function(cls, "get_timestep_embedding"))])
        if isinstance(reason, str):
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

    def make(self, module: nn.Module, ctx: Context) -> Any:
        return TimestepsForward(module)

    def summary(self, count: int) -> str:
        return f"{count} diffusers Timesteps run ldm_fast.functional.timestep_embedding (one kernel; Triton backend)"
