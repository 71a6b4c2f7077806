"""attention: softmax(q k^T * scale) v per batch and head, no mask (checks, kernel or SDPA, autograd,
torch.library ops, in that order).

The kernel takes q, k, v as ``[B, H, N, D]`` views (read in place through strides) and writes out
``[B, Nq, H, D]``; it saves the fp32 base-2 log-sum-exp ``[B, H, Nq]`` for the backward.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import attention as _kernels
from ._common import apply, check_float, check_same_device, finite_float, first_order, launch, needs_grad

ATTENTION_ROUTES_FILE = Path(__file__).resolve().parent.parent / "attention_routes.json"


def attention(q: Tensor, k: Tensor, v: Tensor, *, heads: Optional[int] = None, scale: Optional[float] = None,
              impl: str = "auto") -> Tensor:
    """Scaled dot-product attention, ``softmax(q @ k^T * scale) @ v`` per batch and head, no mask.

    Layouts (both read in place through strides: no transpose, no contiguous copy):

    * q ``[B, Nq, heads*D]``, k ``[B, Nk, heads*D]``, v ``[B, Nk, heads*Dv]`` (what ``to_q``/``to_k``/
      ``to_v`` Linear layers produce, or slices of one fused qkv projection) -> ``[B, Nq, heads*Dv]``,
      ready for the output projection; ``heads=None`` means one head;
    * q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` like ``F.scaled_dot_product_attention`` ->
      ``[B, H, Nq, D]`` (a transposed view of a ``[B, Nq, H, D]`` buffer, as FlashAttention returns).

    ``scale`` defaults to ``D ** -0.5``. Self or cross attention (any Nk >= 1, Nq != Nk), head dims
    up to 512, fp32/fp16/bf16; differentiable in q, k and v (the backward in Triton too; first
    order: a double backward raises).

    ``impl`` (overridden by ``LDM_FAST_ATTENTION``):
    ``"sdpa"`` runs ``F.scaled_dot_product_attention`` (cuDNN/Flash/memory-efficient kernels);
    ``"triton"`` runs ldm_fast's kernel (FlashAttention-2 style with fp32 softmax statistics; head
    dims above 256, the SD VAE's 512, tiled over D; fp32 inputs multiply as TF32 on a GPU);
    ``"auto"`` runs the kernel only where the GPU benchmark measured it faster than SDPA on this
    GPU (``ldm_fast/attention_routes.json``), SDPA everywhere else. The kernel runs where the
    backend allows it (CUDA, or forced with ``LDM_FAST_BACKEND=triton``); a case it does not cover
    (fp64, head dim above 512, Dv != D, Nk = 0) runs SDPA. The backward is deterministic.

    Eager equivalent: ``F.scaled_dot_product_attention(q4, k4, v4, scale=scale)`` on the
    ``[B, H, N, D]`` views (``q.unflatten(2, (heads, D)).transpose(1, 2)``), merged back to
    ``[B, Nq, heads*D]`` for the 3-d layout.
    """
    heads, scale = _check_attention_args(q, k, v, heads, scale)
    impl = backend.attention_impl(impl)
    flat = q.dim() == 3
    if flat:
        # [B, N, heads*D] -> [B, heads, N, D] views (splitting one dim always views; view is one C call
        # where Tensor.unflatten is Python)
        q4 = q.view(q.shape[0], q.shape[1], heads, q.shape[2] // heads).transpose(1, 2)
        k4 = k.view(k.shape[0], k.shape[1], heads, k.shape[2] // heads).transpose(1, 2)
        v4 = v.view(v.shape[0], v.shape[1], heads, v.shape[2] // heads).transpose(1, 2)
    else:
        q4, k4, v4 = q, k, v
    if (impl != "sdpa" and q4.shape[3] <= _kernels.MAX_HEAD_DIM and v4.shape[3] == q4.shape[3] and k4.shape[2] > 0
            and q4.numel() > 0 and backend.kernel_ok(q, k, v) and _kernels.fits_int32(q4, k4, v4)):
        compiling = torch.compiler.is_compiling()
        if impl == "triton" or (not compiling and attention_route(q.device, q.dtype, q4.shape[3], q4.shape[2],
                                                                  k4.shape[2]) == "triton"):
            if compiling:
                out = torch.ops.ldm_fast.attention(q4, k4, v4, scale)[0]
            elif needs_grad(q, k, v):
                out = apply(_AttentionFunction, q4, k4, v4, scale)
            else:
                out = launch("attention", _kernels.attention_fwd, q4, k4, v4, scale, lse=False)[0]
            return out.flatten(2) if flat else out.transpose(1, 2)  # from [B, Nq, H, D]
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, scale=scale)  # [B, H, Nq, Dv]
    return out.transpose(1, 2).flatten(2) if flat else out


def _check_attention_args(q, k, v, heads, scale) -> tuple[int, float]:
    """Validate attention's arguments (errors name the argument); return ``(heads, scale)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):  # the checks inline: each helper call is host time
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            check_float(name, x)
    if not q.dim() == k.dim() == v.dim() or q.dim() not in (3, 4):
        raise ValueError(
            "attention: q, k and v must all be [B, N, heads*D] or all [B, H, N, D], got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        check_same_device("k", k, "q", q)
        check_same_device("v", v, "q", q)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"attention: heads must be a positive int or None, got {heads!r}")
    if q.dim() == 4:
        if heads is not None and heads != q.shape[1]:
            raise ValueError(f"attention: heads={heads} but q [B, H, N, D] has H={q.shape[1]}")
        heads = q.shape[1]
        if k.shape[1] != heads or v.shape[1] != heads:
            raise ValueError(f"attention: k and v must have q's {heads} heads, got shapes {tuple(k.shape)}, {tuple(v.shape)}")
    else:
        heads = 1 if heads is None else heads
        if q.shape[2] % heads:
            raise ValueError(f"attention: q's last dim ({q.shape[2]}) must be divisible by heads ({heads})")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"attention: k's last dim must equal q's ({q.shape[2]} = heads*D), got {k.shape[2]}")
        if v.shape[2] % heads:
            raise ValueError(f"attention: v's last dim ({v.shape[2]}) must be divisible by heads ({heads})")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"attention: q, k and v must have one batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    seq = -2 if q.dim() == 4 else 1
    if k.shape[seq] != v.shape[seq]:
        raise ValueError(f"attention: k and v must have one sequence length, got {k.shape[seq]} and {v.shape[seq]}")
    head_dim = q.shape[-1] if q.dim() == 4 else q.shape[2] // heads
    if q.dim() == 4 and k.shape[-1] != head_dim:
        raise ValueError(f"attention: k's head dim must equal q's ({head_dim}), got {k.shape[-1]}")
    if scale is None:
        return heads, head_dim ** -0.5
    return heads, finite_float("attention: scale", scale)


# routing of impl="auto": the measured table


@functools.lru_cache(maxsize=None)
def _attention_routes() -> dict:
    """``attention_routes.json``: per GPU name, the cases where the GPU benchmark measured the Triton
    kernel faster than SDPA (``python -m benchmarks.bench_attention --write-routes`` writes it)."""
    routes: dict = {}
    for entry in json.loads(ATTENTION_ROUTES_FILE.read_text())["routes"]:
        routes.setdefault(entry["device"], []).append(entry)
    return routes


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def attention_route(device: torch.device, dtype: torch.dtype, head_dim: int, nq: int, nk: int) -> str:
    """What ``impl="auto"`` runs for this case: ``"triton"`` where a measurement on this GPU (by name)
    says the kernel is faster than SDPA for this dtype and head dim at these sequence lengths or
    longer, else ``"sdpa"``."""
    for entry in _attention_routes().get(_device_name(device), ()):
        if (entry["dtype"] == str(dtype).removeprefix("torch.") and entry["head_dim"] == head_dim
                and nq >= entry["min_q"] and nk >= entry["min_k"]):
            return "triton"
    return "sdpa"


class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse = launch("attention", _kernels.attention_fwd, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = launch("attention", _kernels.attention_bwd, grad.transpose(1, 2), q, k, v, out, lse, ctx.scale)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


# torch.compile: one op forward (out and the lse), one backward


@torch.library.custom_op("ldm_fast::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return launch("attention", _kernels.attention_fwd, q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    B, H, NQ, D = q.shape
    out = q.new_empty((B, NQ, H, D))
    return out, q.new_empty((B, H, NQ), dtype=torch.float32)


@torch.library.custom_op("ldm_fast::attention_backward", mutates_args=())
def _attention_backward_op(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return launch("attention", _kernels.attention_bwd, grad, q, k, v, out, lse, scale)


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, scale):
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    return q.new_empty((B, NQ, H, D)), k.new_empty((B, NK, H, D)), k.new_empty((B, NK, H, D))


def _attention_setup(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, grad, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad.transpose(1, 2), q, k, v, out, lse, ctx.scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)
