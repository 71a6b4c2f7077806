"""CUDA's launch-grid limits, and how the launchers stay inside them.

A grid may have at most ``2**31 - 1`` programs on axis 0 (x) and 65,535 on axes 1 and 2 (y, z);
a larger launch fails ("invalid argument", or Triton's own check). Triton's interpreter has no such
limit, so the CPU tests check the grids the launchers compute (tests/test_grid_limits.py records
every launch at large logical shapes on meta tensors).

The launchers put their large, shape-driven counts on axis 0 (rows x column blocks of the
elementwise kernels, query or key blocks of attention, chunks of the split GroupNorm). Where a
count that grows with the batch sits on axis 1 or 2 (attention's batch x heads, the split
GroupNorm's batch), the launcher covers it with :func:`axis_launches`: one launch per slab of at
most 65,535, each kernel adding the slab's start (an ``*_offset`` argument) to its program id.
Every shape below that limit, every SD shape included, is still one launch.
"""

from __future__ import annotations

import functools

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


@functools.lru_cache(maxsize=256)
def axis_launches(grid: tuple, axis: int) -> tuple:
    """``((grid_0, start_0), (grid_1, start_1), ...)``: ``grid`` cut along ``axis`` (1 or 2) into
    launches of at most :data:`MAX_GRID_YZ` programs there, each with the first program index it
    covers. One ``(grid, 0)`` when it fits. Raises ValueError when an axis is over its limit in a
    way no cut along ``axis`` fixes."""
    n = grid[axis]
    starts = range(0, n, MAX_GRID_YZ) if n > MAX_GRID_YZ else (0,)
    out = []
    for start in starts:
        g = list(grid)
        g[axis] = min(MAX_GRID_YZ, n - start) if n > MAX_GRID_YZ else n
        out.append((check_grid(tuple(g)), start))
    return tuple(out)


def check_grid(grid: tuple, what: str = "kernel") -> tuple:
    """``grid`` itself when it is within CUDA's limits; ValueError naming them otherwise."""
    if grid[0] > MAX_GRID_X or any(n > MAX_GRID_YZ for n in grid[1:]):
        raise ValueError(f"{what}: launch grid {grid} exceeds CUDA's limits (axis 0 <= {MAX_GRID_X}, "
                         f"axes 1 and 2 <= {MAX_GRID_YZ}): the input is too large for one launch")
    return grid


__all__ = ["MAX_GRID_X", "MAX_GRID_YZ", "axis_launches", "check_grid"]
