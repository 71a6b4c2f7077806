"""q_sample: the Triton kernel against its eager reference, float64, and diffusers' add_noise."""

import pytest
import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.kernels.q_sample import q_sample_reference

from _numerics import assert_close_to_exact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {
    "batch1-latent": (1, 4, 8, 8),
    "odd-sizes": (3, 5, 7, 11),
    "multi-block-row": (2, 3, 1001),
    "vector-latent": (4, 33),
    "video-latent": (2, 4, 3, 5, 6),
}
T = 1000
ALPHAS_CUMPROD = ldm_fast.make_schedule("scaled_linear", T).alphas_cumprod


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _timesteps(batch):
    return torch.tensor([0, 1, T - 1, 500, 37][:batch] + [T - 1] * max(0, batch - 5))


@pytest.mark.parametrize("target", ["eps", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_with_given_noise(shape, dtype, target, poison, triton_backend):
    x0, noise = _inputs(shape, dtype)
    t = _timesteps(shape[0])
    x_t, tgt = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise, target=target)
    assert triton_backend("q_sample")
    exact = q_sample_reference(x0.double(), t, ALPHAS_CUMPROD.double(), noise.double(), target_v=target == "v")
    eager = q_sample_reference(x0, t, ALPHAS_CUMPROD, noise, target_v=target == "v")
    assert_close_to_exact(x_t, exact[0], eager[0])
    if target == "eps":
        assert tgt is noise  # the given noise is the target: returned, not copied
    else:
        assert_close_to_exact(tgt, exact[1], eager[1])


@pytest.mark.parametrize("t", [0, 1, T - 1], ids=lambda t: f"t={t}")
def test_every_batch_row_gets_the_int_timestep(t, triton_backend):
    x0, noise = _inputs((3, 4, 5, 5), torch.float32)
    x_t, _ = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise)
    assert triton_backend("q_sample")
    abar = ALPHAS_CUMPROD[t]
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


def test_non_contiguous_x0(poison, triton_backend):
    latents = torch.randn(3, 8, 6, 6)
    x0 = latents[:, 2:6]  # a channel slice: rows are strided
    noise = torch.randn(3, 4, 6, 6).transpose(2, 3)  # not row-contiguous: copied
    t = torch.tensor([5, 900, 0])
    x_t, _ = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise)
    assert triton_backend("q_sample")
    torch.testing.assert_close(x_t, q_sample_reference(x0, t, ALPHAS_CUMPROD, noise)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", ["eps", "v"])
def test_in_kernel_noise_is_consistent_with_x_t(dtype, target, poison, triton_backend):
    x0, _ = _inputs((4, 4, 9, 9), dtype)
    t = torch.tensor([0, 10, 500, 999])
    x_t, tgt = F.q_sample(x0, t, ALPHAS_CUMPROD, seed=11, target=target)
    x_t2, _ = F.q_sample(x0, t, ALPHAS_CUMPROD, seed=11, target=target)
    assert triton_backend("q_sample")
    assert torch.equal(x_t, x_t2)
    a = ALPHAS_CUMPROD[t].double().sqrt().view(-1, 1, 1, 1)
    s = (1 - ALPHAS_CUMPROD[t].double()).sqrt().view(-1, 1, 1, 1)
    x0d, x_td, tgtd = x0.double(), x_t.double(), tgt.double()
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    if target == "eps":
        torch.testing.assert_close(x_td, a * x0d + s * tgtd, rtol=tol, atol=tol)
    else:  # a^2 + s^2 = 1: x0 = a * x_t - s * v, with no division to amplify rounding
        torch.testing.assert_close(a * x_td - s * tgtd, x0d, rtol=tol, atol=tol)


def test_in_kernel_noise_statistics(triton_backend):
    x0 = torch.zeros(8, 4, 64, 64)
    _, eps = F.q_sample(x0, 500, ALPHAS_CUMPROD, seed=99)
    assert triton_backend("q_sample")
    eps = eps.double()
    n = eps.numel()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.std().item() - 1) < 5 * (0.5 / n) ** 0.5
    other = F.q_sample(x0, 500, ALPHAS_CUMPROD, seed=100)[1]
    assert (other != eps.float()).float().mean() > 0.99


def test_noise_offset_matches_eager(triton_backend):
    x0, noise = _inputs((3, 4, 6, 5), torch.float32)
    t = torch.tensor([3, 400, 999])
    out = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise, noise_offset=0.1, seed=5)
    assert triton_backend("q_sample")
    with ldm_fast.use_backend("eager"):
        ref = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise, noise_offset=0.1, seed=5)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    offset = (out[1] - noise).mean(dim=(2, 3))  # one offset per (sample, channel)
    assert torch.allclose((out[1] - noise), offset[:, :, None, None].expand_as(noise), atol=1e-6)
    assert offset.abs().max() > 0


def test_gradient_needs_eager_and_gets_it():
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    noise = torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])
    before = ldm_fast.ops.kernel_launches["q_sample"]
    with ldm_fast.use_backend("triton"):
        x_t, v = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise, target="v")
    assert ldm_fast.ops.kernel_launches["q_sample"] == before  # autograd needs the eager path
    (x_t.sum() + v.sum()).backward()
    abar = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad, (abar.sqrt() - (1 - abar).sqrt()).expand_as(x0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_diffusers_add_noise_parity(dtype, triton_backend):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = _inputs((4, 4, 8, 8), dtype)
    t = torch.tensor([0, 1, 500, 999])
    expected = sched.add_noise(x0.float(), noise.float(), t)
    x_t, _ = F.q_sample(x0, t, sched.alphas_cumprod, noise=noise)
    assert triton_backend("q_sample")
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(x_t.float(), expected, rtol=tol, atol=tol)
    # and with ldm_fast's own SD schedule (float64-computed): abar differs by < 5e-7
    x_t_own, _ = F.q_sample(x0, t, ALPHAS_CUMPROD, noise=noise)
    torch.testing.assert_close(x_t_own.float(), expected, rtol=tol, atol=max(tol, 2e-6))


def test_unsupported_dtype_falls_back_to_eager():
    x0, noise = _inputs((2, 3, 4), torch.float64)
    before = ldm_fast.ops.kernel_launches["q_sample"]
    with ldm_fast.use_backend("triton"):
        x_t, _ = F.q_sample(x0, 3, ALPHAS_CUMPROD, noise=noise)
    assert ldm_fast.ops.kernel_launches["q_sample"] == before
    assert x_t.dtype == torch.float64


@pytest.mark.parametrize("backend_name", ["triton", "eager"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(t=torch.tensor([0, T])), ValueError, r"t must lie in \[0, 1000\)"),
        (dict(t=-1), ValueError, r"t must lie in \[0, 1000\)"),
        (dict(t=torch.tensor([0.5, 1.0])), TypeError, "t must hold integer"),
        (dict(t=1.0), TypeError, "t must be an int"),
        (dict(t=torch.tensor([1, 2, 3])), ValueError, r"t must be a scalar or have shape \[2\]"),
        (dict(noise=torch.zeros(2, 3)), ValueError, "noise must have the shape of x0"),
        (dict(x0=torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError, "x0 must be a floating"),
        (dict(alphas_cumprod=torch.zeros(10, 2)), ValueError, "alphas_cumprod must be a non-empty 1-d"),
        (dict(target="x0"), ValueError, "target must be 'eps' or 'v'"),
    ],
    ids=["t-too-large", "t-negative", "t-float", "t-int-float", "t-batch", "noise-shape", "x0-int", "table-2d", "target"],
)
def test_bad_input_names_the_argument(kwargs, error, match, backend_name):
    args = dict(x0=torch.zeros(2, 3, 4), t=torch.tensor([0, 1]), alphas_cumprod=ALPHAS_CUMPROD)
    args.update(kwargs)
    x0, t, table = args.pop("x0"), args.pop("t"), args.pop("alphas_cumprod")
    with ldm_fast.use_backend(backend_name), pytest.raises(error, match=match):
        F.q_sample(x0, t, table, **args)
