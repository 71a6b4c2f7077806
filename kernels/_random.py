"""Counter-based normal random numbers shared by the kernels that draw noise in-kernel."""

from ._triton import tl, triton


def seed_args(seed) -> tuple:
    """``(seed, seed_ptr)`` kernel arguments for a seed given as an int (passed by value; the
    pointer slot gets a dummy 0), as None (nothing is drawn: 0 by value) or as an int64 tensor of
    one element on the kernel's device (passed by pointer, ``SEED_FROM_PTR``: the kernel loads it,
    so a seed drawn on the device by a CUDA graph or a compiled graph changes at every replay
    without the host reading it). The launcher's ``SEED_FROM_PTR`` is ``isinstance(seed_ptr, Tensor)``."""
    if seed is None:
        return 0, 0
    if isinstance(seed, int):
        return seed, 0
    return 0, seed


@triton.jit
def _cos_sin_2pi(u):
    """``(cos(2 pi u), sin(2 pi u))`` for u in [0, 1): quarter-turn reduction, then Taylor polynomials
    on [-pi/4, pi/4] (truncation error < 3e-8). Unlike libdevice's sinf/cosf it has no slow path for
    huge arguments (no local-memory stack, no table loads) and runs the same in the interpreter."""
    q = tl.floor(u * 4.0 + 0.5)  # nearest quarter turn, 0..4
    r = (u - q * 0.25) * 6.283185307179586  # the rest, in [-pi/4, pi/4]
    r2 = r * r
    s = r * (1.0 + r2 * (-1.0 / 6.0 + r2 * (1.0 / 120.0 + r2 * (-1.0 / 5040.0 + r2 * (1.0 / 362880.0)))))
    c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24.0 + r2 * (-1.0 / 720.0 + r2 * (1.0 / 40320.0))))
    quarter = q.to(tl.int32) % 4  # rotate (c, s) by that many quarter turns
    cos = tl.where(quarter == 0, c, tl.where(quarter == 1, -s, tl.where(quarter == 2, -c, s)))
    sin = tl.where(quarter == 0, s, tl.where(quarter == 1, c, tl.where(quarter == 2, -s, -c)))
    return cos, sin


@triton.jit
def uniform_from_words(r):
    """uint32 random words -> fp32 uniforms in [0, 1), exactly ``tl.uint_to_uniform_float``'s map:
    the word read as int32 x, folded to ``x`` or ``-x - 1`` (2^31 values), times
    4.6566127342e-10 (the largest scale keeping 2^31 - 1 below 1.0 after rounding).

    Written with ``~x``, which equals ``-x - 1`` for every int32 without computing ``-x``: the
    negation overflows at 0x80000000, and older Tritons' ``uint_to_uniform_float`` (3.6 among them;
    3.9's uses ``~x``) write it that way, so a kernel launched with ``debug=True`` (the in-kernel
    range check of q_sample's t and sampler_step's index) tripped the integer-overflow sanitizer on
    that word ("int32 overflow detected", a device-side assert that leaves the CUDA context
    unusable). ``~`` is a bitwise op, never sanitized."""
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x * 4.6566127342e-10


@triton.jit
def _box_muller(r0, r1):
    """Two independent standard normals from two uint32 random words."""
    u0 = tl.maximum(uniform_from_words(r0), 1.0e-7)
    radius = tl.sqrt(-2.0 * tl.log(u0))
    cos, sin = _cos_sin_2pi(uniform_from_words(r1))
    return radius * cos, radius * sin


@triton.jit
def randn_row_block(seed, i_row, col_start, BLOCK: tl.constexpr):
    """``BLOCK`` standard normals (fp32) for columns ``col_start .. col_start + BLOCK - 1`` of row ``i_row``.

    The numbers depend only on ``(seed, i_row, column)``, never on the block size or the grid: one
    Philox-4x32 call (10 rounds) with counter ``(column // 4, i_row, 0, 0)`` and key ``seed`` gives
    four words, and two Box-Muller pairs turn them into the normals of columns ``4q .. 4q + 3``.
    ``col_start`` must be a multiple of 4 and ``BLOCK`` a power of two of at least 4.
    """
    Q: tl.constexpr = BLOCK // 4
    c0 = (col_start // 4 + tl.arange(0, Q)).to(tl.uint32)
    c1 = tl.full([Q], i_row, tl.uint32)
    zero = tl.zeros([Q], tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    n0, n1 = _box_muller(r0, r1)
    n2, n3 = _box_muller(r2, r3)
    # join(join(n0, n2), join(n1, n3)) is [Q, 2, 2] with [q, i, j] = (n0, n1, n2, n3)[2i + j]: flattened,
    # element 4q + k of the block takes the k-th normal of counter q.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
