"""The in-kernel normal generator: its sin/cos polynomial and its distribution."""

import math

import torch
import triton
import triton.language as tl

from ldm_fast.kernels._random import _cos_sin_2pi, randn_row_block


@triton.jit
def _cos_sin_kernel(u_ptr, cos_ptr, sin_ptr, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    cos, sin = _cos_sin_2pi(tl.load(u_ptr + o, mask=m))
    tl.store(cos_ptr + o, cos, mask=m)
    tl.store(sin_ptr + o, sin, mask=m)


@triton.jit
def _randn_kernel(out_ptr, seed, K, BLOCK: tl.constexpr):
    i_row = tl.program_id(1)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i_row * K + o, randn_row_block(seed, i_row, tl.program_id(0) * BLOCK, BLOCK), mask=o < K)


def test_cos_sin_polynomial_is_accurate_over_the_whole_turn():
    u = torch.cat([torch.linspace(0, 1, 4001)[:-1], torch.tensor([0.125, 0.375, 0.625, 0.875, 1 - 2**-24])])
    cos, sin = torch.full_like(u, math.nan), torch.full_like(u, math.nan)
    _cos_sin_kernel[(triton.cdiv(u.numel(), 1024),)](u, cos, sin, u.numel(), BLOCK=1024)
    angle = 2 * math.pi * u.double()
    assert (cos.double() - angle.cos()).abs().max() < 1e-6
    assert (sin.double() - angle.sin()).abs().max() < 1e-6


def test_block_size_does_not_change_the_numbers():
    rows, k = 3, 700
    outs = []
    for block in (16, 64, 1024):
        out = torch.full((rows, k), math.nan)
        _randn_kernel[(triton.cdiv(k, block), rows)](out, 77, k, BLOCK=block)
        outs.append(out)
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_distribution_is_standard_normal():
    """Kolmogorov-Smirnov against N(0, 1) on 65536 draws with a fixed seed (critical value at alpha = 0.001: 1.95 / sqrt(n) = 0.0076)."""
    rows, k = 16, 4096
    out = torch.empty(rows, k)
    _randn_kernel[(k // 1024, rows)](out, 2026, k, BLOCK=1024)
    x, _ = out.double().flatten().sort()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    n = x.numel()
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.95 / math.sqrt(n)
    assert x.min() > -7 and x.max() < 7
