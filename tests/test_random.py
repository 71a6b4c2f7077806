"""The in-kernel normal generator: its sin/cos polynomial and its distribution."""

import math

import pytest
import torch
import triton
import triton.language as tl

from ldm_fast.kernels._random import _cos_sin_2pi, randn_row_block, uniform_from_words


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


# ---------------------------------------------------------------------------------------------
# random words -> uniforms under Triton's debug mode (issue 25, item 1)

# The int32 words at and around the ends of the range: 0x80000000 is the one whose negation
# overflows (-x - 1 with x = -2^31), the others its neighbours and the fixed points of the fold.
_WORDS = [0x80000000, 0x80000001, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x7FFFFFFE, 0, 1, 0x40000000, 0xC0000000]


def _as_int32(words):
    return torch.tensor([w - 2**32 if w >= 2**31 else w for w in words], dtype=torch.int32)


@triton.jit
def _uniform_kernel(words_ptr, out_ptr, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    r = tl.load(words_ptr + o, mask=m).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + o, uniform_from_words(r), mask=m)


@triton.jit
def _uniform_triton_kernel(words_ptr, out_ptr, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < N
    r = tl.load(words_ptr + o, mask=m).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + o, tl.uint_to_uniform_float(r), mask=m)


@triton.jit
def _negate_fold_kernel(words_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """The fold as Triton 3.6's uint_to_uniform_float writes it: ``-x - 1`` on int32 (the control)."""
    o = tl.arange(0, BLOCK)
    m = o < N
    x = tl.load(words_ptr + o, mask=m)
    tl.store(out_ptr + o, tl.where(x < 0, -x - 1, x), mask=m)


@pytest.fixture
def interpreter_debug(monkeypatch):
    """Triton's interpreter with ``debug=True`` (device asserts and the integer-overflow sanitizer
    on), as a GPU launch with ``debug=True`` and the default ``sanitize_overflow`` compiles."""
    from triton.runtime import interpreter

    monkeypatch.setattr(interpreter.interpreter_builder, "options", interpreter.InterpreterOptions(debug=True))


def test_the_sanitizer_is_on_in_this_harness(interpreter_debug):
    """The control: with debug on, ``-x - 1`` at 0x80000000 is an overflow the sanitizer reports
    (so the next test, which passes, would fail for the formulation it replaced)."""
    words = _as_int32(_WORDS)
    out = torch.empty_like(words)
    with pytest.raises(Exception, match="overflow"):
        _negate_fold_kernel[(1,)](words, out, words.numel(), BLOCK=16)


def test_uniform_from_words_does_not_overflow_and_keeps_tritons_values(interpreter_debug):
    words = _as_int32(_WORDS)
    out = torch.full((words.numel(),), math.nan)
    _uniform_kernel[(1,)](words, out, words.numel(), BLOCK=16)  # no "int32 overflow detected"
    signed = [int(w) for w in words]
    folded = torch.tensor([w if w >= 0 else -w - 1 for w in signed], dtype=torch.float32)  # exact in Python ints
    expected = folded * torch.tensor(4.6566127342e-10, dtype=torch.float32)
    assert torch.equal(out, expected)
    assert (out >= 0).all() and (out < 1).all()
    assert out[0] == out[4] and out[0].item() == max(out.tolist())  # 0x80000000 folds onto 0x7FFFFFFF


def test_uniform_from_words_equals_tritons_conversion_bit_for_bit():
    """Same numbers as ``tl.uint_to_uniform_float`` (run without debug, where it cannot assert):
    every in-kernel noise stream is unchanged by the rewrite."""
    g = torch.Generator().manual_seed(0)
    words = torch.cat([_as_int32(_WORDS), torch.randint(-2**31, 2**31, (4086,), generator=g, dtype=torch.int64).to(torch.int32)])
    ours, theirs = torch.full((4096,), math.nan), torch.full((4096,), math.nan)
    _uniform_kernel[(1,)](words, ours, 4096, BLOCK=4096)
    _uniform_triton_kernel[(1,)](words, theirs, 4096, BLOCK=4096)
    assert torch.equal(ours, theirs)


def test_the_noise_kernels_run_clean_under_the_sanitizer(interpreter_debug):
    """q_sample's and sampler_step's debug variants (t / index checked on the device) draw their
    noise with the sanitizer on and no assert; a t out of range still fails the device assertion."""
    import ldm_fast

    x0 = torch.zeros(2, 4, 5, 6)
    table = torch.full((10,), 0.25)
    x_t, eps = ldm_fast.ops.q_sample.kernel_call(x0, torch.tensor([3, 9]), table, None, None, 1234, 0.0, False, True)
    assert torch.isfinite(eps).all() and eps.std() > 0.5
    with pytest.raises(Exception, match="t must lie in"):
        ldm_fast.ops.q_sample.kernel_call(x0, torch.tensor([3, 10]), table, None, None, 1234, 0.0, False, True)
