"""One reverse-diffusion step of DDIM or DDPM, classifier-free guidance included, in one pass.

    eps = eps_u + s * (eps_c - eps_u)        (guidance: the two batch halves of one [2B, ...]
                                              model output, unconditional first; else eps as given)
    x0  = (x - sqrt(1 - a_t) * eps) / sqrt(a_t)          (optionally clipped to [-clip, clip])
    x_prev = c_x0 * x0 + c_eps * eps + c_x * x + std * z

with a_t the cumulative alpha at the current timestep and a_prev at the one the step lands on:

    DDIM:  c_x0 = sqrt(a_prev), c_eps = sqrt(1 - a_prev - sigma^2), c_x = 0, std = sigma,
           sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    DDPM:  beta = 1 - a_t / a_prev (the step's beta), c_x0 = sqrt(a_prev) * beta / (1 - a_t),
           c_x = sqrt(1 - beta) * (1 - a_prev) / (1 - a_t), c_eps = 0,
           std = sqrt((1 - a_prev) / (1 - a_t) * beta)      (variance "fixed_small")

The six coefficients (``1/sqrt(a_t)``, ``sqrt(1 - a_t)``, c_x0, c_eps, c_x, std) are computed on
the host in float64 (:func:`step_coefficients`) and reach the kernel either by value as fp32
scalars, or as a row of a float32 table on the device picked by an index that is an int or an
integer tensor on the device (read by the kernel: no host sync, CUDA-graph safe, no recompiles
under torch.compile). z is a given tensor or drawn in-kernel (Philox by (seed, row, column), the
numbers q_sample and reparameterize draw for the same seed). Math in fp32, I/O in x's dtype.

Tensors are R = B rows of K elements (``as_rows``), in x's own memory order: a channels-last x
(and model output) is read and written channels-last, without a copy.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from ._layout import as_rows, row_block, row_blocks
from ._random import randn_row_block, seed_args
from ._triton import DEVICE_ASSERTS, tl, triton
from ._launch import kernel

NUM_WARPS = 4
METHODS = ("ddim", "ddpm")
#: Columns of a coefficient table row (and fields of :class:`StepCoefficients`).
NUM_COEFFICIENTS = 6


class StepCoefficients(NamedTuple):
    """The scalars of one step (see the module docstring), Python floats computed in float64."""

    inv_sqrt_alpha: float  # 1 / sqrt(a_t)
    sqrt_one_minus_alpha: float  # sqrt(1 - a_t)
    c_x0: float
    c_eps: float
    c_x: float
    std: float


def step_coefficients(alpha_t: float, alpha_prev: float, method: str = "ddim", eta: float = 0.0) -> StepCoefficients:
    """The coefficients of a step from cumulative alpha ``alpha_t`` to ``alpha_prev``, in float64.

    ``method``: ``"ddim"`` (with ``eta``: 0 deterministic, 1 the DDPM posterior variance) or
    ``"ddpm"`` (the posterior mean and its "fixed_small" variance; ``eta`` unused). The caller has
    checked ``0 < alpha_t < 1``, ``0 < alpha_prev <= 1``, and ``alpha_t <= alpha_prev`` where a
    variance is involved.
    """
    a, ap = float(alpha_t), float(alpha_prev)
    inv_sqrt_a, s = 1.0 / math.sqrt(a), math.sqrt(1.0 - a)
    beta = (ap - a) / ap  # 1 - a_t / a_prev, without the cancellation
    var = (1.0 - ap) / (1.0 - a) * beta
    if method == "ddpm":
        return StepCoefficients(inv_sqrt_a, s, math.sqrt(ap) * beta / (1.0 - a), 0.0,
                                math.sqrt(a / ap) * (1.0 - ap) / (1.0 - a), math.sqrt(max(var, 0.0)))
    sigma = float(eta) * math.sqrt(max(var, 0.0)) if eta else 0.0
    return StepCoefficients(inv_sqrt_a, s, math.sqrt(ap), math.sqrt(max(1.0 - ap - sigma * sigma, 0.0)), 0.0, sigma)


@kernel
@triton.jit(do_not_specialize=["seed", "index"])
def _sampler_step_kernel(
    eps_ptr, x_ptr, noise_ptr, out_ptr,  # eps [R or 2R, K] rows; x, noise [R, K] rows; out [R, K] (row stride K)
    coef_ptr, index_ptr,                 # coefficient table [N, 6] fp32; index [] / [R] (stride index_stride)
    K, eps_row_stride, cond_offset, x_row_stride, noise_row_stride, out_row_stride, n_col_blocks,
    inv_sqrt_a, sqrt_1ma, c_x0, c_eps, c_x, std,  # by value (COEF_FROM_PTR False)
    guidance, clip, index, index_stride, n_index,
    seed, seed_ptr,
    CFG: tl.constexpr, CLIP: tl.constexpr, NOISE: tl.constexpr,  # NOISE: 0 none, 1 given tensor, 2 in-kernel
    COEF_FROM_PTR: tl.constexpr, INDEX_FROM_PTR: tl.constexpr, CHECK_INDEX: tl.constexpr,
    SEED_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
):
    i_row, i_col, row, o_col, m_col = row_block(n_col_blocks, K, BLOCK)
    if COEF_FROM_PTR:  # one row of the table, picked on the device
        if INDEX_FROM_PTR:  # any integer dtype, read in place (a scalar index has stride 0)
            i_coef = tl.load(index_ptr + row * index_stride).to(tl.int64)
        else:
            i_coef = index.to(tl.int64)
        if CHECK_INDEX:  # launched with debug=True, as torch's own index asserts
            tl.device_assert((i_coef >= 0) & (i_coef < n_index), "sampler_step: index out of the coefficient table")
        p_coef = coef_ptr + i_coef * 6
        inv_sqrt_a = tl.load(p_coef)
        sqrt_1ma = tl.load(p_coef + 1)
        c_x0 = tl.load(p_coef + 2)
        c_eps = tl.load(p_coef + 3)
        c_x = tl.load(p_coef + 4)
        std = tl.load(p_coef + 5)

    b_x = tl.load(x_ptr + row * x_row_stride + o_col, mask=m_col).to(tl.float32)
    p_eps = eps_ptr + row * eps_row_stride + o_col
    if CFG:  # the unconditional half first, the conditional half cond_offset elements later
        b_u = tl.load(p_eps, mask=m_col).to(tl.float32)
        b_c = tl.load(p_eps + cond_offset, mask=m_col).to(tl.float32)
        b_eps = b_u + guidance * (b_c - b_u)
    else:
        b_eps = tl.load(p_eps, mask=m_col).to(tl.float32)
    b_x0 = (b_x - sqrt_1ma * b_eps) * inv_sqrt_a
    if CLIP:
        b_x0 = tl.minimum(tl.maximum(b_x0, -clip), clip)
    b_out = c_x0 * b_x0 + c_eps * b_eps + c_x * b_x
    if NOISE == 1:
        b_out += std * tl.load(noise_ptr + row * noise_row_stride + o_col, mask=m_col).to(tl.float32)
    elif NOISE == 2:
        if SEED_FROM_PTR:  # drawn on the device (CUDA-graph replays and compiled graphs draw anew)
            seed = tl.load(seed_ptr)
        b_out += std * randn_row_block(seed, i_row, i_col * BLOCK, BLOCK)
    tl.store(out_ptr + row * out_row_stride + o_col, b_out.to(out_ptr.dtype.element_ty), mask=m_col)


def memory_order(x: torch.Tensor) -> Optional[list]:
    """The permutation of x's dims that lists them outermost first by stride (batch kept first), or
    None when that is the identity. Reading every operand through it visits x's memory in order."""
    if x.dim() < 3 or x.is_contiguous():
        return None
    inner = sorted(range(1, x.dim()), key=lambda d: (-x.stride(d), d))
    return None if inner == list(range(1, x.dim())) else [0] + inner


def empty_in_memory_order(x: torch.Tensor, order: Optional[list] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, out_rows)``: a new tensor of x's shape and dtype, dense in x's memory order
    (:func:`memory_order`: a channels-last x gets a channels-last out), and the same memory as
    that order's contiguous view, which the kernel writes."""
    if order is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return out, out
    rows = torch.empty([x.shape[d] for d in order], dtype=x.dtype, device=x.device)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return rows.permute(inverse), rows


def sampler_step_fwd(model_output, x, coefficients, index, noise, seed, guidance_scale: Optional[float],
                     clip_sample: Optional[float], add_noise: bool, *, check_index: bool = False) -> torch.Tensor:
    """Launch the kernel once; returns x_prev with x's shape, dtype and memory layout. One launch and
    nothing else on the device (no copy of a row-strided or channels-last operand, no cast).

    model_output: eps ``[B, *rest]``, or ``[2B, *rest]`` (unconditional rows first) when
    ``guidance_scale`` is a float; x: ``[B, *rest]``; coefficients: a :class:`StepCoefficients`
    (passed by value), or a float32 table ``[N, 6]`` on x's device whose row ``index`` (an int, or
    an integer tensor ``[]``/``[1]``/``[B]`` on x's device, read in place; asserted in
    ``[0, N)`` on the device with ``check_index``) holds them; noise: x's shape, or None: then with
    ``add_noise`` z is drawn in-kernel from ``seed`` (an int, or a one-element int64 tensor on the
    device; None when nothing is drawn). Without ``add_noise`` the std term is skipped, whether or
    not a noise tensor is given (as the eager path does).
    Eager equivalent: :func:`sampler_step_reference`.
    """
    order = memory_order(x)
    out, out_rows = empty_in_memory_order(x, order)
    if out.numel() == 0:
        return out
    batch = x.shape[0]
    view = (lambda t: t.permute(order)) if order is not None else (lambda t: t)
    x_rows, x_rs = as_rows(view(x))
    eps_rows, eps_rs = as_rows(view(model_output))
    out_rs = out_rows.numel() // batch  # contiguous in x's order
    has_noise = add_noise and noise is not None  # a given z is ignored without add_noise, as eager does
    noise_rows, noise_rs = as_rows(view(noise)) if has_noise else (x_rows, 0)
    K = out.numel() // batch
    block, n_col_blocks, n_programs = row_blocks(batch, K)
    cfg = guidance_scale is not None
    from_table = isinstance(coefficients, torch.Tensor)
    if from_table:
        table = coefficients if coefficients.is_contiguous() else coefficients.contiguous()
        values = (0.0,) * NUM_COEFFICIENTS
        index_from_ptr = isinstance(index, torch.Tensor)
        index_ptr, index_stride, index_value = (
            (index, index.stride(0) if index.dim() and index.shape[0] > 1 else 0, 0) if index_from_ptr
            else (table, 0, int(index))
        )
        n_index = table.shape[0]
    else:
        table, values, index_from_ptr = x_rows, tuple(float(v) for v in coefficients), False
        index_ptr, index_stride, index_value, n_index = x_rows, 0, 0, 0
    noise_mode = 1 if has_noise else (2 if add_noise else 0)
    seed_value, seed_ptr = seed_args(seed if noise_mode == 2 and seed is not None else 0)
    check = bool(check_index and from_table and index_from_ptr)
    _sampler_step_kernel[(n_programs,)](
        eps_rows, x_rows, noise_rows, out_rows,
        table, index_ptr,
        K, eps_rs, batch * eps_rs if cfg else 0, x_rs, noise_rs, out_rs, n_col_blocks,
        *values,
        float(guidance_scale) if cfg else 0.0, float(clip_sample) if clip_sample is not None else 0.0,
        index_value, index_stride, n_index,
        seed_value, seed_ptr if isinstance(seed_ptr, torch.Tensor) else x_rows,
        CFG=cfg, CLIP=clip_sample is not None, NOISE=noise_mode,
        COEF_FROM_PTR=from_table, INDEX_FROM_PTR=index_from_ptr, CHECK_INDEX=check,
        SEED_FROM_PTR=isinstance(seed_ptr, torch.Tensor), BLOCK=block, num_warps=NUM_WARPS,
        **(DEVICE_ASSERTS if check else {}),
    )
    return out


def sampler_step_reference(model_output, x, coefficients, noise=None, guidance_scale: Optional[float] = None,
                           clip_sample: Optional[float] = None, index=None) -> torch.Tensor:
    """Eager reference: the same formula in plain PyTorch, x_prev in x's dtype.

    Arguments as in :func:`sampler_step_fwd`, with ``noise`` the z to add (None: no noise term).
    ``coefficients``: a :class:`StepCoefficients` (terms with a zero coefficient are skipped), or
    a table ``[N, 6]`` with ``index`` (int or integer tensor ``[]``/``[1]``/``[B]``), gathered on
    the device. Math in fp32 (fp64 for fp64 x): the float coefficients enter as the kernel gets
    them (rounded to fp32), or at full precision for fp64.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    eps = model_output.to(compute)
    if guidance_scale is not None:
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
    xc = x.to(compute)
    if isinstance(coefficients, torch.Tensor):
        rows = coefficients.to(device=x.device, dtype=compute)[index].reshape(-1, NUM_COEFFICIENTS)
        inv_sqrt_a, s, c_x0, c_eps, c_x, std = rows.reshape((rows.shape[0],) + (1,) * (x.dim() - 1) + (-1,)).unbind(-1)
        x0 = (xc - s * eps) * inv_sqrt_a
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        out = c_x0 * x0 + c_eps * eps + c_x * xc
        if noise is not None:
            out = out + std * noise.to(compute)
        return out.to(x.dtype)
    inv_sqrt_a, s, c_x0, c_eps, c_x, std = coefficients
    x0 = (xc - s * eps) * inv_sqrt_a
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    out = c_x0 * x0
    if c_eps:
        out = out + c_eps * eps
    if c_x:
        out = out + c_x * xc
    if noise is not None and std:
        out = out + std * noise.to(compute)
    return out.to(x.dtype)


Coefficients = Union[StepCoefficients, torch.Tensor]
