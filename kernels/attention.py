"""Scaled dot-product attention (FlashAttention-2 style), forward and backward, for any head dim up to 512.

    out = softmax(q @ k^T * scale) @ v            per (batch, head); q [Nq, D], k and v [Nk, D]

The forward streams key/value blocks through an online softmax (running max and sum in fp32, base
2: ``exp2(s * scale * log2(e) - m)``), so the [Nq, Nk] score matrix never reaches memory; it
writes the output and, for the backward, the per-row log-sum-exp (base 2, fp32). The backward
recomputes the probabilities from that log-sum-exp (FlashAttention-2, Dao 2023): one kernel per
query block for dq (it also computes and stores ``delta = rowsum(dout * out)``), then one per key
block for dk and dv, each reduction in a fixed order (no atomics: deterministic).

Head dims: D is padded to a power of two inside registers only (40 -> 64, 80 -> 128, 160 -> 256;
masked loads, nothing padded in memory). Above 256 (the SD VAE's single 512-dim head) one program
cannot hold a [BLOCK_M, D] fp32 accumulator in registers, so D is tiled twice:

* the q.k reduction runs over D in chunks of ``BLOCK_DK`` (``D_CHUNKS`` static steps, each a
  tensor-core dot), with the q chunks re-read per key block (from L1/L2);
* the output columns are split over ``cdiv(D, BLOCK_DV)`` programs (grid axis 2: at most 4), each owning a
  [BLOCK_M, BLOCK_DV] accumulator; each recomputes the scores (the price: 1 + D/BLOCK_DV score
  GEMMs per output GEMM instead of 1).

Layouts: every tensor is addressed as [B, H, N, D] through its (batch, head, row) strides with the
D elements of a row contiguous, so q [B, N, H*D] as a Linear layer produces it, slices of one fused
qkv projection, and SDPA's [B, H, N, D] are all read in place. The output and gradients are
written as [B, N, H, D] (contiguous). The grid is (query or key blocks, batch x heads, output-column
programs); batch x heads above CUDA's 65,535 on axis 1 (temporal attention over every pixel of a
batch) runs as one launch per slab (``bh_offset``, kernels/_grid.py). Offsets of batch and head are int64; offsets inside one
(batch, head) slice are int32 (the launcher checks they fit).

Matrix products run on tensor cores with fp32 accumulation: fp16/bf16 operands as they are (the
probabilities and dS are cast to the input dtype before their GEMM, as FlashAttention does), fp32
operands as TF32 on a GPU (``tl.dot``'s default; the interpreter computes them in fp32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from . import KERNEL_DTYPES
from ._grid import axis_launches
from ._triton import cdiv, next_pow2, tl, triton
from ._launch import kernel

LOG2E = 1.4426950408889634
#: Largest head dim the kernels take (the SD VAE's single head); larger ones run the reference.
MAX_HEAD_DIM = 512


@triton.jit
def _dot(a, b, BF16_AS_F32: tl.constexpr):
    """``a @ b`` in fp32 on tensor cores. ``BF16_AS_F32`` (set only under Triton's CPU interpreter,
    whose ``tl.dot`` multiplies bf16 operands as their raw integer bits) multiplies the bf16 values
    as fp32 instead: the same products, exactly, so the interpreter computes what the GPU does."""
    if BF16_AS_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _head(ptr, i_b, i_h, s_b, s_h, HEAD_DIM: tl.constexpr, HEADS_PACKED: tl.constexpr):
    """``ptr`` moved to (batch i_b, head i_h). With ``HEADS_PACKED`` the head stride is HEAD_DIM (heads
    side by side in a row, as a Linear layer's ``[B, N, heads*D]`` output and SDPA views of it have
    them): a constexpr multiple the compiler can prove 16-byte aligned (D = 40: 80 bytes), where a
    runtime stride of 40 would hide the alignment and forbid 128-bit loads."""
    if HEADS_PACKED:
        return ptr + i_b.to(tl.int64) * s_b + i_h * HEAD_DIM
    return ptr + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h


@triton.jit
def _tile(ptr, o_row, m_row, row_stride, o_col, HEAD_DIM: tl.constexpr):
    """The [len(o_row), len(o_col)] tile ``ptr[o_row * row_stride + o_col]``, zero outside the
    valid rows and beyond HEAD_DIM columns (the row's elements are contiguous)."""
    return tl.load(
        ptr + o_row[:, None] * row_stride + o_col[None, :],
        mask=m_row[:, None] & (o_col[None, :] < HEAD_DIM), other=0.0,
    )


@triton.jit
def _scores(a_ptr, o_a, m_a, a_stride, b_ptr, o_b, m_b, b_stride,
            HEAD_DIM: tl.constexpr, BLOCK_DK: tl.constexpr, D_CHUNKS: tl.constexpr, BF16_AS_F32: tl.constexpr):
    """``A[o_a, :] @ B[o_b, :]^T`` in fp32, [len(o_a), len(o_b)]: the D reduction in D_CHUNKS
    tensor-core dots of BLOCK_DK columns each (both tiles loaded chunk by chunk)."""
    o_k = tl.arange(0, BLOCK_DK)
    b_acc = _dot(_tile(a_ptr, o_a, m_a, a_stride, o_k, HEAD_DIM), tl.trans(_tile(b_ptr, o_b, m_b, b_stride, o_k, HEAD_DIM)),
                 BF16_AS_F32)
    for c in tl.static_range(1, D_CHUNKS):
        o_c = c * BLOCK_DK + o_k
        b_a = _tile(a_ptr, o_a, m_a, a_stride, o_c, HEAD_DIM)
        b_b = _tile(b_ptr, o_b, m_b, b_stride, o_c, HEAD_DIM)
        b_acc += _dot(b_a, tl.trans(b_b), BF16_AS_F32)
    return b_acc


@kernel
@triton.jit(do_not_specialize=["bh_offset"])
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,  # q [B,H,NQ,D], k/v [B,H,NK,D] by strides; o [B,NQ,H,D]; lse [B,H,NQ] fp32
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    H, NQ, NK, bh_offset, qk_scale,  # bh_offset: this launch's first (batch, head); qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    D_CHUNKS: tl.constexpr, BLOCK_DV: tl.constexpr, WRITE_LSE: tl.constexpr, BF16_AS_F32: tl.constexpr, HEADS_PACKED: tl.constexpr,
):
    i_m, i_bh, i_dv = tl.program_id(0), tl.program_id(1) + bh_offset, tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh - i_b * H
    q_ptr = _head(q_ptr, i_b, i_h, s_qb, s_qh, HEAD_DIM, HEADS_PACKED)
    k_ptr = _head(k_ptr, i_b, i_h, s_kb, s_kh, HEAD_DIM, HEADS_PACKED)
    v_ptr = _head(v_ptr, i_b, i_h, s_vb, s_vh, HEAD_DIM, HEADS_PACKED)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < NQ
    o_k = tl.arange(0, BLOCK_DK)
    o_v = i_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    if D_CHUNKS == 1:  # the whole (padded) head fits: q stays in registers for the key loop
        b_q = _tile(q_ptr, o_m, m_m, s_qn, o_k, HEAD_DIM)

    b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores
    b_l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - max)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < NK
        if D_CHUNKS == 1:
            b_s = _dot(b_q, tl.trans(_tile(k_ptr, o_n, m_n, s_kn, o_k, HEAD_DIM)), BF16_AS_F32)
        else:
            b_s = _scores(q_ptr, o_m, m_m, s_qn, k_ptr, o_n, m_n, s_kn, HEAD_DIM, BLOCK_DK, D_CHUNKS, BF16_AS_F32)
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = _tile(v_ptr, o_n, m_n, s_vn, o_v, HEAD_DIM)
        b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, BF16_AS_F32)
        b_m = b_m_new

    b_acc = b_acc / b_l[:, None]
    p_o = o_ptr + i_b.to(tl.int64) * NQ * H * HEAD_DIM + i_h * HEAD_DIM + o_m[:, None] * (H * HEAD_DIM) + o_v[None, :]
    tl.store(p_o, b_acc.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & (o_v[None, :] < HEAD_DIM))
    if WRITE_LSE:
        if i_dv == 0:
            tl.store(lse_ptr + i_bh.to(tl.int64) * NQ + o_m, b_m + tl.log2(b_l), mask=m_m)


@kernel
@triton.jit(do_not_specialize=["bh_offset"])
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,  # o, dq [B,NQ,H,D]; do by strides; lse, delta [B,H,NQ]
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    H, NQ, NK, bh_offset, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    D_CHUNKS: tl.constexpr, BLOCK_DO: tl.constexpr, BF16_AS_F32: tl.constexpr, HEADS_PACKED: tl.constexpr,
):
    """dq = scale * dS @ k with dS = P * (dout @ v^T - delta); also writes delta = rowsum(dout * out)."""
    i_m, i_bh, i_d = tl.program_id(0), tl.program_id(1) + bh_offset, tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh - i_b * H
    q_ptr = _head(q_ptr, i_b, i_h, s_qb, s_qh, HEAD_DIM, HEADS_PACKED)
    k_ptr = _head(k_ptr, i_b, i_h, s_kb, s_kh, HEAD_DIM, HEADS_PACKED)
    v_ptr = _head(v_ptr, i_b, i_h, s_vb, s_vh, HEAD_DIM, HEADS_PACKED)
    do_ptr = _head(do_ptr, i_b, i_h, s_db, s_dh, HEAD_DIM, HEADS_PACKED)
    out_offset = i_b.to(tl.int64) * NQ * H * HEAD_DIM + i_h * HEAD_DIM
    o_ptr += out_offset
    dq_ptr += out_offset
    row_stride = H * HEAD_DIM

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < NQ
    o_k = tl.arange(0, BLOCK_DK)
    o_d = i_d * BLOCK_DO + tl.arange(0, BLOCK_DO)

    b_delta = tl.zeros([BLOCK_M], tl.float32)
    for c in tl.static_range(D_CHUNKS):
        o_c = c * BLOCK_DK + o_k
        b_do = _tile(do_ptr, o_m, m_m, s_dn, o_c, HEAD_DIM).to(tl.float32)
        b_delta += tl.sum(b_do * _tile(o_ptr, o_m, m_m, row_stride, o_c, HEAD_DIM).to(tl.float32), 1)
    if i_d == 0:
        tl.store(delta_ptr + i_bh.to(tl.int64) * NQ + o_m, b_delta, mask=m_m)
    b_lse = tl.load(lse_ptr + i_bh.to(tl.int64) * NQ + o_m, mask=m_m, other=0.0)
    if D_CHUNKS == 1:
        b_q = _tile(q_ptr, o_m, m_m, s_qn, o_k, HEAD_DIM)
        b_do = _tile(do_ptr, o_m, m_m, s_dn, o_k, HEAD_DIM)

    b_dq = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        o_n = start_n + tl.arange(0, BLOCK_N)
        m_n = o_n < NK
        if D_CHUNKS == 1:
            b_k = _tile(k_ptr, o_n, m_n, s_kn, o_k, HEAD_DIM)
            b_s = _dot(b_q, tl.trans(b_k), BF16_AS_F32)
            b_dp = _dot(b_do, tl.trans(_tile(v_ptr, o_n, m_n, s_vn, o_k, HEAD_DIM)), BF16_AS_F32)
        else:
            b_s = _scores(q_ptr, o_m, m_m, s_qn, k_ptr, o_n, m_n, s_kn, HEAD_DIM, BLOCK_DK, D_CHUNKS, BF16_AS_F32)
            b_dp = _scores(do_ptr, o_m, m_m, s_dn, v_ptr, o_n, m_n, s_vn, HEAD_DIM, BLOCK_DK, D_CHUNKS, BF16_AS_F32)
            b_k = _tile(k_ptr, o_n, m_n, s_kn, o_d, HEAD_DIM)
        b_p = tl.where(m_n[None, :], tl.exp2(b_s * qk_scale - b_lse[:, None]), 0.0)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, BF16_AS_F32)

    b_dq *= scale
    tl.store(dq_ptr + o_m[:, None] * row_stride + o_d[None, :], b_dq.to(dq_ptr.dtype.element_ty),
             mask=m_m[:, None] & (o_d[None, :] < HEAD_DIM))


@kernel
@triton.jit(do_not_specialize=["bh_offset"])
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,  # dk, dv [B,NK,H,D]
    s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_db, s_dh, s_dn,
    H, NQ, NK, bh_offset, qk_scale, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
    D_CHUNKS: tl.constexpr, BLOCK_DO: tl.constexpr, BF16_AS_F32: tl.constexpr, HEADS_PACKED: tl.constexpr,
):
    """dv = P^T @ dout and dk = scale * dS^T @ q for one key block, looping over the query blocks."""
    i_n, i_bh, i_d = tl.program_id(0), tl.program_id(1) + bh_offset, tl.program_id(2)
    i_b = i_bh // H
    i_h = i_bh - i_b * H
    q_ptr = _head(q_ptr, i_b, i_h, s_qb, s_qh, HEAD_DIM, HEADS_PACKED)
    k_ptr = _head(k_ptr, i_b, i_h, s_kb, s_kh, HEAD_DIM, HEADS_PACKED)
    v_ptr = _head(v_ptr, i_b, i_h, s_vb, s_vh, HEAD_DIM, HEADS_PACKED)
    do_ptr = _head(do_ptr, i_b, i_h, s_db, s_dh, HEAD_DIM, HEADS_PACKED)
    lse_ptr += i_bh.to(tl.int64) * NQ
    delta_ptr += i_bh.to(tl.int64) * NQ

    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < NK
    o_k = tl.arange(0, BLOCK_DK)
    o_d = i_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    if D_CHUNKS == 1:
        b_k = _tile(k_ptr, o_n, m_n, s_kn, o_k, HEAD_DIM)
        b_v = _tile(v_ptr, o_n, m_n, s_vn, o_k, HEAD_DIM)

    b_dk = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        o_m = start_m + tl.arange(0, BLOCK_M)
        m_m = o_m < NQ
        if D_CHUNKS == 1:
            b_q = _tile(q_ptr, o_m, m_m, s_qn, o_k, HEAD_DIM)
            b_do = _tile(do_ptr, o_m, m_m, s_dn, o_k, HEAD_DIM)
            b_st = _dot(b_k, tl.trans(b_q), BF16_AS_F32)  # S^T [BLOCK_N, BLOCK_M]
            b_dpt = _dot(b_v, tl.trans(b_do), BF16_AS_F32)  # dP^T
        else:
            b_st = _scores(k_ptr, o_n, m_n, s_kn, q_ptr, o_m, m_m, s_qn, HEAD_DIM, BLOCK_DK, D_CHUNKS, BF16_AS_F32)
            b_dpt = _scores(v_ptr, o_n, m_n, s_vn, do_ptr, o_m, m_m, s_dn, HEAD_DIM, BLOCK_DK, D_CHUNKS, BF16_AS_F32)
            b_q = _tile(q_ptr, o_m, m_m, s_qn, o_d, HEAD_DIM)
            b_do = _tile(do_ptr, o_m, m_m, s_dn, o_d, HEAD_DIM)
        b_lse = tl.load(lse_ptr + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(delta_ptr + o_m, mask=m_m, other=0.0)
        b_pt = tl.where(m_m[None, :], tl.exp2(b_st * qk_scale - b_lse[None, :]), 0.0)
        b_dv += _dot(b_pt.to(b_do.dtype), b_do, BF16_AS_F32)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += _dot(b_dst.to(b_q.dtype), b_q, BF16_AS_F32)

    b_dk *= scale
    out_offset = i_b.to(tl.int64) * NK * H * HEAD_DIM + i_h * HEAD_DIM
    p_out = o_n[:, None] * (H * HEAD_DIM) + o_d[None, :]
    m_out = m_n[:, None] & (o_d[None, :] < HEAD_DIM)
    tl.store(dk_ptr + out_offset + p_out, b_dk.to(dk_ptr.dtype.element_ty), mask=m_out)
    tl.store(dv_ptr + out_offset + p_out, b_dv.to(dv_ptr.dtype.element_ty), mask=m_out)


# ---------------------------------------------------------------------------------------------
# launchers


class Plan(NamedTuple):
    """Tile sizes and launch options of one kernel for one (head dim, dtype)."""

    block_m: int
    block_n: int
    block_dk: int  # columns per chunk of the D reduction
    d_chunks: int
    block_dout: int  # output columns per program (grid axis 2 = cdiv(D, block_dout))
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def fwd_plan(head_dim: int, itemsize: int) -> Plan:
    """The forward's tiles: D padded to a power of two up to 256 in one chunk; 512 in chunks of
    128 for q.k and two programs of 256 output columns each.

    Sized by the static audit (``python -m benchmarks.audit --ops attention``: sm_80 and sm_90, no
    spills, shared memory within a block's 163 KB on sm_80 / 227 KB on sm_90). fp32 takes 32-key
    blocks (fp32 operands double the shared-memory staging: 64-key blocks spill at D <= 64 and ask
    192-256 KB at D = 128) and, at D = 512, 32-row blocks without pipelining (100 KB). D = 512 in
    fp16/bf16 takes 32-key blocks: 64 with two stages asked 168 KB, over sm_80's limit.
    """
    padded = max(16, next_pow2(head_dim))
    wide = itemsize > 2
    if padded <= 64:
        return Plan(128, 32 if wide else 64, padded, 1, padded, 4, 3)
    if padded <= 128:
        return Plan(128, 32, padded, 1, padded, 8, 2) if wide else Plan(128, 64, padded, 1, padded, 8, 3)
    if padded <= 256:
        return Plan(64, 32 if wide else 64, padded, 1, padded, 8, 2)
    if wide:
        return Plan(32, 32, 128, cdiv(head_dim, 128), 256, 8, 1)
    return Plan(64, 32, 128, cdiv(head_dim, 128), 256, 8, 2)


@functools.lru_cache(maxsize=None)
def bwd_plan(head_dim: int, itemsize: int) -> Plan:
    """The backward's tiles (both kernels): the resident [BLOCK, D] operands and two fp32
    accumulators bound the block to 64 rows (32 at D 256); D above 256 in chunks of 64 with 128
    output columns per program (64 in fp32).

    Sized by the static audit like :func:`fwd_plan`: fp32 takes 32-key blocks up to D = 128 (64
    spilled: up to 650 bytes on sm_80 at D <= 64, 480 on sm_90 at D = 128); D = 512 reduces q.k in
    64-column chunks (128 left a 4-8 byte spill in dq on sm_80 and dk/dv on sm_90) and in fp32 splits
    the output into 64 columns per program (128 asked 164 KB in dk/dv, over sm_80's limit).
    """
    padded = max(16, next_pow2(head_dim))
    wide = itemsize > 2
    if padded <= 64:
        return Plan(64, 32 if wide else 64, padded, 1, padded, 4, 2)
    if padded <= 128:
        return Plan(64, 32 if wide else 64, padded, 1, padded, 8, 2)
    if padded <= 256:
        return Plan(32, 32, padded, 1, padded, 8, 1)
    return Plan(32, 32, 64, cdiv(head_dim, 64), 64 if wide else 128, 8, 1)


def _unit_d(x: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, N, D]`` with its D elements contiguous (a copy only if they are not)."""
    return x if x.stride(3) == 1 or x.shape[3] == 1 else x.contiguous()


def _bf16_as_f32(x: torch.Tensor) -> bool:
    """bf16 on the CPU interpreter: its ``tl.dot`` mishandles bf16 (see ``_dot``)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu"


def _heads_packed(*tensors: torch.Tensor) -> bool:
    """Every tensor's head stride is D (or it has one head): see ``_head``."""
    return all(t.stride(1) == t.shape[3] or t.shape[1] == 1 for t in tensors)


def _strides(x: torch.Tensor) -> tuple:
    return x.stride(0), x.stride(1), x.stride(2)


def fits_int32(*tensors: torch.Tensor) -> bool:
    """Whether the kernels' int32 offsets hold for these [B, H, N, D] inputs: inside one (batch,
    head) slice of each, and inside one batch of the [B, N, H, D] outputs and gradients."""
    for t in tensors:
        _, heads, n, d = t.shape
        if (n - 1) * t.stride(2) + d >= 2**31 or heads * n * d >= 2**31:
            return False
    return True


def attention_fwd(q, k, v, scale: float, *, lse: bool = True):
    """Launch the forward kernel.

    q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` (views with any batch/head/row strides; D
    elements contiguous or copied), one dtype (fp32/fp16/bf16), D <= 512, Nk >= 1. Returns
    ``(out, lse)``: out ``[B, Nq, H, D]`` contiguous in q's dtype; lse ``[B, H, Nq]`` fp32, the
    base-2 log-sum-exp of ``q @ k^T * scale * log2(e)`` per row (None when ``lse=False``).
    Eager equivalent: :func:`attention_reference`.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    q, k, v = _unit_d(q), _unit_d(k), _unit_d(v)
    out = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device)
    lse_out = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device) if lse else None
    if out.numel() == 0:
        return out, lse_out
    plan = fwd_plan(D, q.element_size())
    # batch x heads on axis 1 (at most 65,535 a launch: more, e.g. temporal attention over every
    # pixel, takes one launch per slab); query blocks fastest on axis 0 (K/V of a head stay in L2)
    for grid, bh_offset in axis_launches((cdiv(NQ, plan.block_m), B * H, cdiv(D, plan.block_dout)), 1):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse_out if lse else out,
            *_strides(q), *_strides(k), *_strides(v),
            H, NQ, NK, bh_offset, float(scale) * LOG2E,
            HEAD_DIM=D, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_DK=plan.block_dk, D_CHUNKS=plan.d_chunks,
            BLOCK_DV=plan.block_dout, WRITE_LSE=lse, BF16_AS_F32=_bf16_as_f32(q),
            HEADS_PACKED=_heads_packed(q, k, v), num_warps=plan.num_warps, num_stages=plan.num_stages,
        )
    return out, lse_out


def attention_bwd(grad, q, k, v, out, lse, scale: float):
    """Launch the backward kernels: ``(dq, dk, dv)``.

    grad: dL/dout ``[B, H, Nq, D]`` (any batch/head/row strides); q, k, v as in
    :func:`attention_fwd`; out ``[B, Nq, H, D]`` and lse ``[B, H, Nq]`` from it. Returns dq
    ``[B, Nq, H, D]``, dk and dv ``[B, Nk, H, D]``, contiguous, in q's dtype. Two launches: dq
    (which also writes delta = rowsum(grad * out), fp32 ``[B, H, Nq]``), then dk and dv.
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    q, k, v, grad = _unit_d(q), _unit_d(k), _unit_d(v), _unit_d(grad)
    dq = torch.empty((B, NQ, H, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, NK, H, D), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    plan = bwd_plan(D, q.element_size())
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad), H, NQ, NK)
    scales = (float(scale) * LOG2E, float(scale))
    meta = dict(HEAD_DIM=D, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_DK=plan.block_dk,
                D_CHUNKS=plan.d_chunks, BLOCK_DO=plan.block_dout, BF16_AS_F32=_bf16_as_f32(q),
                HEADS_PACKED=_heads_packed(q, k, v, grad), num_warps=plan.num_warps,
                num_stages=plan.num_stages)
    n_d = cdiv(D, plan.block_dout)
    for grid, bh_offset in axis_launches((cdiv(NQ, plan.block_m), B * H, n_d), 1):  # as in the forward
        _attention_bwd_dq_kernel[grid](q, k, v, out, grad, lse, delta, dq, *strides, bh_offset, *scales, **meta)
    for grid, bh_offset in axis_launches((cdiv(NK, plan.block_n), B * H, n_d), 1):
        _attention_bwd_dkdv_kernel[grid](q, k, v, grad, lse, delta, dk, dv, *strides, bh_offset, *scales, **meta)
    return dq, dk, dv


def attention_reference(q, k, v, scale: Optional[float] = None) -> torch.Tensor:
    """Eager reference, differentiable by autograd: ``softmax(q @ k^T * scale) @ v`` written out.

    q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` -> ``[B, H, Nq, D]``; softmax in fp32 (fp64 for
    fp64 inputs), matrix products in the input dtype. For a float64 ground truth pass float64 tensors.
    ``scale`` defaults to ``D ** -0.5``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-2, -1)).to(compute) * scale
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)


__all__ = ["attention_fwd", "attention_bwd", "attention_reference", "fwd_plan", "bwd_plan", "fits_int32",
           "MAX_HEAD_DIM", "KERNEL_DTYPES", "LOG2E", "Plan"]
