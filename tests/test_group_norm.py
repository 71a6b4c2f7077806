"""group_norm (+SiLU): the Triton kernels (interpreted) against F.group_norm and float64, both paths and layouts."""

import pytest
import torch
import torch.nn.functional as TF

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.kernels import group_norm as gn
from ldm_fast.kernels.group_norm import group_norm_reference

from _numerics import assert_close_to_exact, nan_like

# id: (shape, num_groups). SD channel counts at small spatial sizes, then the odd cases.
SHAPES = {
    "sd-128": ((1, 128, 4, 4), 32),  # VAE top level: 4 channels per group
    "sd-256": ((1, 256, 3, 3), 32),
    "sd-320": ((2, 320, 2, 3), 32),  # UNet level 0: 10 channels per group, not a power of two
    "sd-512": ((1, 512, 2, 2), 32),
    "sd-640": ((1, 640, 2, 2), 32),
    "sd-1280": ((1, 1280, 2, 2), 32),  # 40 channels per group
    "c96-g32": ((2, 96, 3, 3), 32),  # 3 channels per group
    "spatial-1x1": ((2, 64, 1, 1), 32),
    "spatial-7x5": ((2, 32, 7, 5), 8),  # 35 positions: masked tails everywhere
    "group-of-1-channel": ((2, 16, 3, 4), 16),
    "one-group": ((2, 24, 3, 3), 1),
    "video-BCTHW": ((1, 64, 3, 4, 4), 32),
    "no-spatial-BC": ((3, 64), 32),
}
GRAD_SHAPES = {
    "sd-320": ((1, 320, 2, 3), 32),
    **{k: SHAPES[k] for k in ("c96-g32", "spatial-7x5", "group-of-1-channel", "one-group", "video-BCTHW")},
}
# (dtype, activation) pairs: every dtype, SiLU and the plain path (the SiLU code minus the SiLU).
DTYPE_ACTIVATIONS = [(torch.float32, None), (torch.float16, "silu"), (torch.bfloat16, "silu")]
DTYPE_ACTIVATION_IDS = ["fp32-plain", "fp16-silu", "bf16-silu"]
GRAD_DTYPE_ACTIVATIONS = [
    (torch.float32, None), (torch.float32, "silu"), (torch.float16, "silu"), (torch.bfloat16, "silu"),
]
GRAD_DTYPE_ACTIVATION_IDS = ["fp32-plain", "fp32-silu", "fp16-silu", "bf16-silu"]

# Shapes for the forced split path (tile 32, 16 target programs): several S-chunks, two tiles per
# statistics/apply program, a partial last tile; channel blocks that straddle groups of 3 channels.
SPLIT_SHAPES = {
    "nchw-multichunk": ((2, 4, 13, 11), 2, False),
    "channels-last-multichunk": ((2, 4, 13, 11), 2, True),
    "cg3-channels-last": ((2, 12, 4, 3), 4, True),
    "video-BCTHW": ((1, 16, 3, 5, 4), 4, False),
}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, *spatial] stored channels fastest (NHWC / NDHWC)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def _inputs(shape, dtype, *, param_dtype=None, seed=0, offset=0.0):
    """x (mean ``offset``, std 2), weight around 1 and bias, deterministic."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (offset + 2 * torch.randn(shape, generator=g)).to(dtype)
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    bias = (0.5 * torch.randn(C, generator=g)).to(param_dtype or dtype)
    return x, weight, bias


def _reference(x, groups, weight, bias, eps, activation, cast):
    """group_norm_reference at dtype ``cast`` (float64: the exact answer); parameters as fp32 at
    low precision (CPU group_norm takes fp16/bf16 x with fp32 parameters, and the upcast is exact)."""
    pcast = torch.float64 if cast == torch.float64 else torch.float32
    w = None if weight is None else weight.to(pcast)
    b = None if bias is None else bias.to(pcast)
    return group_norm_reference(x.to(cast), groups, w, b, eps, activation)


def _check_forward(y, x, groups, weight, bias, eps, activation):
    exact = _reference(x, groups, weight, bias, eps, activation, torch.float64)
    eager = _reference(x, groups, weight, bias, eps, activation, x.dtype)
    assert_close_to_exact(y, exact, eager)


def _check_gradients(x, groups, weight, bias, eps, activation, grad, grads):
    """grads = (dx, dweight, dbias) from the kernel against autograd through the float64 reference,
    with autograd through the eager reference at x's dtype as the yardstick."""
    results = {}
    for cast in (torch.float64, x.dtype):
        pcast = torch.float64 if cast == torch.float64 else torch.float32
        xr = x.detach().to(cast).requires_grad_()
        wr = weight.detach().to(pcast).requires_grad_()
        br = bias.detach().to(pcast).requires_grad_()
        group_norm_reference(xr, groups, wr, br, eps, activation).backward(grad.to(cast))
        results[cast] = (xr.grad, wr.grad, br.grad)
    for got, exact, eager in zip(grads, results[torch.float64], results[x.dtype]):
        assert_close_to_exact(got, exact, eager.to(got.dtype))


@pytest.fixture
def force_split(monkeypatch):
    """Send every call down the split path, with tiles small enough that the test shapes span several."""

    def force(tile: int = 32, target_programs: int = 16):
        monkeypatch.setattr(gn, "ONE_PASS_MAX", 0)
        monkeypatch.setattr(gn, "ONE_PASS_MAX_BYTES", 0)
        monkeypatch.setattr(gn, "ONE_PASS_MAX_BWD", 0)
        monkeypatch.setattr(gn, "TILE", tile)
        monkeypatch.setattr(gn, "TARGET_PROGRAMS", target_programs)
        monkeypatch.setattr(gn, "MERGE_BLOCK", 2)  # the apply kernel merges a group's chunks in several steps

    return force


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("dtype, activation", DTYPE_ACTIVATIONS, ids=DTYPE_ACTIVATION_IDS)
@pytest.mark.parametrize("shape, groups", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_reference(shape, groups, dtype, activation, poison, triton_backend):
    x, weight, bias = _inputs(shape, dtype)
    eps = 1e-6 if shape[1] in (128, 256, 512) else 1e-5  # VAE 1e-6, UNet 1e-5
    y = F.group_norm(x, groups, weight, bias, eps, activation=activation)
    assert triton_backend("group_norm")
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    _check_forward(y, x, groups, weight, bias, eps, activation)


@pytest.mark.parametrize("out_layout", ["out-nchw", "out-channels-last"])
@pytest.mark.parametrize("in_layout", ["in-nchw", "in-channels-last"])
@pytest.mark.parametrize(
    "shape, groups, dtype",
    [((1, 320, 2, 3), 32, torch.bfloat16), (*SHAPES["c96-g32"], torch.float32),
     (*SHAPES["spatial-7x5"], torch.float16), (*SHAPES["video-BCTHW"], torch.bfloat16)],
    ids=["sd-320-bf16", "c96-g32-fp32", "spatial-7x5-fp16", "video-BCTHW-bf16"],
)
def test_layouts_in_and_out(shape, groups, dtype, in_layout, out_layout, poison, triton_backend):
    x, weight, bias = _inputs(shape, dtype)
    if in_layout == "in-channels-last":
        x = _channels_last(x)
        assert not x.is_contiguous()
    fmt = torch.contiguous_format if out_layout == "out-nchw" else torch.channels_last
    y = F.group_norm(x, groups, weight, bias, activation="silu", out_memory_format=fmt)
    assert triton_backend("group_norm")
    if out_layout == "out-nchw":
        assert y.is_contiguous()
    else:
        assert y.movedim(1, -1).is_contiguous() and not y.is_contiguous()
    _check_forward(y, x, groups, weight, bias, 1e-5, "silu")
    if (in_layout == "in-nchw") == (out_layout == "out-nchw"):
        kept = F.group_norm(x, groups, weight, bias, activation="silu")  # None keeps x's layout
        assert kept.stride() == x.stride() and torch.equal(kept, y)


def test_channels_last_3d_output_format(triton_backend):
    x, weight, bias = _inputs((1, 64, 2, 3, 4), torch.float16)
    y = F.group_norm(x, 32, weight, bias, out_memory_format=torch.channels_last_3d)
    assert triton_backend("group_norm")
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    _check_forward(y, x, 32, weight, bias, 1e-5, None)


@pytest.mark.parametrize(
    "x_dtype, param_dtype",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["x-fp16-params-fp32", "x-bf16-params-fp16", "x-fp32-params-bf16"],
)
def test_parameter_dtype_independent_of_x(x_dtype, param_dtype, poison, triton_backend):
    x, weight, bias = _inputs((2, 64, 3, 3), x_dtype, param_dtype=param_dtype)
    y = F.group_norm(x, 32, weight, bias, activation="silu")
    assert triton_backend("group_norm")
    assert y.dtype == x_dtype
    _check_forward(y, x, 32, weight, bias, 1e-5, "silu")


@pytest.mark.parametrize("affine", ["weight-only", "bias-only", "no-affine"])
def test_missing_weight_or_bias(affine, triton_backend):
    x, weight, bias = _inputs((2, 32, 3, 3), torch.float32)
    weight = None if affine == "bias-only" or affine == "no-affine" else weight
    bias = None if affine == "weight-only" or affine == "no-affine" else bias
    y = F.group_norm(x, 8, weight, bias, activation="silu")
    assert triton_backend("group_norm")
    torch.testing.assert_close(y, TF.silu(TF.group_norm(x, 8, weight, bias)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["one-pass", "split"])
def test_variance_is_two_pass(path, force_split):
    """Mean 1000, std 2: E[x^2] - E[x]^2 in fp32 would lose the variance to cancellation."""
    if path == "split":
        force_split()
    x, weight, bias = _inputs((2, 8, 13, 11), torch.float32, offset=1000.0)
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 2, 1e-5)
    _check_forward(y, x, 2, weight, bias, 1e-5, None)
    var = x.double().view(2, 2, -1).var(dim=-1, unbiased=False)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), x.double().view(2, 2, -1).mean(-1), rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("dtype, activation", GRAD_DTYPE_ACTIVATIONS, ids=GRAD_DTYPE_ACTIVATION_IDS)
@pytest.mark.parametrize("shape, groups", GRAD_SHAPES.values(), ids=GRAD_SHAPES.keys())
def test_gradients(shape, groups, dtype, activation, triton_backend):
    x, weight, bias = _inputs(shape, dtype)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    xk, wk, bk = (t.clone().requires_grad_() for t in (x, weight, bias))
    F.group_norm(xk, groups, wk, bk, activation=activation).backward(grad)
    assert triton_backend("group_norm")
    assert xk.grad.dtype == dtype and wk.grad.dtype == weight.dtype
    _check_gradients(x, groups, weight, bias, 1e-5, activation, grad, (xk.grad, wk.grad, bk.grad))


@pytest.mark.parametrize("layouts", ["x-cl-dy-nchw", "x-nchw-dy-cl"])
def test_gradient_layouts(layouts, triton_backend):
    """dy in another layout than x (the output was written channels-last, or the reverse)."""
    x, weight, bias = _inputs((2, 64, 3, 5), torch.float16)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    if layouts == "x-cl-dy-nchw":
        x = _channels_last(x)
    else:
        grad = _channels_last(grad)
    xk, wk, bk = (t.clone().requires_grad_() for t in (x, weight, bias))
    F.group_norm(xk, 32, wk, bk, activation="silu").backward(grad)
    assert triton_backend("group_norm")
    _check_gradients(x, 32, weight, bias, 1e-5, "silu", grad, (xk.grad, wk.grad, bk.grad))


def test_gradient_without_affine(triton_backend):
    x = torch.randn(2, 32, 3, 3, requires_grad=True)
    grad = torch.randn(2, 32, 3, 3)
    F.group_norm(x, 8, activation="silu").backward(grad)
    assert triton_backend("group_norm")
    xr = x.detach().double().requires_grad_()
    TF.silu(TF.group_norm(xr, 8)).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the split path, forced at small sizes, and the one-pass batch blocks


@pytest.mark.parametrize("dtype, activation", DTYPE_ACTIVATIONS, ids=DTYPE_ACTIVATION_IDS)
@pytest.mark.parametrize("shape, groups, channels_last", SPLIT_SHAPES.values(), ids=SPLIT_SHAPES.keys())
def test_split_path(shape, groups, channels_last, dtype, activation, force_split, poison, triton_backend):
    force_split()
    x, weight, bias = _inputs(shape, dtype)
    if channels_last:
        x = _channels_last(x)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    xk, wk, bk = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.group_norm(xk, groups, wk, bk, activation=activation)
    y.backward(grad)
    assert triton_backend("group_norm")
    _check_forward(y.detach(), x, groups, weight, bias, 1e-5, activation)
    _check_gradients(x, groups, weight, bias, 1e-5, activation, grad, (xk.grad, wk.grad, bk.grad))


def test_split_tiles_cover_several_chunks(force_split):
    """The forced configuration really has several S-chunks, several tiles per program, a partial tile."""
    force_split()
    S = 13 * 11
    for channels_last in (False, True):
        block_s, block_c = gn._split_tile(4, S, channels_last)
        tiles_per_program, n_chunks = gn._chunks(2, S, -(-4 // block_c), block_s)
        assert tiles_per_program > 1 and n_chunks > 1 and S % block_s, (channels_last, block_s, tiles_per_program)
        # the forward statistics: several chunks per group (more than MERGE_BLOCK), several tiles per
        # chunk, a partial last chunk
        st = gn._stats_chunks(2, 2, S, 2, channels_last)
        units = S if channels_last else 2 * S
        assert st.n_chunks > gn.MERGE_BLOCK and st.chunk_len > st.BLOCK_S and units % st.chunk_len, st


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_one_pass_batch_blocks(channels_last, monkeypatch, triton_backend):
    """Several batch items per one-pass program (weights read once per block), a partial last block."""
    monkeypatch.setattr(gn, "ONE_PASS_MIN_PROGRAMS", 1)
    assert gn._batches_per_program(5, 2) == 4
    x, weight, bias = _inputs((5, 8, 3, 3), torch.float16)
    if channels_last:
        x = _channels_last(x)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    xk, wk, bk = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = F.group_norm(xk, 2, wk, bk, activation="silu")
    y.backward(grad)
    assert triton_backend("group_norm")
    _check_forward(y.detach(), x, 2, weight, bias, 1e-5, "silu")
    _check_gradients(x, 2, weight, bias, 1e-5, "silu", grad, (xk.grad, wk.grad, bk.grad))


class _LaunchSpy:
    """Stands in for a Triton kernel: counts ``kernel[grid](...)`` launches and runs the real one."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_pass_pieces_and_size_rule():
    """Channels held as two power-of-two pieces; the U-Net's 640x32x32 group (20480 elements) fits in
    NCHW only; 320x64x64 (40960) takes the split path (it needed all 128 registers at 16 warps)."""
    assert [gn._channel_pieces(cg) for cg in (1, 4, 10, 16, 20, 30, 40)] == [
        (1, 0), (4, 0), (8, 2), (16, 0), (16, 4), (16, 16), (32, 8)]
    for shape in ((1, 640, 32, 32), (8, 640, 32, 32)):
        assert gn.one_pass_fits(shape, 32, dtype=torch.float16) and gn.one_pass_fits(shape, 32, dtype=torch.bfloat16)
        assert not gn.one_pass_fits(shape, 32, dtype=torch.float16, channels_last=True)
        assert not gn.one_pass_fits(shape, 32)  # no dtype: the layout- and dtype-independent limit only
    assert gn.one_pass_fits((1, 640, 32, 32), 32, dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert not gn.one_pass_fits((1, 320, 64, 64), 32, dtype=dtype)
    assert not gn.one_pass_fits((1, 512, 64, 64), 32, dtype=torch.float16)  # VAE: 65536 elements
    assert [gn._one_pass_warps(gn._one_pass_elements(S, cg, False)) for S, cg in ((64, 40), (256, 10))] == [8, 8]


@pytest.mark.parametrize(
    "dtype, channels_last, one_pass",
    [(torch.float16, False, True), (torch.bfloat16, False, True), (torch.float32, False, False),
     (torch.float16, True, False)],
    ids=["fp16-nchw", "bf16-nchw", "fp32-nchw", "fp16-channels-last"],
)
def test_one_pass_byte_limit_routes_truthfully(dtype, channels_last, one_pass, monkeypatch, poison):
    """Above ONE_PASS_MAX, groups within ONE_PASS_MAX_BYTES of x take the one pass when NCHW, as
    one_pass_fits says (scaled down: 16 positions x 10 channels = 8 + 2 pieces, 320 bytes at fp16)."""
    monkeypatch.setattr(gn, "ONE_PASS_MAX", 64)
    monkeypatch.setattr(gn, "ONE_PASS_MAX_BYTES", 320)
    spy = _LaunchSpy(gn._group_norm_fwd_one_pass_kernel)
    monkeypatch.setattr(gn, "_group_norm_fwd_one_pass_kernel", spy)
    x, weight, bias = _inputs((2, 20, 4, 4), dtype)
    if channels_last:
        x = _channels_last(x)
    assert gn.one_pass_fits(x.shape, 2, dtype=dtype, channels_last=channels_last) == one_pass
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 2, 1e-5, "silu", out=nan_like(x))
    assert spy.launches == int(one_pass)
    _check_forward(y, x, 2, weight, bias, 1e-5, "silu")
    torch.testing.assert_close(mean.double(), x.double().reshape(2, 2, -1).mean(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 640, 32, 32)], ids=["unet-640x32x32"])
def test_one_pass_at_unet_size(shape, monkeypatch, poison):
    """The full-size U-Net group of 20480 elements (16 + 4 channel pieces) in one pass, fp16."""
    spy = _LaunchSpy(gn._group_norm_fwd_one_pass_kernel)
    monkeypatch.setattr(gn, "_group_norm_fwd_one_pass_kernel", spy)
    x, weight, bias = _inputs(shape, torch.float16)
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 32, 1e-5, "silu", out=nan_like(x))
    assert spy.launches == 1
    _check_forward(y, x, 32, weight, bias, 1e-5, "silu")


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("path", ["one-pass", "split"])
def test_every_output_element_is_written(path, layout, force_split):
    """Launchers writing into NaN-filled buffers: y and dx must come back all finite."""
    if path == "split":
        force_split()
    x, weight, bias = _inputs((2, 8, 13, 11), torch.float16)
    if layout == "channels-last":
        x = _channels_last(x)
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 2, 1e-5, "silu", out=nan_like(x))
    assert torch.isfinite(y).all() and torch.isfinite(mean).all() and torch.isfinite(rstd).all()
    dx, dw, db = gn.group_norm_bwd(y, x, weight, bias, mean, rstd, 2, "silu", out=nan_like(x))
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    assert dx.stride() == x.stride()


# ---------------------------------------------------------------------------------------------
# shift (issue #16): y = GroupNorm(x + shift[:, :, None, None]) without materializing the sum, as
# diffusers' ResnetBlock2D does before norm2 (``h = conv1(h) + temb[:, :, None, None]``). The
# launchers are called directly (the public op does not take a shift yet).

# (x dtype, activation, shift dtype): the shift in x's dtype, or fp32 beside a low-precision x
SHIFT_DTYPES = [(torch.float32, None, torch.float32), (torch.float16, "silu", torch.float16),
                (torch.bfloat16, "silu", torch.float32)]
SHIFT_DTYPE_IDS = ["fp32-plain", "fp16-silu", "bf16-silu-fp32-shift"]
# (shape, groups): 3 channels per group over 35 positions (masked tails, straddling channel
# blocks); a group of one channel (dshift is then 0: each channel's dx sums to 0)
SHIFT_SHAPES = {"cg3-7x5": ((2, 12, 7, 5), 4), "group-of-1-channel": ((2, 8, 5, 3), 8)}


def _shift_inputs(shape, dtype, shift_dtype, channels_last):
    x, weight, bias = _inputs(shape, dtype)
    g = torch.Generator().manual_seed(5)
    shift = (3 * torch.randn(shape[:2], generator=g)).to(shift_dtype)  # of the order of x's spread and more
    grad = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x, grad = _channels_last(x), _channels_last(grad)
    return x, weight, bias, shift, grad


def _shift_references(x, groups, weight, bias, shift, eps, activation, grad):
    """{cast: (y, dx, dweight, dbias, dshift)} by autograd through ``group_norm_reference(...,
    shift=)`` at float64 (exact) and at x's dtype (eager; the parameters fp32 as in _reference)."""
    results = {}
    for cast in (torch.float64, x.dtype):
        pcast = torch.float64 if cast == torch.float64 else torch.float32
        leaves = [x.detach().to(cast), weight.detach().to(pcast), bias.detach().to(pcast),
                  shift.detach().to(torch.float64 if cast == torch.float64 else shift.dtype)]
        leaves = [t.requires_grad_() for t in leaves]
        y = group_norm_reference(leaves[0], groups, leaves[1], leaves[2], eps, activation, shift=leaves[3])
        y.backward(grad.to(cast))
        results[cast] = (y.detach(),) + tuple(t.grad for t in leaves)
    return results[torch.float64], results[x.dtype]


@pytest.mark.parametrize("dtype, activation, shift_dtype", SHIFT_DTYPES, ids=SHIFT_DTYPE_IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
@pytest.mark.parametrize("path", ["one-pass", "split"])
@pytest.mark.parametrize("shape, groups", SHIFT_SHAPES.values(), ids=SHIFT_SHAPES.keys())
def test_shift_forward_and_backward(shape, groups, path, layout, dtype, activation, shift_dtype, force_split,
                                    monkeypatch, poison):
    """y, mean/rstd, dx, dweight, dbias and dshift of the fused shift against F.group_norm(x + shift)
    by autograd, float64 and eager, on both paths (the split one over several chunks) and layouts."""
    if path == "split":
        force_split()
    spies = {name: _LaunchSpy(getattr(gn, name)) for name in (
        "_group_norm_fwd_one_pass_kernel", "_group_norm_fwd_apply_kernel",
        "_group_norm_bwd_one_pass_kernel", "_group_norm_bwd_finalize_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(gn, name, spy)
    x, weight, bias, shift, grad = _shift_inputs(shape, dtype, shift_dtype, layout == "channels-last")
    eps = 1e-5
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, groups, eps, activation, shift=shift)
    dx, dw, db, dshift = gn.group_norm_bwd(grad, x, weight, bias, mean, rstd, groups, activation, shift=shift)
    one_pass = path == "one-pass"
    assert [s.launches for s in spies.values()] == ([1, 0, 1, 0] if one_pass else [0, 1, 0, 1])
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    assert dshift.shape == shift.shape and dshift.dtype == shift.dtype
    exact, eager = _shift_references(x, groups, weight, bias, shift, eps, activation, grad)
    for got, ex, ea in zip((y, dx, dw, db, dshift), exact, eager):
        assert_close_to_exact(got, ex, ea.to(got.dtype))
    xs = x.double() + shift.double()[:, :, None, None]
    torch.testing.assert_close(mean.double(), xs.reshape(shape[0], groups, -1).mean(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xs.reshape(shape[0], groups, -1).var(-1, unbiased=False)
                                                         + eps), rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", ["one-pass", "split"])
def test_shift_without_affine_and_into_out(path, force_split, poison):
    """No weight or bias, y and dx written into NaN-filled buffers of the other layout: every
    element written, the shift still applied."""
    if path == "split":
        force_split()
    x, _, _, shift, grad = _shift_inputs((2, 12, 7, 5), torch.float16, torch.float16, False)
    y, mean, rstd = gn.group_norm_fwd(x, None, None, 4, 1e-5, "silu", shift=shift, out=nan_like(_channels_last(x)))
    dx, dw, db, dshift = gn.group_norm_bwd(grad, x, None, None, mean, rstd, 4, "silu", shift=shift,
                                           out=nan_like(_channels_last(x)))
    assert dw.numel() == 0 and db.numel() == 0 and torch.isfinite(y).all() and torch.isfinite(dx).all()
    xr, sr = x.double().requires_grad_(), shift.double().requires_grad_()
    ref = group_norm_reference(xr, 4, None, None, 1e-5, "silu", shift=sr)
    ref.backward(grad.double())
    eager = group_norm_reference(x, 4, None, None, 1e-5, "silu", shift=shift)
    assert_close_to_exact(y, ref.detach(), eager)
    torch.testing.assert_close(dx.double(), xr.grad, rtol=0, atol=2e-2)
    torch.testing.assert_close(dshift.double(), sr.grad, rtol=0, atol=5e-2)


@pytest.mark.parametrize("path", ["one-pass", "split"])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_shift_read_in_place_from_a_column_slice(path, layout, force_split, poison):
    """A shift that is a column slice of a wider [B, N] tensor (the packed time_emb_proj output every
    ResnetBlock2D slices its part from) is read in place by the forward kernels, rows a stride apart:
    the same y and statistics, bit for bit, as with the same shift made contiguous; no copy."""
    if path == "split":
        force_split()
    x, weight, bias, shift, _ = _shift_inputs((2, 12, 7, 5), torch.float16, torch.float16, layout == "channels-last")
    wide = torch.randn(2, 40, dtype=torch.float16)
    wide[:, 9:21] = shift
    sliced = wide[:, 9:21]
    assert sliced.stride() == (40, 1) and gn._check_shift(sliced, x, rows=True) is sliced
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 4, 1e-5, "silu", shift=sliced, out=nan_like(x))
    y0, mean0, rstd0 = gn.group_norm_fwd(x, weight, bias, 4, 1e-5, "silu", shift=shift.contiguous())
    assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(rstd, rstd0)


@pytest.mark.parametrize("layout, out_layout", [("nchw", None), ("channels-last", None), ("nchw", True),
                                                ("channels-last", False), ("video", None)])
@pytest.mark.parametrize("stats", [False, True])
def test_a_planned_signature_launches_what_the_full_path_launches(layout, out_layout, stats, poison, monkeypatch):
    """A repeat of an op call's signature (``checked``) goes straight to the one-pass launch planned by
    its first call (``_ONE_PASS_CALLS``): the same y, mean and rstd, bit for bit, as the full path,
    with new values of everything the plan does not hold (x, weight, bias, eps, a shift read from a
    column slice, a weight with a stride); another signature (a dtype, the options, which tensors are
    given, the tuning constants) plans anew; an unplanned layout (a transposed x) is never planned."""
    monkeypatch.setattr(gn, "_ONE_PASS_CALLS", {})
    shape = (2, 12, 3, 4, 2) if layout == "video" else (2, 12, 7, 5)
    g = torch.Generator().manual_seed(5)

    def call(checked, seed_shift=0.0, eps=1e-5, **kwargs):
        x = torch.randn(shape, generator=g) + seed_shift
        if layout == "channels-last":
            x = _channels_last(x)
        wide = torch.randn(2, 30, generator=g)
        weight = torch.randn(24, generator=g)[::2]  # stride 2: the launch makes it contiguous
        bias = torch.randn(12, generator=g)
        args = (x, weight, bias, 4, eps, "silu", out_layout)
        return gn.group_norm_fwd(*args, stats=stats, shift=wide[:, 7:19], checked=checked, **kwargs), args, wide

    (y, mean, rstd), args, wide = call(True)  # plans
    assert len(gn._ONE_PASS_CALLS) == 1
    for seed_shift, eps in ((0.0, 1e-5), (3.0, 1e-3)):  # planned: new values, the same computation
        state = g.get_state()
        planned, _, _ = call(True, seed_shift, eps)
        g.set_state(state)
        full, _, _ = call(False, seed_shift, eps)
        assert len(gn._ONE_PASS_CALLS) == 1
        assert planned[0].stride() == full[0].stride() and torch.equal(planned[0], full[0])
        assert (planned[1] is None) == (not stats)
        if stats:
            assert torch.equal(planned[1], full[1]) and torch.equal(planned[2], full[2])
    x, weight, bias = args[:3]
    gn.group_norm_fwd(x.half(), weight, bias, 4, 1e-5, "silu", out_layout, stats=stats, checked=True)
    gn.group_norm_fwd(x, None, bias, 4, 1e-5, "silu", out_layout, stats=stats, checked=True)
    gn.group_norm_fwd(x, weight, bias, 4, 1e-5, None, out_layout, stats=stats, checked=True)
    assert len(gn._ONE_PASS_CALLS) == 4
    monkeypatch.setattr(gn, "ONE_PASS_MIN_PROGRAMS", 1)
    gn.group_norm_fwd(x, weight, bias, 4, 1e-5, None, out_layout, stats=stats, checked=True)
    assert len(gn._ONE_PASS_CALLS) == 5
    odd = torch.randn(shape[:2] + shape[2:][::-1]).transpose(-1, -2)  # neither layout: copied, not planned
    y_odd = gn.group_norm_fwd(odd, weight, bias, 4, 1e-5, "silu", out_layout, stats=stats, checked=True)[0]
    assert len(gn._ONE_PASS_CALLS) == 5
    ref = gn.group_norm_fwd(odd.contiguous(), weight, bias, 4, 1e-5, "silu", out_layout, stats=stats)[0]
    assert torch.equal(y_odd, ref)


@pytest.mark.parametrize("layout", ["nchw", "channels-last", "video"])
@pytest.mark.parametrize("affine, shift", [(True, True), (True, False), (False, False)])
def test_a_planned_backward_launches_what_the_full_path_launches(layout, affine, shift, poison, monkeypatch):
    """The backward's repeats of an op call's signature (``checked``) launch as planned by its first
    call (``_ONE_PASS_BWD_CALLS``): dx, dweight, dbias and dshift bit for bit as the full path, with
    new values and a weight with a stride; another signature (dy's layout or dtype, the activation,
    which tensors are given, the tuning constants) plans anew; an unplanned layout (a transposed dy,
    copied) is never planned."""
    monkeypatch.setattr(gn, "_ONE_PASS_BWD_CALLS", {})
    shape = (2, 12, 3, 4, 2) if layout == "video" else (2, 12, 7, 5)
    g = torch.Generator().manual_seed(6)

    def call(checked, scale=1.0, activation="silu", dy_dtype=None):
        x = torch.randn(shape, generator=g) * scale
        dy = torch.randn(shape, generator=g, dtype=dy_dtype)
        if layout == "channels-last":
            x, dy = _channels_last(x), _channels_last(dy)
        weight = torch.randn(24, generator=g)[::2] if affine else None  # stride 2: made contiguous
        bias = torch.randn(12, generator=g) if affine else None
        sh = torch.randn(2, 12, generator=g) if shift else None
        _, mean, rstd = gn.group_norm_fwd(x, weight, bias, 4, 1e-5, activation, shift=sh)
        return gn.group_norm_bwd(dy, x, weight, bias, mean, rstd, 4, activation, shift=sh, checked=checked)

    call(True)  # plans
    assert len(gn._ONE_PASS_BWD_CALLS) == 1
    for scale in (1.0, 3.0):  # planned: new values, the same computation
        state = g.get_state()
        planned = call(True, scale)
        g.set_state(state)
        full = call(False, scale)
        assert len(gn._ONE_PASS_BWD_CALLS) == 1 and len(planned) == len(full) == (4 if shift else 3)
        assert planned[0].stride() == full[0].stride()
        for a, b in zip(planned, full):
            assert torch.equal(a, b)
    call(True, activation=None)
    call(True, dy_dtype=torch.float64)
    assert len(gn._ONE_PASS_BWD_CALLS) == 3
    monkeypatch.setattr(gn, "ONE_PASS_MAX_BWD", gn.ONE_PASS_MAX_BWD * 2)
    call(True)
    assert len(gn._ONE_PASS_BWD_CALLS) == 4
    x = torch.randn(shape, generator=g)
    odd = torch.randn(shape[:2] + shape[2:][::-1], generator=g).transpose(-1, -2)  # neither layout: copied
    _, mean, rstd = gn.group_norm_fwd(x, None, None, 4, 1e-5, "silu")
    dx = gn.group_norm_bwd(odd, x, None, None, mean, rstd, 4, "silu", checked=True)[0]
    assert len(gn._ONE_PASS_BWD_CALLS) == 4
    assert torch.equal(dx, gn.group_norm_bwd(odd.contiguous(), x, None, None, mean, rstd, 4, "silu")[0])


def test_shift_none_is_the_plain_norm(poison):
    """shift=None keeps the three-tuple backward and the plain statistics; a zero shift equals it."""
    x, weight, bias, _, grad = _shift_inputs((2, 12, 7, 5), torch.float32, torch.float32, False)
    y, mean, rstd = gn.group_norm_fwd(x, weight, bias, 4, 1e-5, "silu")
    y0, mean0, rstd0 = gn.group_norm_fwd(x, weight, bias, 4, 1e-5, "silu", shift=torch.zeros(2, 12))
    assert torch.equal(y, y0) and torch.equal(mean, mean0) and torch.equal(rstd, rstd0)
    plain = gn.group_norm_bwd(grad, x, weight, bias, mean, rstd, 4, "silu")
    shifted = gn.group_norm_bwd(grad, x, weight, bias, mean, rstd, 4, "silu", shift=torch.zeros(2, 12))
    assert len(plain) == 3 and len(shifted) == 4
    for a, b in zip(plain, shifted):
        assert torch.equal(a, b)
    torch.testing.assert_close(shifted[3], plain[0].sum((2, 3)), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "shift, error, match",
    [(torch.zeros(2, 11), ValueError, r"shift must have the shape \[B, C\] = \(2, 12\)"),
     (torch.zeros(2, 12, dtype=torch.int32), TypeError, "shift must be a floating-point"),
     ([0.0] * 12, TypeError, "shift must be a torch.Tensor"),
     (torch.zeros(2, 12, device="meta"), ValueError, "shift is on meta")],
    ids=["shape", "int-dtype", "not-tensor", "device"],
)
def test_bad_shift_names_the_argument(shift, error, match):
    x = torch.zeros(2, 12, 3, 3)
    with pytest.raises(error, match=match):
        gn.group_norm_fwd(x, None, None, 4, 1e-5, shift=shift)
    with pytest.raises(error, match=match):
        gn.group_norm_bwd(x, x, None, None, torch.zeros(2, 4), torch.ones(2, 4), 4, shift=shift)


# ---------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("cls", ["GroupNorm", "GroupNorm32"])
def test_state_dict_round_trip_with_torch(cls):
    ours_cls = getattr(ldm_fast.nn, cls)
    theirs = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = ours_cls(32, 64, eps=1e-6, activation="silu")
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = torch.nn.GroupNorm(32, 64, eps=1e-6)
    back.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), theirs.state_dict().values()))
    assert isinstance(ours, torch.nn.GroupNorm)
    x = torch.randn(2, 64, 3, 3)
    torch.testing.assert_close(ours(x), TF.silu(theirs(x)), rtol=1e-5, atol=1e-5)


def test_module_options_and_repr():
    m = ldm_fast.nn.GroupNorm(32, 128, eps=1e-6, activation="silu")
    assert repr(m) == "GroupNorm(32, 128, eps=1e-06, affine=True, bias=True, activation='silu')"
    assert repr(ldm_fast.nn.GroupNorm32(32, 64)) == "GroupNorm32(32, 64, eps=1e-05, affine=True, bias=True)"
    plain = ldm_fast.nn.GroupNorm(4, 8, affine=False)
    assert plain.weight is None and plain.bias is None and "affine=False" in repr(plain)
    no_bias = ldm_fast.nn.GroupNorm(4, 8, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(no_bias(x), TF.group_norm(x, 4, no_bias.weight))


def test_module_on_a_torch_without_the_bias_argument(monkeypatch):
    """torch 2.11's nn.GroupNorm.__init__ has no ``bias`` argument (added in 2.12): the module still
    builds, with and without bias, and keeps torch's state_dict."""
    torch_init = torch.nn.GroupNorm.__init__

    def init_2_11(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        torch_init(self, num_groups, num_channels, eps, affine, device, dtype)

    monkeypatch.setattr(torch.nn.GroupNorm, "__init__", init_2_11)
    m = ldm_fast.nn.GroupNorm(4, 8, activation="silu")
    assert list(m.state_dict()) == ["weight", "bias"] and m.activation == "silu"
    no_bias = ldm_fast.nn.GroupNorm(4, 8, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(no_bias(x), TF.group_norm(x, 4, no_bias.weight))
    assert ldm_fast.nn.GroupNorm32(4, 8).weight.shape == (8,)


def test_module_runs_the_kernel(triton_backend):
    m = ldm_fast.nn.GroupNorm(32, 64, activation="silu")
    x = torch.randn(1, 64, 3, 3)
    torch.testing.assert_close(m(x), TF.silu(TF.group_norm(x, 32, m.weight, m.bias)), rtol=1e-5, atol=1e-5)
    assert triton_backend("group_norm")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_group_norm32_semantics(dtype, triton_backend):
    """Eager: exactly the SD U-Net's super().forward(x.float()).type(x.dtype); kernel: fp32 compute, one rounding."""
    m = ldm_fast.nn.GroupNorm32(32, 64)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 64, 3, 3).to(dtype)
    expected = torch.nn.GroupNorm.forward(m, x.float()).type(x.dtype)
    with ldm_fast.use_backend("eager"):
        assert torch.equal(m(x), expected)
    y = m(x)
    assert triton_backend("group_norm") and y.dtype == dtype
    exact = TF.group_norm(x.double(), 32, m.weight.double(), m.bias.double())
    assert_close_to_exact(y, exact, expected)


def test_torch_compile_fullgraph_block(triton_backend, monkeypatch):
    """conv -> GroupNorm(silu) -> conv traced by torch.compile(fullgraph=True), forward and backward,
    with the kernel in the graph (LDM_FAST_COMPILE=kernel; auto leaves groups this small to Inductor)."""
    monkeypatch.setenv("LDM_FAST_COMPILE", "kernel")
    ldm_fast.backend.reload_env()
    torch.compiler.reset()
    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Conv2d(4, 64, 3, padding=1),
        ldm_fast.nn.GroupNorm(32, 64, activation="silu"),
        torch.nn.Conv2d(64, 4, 3, padding=1),
    )
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    assert triton_backend("group_norm")
    grads = [x.grad] + [p.grad for p in block.parameters()]
    with ldm_fast.use_backend("eager"):
        x_ref = x.detach().requires_grad_()
        block.zero_grad()
        ref = block(x_ref)
        ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, [x_ref.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_custom_ops_pass_opcheck(triton_backend):
    """Schema, fake tensor, autograd registration and AOT dispatch of both ops."""
    x, weight, bias = _inputs((1, 8, 2, 3), torch.float32)
    x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
    torch.library.opcheck(torch.ops.ldm_fast.group_norm.default, (x, weight, bias, 4, 1e-5, "silu", True))
    y, mean, rstd = torch.ops.ldm_fast.group_norm(x.detach(), weight.detach(), bias.detach(), 4, 1e-5, "silu", False)
    grad_args = (torch.ones_like(y), x.detach(), weight.detach(), None, mean, rstd, 4, "")
    torch.library.opcheck(torch.ops.ldm_fast.group_norm_backward.default, grad_args)


# ---------------------------------------------------------------------------------------------
# fallbacks and errors


@pytest.mark.parametrize("in_layout", ["in-nchw", "in-channels-last"])
def test_eager_backend_is_torch_bit_for_bit(in_layout):
    x, weight, bias = _inputs((2, 64, 3, 5), torch.float16)
    if in_layout == "in-channels-last":
        x = _channels_last(x)
    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("eager"):
        y = F.group_norm(x, 32, weight, bias, 1e-6, activation="silu")
        y_cl = F.group_norm(x, 32, weight, bias, 1e-6, activation="silu", out_memory_format=torch.channels_last)
        plain = F.group_norm(x, 32, weight, bias, 1e-6)
    assert ldm_fast.ops.kernel_launches["group_norm"] == before
    expected = TF.silu(TF.group_norm(x, 32, weight, bias, 1e-6))
    assert torch.equal(y, expected) and y.stride() == expected.stride()
    assert torch.equal(y_cl, expected) and y_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, TF.group_norm(x, 32, weight, bias, 1e-6))


@pytest.mark.parametrize(
    "x, weight",
    [
        (torch.randn(2, 16, 3, 3, dtype=torch.float64), torch.ones(16, dtype=torch.float64)),
        (torch.randn(0, 16, 3, 3), torch.ones(16)),
    ],
    ids=["float64", "empty-batch"],
)
def test_unsupported_inputs_fall_back_to_eager(x, weight):
    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("triton"):
        y = F.group_norm(x, 4, weight, activation="silu")
    assert ldm_fast.ops.kernel_launches["group_norm"] == before
    assert torch.equal(y, TF.silu(TF.group_norm(x, 4, weight)))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: F.group_norm(torch.zeros(2, 6, 4), 4), RuntimeError, r"channel count of x \(C=6.*num_groups \(4\)"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 4, torch.ones(5)), RuntimeError, "weight must be a vector of C=8"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 4, None, torch.ones(8, 1)), RuntimeError, "bias must be a vector"),
        (lambda: F.group_norm(torch.zeros(8), 4), RuntimeError, "x must have at least 2 dimensions"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 0), RuntimeError, "num_groups must be positive"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 2.0), TypeError, "num_groups must be an int"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4, dtype=torch.int32), 4), TypeError, "x must be a floating"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 4, activation="gelu"), ValueError, "activation must be one of"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 4, out_memory_format="nhwc"), ValueError, "out_memory_format"),
        (lambda: F.group_norm(torch.zeros(2, 8, 4), 4, torch.ones(8, device="meta")), ValueError, "weight is on meta"),
        (lambda: ldm_fast.nn.GroupNorm(4, 6), ValueError, r"num_channels \(6\) must be divisible"),
        (lambda: ldm_fast.nn.GroupNorm(4, 8, activation="relu"), ValueError, "activation must be one of"),
    ],
    ids=["channels-not-divisible", "weight-length", "bias-shape", "one-dim", "zero-groups", "float-groups",
         "int-dtype", "activation", "memory-format", "devices", "module-channels", "module-activation"],
)
def test_bad_input_names_the_argument(call, error, match):
    with ldm_fast.use_backend("triton"), pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: TF.group_norm(torch.zeros(2, 6, 4), 4),
        lambda: TF.group_norm(torch.zeros(2, 8, 4), 4, torch.ones(5)),
        lambda: TF.group_norm(torch.zeros(8), 4),
    ],
    ids=["channels-not-divisible", "weight-length", "one-dim"],
)
def test_torch_raises_the_same_error_type(call):
    with pytest.raises(RuntimeError):
        call()


# ---------------------------------------------------------------------------------------------
# shift through the public op (the launchers' shift is tested above)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 5, 3), (1, 64, 40, 40)], ids=["one-pass", "split"])
def test_public_group_norm_with_shift(dtype, shape, triton_backend, poison):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    shift = torch.randn(shape[:2], generator=g).to(dtype).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=g)).requires_grad_(True)
    bias = (0.1 * torch.randn(shape[1], generator=g)).requires_grad_(True)
    grad = torch.randn(shape, generator=g).to(dtype)
    y = F.group_norm(x, 4, weight, bias, 1e-5, activation="silu", shift=shift)
    assert triton_backend("group_norm")
    grads = torch.autograd.grad(y, (x, weight, bias, shift), grad)

    def run(cast):
        leaves = [t.detach().to(cast if t.dtype == dtype else torch.promote_types(t.dtype, cast)).requires_grad_(True)
                  for t in (x, weight, bias, shift)]
        xc, wc, bc, sc = leaves
        with ldm_fast.use_backend("eager"):
            out = TF.silu(TF.group_norm(xc + sc[:, :, None, None], 4, wc, bc, 1e-5))
        return (out, *torch.autograd.grad(out, leaves, grad.to(cast)))

    exact, eager = run(torch.float64), run(dtype)
    for got, ex, ea in zip((y, *grads), exact, eager):
        assert_close_to_exact(got, ex.to(torch.float64), ea.to(got.dtype))


def test_public_group_norm_shift_is_checked():
    x = torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match=r"shift must be \[B, C\]"):
        F.group_norm(x, 4, shift=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="shift must be a floating"):
        F.group_norm(x, 4, shift=torch.zeros(2, 8, dtype=torch.int64))
    torch.testing.assert_close(F.group_norm(x + 1, 4, shift=torch.ones(2, 8, 1)), F.group_norm(x + 2, 4, shift=-torch.ones(2, 8)))


def test_public_group_norm_with_shift_under_compile_is_one_op(monkeypatch, triton_backend):
    """LDM_FAST_COMPILE=kernel: group_norm with a shift is one ldm_fast op in the graph, forward and
    backward (dshift included), equal to the eager kernel call."""
    monkeypatch.setenv("LDM_FAST_COMPILE", "kernel")
    ldm_fast.backend.reload_env()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 5, 3, generator=g, requires_grad=True)
    shift = torch.randn(2, 8, generator=g, requires_grad=True)
    ops = []

    def backend_fn(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    fn = lambda x, s: F.group_norm(x, 4, shift=s, activation="silu")  # noqa: E731
    torch.compiler.reset()
    y = torch.compile(fn, backend=backend_fn, fullgraph=True)(x, shift)
    assert ops.count("ldm_fast.group_norm") == 1, ops
    dx, ds = torch.autograd.grad(y.sum(), (x, shift))
    y_ref = fn(x, shift)
    dx_ref, ds_ref = torch.autograd.grad(y_ref.sum(), (x, shift))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(ds, ds_ref)


# ---------------------------------------------------------------------------------------------
# autocast (issue 25, item 10): CUDA autocast runs group_norm in fp32 (its fp32 list); so does the
# kernel path. The CUDA branch is reached on the CPU by declaring CPU autocast an fp32-list device.


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True], ids=["", "shift"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_group_norm_follows_fp32_autocast(dtype, shift, grad, triton_backend, monkeypatch, poison):
    monkeypatch.setattr(ldm_fast.ops.group_norm, "FP32_AUTOCAST_DEVICES", ("cpu",))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 5, 7, generator=g).to(dtype)
    w, b = 1 + torch.randn(12, generator=g), torch.randn(12, generator=g)  # fp32 parameters, as in AMP training
    s = torch.randn(2, 12, generator=g).to(dtype) if shift else None
    leaves = [t for t in (x, w, b, s) if t is not None]
    if grad:
        for t in leaves:
            t.requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        y = F.group_norm(x, 4, w, b, 1e-5, activation="silu", shift=s)
    assert triton_backend("group_norm") and y.dtype == torch.float32  # as torch's under CUDA autocast

    def reference(xs, ws, bs, ss, compute):  # autocast's rule: the sum in x's dtype, then the norm in fp32
        h = xs if ss is None else xs + ss[:, :, None, None]
        return TF.silu(TF.group_norm(h.to(compute), 4, ws.to(compute), bs.to(compute), 1e-5))

    eager = reference(x, w, b, s, torch.float32)
    exact = reference(*(t.double() if t is not None else None for t in (x, w, b, s)), torch.float64)
    if shift:  # the kernel adds the shift in fp32, eager rounds the sum to x's dtype first
        eager = reference(x.float(), w, b, s.float(), torch.float32)
    assert_close_to_exact(y.detach(), exact.detach(), eager.detach())
    if not grad:
        return
    dy = torch.randn(y.shape, generator=g)
    got = torch.autograd.grad(y, leaves, dy)

    def grads(compute):  # autograd through the reference at ``compute``, for the same leaves
        fresh = {name: t.detach().to(compute).requires_grad_() for name, t in zip("xwbs", (x, w, b, s)) if t is not None}
        out = reference(fresh["x"], fresh["w"], fresh["b"], fresh.get("s"), compute)
        return torch.autograd.grad(out, list(fresh.values()), dy.to(compute))

    for leaf, got_g, want_g, eager_g in zip(leaves, got, grads(torch.float64), grads(torch.float32)):
        assert got_g.dtype == leaf.dtype  # x's (and shift's) gradient in its dtype, the fp32 parameters' in fp32
        assert_close_to_exact(got_g, want_g, eager_g.to(leaf.dtype))


def test_group_norm_keeps_the_inputs_dtype_where_autocast_does(triton_backend):
    """CPU autocast keeps group_norm in the input's dtype (torch's CPU rule), and GroupNorm32
    (``upcast``) casts back to x's dtype under any autocast, as the SD U-Net's class does."""
    x = torch.randn(2, 8, 3, 3, dtype=torch.bfloat16)
    w = torch.ones(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.group_norm(x, 2, w, w).dtype == torch.bfloat16
        assert TF.group_norm(x, 2, w, w).dtype == torch.bfloat16  # (torch's own rule on the CPU)
    assert triton_backend("group_norm")


def test_group_norm32_under_fp32_autocast_keeps_x_dtype(triton_backend, monkeypatch):
    monkeypatch.setattr(ldm_fast.ops.group_norm, "FP32_AUTOCAST_DEVICES", ("cpu",))
    m = ldm_fast.nn.GroupNorm32(4, 8)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        assert m(x).dtype == torch.float16
        assert ldm_fast.nn.GroupNorm(4, 8)(x).dtype == torch.float32
