"""Drop-in modules backed by the fused kernels.

Each is a subclass of its ``torch.nn`` counterpart with the same parameters, so a checkpoint saved
from the torch module loads unchanged (and back), and ``isinstance(m, torch.nn.GroupNorm)`` holds.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor

from . import functional
from .functional import GROUP_NORM_ACTIVATIONS

__all__ = ["GroupNorm", "GroupNorm32"]


def _torch_group_norm_takes_bias() -> bool:
    """Whether ``torch.nn.GroupNorm.__init__`` has the ``bias`` argument (torch >= 2.12)."""
    return "bias" in inspect.signature(torch.nn.GroupNorm.__init__).parameters


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` with an optional fused SiLU: ``activation=None`` or ``"silu"``.

    Input ``[B, C, *spatial]`` (NCHW or channels-last), output the same shape, dtype and layout.
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

    def forward(self, input: Tensor) -> Tensor:
        return functional.group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation
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

    def forward(self, input: Tensor) -> Tensor:
        return functional._group_norm(
            input, self.num_groups, self.weight, self.bias, self.eps, self.activation, None, upcast=True
        )
