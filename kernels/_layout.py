"""Host-side layout helpers shared by the elementwise launchers."""

from __future__ import annotations

import torch


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View ``x`` of shape ``[R, *rest]`` as R rows of ``K = prod(rest)`` contiguous elements.

    Returns ``(x, row_stride)`` when every row is already contiguous (a channel slice of a
    ``[B, 2C, H, W]`` moments tensor is: its rows are ``2*C*H*W`` apart), else a contiguous copy
    and its row stride ``K``. A 1-d tensor is one row.
    """
    if x.dim() <= 1:
        x = x.contiguous()
        return x, x.numel()
    rows = x.shape[0]
    inner = x[0] if rows > 0 else x
    if rows > 0 and inner.is_contiguous():
        return x, (x.stride(0) if rows > 1 else inner.numel())
    x = x.contiguous()
    return x, x[0].numel() if rows > 0 else 0
