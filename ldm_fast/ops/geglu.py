"""geglu: the gated GELU of the SD transformer blocks' feed-forward, one pass over the projection
(checks, kernel or reference, autograd, in that order).

Under torch.compile it traces the eager reference: Inductor fuses the chunk, gelu and multiply
itself (the issue #16 policy: a fusion steps aside under compile unless measured faster), so no
torch.library op is registered.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend
from ..kernels import geglu as _kernels
from ._common import apply, check_float, first_order, launch, needs_grad

APPROXIMATE = _kernels.APPROXIMATE


def geglu(proj: Tensor, approximate: str = "none") -> Tensor:
    """``hidden * gelu(gate)`` with ``hidden, gate = proj.chunk(2, dim=-1)``: proj ``[..., 2F]`` (what
    diffusers' ``GEGLU.proj`` Linear produces; any leading dims, the last contiguous, rows may be
    strided) -> ``[..., F]`` in proj's dtype. The kernel reads both halves in place and computes in
    fp32 (3F elements moved per row against eager's 5F); ``approximate``: ``"none"`` (erf) or
    ``"tanh"``. Differentiable in proj (backward in one Triton pass; first order).

    Eager equivalent (diffusers ``GEGLU.forward`` after ``proj``, bit for bit on the eager backend):
    ``hidden, gate = proj.chunk(2, dim=-1); hidden * F.gelu(gate, approximate=approximate)``.
    """
    if not (isinstance(proj, Tensor) and proj.is_floating_point()):
        check_float("proj", proj)
    if proj.dim() < 1 or proj.shape[-1] % 2:
        raise ValueError(f"geglu: proj must be [..., 2F] with an even last dim, got shape {tuple(proj.shape)}")
    if approximate not in APPROXIMATE:
        raise ValueError(f"geglu: approximate must be one of {APPROXIMATE}, got {approximate!r}")
    if (proj.numel() and proj.stride(-1) == 1 and not torch.compiler.is_compiling()
            and backend.kernel_ok(proj)):
        if needs_grad(proj):
            return apply(_GEGLUFunction, proj, approximate)
        return launch("geglu", _kernels.geglu_fwd, proj, approximate, checked=True)
    return _kernels.geglu_reference(proj, approximate)


class _GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, approximate):
        ctx.save_for_backward(proj)
        ctx.approximate = approximate
        return launch("geglu", _kernels.geglu_fwd, proj, approximate, checked=True)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (proj,) = ctx.saved_tensors
        return launch("geglu", _kernels.geglu_bwd, grad.contiguous(), proj, ctx.approximate), None
