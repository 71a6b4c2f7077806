"""reparameterize / reparameterize_moments: the Triton kernel against its eager reference and float64."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.kernels.reparameterize import reparameterize_reference

from _numerics import assert_close_to_exact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    "batch1-latent": (1, 4, 8, 8),
    "odd-sizes": (3, 5, 7, 11),  # 385 per row: not a multiple of any block
    "multi-block-row": (2, 3001),  # a row spans several blocks, the last partial
    "vector-latent": (5, 33),  # the vector (MLP) LDM's [B, latent]
    "one-dim": (37,),
}


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g).to(dtype)
    logvar = (2 * torch.randn(shape, generator=g)).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    return mean, logvar, noise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_with_given_noise(shape, dtype, poison, triton_backend):
    mean, logvar, noise = _inputs(shape, dtype)
    z = F.reparameterize(mean, logvar, noise=noise, scale=0.18215, shift=0.1)
    assert triton_backend("reparameterize")
    exact = reparameterize_reference(mean.double(), logvar.double(), noise.double(), 0.18215, 0.1)
    eager = reparameterize_reference(mean, logvar, noise, 0.18215, 0.1)
    assert_close_to_exact(z, exact, eager)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_read_in_place(dtype, poison, triton_backend):
    """A [B, 2C, H, W] moments tensor: the halves are strided views, read without a copy."""
    moments = torch.randn(3, 8, 5, 6).to(dtype)
    noise = torch.randn(3, 4, 5, 6).to(dtype)
    z = F.reparameterize_moments(moments, noise=noise, scale=0.13025)
    assert triton_backend("reparameterize")
    mean, logvar = moments.chunk(2, dim=1)
    assert not mean.is_contiguous()
    exact = reparameterize_reference(mean.double(), logvar.double(), noise.double(), 0.13025)
    assert_close_to_exact(z, exact, reparameterize_reference(mean, logvar, noise, 0.13025))


def test_non_contiguous_inputs_are_correct(poison, triton_backend):
    mean = torch.randn(6, 5).t()  # rows not contiguous: the launcher copies
    logvar = torch.randn(5, 6)[:, ::1]
    noise = torch.randn(10, 6)[::2]  # strided rows
    z = F.reparameterize(mean, logvar, noise=noise)
    assert triton_backend("reparameterize")
    torch.testing.assert_close(z, reparameterize_reference(mean, logvar, noise), rtol=1e-6, atol=1e-6)


def test_logvar_clamp():
    mean = torch.zeros(2, 4)
    logvar = torch.tensor([[-100.0, -30.0, 20.0, 100.0]] * 2)
    noise = torch.ones(2, 4)
    with ldm_fast.use_backend("triton"):
        z = F.reparameterize(mean, logvar, noise=noise)
    expected = torch.exp(0.5 * torch.tensor([-30.0, -30.0, 20.0, 20.0]))
    torch.testing.assert_close(z, expected.expand(2, 4))


def _special_inputs(dtype):
    """Rows of NaN / +-inf logvar and NaN mean among ordinary values (issue #17 item 3)."""
    mean, logvar, noise = _inputs((3, 2, 5, 7), dtype, seed=4)
    nan, inf = float("nan"), float("inf")
    logvar[0, 0, 0, :4] = torch.tensor([nan, inf, -inf, nan])
    logvar[1, 1, 2, 3] = nan
    mean[0, 1, 1, :2] = nan
    mean[2, 0, 4, 6] = nan
    logvar[2, 0, 4, 5] = inf
    return mean, logvar, noise


def _assert_same_with_nan(out, expected):
    """Equal NaN positions, and the rest within torch's per-dtype tolerance of ``expected``."""
    assert torch.equal(out.isnan(), expected.isnan()), (out.isnan().nonzero(), expected.isnan().nonzero())
    keep = ~expected.isnan()
    torch.testing.assert_close(out[keep], expected[keep])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_kernel_noise", [False, True], ids=["given-noise", "in-kernel-noise"])
def test_nan_propagates_and_inf_logvar_is_clamped(dtype, in_kernel_noise, poison, triton_backend):
    """A NaN logvar or mean gives a NaN z (tl.clamp alone maps NaN to the lower limit); +-inf
    logvar clamps to exp(0.5 * 20) / exp(0.5 * -30), as eager and torch.clamp."""
    mean, logvar, noise = _special_inputs(dtype)
    z = F.reparameterize(mean, logvar, noise=None if in_kernel_noise else noise, seed=3, scale=0.5, shift=0.1)
    assert triton_backend("reparameterize")
    expected_nan = mean.isnan() | logvar.isnan()
    assert torch.equal(z.isnan(), expected_nan) and torch.isfinite(z[~expected_nan]).all()
    if not in_kernel_noise:
        _assert_same_with_nan(z, reparameterize_reference(mean, logvar, noise, 0.5, 0.1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_from_moments(dtype, poison, triton_backend):
    mean, logvar, noise = _special_inputs(dtype)
    z = F.reparameterize_moments(torch.cat([mean, logvar], dim=1), noise=noise, scale=0.18215)
    assert triton_backend("reparameterize")
    _assert_same_with_nan(z, reparameterize_reference(mean, logvar, noise, 0.18215))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_at_nan_and_inf_match_torch_clamp(dtype, poison, triton_backend):
    """dmean = scale * grad everywhere; dlogvar is torch.clamp's: 0 at a NaN or +-inf logvar (outside
    [min, max]), NaN where the upstream gradient is NaN inside the range."""
    mean, logvar, noise = _special_inputs(dtype)
    grad = torch.randn(mean.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grad[1, 0, 0, :3] = float("nan")
    m, lv = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    F.reparameterize(m, lv, noise=noise, scale=0.5, shift=0.1).backward(grad)
    assert triton_backend("reparameterize")
    em, elv = mean.clone().requires_grad_(), logvar.clone().requires_grad_()
    reparameterize_reference(em, elv, noise, 0.5, 0.1).backward(grad)
    assert (elv.grad[logvar.isnan() | logvar.isinf()] == 0).all()  # what torch gives
    assert elv.grad.isnan().any()
    _assert_same_with_nan(m.grad, em.grad)
    _assert_same_with_nan(lv.grad, elv.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_kernel_noise", [False, True], ids=["given-noise", "in-kernel-noise"])
def test_gradients(dtype, in_kernel_noise, triton_backend):
    g = torch.Generator().manual_seed(1)
    shape = (3, 2, 5, 7)
    mean = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    # logvar straddles the clamp range: outside it the gradient is zero, as torch.clamp's is
    logvar = (torch.randn(shape, generator=g) * 15).to(dtype).requires_grad_()
    noise = None if in_kernel_noise else torch.randn(shape, generator=g).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    z = F.reparameterize(mean, logvar, noise=noise, seed=7, scale=0.5, shift=0.2)
    z.backward(grad)
    assert triton_backend("reparameterize")
    if noise is None:  # the eps the kernel drew, recovered from its output
        std = torch.exp(0.5 * logvar.detach().double().clamp(-30, 20))
        noise = ((z.detach().double() / 0.5 + 0.2 - mean.detach().double()) / std).to(dtype)
    for mode in ("exact", "eager"):
        cast = torch.float64 if mode == "exact" else dtype
        m = mean.detach().to(cast).requires_grad_()
        lv = logvar.detach().to(cast).requires_grad_()
        reparameterize_reference(m, lv, noise.to(cast), 0.5, 0.2).backward(grad.to(cast))
        if mode == "exact":
            exact = (m.grad, lv.grad)
        else:
            eager = (m.grad, lv.grad)
    assert_close_to_exact(mean.grad, exact[0], eager[0])
    if in_kernel_noise and dtype != torch.float32:
        # eps recovered from a rounded z is itself rounded: compare where std is large enough to recover it
        mask = (logvar.detach().float() > -4) & (logvar.detach().float().abs() < 20)
        torch.testing.assert_close(logvar.grad.float()[mask], exact[1].float()[mask], rtol=0.05, atol=0.02)
    else:
        assert_close_to_exact(logvar.grad, exact[1], eager[1])
    outside = (logvar.detach().float() < -30) | (logvar.detach().float() > 20)
    assert outside.any() and (logvar.grad[outside] == 0).all()


def test_in_kernel_noise_is_seeded_and_independent_of_block(triton_backend):
    mean, logvar = torch.zeros(2, 5000), torch.zeros(2, 5000)
    a = F.reparameterize(mean, logvar, seed=123)
    b = F.reparameterize(mean, logvar, seed=123)
    c = F.reparameterize(mean, logvar, seed=124)
    short = F.reparameterize(mean[:, :300], logvar[:, :300], seed=123)  # another K: another block size
    assert triton_backend("reparameterize")
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    assert torch.equal(short, a[:, :300])  # numbers depend on (seed, row, column) only
    assert (a[0] != a[1]).float().mean() > 0.99  # rows draw different numbers


def test_in_kernel_noise_statistics(triton_backend):
    """131072 draws with a fixed seed: mean 0 and std 1 well within 5 standard errors."""
    eps = F.reparameterize(torch.zeros(8, 16384), torch.zeros(8, 16384), seed=2024).double()
    assert triton_backend("reparameterize")
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    assert abs((eps**4).mean().item() - 3) < 0.1  # normal kurtosis, not uniform's 1.8
    assert abs(torch.corrcoef(torch.stack([eps[:, :-1].flatten(), eps[:, 1:].flatten()]))[0, 1].item()) < 0.02
    assert torch.isfinite(eps).all()


def test_seed_none_follows_torch_manual_seed(triton_backend):
    mean, logvar = torch.zeros(2, 64), torch.zeros(2, 64)
    torch.manual_seed(5)
    a = F.reparameterize(mean, logvar)
    torch.manual_seed(5)
    b = F.reparameterize(mean, logvar)
    c = F.reparameterize(mean, logvar)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_eager_backend_is_the_reference_bit_for_bit():
    mean, logvar, noise = _inputs((2, 4, 3, 3), torch.float16)
    with ldm_fast.use_backend("eager"):
        z = F.reparameterize(mean, logvar, noise=noise, scale=0.18215)
    assert torch.equal(z, reparameterize_reference(mean, logvar, noise, 0.18215))


def test_unsupported_dtype_falls_back_to_eager():
    mean, logvar, noise = _inputs((2, 9), torch.float64)
    before = ldm_fast.ops.kernel_launches["reparameterize"]
    with ldm_fast.use_backend("triton"):
        z = F.reparameterize(mean, logvar, noise=noise)
    assert ldm_fast.ops.kernel_launches["reparameterize"] == before
    assert z.dtype == torch.float64
    assert torch.equal(z, reparameterize_reference(mean, logvar, noise))


def test_diffusers_parity():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 6, 6)
    dist = DiagonalGaussianDistribution(moments)
    expected = dist.sample(generator=torch.Generator().manual_seed(3)) * 0.18215
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    with ldm_fast.use_backend("triton"):
        z = F.reparameterize_moments(moments, noise=noise, scale=0.18215)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 4)), ValueError, "logvar must have the shape"),
        (lambda: F.reparameterize(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3)), TypeError, "mean must be a floating"),
        (lambda: F.reparameterize(torch.zeros(2, 3), [0.0]), TypeError, "logvar must be a torch.Tensor"),
        (lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3, device="meta")), ValueError, "logvar is on meta"),
        (lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), noise=torch.zeros(3)), ValueError, "noise must have"),
        (lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), seed=1.5), TypeError, "seed must be an int"),
        (lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), seed=-1), ValueError, "seed must be in"),
        (lambda: F.reparameterize_moments(torch.zeros(2, 3, 4)), ValueError, "even channel count"),
    ],
    ids=["shape", "int-dtype", "not-tensor", "devices", "noise-shape", "seed-type", "seed-range", "odd-moments"],
)
def test_bad_input_names_the_argument(call, error, match):
    with ldm_fast.use_backend("triton"), pytest.raises(error, match=match):
        call()


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4),
    inner=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    pad=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
)
def test_any_shape_and_row_stride(rows, inner, pad, dtype):
    """Property: for any shape and any row stride (a row-padded buffer), the kernel equals the reference."""
    k = 1
    for n in inner:
        k *= n
    g = torch.Generator().manual_seed(rows * 1000 + k * 10 + pad)
    buffers = [torch.randn(rows, k + pad, generator=g).to(dtype) for _ in range(3)]
    mean, logvar, noise = (b[:, :k].reshape(rows, *inner) if inner else b[:, 0] for b in buffers)
    with ldm_fast.use_backend("triton"):
        z = F.reparameterize(mean, logvar, noise=noise, scale=0.7)
    expected = reparameterize_reference(mean, logvar, noise, 0.7)
    torch.testing.assert_close(z, expected)  # torch's per-dtype tolerances: a few ulp
