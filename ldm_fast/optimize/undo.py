"""The undo records :func:`ldm_fast.optimize` leaves on a model: plain data holding module
references (so ``copy.deepcopy`` maps them to the copy), each able to say whether the model was
changed since (``conflict``) and to put back what it changed (``undo``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import nn

from .report import OptimizeReport

_STATE_ATTR = "_ldm_fast_optimized"


@dataclass
class _SetClass:
    module: nn.Module
    old: type
    new: type

    def conflict(self) -> Optional[str]:
        if type(self.module) is not self.new:
            return f"the class of a module is {type(self.module).__name__}, not {self.new.__name__} as optimize left it"
        return None

    def undo(self) -> None:
        self.module.__class__ = self.old


class _Missing:
    """The "attribute was absent" marker; pickles and deep-copies as the one module-level instance."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


@dataclass
class _SetAttr:
    """A plain (non-module) instance attribute set, e.g. ``activation`` or an instance-level
    ``forward``; undo puts back the old value or deletes it. With ``new`` given, restore refuses
    when the attribute no longer holds that object (it was replaced after optimize)."""

    module: nn.Module
    name: str
    old: Any = _MISSING
    new: Any = _MISSING

    def conflict(self) -> Optional[str]:
        if self.new is not _MISSING and self.module.__dict__.get(self.name, _MISSING) is not self.new:
            return f"the {self.name} of a {type(self.module).__name__} was replaced after optimize"
        return None

    def undo(self) -> None:
        if self.old is _MISSING:
            self.module.__dict__.pop(self.name, None)
        else:
            self.module.__dict__[self.name] = self.old


@dataclass
class _SetChild:
    """A child module replaced (a Sequential entry); undo puts the original module object back."""

    parent: nn.Module
    key: str
    old: nn.Module
    new: nn.Module

    def conflict(self) -> Optional[str]:
        if self.parent._modules.get(self.key) is not self.new:
            return f"entry {self.key!r} of a {type(self.parent).__name__} was replaced after optimize"
        return None

    def undo(self) -> None:
        self.parent._modules[self.key] = self.old


@dataclass
class _Restride:
    """A parameter/buffer (and its grad) stored in another memory format; undo restores the strides."""

    module: nn.Module
    name: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    def conflict(self) -> Optional[str]:
        return None

    def undo(self) -> None:
        tensor = self.module._parameters.get(self.name)
        if tensor is None:
            tensor = self.module._buffers.get(self.name)
        if tensor is None:
            return
        tensor.data = _with_strides(tensor.data, self.shape, self.stride)
        if tensor.grad is not None:
            tensor.grad = _with_strides(tensor.grad, self.shape, self.stride)


@dataclass
class _Unpack:
    """Linear weights packed into one buffer (a ``ldm_fast.nn.PackedLinears``: the attention
    projections, the ResNet time projections); undo gives each weight still in the buffer its own
    storage again (a weight re-allocated since is left as it is)."""

    pack: Any

    def conflict(self) -> Optional[str]:
        return None

    def undo(self) -> None:
        self.pack.unpack()


def _with_strides(t: torch.Tensor, shape, stride) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or tuple(t.stride()) == tuple(stride):
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


@dataclass
class _State:
    """The bookkeeping :func:`optimize` leaves on the model (``model._ldm_fast_optimized``)."""

    report: OptimizeReport
    records: list
