"""Counter-based normal random numbers shared by the kernels that draw noise in-kernel."""

from ._triton import tl, triton


@triton.jit
def randn_row_block(seed, i_row, col_start, BLOCK: tl.constexpr):
    """``BLOCK`` standard normals for columns ``col_start .. col_start + BLOCK - 1`` of row ``i_row``.

    The numbers depend only on ``(seed, i_row, column)``, never on the block size or the grid: one
    Philox-4x32 call with counter ``(column // 4, i_row, 0, 0)`` gives four uniforms, and two
    Box-Muller pairs turn them into the normals of columns ``4q .. 4q + 3``. ``col_start`` must be a
    multiple of 4 and ``BLOCK`` a power of two of at least 4.
    """
    Q: tl.constexpr = BLOCK // 4
    c0 = (col_start // 4 + tl.arange(0, Q)).to(tl.uint32)
    c1 = tl.full([Q], i_row, tl.uint32)
    zero = tl.zeros([Q], tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    # join(join(n0, n2), join(n1, n3)) is [Q, 2, 2] with [q, i, j] = (n0, n1, n2, n3)[2i + j]: flattened,
    # element 4q + k of the block takes the k-th normal of counter q.
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
