"""CUDA's grid limits (x < 2^31, y and z <= 65,535; issue 25, item 7) at the shapes users reach.

Triton's interpreter has no such limit, so a launch past it would pass every CPU test and fail on
the GPU. Here every launcher runs on META tensors of large logical shapes (no memory, no data) with
the Triton launch recorded instead of run: the grids it would launch are checked against the
limits, and the slabs of an axis cut into several launches must cover it exactly once. Then, with
the limit lowered, the sliced launches run interpreted at small shapes and must give the unsliced
results bit for bit (the ``*_offset`` arithmetic in the kernels).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton.runtime.interpreter as interpreter

from ldm_fast.kernels import _grid, _layout
from ldm_fast.kernels import add_layer_norm as aln
from ldm_fast.kernels import attention as attn
from ldm_fast.kernels import geglu as gg
from ldm_fast.kernels import group_norm as gn
from ldm_fast.kernels import q_sample as qs
from ldm_fast.kernels import reparameterize as rp
from ldm_fast.kernels import sampler_step as ss
from ldm_fast.kernels import timestep_embedding as te

MAX_X, MAX_YZ = 2**31 - 1, 65535


@pytest.fixture
def launches(monkeypatch):
    """``[(kernel name, grid, kwargs)]`` of every Triton launch in the test; nothing runs."""
    recorded = []

    def record(self, *args, grid, warmup, **kwargs):
        recorded.append((self.fn.__name__, tuple(grid) + (1,) * (3 - len(grid)), args, kwargs))

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    return recorded


def _meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _assert_within_limits(recorded):
    assert recorded, "nothing was launched"
    for name, grid, _, _ in recorded:
        assert 0 < grid[0] <= MAX_X and 0 < grid[1] <= MAX_YZ and 0 < grid[2] <= MAX_YZ, (name, grid)


def _covered(recorded, module, kernel: str, axis: int, offset_name: str) -> list:
    """The program indices of ``axis`` the launches of ``module.kernel`` cover (its offset argument
    plus the range of the axis), in launch order."""
    index = getattr(module, kernel).arg_names.index(offset_name)
    covered = []
    for name, grid, args, _ in recorded:
        if name == kernel:
            covered.extend(range(args[index], args[index] + grid[axis]))
    return covered


# ---------------------------------------------------------------------------------------------
# the grids at large logical shapes


def test_attention_batch_times_heads_above_65535(launches):
    """Temporal attention runs over every pixel as the batch: 2 x 64 x 64 pixels x 8 heads = 65,536
    (b, h) pairs, and 16,384 x 8 = 131,072 here: slabs of 65,535 on axis 1, covering each pair once."""
    B, H, N, D = 16384, 8, 16, 40
    q = _meta(B, N, H, D).transpose(1, 2)  # [B, H, N, D] views of [B, N, H*D], as F.attention passes them
    attn.attention_fwd(q, q, q, 0.125)
    out, lse = torch.empty(B, N, H, D, dtype=q.dtype, device="meta"), _meta(B, H, N, dtype=torch.float32)
    attn.attention_bwd(q, q, q, q, out, lse, 0.125)
    _assert_within_limits(launches)
    for kernel in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"):
        assert _covered(launches, attn, kernel, 1, "bh_offset") == list(range(B * H)), kernel
    assert [g[1] for n, g, _, _ in launches if n == "_attention_fwd_kernel"] == [65535, 65535, 2]


@pytest.mark.parametrize("shape, groups, path", [
    ((200_000, 32, 4, 4), 8, "one-pass"),  # a huge batch of small maps: batch blocks stay few on axis 1
    ((70_000, 64, 128, 128), 32, "split"),  # the split kernels' batch on axis 2, in slabs
    ((70_000, 64, 64, 64), 1, "split"),
], ids=["one-pass-b200k", "split-b70k", "split-one-group"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_huge_batch(launches, shape, groups, path, channels_last):
    x = _meta(*shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = _meta(shape[1])
    y, mean, rstd = gn.group_norm_fwd(x, w, w, groups, 1e-5, "silu", shift=_meta(shape[0], shape[1]))
    gn.group_norm_bwd(y, x, w, w, mean, rstd, groups, "silu", shift=_meta(shape[0], shape[1]))
    _assert_within_limits(launches)
    names = {name for name, _, _, _ in launches}
    assert (path == "split") == ("_group_norm_fwd_stats_kernel" in names), names
    if path == "split":
        for kernel in ("_group_norm_fwd_stats_kernel", "_group_norm_fwd_apply_kernel",
                       "_group_norm_bwd_stats_kernel", "_group_norm_bwd_apply_kernel"):
            assert _covered(launches, gn, kernel, 2, "b_offset") == list(range(shape[0])), kernel


def test_group_norm_more_channels_than_axis_1_takes_the_reference():
    x = torch.randn(1, gn.MAX_CHANNELS + 1, 1, 1)
    with pytest.raises(ValueError, match="at most 65535 channels"):
        gn.group_norm_fwd(x, None, None, gn.MAX_CHANNELS + 1, 1e-5)
    import ldm_fast
    from ldm_fast import functional as F

    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("triton"):
        y = F.group_norm(torch.randn(1, gn.MAX_CHANNELS + 1, 2), gn.MAX_CHANNELS + 1)
    assert ldm_fast.ops.kernel_launches["group_norm"] == before and y.shape == (1, gn.MAX_CHANNELS + 1, 2)


def test_elementwise_and_row_kernels_at_large_shapes(launches):
    """The 1-D grids: rows x column blocks on axis 0 (a video batch of SD latents, a long token
    batch, a million timesteps)."""
    x = _meta(70_000, 4, 64, 64)
    table = _meta(1000, dtype=torch.float32)
    qs.q_sample_fwd(x, _meta(70_000, dtype=torch.int64), table, None, None, 1, 0.0, True, check_t=True)
    rp.reparameterize_fwd(x, x, None, 1, 1.0, 0.0)
    rp.reparameterize_bwd(x, x, None, 1, 1.0)
    coef = ss.StepCoefficients(1.0, 0.1, 0.9, 0.1, 0.0, 0.2)
    ss.sampler_step_fwd(_meta(140_000, 4, 64, 64), x, coef, None, None, 1, 7.5, None, True)
    tokens = _meta(70_000 * 77, 2 * 1280)
    gg.geglu_fwd(tokens, "none")
    aln.add_layer_norm_fwd(_meta(70_000 * 64, 320), _meta(70_000 * 64, 320), None, None, 1e-5)
    te.timestep_embedding_fwd(_meta(1_000_000, dtype=torch.int64), 320, True, 0.0, 1.0, 10000)
    _assert_within_limits(launches)
    assert len({name for name, _, _, _ in launches}) == 7


def test_a_grid_past_axis_0_is_a_clear_error():
    assert _layout.row_blocks(MAX_X, 1)[2] == MAX_X
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        _layout.row_blocks(MAX_X + 1, 1)
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        _grid.check_grid((1, MAX_YZ + 1, 1))


def test_axis_launches():
    assert _grid.axis_launches((5, 7, 2), 1) == (((5, 7, 2), 0),)
    cut = _grid.axis_launches((3, 1, 2 * MAX_YZ + 10), 2)
    assert cut == (((3, 1, MAX_YZ), 0), ((3, 1, MAX_YZ), MAX_YZ), ((3, 1, 10), 2 * MAX_YZ))


# ---------------------------------------------------------------------------------------------
# the sliced launches compute what one launch computes (interpreted, with the limit lowered)


@contextlib.contextmanager
def _grid_limit(monkeypatch, limit: int):
    """CUDA's 65,535 on axes 1 and 2 lowered to ``limit`` inside the block."""
    with monkeypatch.context() as m:
        m.setattr(_grid, "MAX_GRID_YZ", limit)
        _grid.axis_launches.cache_clear()
        try:
            yield
        finally:
            _grid.axis_launches.cache_clear()


def _attention_run(q, k, v, grad):
    out, lse = attn.attention_fwd(q, k, v, 0.3)
    dq, dk, dv = attn.attention_bwd(grad, q, k, v, out, lse, 0.3)
    return out, lse, dq, dk, dv


def test_attention_in_slabs_equals_one_launch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, 19, 16, generator=g) for _ in range(4))  # B x H = 8 -> slabs 3, 3, 2
    whole = _attention_run(q, k, v, grad)
    with _grid_limit(monkeypatch, 3):
        assert len(_grid.axis_launches((2, 8, 1), 1)) == 3
        sliced = _attention_run(q, k, v, grad)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_group_norm_split_in_slabs_equals_one_launch(monkeypatch, channels_last):
    for name in ("ONE_PASS_MAX", "ONE_PASS_MAX_BYTES", "ONE_PASS_MAX_BWD"):
        monkeypatch.setattr(gn, name, 0)  # the split path at a small shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 8, 5, 6, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b, shift, dy = torch.randn(8, generator=g), torch.randn(8, generator=g), torch.randn(7, 8, generator=g), torch.randn_like(x)

    def run():
        y, mean, rstd = gn.group_norm_fwd(x, w, b, 4, 1e-5, "silu", shift=shift)
        return (y, mean, rstd) + tuple(gn.group_norm_bwd(dy, x, w, b, mean, rstd, 4, "silu", shift=shift))

    whole = run()
    with _grid_limit(monkeypatch, 4):  # batch 7 -> slabs of 4 and 3 (G = 4 on axis 1)
        assert len(_grid.axis_launches((1, 4, 7), 2)) == 2
        sliced = run()
    for a, b_ in zip(whole, sliced):
        assert torch.equal(a, b_)
