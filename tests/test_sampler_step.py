"""sampler_step: the Triton kernel against its eager reference and float64; its call path (one launch,
nothing else, no torch.library in eager, one op under torch.compile); layouts, noise, the table path."""

import pytest
import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast import ops
from ldm_fast.kernels.sampler_step import StepCoefficients, sampler_step_reference, step_coefficients

from _numerics import assert_close_to_exact
from test_call_path import _graph_ops, _kernel_work, recording

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    "batch1-latent": (1, 4, 8, 8),
    "odd-sizes": (3, 5, 7, 11),
    "multi-block-row": (2, 3, 1001),
    "vector-latent": (4, 33),
    "video-latent": (2, 4, 3, 5, 6),
}
ABAR = ldm_fast.make_schedule("scaled_linear").alphas_cumprod
# (method, eta, t, t_prev, guidance, clip): t_prev -1 is the end (DDIM: abar[0]; DDPM: 1)
VARIANTS = {
    "ddim-cfg": ("ddim", 0.0, 781, 761, 7.5, None),
    "ddim-eta1-noise": ("ddim", 1.0, 981, 961, None, None),
    "ddim-final-clip": ("ddim", 0.5, 1, -1, 3.0, 1.0),
    "ddpm-cfg-noise": ("ddpm", 0.0, 500, 499, 5.0, None),
    "ddpm-last": ("ddpm", 0.0, 0, -1, None, None),
}


def _alphas(method, t, t_prev):
    alpha_prev = float(ABAR[t_prev]) if t_prev >= 0 else (float(ABAR[0]) if method == "ddim" else 1.0)
    return float(ABAR[t]), alpha_prev


def _inputs(shape, dtype, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    out_shape = (2 * shape[0],) + tuple(shape[1:]) if cfg else shape
    return x.to(dtype), torch.randn(out_shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_float64_and_eager(shape, dtype, variant, poison, triton_backend):
    method, eta, t, t_prev, guidance, clip = variant
    x, eps, noise = _inputs(shape, dtype, guidance is not None)
    alpha_t, alpha_prev = _alphas(method, t, t_prev)
    out = F.sampler_step(eps, x, alpha_t, alpha_prev, method=method, eta=eta, guidance_scale=guidance,
                         clip_sample=clip, noise=noise)
    assert triton_backend("sampler_step")
    coefs = step_coefficients(alpha_t, alpha_prev, method, eta)
    z = noise if coefs.std > 0 else None
    exact = sampler_step_reference(eps.double(), x.double(), coefs, None if z is None else z.double(), guidance, clip)
    eager = sampler_step_reference(eps, x, coefs, z, guidance, clip)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_exact(out, exact, eager)
    if dtype == torch.float32:  # the interpreter runs the eager formula's fp32 operations: equal to an ulp
        torch.testing.assert_close(out, eager, rtol=2e-7, atol=2e-7 * max(1.0, eager.abs().max().item()))


def test_coefficients_match_the_formulas():
    a, ap = 0.3, 0.6
    ddim = step_coefficients(a, ap, "ddim", 1.0)
    sigma = ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
    assert ddim == pytest.approx(((1 / a) ** 0.5, (1 - a) ** 0.5, ap**0.5, (1 - ap - sigma**2) ** 0.5, 0.0, sigma))
    ddpm = step_coefficients(a, ap, "ddpm")
    beta = 1 - a / ap
    assert ddpm == pytest.approx(((1 / a) ** 0.5, (1 - a) ** 0.5, ap**0.5 * beta / (1 - a), 0.0,
                                  (1 - beta) ** 0.5 * (1 - ap) / (1 - a), ((1 - ap) / (1 - a) * beta) ** 0.5))
    assert step_coefficients(a, ap, "ddim", 0.0).std == 0.0 and step_coefficients(a, 1.0, "ddpm").std == 0.0


# ---------------------------------------------------------------------------------------------
# noise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 1.0)], ids=["ddpm", "ddim-eta1"])
def test_in_kernel_noise_is_the_philox_stream_of_the_seed(dtype, method, eta, poison, triton_backend):
    """z drawn in the kernel is the stream q_sample draws for the same seed (by seed, row, column):
    the step with seed=s equals the step given that noise, and repeats."""
    x, eps, _ = _inputs((3, 4, 9, 9), dtype, cfg=True)
    alpha_t, alpha_prev = _alphas(method, 600, 580)
    kwargs = dict(method=method, eta=eta, guidance_scale=3.0)
    out = F.sampler_step(eps, x, alpha_t, alpha_prev, seed=11, **kwargs)
    assert torch.equal(out, F.sampler_step(eps, x, alpha_t, alpha_prev, seed=11, **kwargs))
    _, z = F.q_sample(torch.zeros(x.shape, dtype=torch.float32), 0, ABAR, seed=11)
    given = F.sampler_step(eps, x, alpha_t, alpha_prev, noise=z, **kwargs)
    assert triton_backend("sampler_step")
    torch.testing.assert_close(out, given, rtol=0, atol=0)
    assert not torch.equal(out, F.sampler_step(eps, x, alpha_t, alpha_prev, seed=12, **kwargs))


@pytest.mark.parametrize("coefficients", ["alphas", "table"])
def test_add_noise_false_ignores_a_given_noise(coefficients, poison, triton_backend):
    """Issue #17 item 2: ``noise=z, add_noise=False`` adds no noise under the kernel, as eager."""
    x, eps, noise = _inputs((2, 4, 6, 5), torch.float16, cfg=True)
    alpha_t, alpha_prev = _alphas("ddpm", 500, 499)
    coefs = step_coefficients(alpha_t, alpha_prev, "ddpm")
    assert coefs.std > 0
    if coefficients == "table":
        kwargs = dict(coefficients=_table([coefs]), index=0)
    else:
        kwargs = dict(alpha_t=alpha_t, alpha_prev=alpha_prev, method="ddpm")
    out = F.sampler_step(eps, x, guidance_scale=3.0, noise=noise, add_noise=False, **kwargs)
    assert triton_backend("sampler_step")
    with ldm_fast.use_backend("eager"):
        eager = F.sampler_step(eps, x, guidance_scale=3.0, noise=noise, add_noise=False, **kwargs)
    expected = sampler_step_reference(eps, x, coefs, None, 3.0)
    torch.testing.assert_close(eager, expected, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)
    exact = sampler_step_reference(eps.double(), x.double(), coefs, None, 3.0)
    assert_close_to_exact(out, exact, expected)


def test_in_kernel_noise_statistics(triton_backend):
    x, eps = torch.zeros(4, 4, 64, 64), torch.zeros(4, 4, 64, 64)
    alpha_t, alpha_prev = _alphas("ddim", 981, 961)
    coefs = step_coefficients(alpha_t, alpha_prev, "ddim", 1.0)
    z = F.sampler_step(eps, x, alpha_t, alpha_prev, eta=1.0, seed=5).double() / coefs.std  # x = eps = 0: only std * z
    assert triton_backend("sampler_step")
    n = z.numel()
    assert abs(z.mean().item()) < 5 / n**0.5 and abs(z.std().item() - 1) < 5 * (0.5 / n) ** 0.5


def test_eager_backend_draws_from_a_seeded_torch_generator():
    x, eps, _ = _inputs((2, 4, 5, 5), torch.float32, cfg=False)
    alpha_t, alpha_prev = _alphas("ddpm", 300, 299)
    with ldm_fast.use_backend("eager"):
        out = F.sampler_step(eps, x, alpha_t, alpha_prev, method="ddpm", seed=7)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    expected = sampler_step_reference(eps, x, step_coefficients(alpha_t, alpha_prev, "ddpm"), z)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------
# layouts


def test_row_strided_inputs_are_read_in_place(triton_backend, monkeypatch):
    """x a channel slice of [B, 8, H, W]; the model output the eps half of a learned-variance
    [2B, 8, H, W] output: rows strided, read without a copy."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 6, 5, generator=g)[:, 2:6]
    eps = torch.randn(6, 8, 6, 5, generator=g)[:, :4]
    alpha_t, alpha_prev = _alphas("ddim", 500, 480)
    with recording(monkeypatch) as rec:
        out = F.sampler_step(eps, x, alpha_t, alpha_prev, guidance_scale=2.0)
    assert len(rec.launches) == 1 and not _kernel_work(rec.ops), rec.ops
    assert out.is_contiguous()
    expected = sampler_step_reference(eps, x, step_coefficients(alpha_t, alpha_prev), None, 2.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_channels_last_stays_channels_last_without_copies(triton_backend, monkeypatch):
    cl = torch.channels_last
    x, eps, noise = _inputs((2, 4, 5, 7), torch.float16, cfg=True)
    x, eps, noise = x.to(memory_format=cl), eps.to(memory_format=cl), noise.to(memory_format=cl)
    alpha_t, alpha_prev = _alphas("ddpm", 200, 199)
    with recording(monkeypatch) as rec:
        out = F.sampler_step(eps, x, alpha_t, alpha_prev, method="ddpm", guidance_scale=4.0, noise=noise)
    assert len(rec.launches) == 1 and not _kernel_work(rec.ops), rec.ops
    assert out.is_contiguous(memory_format=cl)
    expected = sampler_step_reference(eps, x, step_coefficients(alpha_t, alpha_prev, "ddpm"), noise, 4.0)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-3)


def test_mismatched_layouts_are_copied_into_x_order(poison, triton_backend):
    x, eps, noise = _inputs((2, 4, 5, 7), torch.float32, cfg=True)
    eps_cl = eps.to(memory_format=torch.channels_last)
    noise_t = noise.transpose(2, 3).contiguous().transpose(2, 3)
    alpha_t, alpha_prev = _alphas("ddim", 900, 880)
    out = F.sampler_step(eps_cl, x, alpha_t, alpha_prev, eta=0.7, guidance_scale=3.0, noise=noise_t)
    assert triton_backend("sampler_step") and out.is_contiguous()
    expected = sampler_step_reference(eps, x, step_coefficients(alpha_t, alpha_prev, "ddim", 0.7), noise, 3.0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_broadcast_inputs(poison, triton_backend):
    """Expanded views (stride 0): one noise row for the whole batch is read in place, a broadcast
    spatial dim is copied; the output is a new dense tensor either way."""
    x, eps, noise = _inputs((3, 4, 5, 6), torch.float32, cfg=True)
    noise_one = noise[:1].expand(3, -1, -1, -1)
    x_bcast = x[:, :, :1].expand(-1, -1, 5, -1)
    alpha_t, alpha_prev = _alphas("ddpm", 100, 99)
    coefs = step_coefficients(alpha_t, alpha_prev, "ddpm")
    for xx, nn in ((x, noise_one), (x_bcast, noise)):
        out = F.sampler_step(eps, xx, alpha_t, alpha_prev, method="ddpm", guidance_scale=2.0, noise=nn)
        expected = sampler_step_reference(eps, xx.contiguous(), coefs, nn.contiguous(), 2.0)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert triton_backend("sampler_step")


def test_one_value_per_sample_and_empty(triton_backend):
    x, eps = torch.randn(5), torch.randn(10)
    alpha_t, alpha_prev = _alphas("ddim", 400, 380)
    out = F.sampler_step(eps, x, alpha_t, alpha_prev, guidance_scale=2.0)
    expected = sampler_step_reference(eps[:, None], x[:, None], step_coefficients(alpha_t, alpha_prev), None, 2.0)[:, 0]
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert F.sampler_step(torch.empty(0, 4), torch.empty(0, 4), alpha_t, alpha_prev).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# the coefficient table (graph-safe: the row picked on the device)


def _table(rows):
    return torch.tensor([list(c) for c in rows], dtype=torch.float64).float()


@pytest.mark.parametrize("index_kind", ["int", "scalar-tensor", "per-row-int32"])
def test_table_path_equals_the_scalar_path(index_kind, poison, triton_backend):
    a = [float(ABAR[t]) for t in (900, 700, 500)]
    steps = [step_coefficients(a[0], a[1], "ddpm"), step_coefficients(a[1], a[2], "ddpm")]
    table = _table(steps)
    x, eps, noise = _inputs((2, 3, 7, 5), torch.float16, cfg=True)
    index = {"int": 1, "scalar-tensor": torch.tensor(1),
             "per-row-int32": torch.tensor([1, 0], dtype=torch.int32)}[index_kind]
    out = F.sampler_step(eps, x, coefficients=table, index=index, guidance_scale=6.0, noise=noise)
    assert triton_backend("sampler_step")
    if index_kind == "per-row-int32":
        rows = [F.sampler_step(eps[[b, 2 + b]], x[b:b + 1], coefficients=steps[i], guidance_scale=6.0,
                               noise=noise[b:b + 1]) for b, i in enumerate((1, 0))]
        expected = torch.cat(rows)
    else:
        expected = F.sampler_step(eps, x, coefficients=steps[1], guidance_scale=6.0, noise=noise)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with ldm_fast.use_backend("eager"):
        eager = F.sampler_step(eps, x, coefficients=table, index=index, guidance_scale=6.0, noise=noise)
    torch.testing.assert_close(out, eager, rtol=0, atol=2e-3)


def test_table_index_checked_on_the_device_runs_the_debug_variant(triton_backend):
    table = _table([step_coefficients(0.3, 0.5)])
    x, eps, _ = _inputs((2, 4, 3, 3), torch.float32, cfg=False)
    out = ops.sampler_step.kernel_call(eps, x, table, torch.tensor([0, 0]), None, None, None, None, False, True)
    torch.testing.assert_close(out, F.sampler_step(eps, x, 0.3, 0.5), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# fallbacks and errors


def test_gradient_needs_eager_and_gets_it():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    eps = torch.randn(4, 3, 4, 4)
    before = ldm_fast.ops.kernel_launches["sampler_step"]
    with ldm_fast.use_backend("triton"):
        out = F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=2.0)
    assert ldm_fast.ops.kernel_launches["sampler_step"] == before
    out.sum().backward()
    c = step_coefficients(0.3, 0.5)
    torch.testing.assert_close(x.grad, torch.full_like(x, c.c_x0 * c.inv_sqrt_alpha))


def test_unsupported_dtype_falls_back_to_eager():
    x, eps = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    before = ldm_fast.ops.kernel_launches["sampler_step"]
    with ldm_fast.use_backend("triton"):
        out = F.sampler_step(eps, x, 0.3, 0.5)
    assert ldm_fast.ops.kernel_launches["sampler_step"] == before and out.dtype == torch.float64


@pytest.mark.parametrize("backend_name", ["triton", "eager"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model_output=torch.zeros(2, 3, 4)), ValueError,
         r"model_output must be the model's output on \[uncond, cond\]"),
        (dict(guidance_scale=None, model_output=torch.zeros(4, 3, 4)), ValueError,
         "model_output must have the shape of x"),
        (dict(alpha_t=1.0), ValueError, r"alpha_t .* must lie in \(0, 1\)"),
        (dict(alpha_prev=0.0), ValueError, r"alpha_prev .* must lie in \(0, 1\]"),
        (dict(alpha_prev=0.2, method="ddpm"), ValueError, "alpha_prev must be >= alpha_t"),
        (dict(method="euler"), ValueError, "method must be one of"),
        (dict(eta=-1.0), ValueError, "eta must be >= 0"),
        (dict(eta=3.0), ValueError, "eta=3.0 is too large"),
        (dict(alpha_t=None), TypeError, "needs alpha_t and alpha_prev"),
        (dict(noise=torch.zeros(2, 3)), ValueError, "noise must have the shape of x"),
        (dict(clip_sample=0.0), ValueError, "clip_sample must be > 0"),
        (dict(x=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x must be a floating"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(alpha_t=None, alpha_prev=None, coefficients=torch.zeros(3, 5), index=0), ValueError,
         r"coefficients must be a table \[N, 6\]"),
        (dict(alpha_t=None, alpha_prev=None, coefficients=torch.zeros(3, 6), index=3), ValueError,
         r"index must lie in \[0, 3\)"),
        (dict(alpha_t=None, alpha_prev=None, coefficients=torch.zeros(3, 6), index=torch.tensor([0, 5])), ValueError,
         r"index must lie in \[0, 3\)"),
        (dict(alpha_t=None, alpha_prev=None, coefficients=torch.zeros(3, 6)), TypeError, "index .* is required"),
        (dict(coefficients=torch.zeros(3, 6), index=0), TypeError, "either alpha_t and alpha_prev, or coefficients"),
    ],
    ids=["cfg-shape", "eps-shape", "alpha-t-one", "alpha-prev-zero", "ddpm-order", "method", "eta-negative",
         "eta-too-large", "no-alphas", "noise-shape", "clip", "x-int", "seed", "table-shape", "index-int",
         "index-tensor", "no-index", "both"],
)
def test_bad_input_names_the_argument(kwargs, error, match, backend_name):
    args = dict(model_output=torch.zeros(4, 3, 4), x=torch.zeros(2, 3, 4), alpha_t=0.3, alpha_prev=0.5,
                guidance_scale=7.5)
    args.update(kwargs)
    with ldm_fast.use_backend(backend_name), pytest.raises(error, match=match):
        F.sampler_step(args.pop("model_output"), args.pop("x"), args.pop("alpha_t"), args.pop("alpha_prev"), **args)


# ---------------------------------------------------------------------------------------------
# the call path


def test_eager_call_launches_one_kernel_and_nothing_else(triton_backend, monkeypatch):
    x, eps, noise = _inputs((2, 4, 3, 3), torch.float16, cfg=True)
    table = _table([step_coefficients(0.3, 0.5, "ddpm")])
    for call in (
        lambda: F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=7.5),  # DDIM eta 0: no noise
        lambda: F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=7.5, method="ddpm", seed=3),  # noise in-kernel
        lambda: F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=7.5, method="ddpm"),  # seed drawn on the host
        lambda: F.sampler_step(eps[:2], x, 0.3, 0.5, eta=1.0, noise=noise),  # given noise, no CFG
        lambda: F.sampler_step(eps, x, coefficients=table, index=0, guidance_scale=7.5, seed=1),  # table, int index
    ):
        with recording(monkeypatch) as rec:
            call()
        assert len(rec.launches) == 1, rec.launches
        assert not [op for op in rec.ops if op.startswith("ldm_fast::")], rec.ops  # no torch.library in eager
        host_only = ("aten::randint", "aten::random_", "aten::_local_scalar_dense")  # the host seed draw
        assert not [op for op in _kernel_work(rec.ops) if op not in host_only], rec.ops


def test_compile_captures_one_op(triton_backend):
    x, eps, _ = _inputs((2, 4, 3, 3), torch.float32, cfg=True)
    ops_ = _graph_ops(lambda e, x: F.sampler_step(e, x, 0.3, 0.5, guidance_scale=7.5), eps, x)
    assert ops_ == ["ldm_fast.sampler_step"], ops_
    table = _table([step_coefficients(0.3, 0.5, "ddpm"), step_coefficients(0.5, 0.6, "ddpm")])
    ops_ = _graph_ops(lambda e, x, i: F.sampler_step(e, x, coefficients=table, index=i, guidance_scale=7.5, seed=4),
                      eps, x, torch.tensor(1))
    # the op, and the torch.full that makes the int seed a tensor
    assert [op for op in ops_ if "ldm_fast" in op] == ["ldm_fast.sampler_step"] and len(ops_) == 2, ops_


def test_compiled_loop_with_a_tensor_index_compiles_once(triton_backend):
    torch.compiler.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    steps = [step_coefficients(float(ABAR[t]), float(ABAR[t - 20]), "ddim", 0.5) for t in (981, 961, 941)]
    table = _table(steps)
    step = torch.compile(lambda e, x, i: F.sampler_step(e, x, coefficients=table, index=i, guidance_scale=7.5, seed=9),
                         fullgraph=True, backend=capture)
    x, eps, _ = _inputs((1, 4, 4, 4), torch.float32, cfg=True)
    for i in range(3):
        out = step(eps, x, torch.tensor(i))
        torch.testing.assert_close(out, F.sampler_step(eps, x, coefficients=steps[i], guidance_scale=7.5, seed=9),
                                   rtol=0, atol=0)
    assert len(graphs) == 1
