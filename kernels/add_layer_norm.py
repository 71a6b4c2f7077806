"""Add + LayerNorm: the residual stream of the SD transformer blocks, one pass over each row.

    s   = x + residual                                   # [..., C], rounded to x's dtype
    out = layer_norm(s) = (s - mean) * rstd * weight + bias
    mean = sum(s) / C,  rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)

(diffusers ``BasicTransformerBlock``: ``hidden_states = attn_output + hidden_states`` then
``norm_hidden_states = self.norm2(hidden_states)``.) The statistics are computed from the ROUNDED
sum, as eager computes them from the stored ``s``, so ``s`` is bit-identical to eager's and
``out`` differs from eager's only by fp32 rounding order. Math in fp32 whatever the storage dtype.

Optional ``s_bias`` [C] (the ``HAS_S_BIAS`` flag): the first output becomes ``s + s_bias``, rounded
again to the storage dtype (eager's ``(x + residual) + s_bias``, bit for bit), while ``out``, mean
and rstd stay those of the unbiased ``s``. With s_bias = the bias of the Linear whose output is
later added to ``s`` (diffusers' ``ff(norm(s)) + s``), the caller folds that residual add into the
GEMM: ``torch.addmm(s + s_bias, g, W.t())``. Forward only: the op's autograd runs the reference.

Traffic per row of C elements: eager runs the add (reads 2C, writes C) and layer_norm (reads C,
writes C): 5C in two launches. The kernel reads x and residual once and writes s and out: 4C in
one launch (plus 8 bytes of statistics a row, for the backward). With s_bias: one more [C] read
a program (as weight and bias), nothing more.

Backward: no kernel of its own. ``s`` is all the layer norm's backward needs beside the saved
mean and rstd, so the op's autograd calls ``aten.native_layer_norm_backward`` on them (what eager's
``F.layer_norm`` backward runs) and adds the upstream gradient of ``s``: ``dx = dresidual = ds +
dL/ds``.

Plan: each program takes ROWS rows x BLOCK_C columns, BLOCK_C the next power of two >= C (the
whole row in registers: one read, two-pass variance from registers), ROWS = TILE / BLOCK_C rows
(at least 1) so a program holds TILE elements (16 a thread at 8 warps: 128-bit accesses). x and
residual are read in place as ``[B, N, C]`` views with any strides (row r at ``(r // N) * batch
stride + (r % N) * row stride``, int64; Triton specializes a column stride of 1, so contiguous rows
keep their 128-bit loads); s and out are written contiguous. Above :data:`MAX_C` columns the op
runs the eager reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as TF

from ._grid import check_grid
from ._triton import cdiv, next_pow2, tl, triton
from ._launch import kernel

TILE = 4096  # elements per program at 8 warps: 16 per thread
MAX_C = 8192  # the widest row held in registers (16 warps, 16 fp32 a thread per tensor)


@triton.jit
def _to_storage(b, dtype: tl.constexpr, BF16_RNE: tl.constexpr):
    """An fp32 block in the storage dtype. ``BF16_RNE`` (set only under Triton's CPU interpreter,
    whose fp32 -> bf16 cast truncates where a GPU rounds to nearest even) rounds the fp32 bits to
    nearest even first, so the truncating cast is exact and ``s`` is eager's bit for bit there too."""
    if BF16_RNE:
        b_bits = b.to(tl.uint32, bitcast=True)
        b_bits = (b_bits + (0x7FFF + ((b_bits >> 16) & 1))) & 0xFFFF0000
        b = b_bits.to(tl.float32, bitcast=True)
    return b.to(dtype)


@kernel
@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr, res_ptr,  # x, residual [R, C]: row r = (b, n), b = r // N, n = r % N, strides below
    w_ptr, b_ptr, sb_ptr,  # weight, bias, s_bias [C] (each read only under its HAS_ flag)
    s_ptr, out_ptr, mean_ptr, rstd_ptr,  # s (+ s_bias) [R, C] x's dtype, out [R, C] out's dtype; mean, rstd [R] fp32 (STORE_STATS)
    R, C, N, x_sb, x_sn, x_sc, r_sb, r_sn, r_sc, eps,  # N rows a batch; (batch, row, column) strides of x, residual
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_S_BIAS: tl.constexpr, STORE_STATS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr, BF16_RNE: tl.constexpr, OUT_BF16_RNE: tl.constexpr,
):
    i_pid = tl.program_id(0)
    o_row = i_pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS] int64
    o_col = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    m_row = o_row < R
    m_col = o_col < C
    m = m_row[:, None] & m_col[None, :]
    o_b, o_n = o_row // N, o_row % N  # [ROWS] int64
    b_x = tl.load(x_ptr + (o_b * x_sb + o_n * x_sn)[:, None] + o_col[None, :] * x_sc, mask=m, other=0.0)
    b_r = tl.load(res_ptr + (o_b * r_sb + o_n * r_sn)[:, None] + o_col[None, :] * r_sc, mask=m, other=0.0)
    # the sum rounded to the storage dtype, as eager stores it; the statistics come from that value
    b_s_low = _to_storage(b_x.to(tl.float32) + b_r.to(tl.float32), s_ptr.dtype.element_ty, BF16_RNE)
    o_out = o_row[:, None] * C + o_col[None, :]
    if HAS_S_BIAS:  # the first output is s + s_bias, rounded again as eager's second add rounds it
        b_sb = tl.load(sb_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)  # [BLOCK_C]
        tl.store(s_ptr + o_out, _to_storage(b_s_low.to(tl.float32) + b_sb[None, :], s_ptr.dtype.element_ty, BF16_RNE),
                 mask=m)
    else:
        tl.store(s_ptr + o_out, b_s_low, mask=m)
    b_s = b_s_low.to(tl.float32)  # the statistics come from the unbiased s
    b_mean = tl.sum(b_s, axis=1) / C  # [ROWS]; masked lanes hold 0
    b_d = tl.where(m_col[None, :], b_s - b_mean[:, None], 0.0)
    b_var = tl.sum(b_d * b_d, axis=1) / C  # two-pass variance, from registers
    b_rstd = 1.0 / tl.sqrt(b_var + eps)
    b_y = b_d * b_rstd[:, None]
    if HAS_WEIGHT:
        b_y = b_y * tl.load(w_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b_y = b_y + tl.load(b_ptr + o_col, mask=m_col, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + o_out, _to_storage(b_y, out_ptr.dtype.element_ty, OUT_BF16_RNE), mask=m)
    if STORE_STATS:  # (for the backward; inference does not write them)
        tl.store(mean_ptr + o_row, b_mean, mask=m_row)
        tl.store(rstd_ptr + o_row, b_rstd, mask=m_row)


@functools.lru_cache(maxsize=1024)
def _plan(R: int, C: int) -> tuple[int, int, int, int]:
    """``(ROWS, BLOCK_C, num_warps, programs)``: the whole row in one block of the next power of two
    >= C, ``TILE / BLOCK_C`` rows a program (C = 320: 8 rows of 512; 640: 4 of 1024; 1280: 2 of
    2048), 8 warps, 16 for rows wider than TILE."""
    block = max(16, next_pow2(C))
    rows = max(1, TILE // block)
    num_warps = 8 if block <= TILE else 16
    return rows, block, num_warps, check_grid((cdiv(R, rows),), "add_layer_norm")[0]


@functools.lru_cache(maxsize=1024)
def _launch_plan(R: int, C: int, dtype: torch.dtype, out_dtype: torch.dtype, cpu: bool, has_weight: bool,
                 has_bias: bool, has_s_bias: bool, stats: bool) -> tuple[int, dict]:
    """``(programs, constexprs and num_warps)`` for a forward launch: :func:`_plan` and the flags, kept
    per call signature (one lookup a call instead of building ten keyword arguments; issue #24). The
    interpreter's bf16 stores round to nearest even (``BF16_RNE``) only on the CPU."""
    rows, block, num_warps, n_programs = _plan(R, C)
    return n_programs, {"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "HAS_S_BIAS": has_s_bias,
                        "STORE_STATS": stats, "ROWS": rows, "BLOCK_C": block,
                        "BF16_RNE": cpu and dtype == torch.bfloat16, "OUT_BF16_RNE": cpu and out_dtype == torch.bfloat16,
                        "num_warps": num_warps}


def _check(x, residual, weight, bias, s_bias=None) -> int:
    for name, t in (("x", x), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"add_layer_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"add_layer_norm: {name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("add_layer_norm: x must be [..., C], got a 0-dim tensor")
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"add_layer_norm: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias), ("s_bias", s_bias)):
        if p is None:
            continue
        if not (isinstance(p, torch.Tensor) and p.is_floating_point()):
            raise TypeError(f"add_layer_norm: {name} must be a floating-point tensor or None, got "
                            f"{type(p).__name__ if not isinstance(p, torch.Tensor) else p.dtype}")
        if p.shape != (C,):
            raise ValueError(f"add_layer_norm: {name} must have shape ({C},) (x's last dim), got {tuple(p.shape)}")
    return C


def add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight=None, bias=None, eps: float = 1e-5,
                       s_bias=None, out_dtype=None, *, stats: bool = True, checked: bool = False):
    """Launch the forward kernel: ``s = x + residual; out = layer_norm(s, (C,), weight, bias, eps)``,
    and with ``s_bias`` the first output ``s + s_bias`` in place of ``s``.

    x, residual: ``[..., C]``, one floating dtype, ``C <= MAX_C``, read in place as ``[B, N, C]`` views
    with any strides (leading dims that do not collapse to two are copied); weight, bias: ``[C]`` or
    None, any float dtype (loaded as fp32); s_bias: ``[C]`` or None, any float dtype (taken as
    :func:`layer_norm_param` takes a bias: x's dtype or fp32 beside fp16/bf16 as is, else cast to
    x's dtype first). Returns ``(s, out, mean, rstd)``: s (``s + s_bias`` with s_bias) and out
    ``[..., C]`` contiguous, s in x's dtype, out in ``out_dtype`` (None: x's; fp32 is what autocast's
    layer_norm returns); with ``stats`` mean and rstd ``[R]`` fp32 (R = every leading element) of the
    unbiased s, else None for both (inference allocates only what it returns); one launch.
    ``checked``: the caller (the op) has checked the arguments already. Eager equivalent:
    :func:`add_layer_norm_reference`.
    """
    if checked:
        C = x.shape[-1]
    else:
        C = _check(x, residual, weight, bias, s_bias)
        if C > MAX_C:
            raise ValueError(f"add_layer_norm: the kernel holds rows of at most {MAX_C} elements, got C = {C}")
    # (empty_like: half the host time of torch.empty(shape, dtype=, device=); without a memory_format
    # argument where x is contiguous already, which is what it returns then)
    dense = x.is_contiguous()
    if dense:
        s, out = torch.empty_like(x), torch.empty_like(x, dtype=out_dtype)
    else:
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
        out = torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
    R = s.numel() // C if C else 0
    mean = rstd = None
    if stats:
        mean = torch.empty((R,), dtype=torch.float32, device=x.device)
        rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R == 0:
        return s, out, mean, rstd
    if dense and residual.is_contiguous():  # the common case: one batch of R rows
        N, x_strides, r_strides = R, (0, C, 1), (0, C, 1)
    else:
        N = _batch_rows(x)
        (x, x_strides), (residual, r_strides) = _strides(x, N), _strides(residual, N)
    if s_bias is not None:
        s_bias = _unit_stride(layer_norm_param(s_bias, x.dtype))
    if weight is not None and weight.stride(0) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    n_programs, constants = _launch_plan(R, C, x.dtype, out.dtype, x.is_cpu, weight is not None, bias is not None,
                                         s_bias is not None, stats)
    _add_layer_norm_fwd_kernel[(n_programs,)](
        x, residual, weight if weight is not None else x, bias if bias is not None else x,
        s_bias if s_bias is not None else x, s, out, mean if stats else s, rstd if stats else s, R, C, N, *x_strides,
        *r_strides, eps if type(eps) is float else float(eps), **constants)
    return s, out, mean, rstd


def _batch_rows(x: torch.Tensor) -> int:
    """N, the rows of x's last leading dimension (of size > 1): the kernel addresses row r as
    (r // N, r % N), so a ``[B, N, C]`` view with any strides is read in place (the SD 1.x transformer
    block's residual stream in an NCHW U-Net: the permuted view of proj_in's output, C-stride H*W)."""
    sizes = [n for n in x.shape[:-1] if n > 1]
    return sizes[-1] if sizes else 1


def _strides(x: torch.Tensor, N: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(x, (batch stride, row stride, column stride))`` for x ``[..., N, C]`` read as B x N rows of C
    in place, when its leading dims other than the last of size > 1 collapse into one stride; else a
    contiguous copy's strides."""
    C = x.shape[-1]
    dims = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n > 1]
    if not dims:
        return x, (0, 0, x.stride(-1) if C > 1 else 1)
    row_stride = dims[-1][1]
    batch = dims[:-1]
    batch_stride, ok = 0, True
    if batch:
        batch_stride = batch[-1][1]
        expected = batch_stride
        for n, st in reversed(batch):
            ok = ok and st == expected
            expected = st * n
    if not ok:
        x = x.contiguous()
        return x, (N * C, C, 1)
    return x, (batch_stride, row_stride, x.stride(-1) if C > 1 else 1)


def _unit_stride(p):
    """A ``[C]`` parameter (or None) the kernel can read at unit stride: as is, or a contiguous copy."""
    return p if p is None or p.stride(0) == 1 else p.contiguous()


def layer_norm_param(p, dtype: torch.dtype):
    """weight or bias as ``F.layer_norm`` takes it beside an input of ``dtype``: as is when the dtypes
    match or when it is fp32 beside fp16/bf16 (the mixed case torch supports), else cast to ``dtype``."""
    if p is None or p.dtype == dtype or (p.dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16)):
        return p
    return p.to(dtype)


def add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight=None, bias=None, eps: float = 1e-5,
                             s_bias=None, out_dtype=None):
    """Eager reference, differentiable by autograd: diffusers' two statements,
    ``s = x + residual; out = F.layer_norm(s, (C,), weight, bias, eps)``; returns ``(s, out)``, or
    ``(s + s_bias, out)`` with s_bias ``[C]`` (``out`` still the layer norm of the unbiased s).

    Computed in x's dtype as diffusers does (at fp16/bf16 the eager low-precision result the kernel
    is judged against; at fp64 the exact one). weight, bias and s_bias are cast to x's dtype where
    ``F.layer_norm`` would refuse the pair (:func:`layer_norm_param`); ``s + s_bias`` is cast back
    to x's dtype (a no-op when s_bias has x's dtype: then it is eager's ``(x + residual) + s_bias``).
    With ``out_dtype`` the norm runs on ``s.to(out_dtype)`` (autocast's layer_norm: the sum in x's
    dtype, the norm and its output in fp32).
    """
    C = _check(x, residual, weight, bias, s_bias)
    s = x + residual
    sn = s if out_dtype is None or out_dtype == s.dtype else s.to(out_dtype)
    out = TF.layer_norm(sn, (C,), layer_norm_param(weight, sn.dtype), layer_norm_param(bias, sn.dtype), eps)
    if s_bias is not None:
        return (s + layer_norm_param(s_bias, s.dtype)).to(s.dtype), out
    return s, out


def add_layer_norm_bwd(grad_s, grad_out, s, mean, rstd, weight, bias, output_mask):
    """The backward from the forward's ``s``, mean and rstd: ``(dx, dweight, dbias)`` (each None
    where ``output_mask`` = (input, weight, bias) does not ask for it, or no gradient flows), with
    ``dx = dresidual = dlayer_norm/ds + grad_s``. The layer norm's part is
    ``aten.native_layer_norm_backward`` (eager's own backward kernel): on CUDA with the fp32 mean
    and rstd as torch's CUDA forward saves them; elsewhere (the interpreter's CPU tensors, whose
    kernel wants statistics in the input dtype) upcast to fp32 and cast back.
    """
    ds = dweight = dbias = None
    if grad_out is not None:
        C = s.shape[-1]
        stat_shape = s.shape[:-1] + (1,)
        base = s if grad_out.dtype == s.dtype else s.to(grad_out.dtype)  # (out_dtype: the norm ran on s in it)
        w, b = layer_norm_param(weight, base.dtype), layer_norm_param(bias, base.dtype)
        mask = [bool(output_mask[0]), bool(output_mask[1]) and w is not None, bool(output_mask[2]) and b is not None]
        if base.is_cuda or base.dtype == torch.float32:
            g, sv = grad_out, base
        else:
            g, sv = grad_out.float(), base.float()
            w = w.float() if w is not None else None
            b = b.float() if b is not None else None
        ds, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            g, sv, (C,), mean.view(stat_shape), rstd.view(stat_shape), w, b, mask)
        if ds is not None and ds.dtype != s.dtype:  # (each .to() is host time, even a no-op one)
            ds = ds.to(s.dtype)
        if dweight is not None and dweight.dtype != weight.dtype:
            dweight = dweight.to(weight.dtype)
        if dbias is not None and dbias.dtype != bias.dtype:
            dbias = dbias.to(bias.dtype)
    if output_mask[0] and grad_s is not None:
        ds = grad_s.to(s.dtype) if ds is None else ds + grad_s
    return ds, dweight, dbias
