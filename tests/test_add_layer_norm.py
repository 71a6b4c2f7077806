"""add_layer_norm (kernels/add_layer_norm.py, ldm_fast.functional.add_layer_norm) in the interpreter,
against the eager reference and float64.

``s`` is judged bit for bit against eager's ``x + residual`` (the kernel rounds the sum as eager
does); ``out``, the statistics and every gradient by the project's rule (tests/_numerics.py). The
``triton_backend`` fixture proves the kernel ran; ``poison`` fills fresh outputs with NaN. With
``s_bias`` the first output is judged bit for bit against eager's ``(x + residual) + s_bias`` and
``out`` against the call without s_bias.
"""

import pytest
import torch
import torch.nn.functional as TF

import ldm_fast
import ldm_fast.functional as lf
from ldm_fast.kernels import add_layer_norm as aln
from ldm_fast.kernels.add_layer_norm import add_layer_norm_fwd, add_layer_norm_reference

from _numerics import assert_close_to_exact
from benchmarks import traffic

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {  # x, residual [..., C]
    "odd-C5": (2, 3, 5),  # a block of 16 lanes, 11 masked; 256 rows a program, 6 in use
    "odd-C77": (2, 9, 77),  # CLIP's 77 as a width: 128 lanes, a partial row tile
    "sd-C320": (2, 16, 320),  # SD 1.5's first transformer level scaled down to 32 tokens: 8 rows of 512
    "sd-C1280-rows": (3, 1280),  # the mid block's width: 2 rows of 2048 a program, the last tile half used
    "one-row-C640": (640,),
}
AFFINE = ["none", "weight", "weight+bias", "fp32-params"]


def _inputs(shape, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)  # an offset mean: the two-pass variance matters
    residual = torch.randn(shape, generator=g).to(dtype)
    pdtype = torch.float32 if affine == "fp32-params" else dtype
    weight = (1 + 0.5 * torch.randn(C, generator=g)).to(pdtype) if affine != "none" else None
    bias = (0.5 * torch.randn(C, generator=g)).to(pdtype) if affine in ("weight+bias", "fp32-params") else None
    return x, residual, weight, bias


def _double(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_reference(shape, dtype, affine, poison, triton_backend):
    x, residual, weight, bias = _inputs(shape, dtype, affine)
    s, out = lf.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert triton_backend("add_layer_norm")
    assert s.shape == out.shape == shape and s.is_contiguous() and out.is_contiguous()
    assert s.dtype == out.dtype == dtype
    eager_s, eager_out = add_layer_norm_reference(x, residual, weight, bias, 1e-5)
    assert torch.equal(s, eager_s)  # the sum rounded to the storage dtype as eager rounds it
    # exact: the layer norm of the ROUNDED sum in float64 (what the op defines)
    exact = TF.layer_norm(s.double(), (shape[-1],), _double(weight), _double(bias), 1e-5)
    assert_close_to_exact(out, exact, eager_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_launcher_statistics(dtype, poison):
    """mean and rstd ([R] fp32, what the backward reads) against float64."""
    x, residual, weight, bias = _inputs((2, 5, 77), dtype, "weight+bias")
    s, out, mean, rstd = add_layer_norm_fwd(x, residual, weight, bias, 1e-5)
    assert mean.shape == rstd.shape == (10,) and mean.dtype == rstd.dtype == torch.float32
    sd = s.double().reshape(10, 77)
    exact_mean = sd.mean(-1)
    exact_rstd = (sd.var(-1, unbiased=False) + 1e-5).rsqrt()
    torch.testing.assert_close(mean.double(), exact_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), exact_rstd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_rows_read_in_place(dtype, poison, triton_backend, monkeypatch):
    """Slices of wider rows (row strides C + 6 and C + 2) are read without a copy."""
    C = 96
    x = _inputs((2, 5, C + 6), dtype, "none")[0][..., 3:3 + C]
    residual = _inputs((2, 5, C + 2), dtype, "none", seed=1)[0][..., :C]
    weight = torch.randn(C).to(dtype)
    assert not x.is_contiguous() and not residual.is_contiguous()
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copied"))
    s, out = lf.add_layer_norm(x, residual, weight)
    monkeypatch.undo()
    assert triton_backend("add_layer_norm")
    eager_s, eager_out = add_layer_norm_reference(x, residual, weight)
    assert torch.equal(s, eager_s)
    assert_close_to_exact(out, TF.layer_norm(s.double(), (C,), weight.double()), eager_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_row_and_column_strided_views_read_in_place(dtype, poison, triton_backend, monkeypatch):
    """[B, N, C] views with any strides are read without a copy: a transpose of the leading dims, and
    the SD 1.x transformer block's residual stream in an NCHW U-Net (the permuted view of proj_in's
    [B, C, H, W] output: column stride H*W, row stride 1)."""
    C = 40
    transposed = torch.randn(7, 3, C).to(dtype).transpose(0, 1)  # [3, 7, C], strides (C, 3C, 1)
    conv_out = torch.randn(2, C, 2, 3).to(dtype)  # NCHW
    nchw_tokens = conv_out.permute(0, 2, 3, 1).reshape(2, 6, C)  # a view: strides (6C, 1, 6)
    assert nchw_tokens.stride() == (6 * C, 1, 6)
    for x, residual in ((transposed, torch.randn(3, 7, C).to(dtype)), (torch.randn(2, 6, C).to(dtype), nchw_tokens)):
        monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copied"))
        s, out = lf.add_layer_norm(x, residual)
        monkeypatch.undo()
        assert triton_backend("add_layer_norm")
        eager_s, eager_out = add_layer_norm_reference(x, residual)
        assert torch.equal(s, eager_s) and s.is_contiguous() and out.is_contiguous()
        assert_close_to_exact(out, TF.layer_norm(s.double(), (C,)), eager_out)


def test_leading_dims_that_do_not_collapse_to_two_are_copied(poison, triton_backend):
    C = 24
    x = torch.randn(4, 3, 2, C).permute(2, 1, 0, 3)  # [2, 3, 4, C]: three leading strides, no two-level view
    residual = torch.randn(2, 3, 4, C)
    s, out = lf.add_layer_norm(x, residual)
    assert triton_backend("add_layer_norm")
    eager_s, eager_out = add_layer_norm_reference(x, residual)
    assert torch.equal(s, eager_s)
    assert_close_to_exact(out, TF.layer_norm(s.double(), (C,)), eager_out)


UPSTREAM = ["s-and-out", "out-only", "s-only"]


@pytest.mark.parametrize("upstream", UPSTREAM)
@pytest.mark.parametrize("affine", ["none", "weight+bias", "fp32-params"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_autograd(dtype, affine, upstream, poison, triton_backend):
    shape = (2, 6, 77)
    x, residual, weight, bias = _inputs(shape, dtype, affine)
    g = torch.Generator().manual_seed(3)
    grad_s = torch.randn(shape, generator=g).to(dtype)
    grad_out = torch.randn(shape, generator=g).to(dtype)

    def run(fn, cast):
        leaves = [None if t is None else t.detach().to(cast or t.dtype).requires_grad_() for t in (x, residual, weight, bias)]
        s, out = fn(*leaves, 1e-5)
        outs, grads = [], []
        if upstream != "out-only":
            outs.append(s)
            grads.append(grad_s.to(s.dtype))
        if upstream != "s-only":
            outs.append(out)
            grads.append(grad_out.to(out.dtype))
        wanted = [t for t in leaves if t is not None]
        got = torch.autograd.grad(outs, wanted, grads, allow_unused=True)
        return [torch.zeros_like(t) if d is None else d for t, d in zip(wanted, got)]

    fused = run(lf.add_layer_norm, None)
    assert triton_backend("add_layer_norm")
    exact = run(add_layer_norm_reference, torch.float64)
    eager = run(add_layer_norm_reference, None)
    for name, got, ex, low in zip(["x", "residual", "weight", "bias"], fused, exact, eager):
        assert got.dtype == low.dtype, name
        assert_close_to_exact(got, ex, low)


def test_gradient_of_one_input_and_of_the_parameters_only(triton_backend):
    x, residual, weight, bias = _inputs((3, 20), torch.float32, "weight+bias")
    weight.requires_grad_()
    s, out = lf.add_layer_norm(x, residual, weight, bias)
    assert triton_backend("add_layer_norm") and s.requires_grad and out.requires_grad
    (dweight,) = torch.autograd.grad(out, weight, torch.ones_like(out))
    w = weight.detach().requires_grad_()
    (ref,) = torch.autograd.grad(TF.layer_norm(x + residual, (20,), w, bias), w, torch.ones_like(out))
    torch.testing.assert_close(dweight, ref, rtol=1e-5, atol=1e-5)
    x.requires_grad_()
    s, out = lf.add_layer_norm(x, residual, weight, bias)
    dx, dw = torch.autograd.grad(out.sum() + s.sum(), [x, weight])
    xr = x.detach().requires_grad_()
    s_ref = xr + residual
    ref_dx, ref_dw = torch.autograd.grad(TF.layer_norm(s_ref, (20,), w, bias).sum() + s_ref.sum(), [xr, w])
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)


def test_double_backward_raises(triton_backend):
    x = torch.randn(2, 8, requires_grad=True)
    s, out = lf.add_layer_norm(x, torch.randn(2, 8))
    (dx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        dx.sum().backward()


def test_empty_and_uncovered_inputs_run_the_reference(triton_backend):
    for shape in [(0, 3, 8), (4, 0)]:
        s, out = lf.add_layer_norm(torch.randn(shape), torch.randn(shape))
        assert s.shape == out.shape == shape
    s, out = lf.add_layer_norm(torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    assert s.dtype == out.dtype == torch.float64
    wide = torch.randn(1, aln.MAX_C + 1)
    s, out = lf.add_layer_norm(wide, wide)
    torch.testing.assert_close(out, TF.layer_norm(wide + wide, (aln.MAX_C + 1,)))
    assert not triton_backend("add_layer_norm")
    s, _, mean, rstd = add_layer_norm_fwd(torch.randn(0, 5), torch.randn(0, 5))
    assert s.shape == (0, 5) and mean.shape == rstd.shape == (0,)


def test_bad_arguments_name_the_argument():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="x"):
        lf.add_layer_norm([1.0], x)
    with pytest.raises(TypeError, match="residual"):
        lf.add_layer_norm(x, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        lf.add_layer_norm(x, torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="residual"):  # ArgumentError: a RuntimeError too, as torch raises
        lf.add_layer_norm(x, torch.randn(4, 4))
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        lf.add_layer_norm(x, x.half())
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        lf.add_layer_norm(x, x, torch.ones(5))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        lf.add_layer_norm(x, x, None, torch.ones(1, 4))
    with pytest.raises(TypeError, match="weight"):
        lf.add_layer_norm(x, x, torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="eps"):
        lf.add_layer_norm(x, x, eps=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        lf.add_layer_norm(x, x, eps=-1e-5)
    with pytest.raises(TypeError, match="eps"):
        lf.add_layer_norm(x, x, eps="1e-5")
    with pytest.raises(ValueError, match="x"):
        lf.add_layer_norm(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight must have shape"):
        add_layer_norm_fwd(x, x, torch.ones(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_backend_is_diffusers_bit_for_bit(dtype):
    x, residual, weight, bias = _inputs((2, 5, 40), dtype, "weight+bias")
    with ldm_fast.use_backend("eager"):
        s, out = lf.add_layer_norm(x, residual, weight, bias, 1e-6)
    h = x + residual
    assert torch.equal(s, h)
    assert torch.equal(out, TF.layer_norm(h, (40,), weight, bias, 1e-6))


def test_block_plan():
    """The whole row in one power-of-two block, TILE (4096) elements a program at 8 warps; wider rows 16 warps."""
    assert aln._plan(2048, 320) == (8, 512, 8, 256)  # SD 1.5 level 1 at 256 px b2: 2048 rows
    assert aln._plan(512, 640) == (4, 1024, 8, 128)
    assert aln._plan(128, 1280) == (2, 2048, 8, 64)
    assert aln._plan(6, 5) == (256, 16, 8, 1)
    assert aln._plan(3, 8192) == (1, 8192, 16, 3)


# -- s_bias: the first output s + s_bias, out and the statistics those of the unbiased s

S_BIAS_SHAPES = {  # x, residual [..., C]
    "odd-C7": (3, 7),  # 16 lanes, 9 masked
    "sd-C320": (2, 5, 320),  # SD 1.5's first transformer width, a partial row tile
    "odd-C1000": (5, 1000),  # 1024 lanes, 4 rows a program: two programs, the second one row
}


def _s_bias(C, dtype, seed=5):
    return (0.7 * torch.randn(C, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", S_BIAS_SHAPES.values(), ids=S_BIAS_SHAPES.keys())
def test_s_bias_output_is_eager_bit_for_bit_and_out_unchanged(shape, dtype, poison, triton_backend):
    x, residual, weight, bias = _inputs(shape, dtype, "weight+bias")
    s_bias = _s_bias(shape[-1], dtype)
    s_biased, out = lf.add_layer_norm(x, residual, weight, bias, 1e-5, s_bias=s_bias)
    assert triton_backend("add_layer_norm")
    assert s_biased.shape == out.shape == shape and s_biased.is_contiguous() and s_biased.dtype == dtype
    assert torch.equal(s_biased, (x + residual) + s_bias)  # rounded twice, as eager's two adds round
    s, out_plain = lf.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert torch.equal(out, out_plain)  # normalized from the unbiased s
    eager_out = add_layer_norm_reference(x, residual, weight, bias, 1e-5)[1]
    assert_close_to_exact(out, TF.layer_norm(s.double(), (shape[-1],), _double(weight), _double(bias), 1e-5), eager_out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s_bias_leaves_the_statistics_of_the_unbiased_sum(dtype, poison):
    x, residual, weight, bias = _inputs((2, 3, 77), dtype, "weight+bias")
    s_biased, out, mean, rstd = add_layer_norm_fwd(x, residual, weight, bias, 1e-5, s_bias=_s_bias(77, dtype))
    s, out_plain, mean_plain, rstd_plain = add_layer_norm_fwd(x, residual, weight, bias, 1e-5)
    assert torch.equal(mean, mean_plain) and torch.equal(rstd, rstd_plain) and torch.equal(out, out_plain)
    assert torch.equal(s_biased, s + _s_bias(77, dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_s_bias_strided_rows_read_in_place(dtype, poison, triton_backend, monkeypatch):
    C = 96
    x = _inputs((2, 5, C + 6), dtype, "none")[0][..., 3:3 + C]
    residual = _inputs((2, 5, C + 2), dtype, "none", seed=1)[0][..., :C]
    s_bias = _s_bias(C, dtype)
    assert not x.is_contiguous() and not residual.is_contiguous()
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copied"))
    s_biased, out = lf.add_layer_norm(x, residual, s_bias=s_bias)
    monkeypatch.undo()
    assert triton_backend("add_layer_norm")
    assert torch.equal(s_biased, (x + residual) + s_bias)
    assert torch.equal(out, lf.add_layer_norm(x, residual)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_s_bias_of_another_dtype_or_stride(dtype, poison, triton_backend):
    """An fp32 s_bias beside fp16/bf16 x: added in fp32, cast back to x's dtype (the reference's
    ``(s + s_bias).to(x.dtype)``); a strided or fp64 one as the reference takes it."""
    x, residual, _, _ = _inputs((4, 33), dtype, "none")
    s = x + residual
    s_bias32 = _s_bias(33, torch.float32)
    s_biased, _ = lf.add_layer_norm(x, residual, s_bias=s_bias32)
    assert s_biased.dtype == dtype and torch.equal(s_biased, (s + s_bias32).to(dtype))
    strided = _s_bias(66, dtype)[::2]
    assert torch.equal(lf.add_layer_norm(x, residual, s_bias=strided)[0], s + strided)
    s_bias64 = _s_bias(33, torch.float64)
    got = lf.add_layer_norm(x, residual, s_bias=s_bias64)[0]
    assert torch.equal(got, add_layer_norm_reference(x, residual, s_bias=s_bias64)[0])
    assert triton_backend("add_layer_norm")


def test_s_bias_costs_one_row_read_a_program(triton_backend):
    """Traffic: s_bias adds C elements read a program (as weight and bias do), no store."""
    shape = (2, 16, 320)  # 4 programs of 8 rows
    x, residual, weight, bias = _inputs(shape, torch.float16, "weight+bias")
    counted = []
    for s_bias in (None, _s_bias(320, torch.float16)):
        with traffic.KernelCounter() as k:
            lf.add_layer_norm(x, residual, weight, bias, s_bias=s_bias)
        (launch,) = k.launches
        counted.append((launch.programs, k.load_bytes, k.store_bytes))
    (programs, plain_load, plain_store), (_, load, store) = counted
    assert programs == aln._plan(32, 320)[3] == 4
    assert load - plain_load == programs * 320 * 2 and store == plain_store


UPSTREAM_S_BIAS = ["s-and-out", "s-only", "out-only"]


@pytest.mark.parametrize("upstream", UPSTREAM_S_BIAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s_bias_gradients_run_the_reference(dtype, upstream, triton_backend):
    """Any input requiring grad with s_bias given: the eager reference, autograd through torch ops,
    gradients for x, residual, weight, bias and s_bias as eager autograd's (and within the rule of float64)."""
    shape = (2, 3, 40)
    x, residual, weight, bias = _inputs(shape, dtype, "weight+bias")
    s_bias = _s_bias(40, dtype)
    g = torch.Generator().manual_seed(4)
    grad_s, grad_out = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))

    def run(fn, cast):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, residual, weight, bias, s_bias)]
        s, out = fn(*leaves[:4], 1e-5, s_bias=leaves[4])
        pairs = {"s-and-out": [(s, grad_s), (out, grad_out)], "s-only": [(s, grad_s)],
                 "out-only": [(out, grad_out)]}[upstream]
        got = torch.autograd.grad([o for o, _ in pairs], leaves, [d.to(o.dtype) for o, d in pairs], allow_unused=True)
        return [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, got)]

    fused = run(lf.add_layer_norm, None)
    assert not triton_backend("add_layer_norm")  # the s_bias kernel is forward only
    eager = run(add_layer_norm_reference, None)
    exact = run(add_layer_norm_reference, torch.float64)
    for name, got, low, ex in zip(["x", "residual", "weight", "bias", "s_bias"], fused, eager, exact):
        assert got.dtype == low.dtype and torch.equal(got, low), name
        assert_close_to_exact(got, ex, low)


def test_s_bias_gradcheck_and_no_grad_inference(triton_backend):
    leaves = [t.double().requires_grad_() for t in _inputs((2, 7), torch.float32, "weight+bias")]
    s_bias = _s_bias(7, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, r, w, b, sb: lf.add_layer_norm(x, r, w, b, s_bias=sb),
                                    (*leaves, s_bias))
    x = torch.randn(3, 8)
    s_bias = torch.randn(8, requires_grad=True)  # only s_bias wants a gradient: the reference too
    s_biased, _ = lf.add_layer_norm(x, x, s_bias=s_bias)
    (d,) = torch.autograd.grad(s_biased.sum(), s_bias)
    assert torch.equal(d, torch.full((8,), 3.0)) and not triton_backend("add_layer_norm")
    with torch.no_grad():  # inputs that require grad, but no graph recorded: the kernel
        s_biased, out = lf.add_layer_norm(x.requires_grad_(), x, s_bias=s_bias)
    assert triton_backend("add_layer_norm") and not s_biased.requires_grad
    assert torch.equal(s_biased, (x + x) + s_bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_s_bias_eager_backend_is_the_two_adds(dtype):
    x, residual, weight, bias = _inputs((2, 5, 40), dtype, "weight+bias")
    s_bias = _s_bias(40, dtype)
    with ldm_fast.use_backend("eager"):
        s_biased, out = lf.add_layer_norm(x, residual, weight, bias, 1e-6, s_bias=s_bias)
    h = x + residual
    assert torch.equal(s_biased, h + s_bias)
    assert torch.equal(out, TF.layer_norm(h, (40,), weight, bias, 1e-6))


def test_bad_s_bias_names_s_bias():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"s_bias must have shape \(4,\)"):
        lf.add_layer_norm(x, x, s_bias=torch.ones(5))
    with pytest.raises(ValueError, match=r"s_bias must have shape \(4,\)"):
        lf.add_layer_norm(x, x, s_bias=torch.ones(1, 4))
    with pytest.raises(TypeError, match="s_bias"):
        lf.add_layer_norm(x, x, s_bias=torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="s_bias"):
        lf.add_layer_norm(x, x, s_bias=[0.0] * 4)
    with pytest.raises(TypeError):  # keyword-only: a fifth positional argument stays eps
        lf.add_layer_norm(x, x, None, None, 1e-5, torch.ones(4))
    with pytest.raises(ValueError, match=r"s_bias must have shape"):
        add_layer_norm_fwd(x, x, s_bias=torch.ones(3))
    with pytest.raises(TypeError, match="s_bias"):
        add_layer_norm_reference(x, x, s_bias=torch.ones(4, dtype=torch.int64))


# --- out_dtype: autocast's fp32 layer norm of a low-precision sum ----------------------------------


@pytest.mark.parametrize("affine", ["weight+bias", "fp32-params"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_out_dtype_fp32_forward_and_gradients(dtype, affine, poison, triton_backend):
    """out_dtype=float32: s in x's dtype (bit for bit eager's), out fp32, the norm of the rounded sum
    in fp32 (what autocast's layer_norm returns), against float64 by the rule; the gradients (the norm's
    backward on s in fp32, ds cast back to x's dtype as autocast's cast backward does) too."""
    shape = (2, 6, 77)
    x, residual, weight, bias = _inputs(shape, dtype, affine)
    s, out = lf.add_layer_norm(x, residual, weight, bias, 1e-5, out_dtype=torch.float32)
    assert triton_backend("add_layer_norm")
    assert s.dtype == dtype and out.dtype == torch.float32
    eager_s, eager_out = add_layer_norm_reference(x, residual, weight, bias, 1e-5, out_dtype=torch.float32)
    assert torch.equal(s, eager_s) and eager_out.dtype == torch.float32
    exact = TF.layer_norm(s.double(), (77,), _double(weight), _double(bias), 1e-5)
    assert_close_to_exact(out, exact, eager_out)
    # what CUDA autocast computes (layer_norm on its fp32 list): the norm of the sum cast to fp32
    cuda_ac = TF.layer_norm((x + residual).float(), (77,), _float(weight), _float(bias), 1e-5)
    assert torch.equal(cuda_ac, eager_out)

    g = torch.Generator().manual_seed(3)
    grad_s, grad_out = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g)

    def run(fn, cast):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (x, residual, weight, bias)]
        s, out = fn(*leaves, 1e-5, out_dtype=torch.float32 if cast is None else None)
        return torch.autograd.grad((s, out), leaves, (grad_s.to(s.dtype), grad_out.to(out.dtype)))

    fused = run(lf.add_layer_norm, None)
    assert triton_backend("add_layer_norm")
    exact_g, eager_g = run(add_layer_norm_reference, torch.float64), run(add_layer_norm_reference, None)
    for name, got, ex, low in zip(["x", "residual", "weight", "bias"], fused, exact_g, eager_g):
        assert got.dtype == low.dtype, name
        assert_close_to_exact(got, ex, low)


def _float(t):
    return None if t is None else t.float()


def test_autocast_layer_norm_dtype_rule(monkeypatch):
    """add_norm's out_dtype: None without autocast, fp32 under CUDA autocast (layer_norm on its fp32
    list), the eager statements under another device's autocast, the CPU's included (which keeps
    layer_norm in the input's dtype: checked here)."""
    from ldm_fast._fusion import _UNKNOWN_AUTOCAST, autocast_layer_norm_dtype

    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert TF.layer_norm(x, (8,), torch.ones(8), torch.zeros(8)).dtype == torch.bfloat16
        assert autocast_layer_norm_dtype("cpu") is _UNKNOWN_AUTOCAST
    assert autocast_layer_norm_dtype("cuda") is None and autocast_layer_norm_dtype("cpu") is None  # autocast off
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: True)
    assert autocast_layer_norm_dtype("cuda") == torch.float32
    assert autocast_layer_norm_dtype("xpu") is _UNKNOWN_AUTOCAST


def test_out_dtype_checked():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="out_dtype"):
        lf.add_layer_norm(x, x, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="out_dtype"):
        lf.add_layer_norm(x, x, out_dtype="float32")
    s, out = lf.add_layer_norm(x, x, out_dtype=torch.float32)  # x's own dtype: the plain call
    assert out.dtype == torch.float32


def test_inference_allocates_only_what_it_returns(triton_backend, monkeypatch):
    """No gradient to record: the op asks the launcher for s and out only, not the statistics the
    backward would read, and tells it the arguments are checked (no second check)."""
    import ldm_fast.ops.add_layer_norm as op

    calls = []
    launcher = op._kernels.add_layer_norm_fwd
    monkeypatch.setattr(op._kernels, "add_layer_norm_fwd", lambda *a, **k: calls.append(k) or launcher(*a, **k))
    x, residual = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    with torch.no_grad():
        s, out = lf.add_layer_norm(x, residual)
    assert triton_backend("add_layer_norm") and calls == [{"stats": False, "checked": True}]
    assert add_layer_norm_fwd(x, residual, stats=False)[2:] == (None, None)
    s_ref, out_ref = add_layer_norm_reference(x, residual)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
