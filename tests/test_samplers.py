"""ldm_fast.samplers against diffusers' DDIMScheduler / DDPMScheduler (SD settings): timesteps, single
steps, a whole guided trajectory, img2img's start, inpainting's re-noising; eager and the kernel forced."""

import contextlib
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import ldm_fast
from ldm_fast import backend, ops
from ldm_fast.kernels.sampler_step import sampler_step_reference, step_coefficients
from ldm_fast.samplers import DDIMSampler, DDPMSampler, make_timesteps

from _numerics import assert_close_to_exact
from test_call_path import _Record

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
T = 1000
BACKENDS = ["eager", "triton"]


def _ddim(spacing="leading", steps=20):
    sched = DDIMScheduler(**SD, set_alpha_to_one=False, steps_offset=1 if spacing == "leading" else 0,
                          timestep_spacing=spacing)
    sched.set_timesteps(steps)
    return sched


def _ddpm(steps=None, spacing="leading"):
    sched = DDPMScheduler(**SD, steps_offset=1 if spacing == "leading" else 0, timestep_spacing=spacing)
    if steps is not None:
        sched.set_timesteps(steps)
    return sched


@contextlib.contextmanager
def _backend(name):
    """Run on ``name``; with "triton" also assert the kernel launched."""
    before = ops.kernel_launches["sampler_step"]
    with ldm_fast.use_backend(name):
        yield
    if name == "triton":
        assert ops.kernel_launches["sampler_step"] > before


def _tensors(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


class StandIn:
    """A small fixed model: eps = tanh(W x + (mean of cond) P * t / 1000); records what it sees."""

    def __init__(self, channels=4, dim=8, seed=0):
        self.w, self.p = (m * 0.4 for m in _tensors((channels, channels), (dim, channels), seed=seed))
        self.calls = []

    def __call__(self, x, t, cond):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],) and t.device == x.device
        self.calls.append((x.clone(), t.clone()))
        h = torch.einsum("oc,nchw->nohw", self.w, x)
        if cond is not None:
            h = h + (cond.mean(1) @ self.p)[:, :, None, None] * (t.float() / 1000)[:, None, None, None]
        eps = torch.tanh(h)
        self.calls[-1] += (eps.clone(),)
        return eps


# ---------------------------------------------------------------------------------------------
# timesteps


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 30, 50, 1000])
def test_timesteps_equal_diffusers(steps, spacing):
    expected = _ddim(spacing, steps).timesteps
    assert torch.equal(_ddpm(steps, spacing).timesteps, expected)
    ours = DDIMSampler(ldm_fast.make_schedule(), steps, spacing=spacing).timesteps
    assert torch.equal(DDPMSampler(ldm_fast.make_schedule(), steps, spacing).timesteps, ours)
    assert len(ours) == steps and (ours[:-1] > ours[1:]).all() and 0 <= ours.min() and ours.max() < T
    if spacing == "leading" and steps == T:  # diffusers: 1000, 999, ..., 1, and t = 1000 is outside its table
        assert expected[0] == T and torch.equal(ours, torch.arange(T - 1, -1, -1))
        with pytest.raises(IndexError):
            _ddim(spacing, steps).step(torch.zeros(1, 4, 2, 2), expected[0], torch.zeros(1, 4, 2, 2))
    else:
        assert torch.equal(ours, expected)


def test_sd_ddim_50_steps_and_final_alpha():
    sampler = DDIMSampler(ldm_fast.make_schedule(), 50)
    assert sampler.timesteps[0] == 981 and sampler.timesteps[-1] == 1 and len(sampler.timesteps) == 50
    assert sampler.prev_timesteps[-1] == -1 and sampler.final_alpha_cumprod == pytest.approx(0.99915)
    assert torch.equal(DDPMSampler(ldm_fast.make_schedule()).timesteps, torch.arange(T - 1, -1, -1))


# ---------------------------------------------------------------------------------------------
# one step


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["eta0", "eta1"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_equals_diffusers(spacing, eta, backend_name):
    sched = _ddim(spacing, 20)
    sampler = DDIMSampler(sched.alphas_cumprod, 20, eta=eta, spacing=spacing)
    x, eps, noise = _tensors((2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))
    for t in sched.timesteps:
        expected = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        with _backend(backend_name):
            out = sampler.step(eps, t, x, noise=noise)
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("steps", [None, 20], ids=["full-chain", "20-steps"])
def test_ddpm_step_equals_diffusers(steps, backend_name):
    """Equal up to diffusers' own fp32 rounding: its ``1 - abar_t / abar_prev`` cancels at small t
    (2.7e-5 at t = 1), where the float64 coefficients here stay within 2x of its error plus an ulp."""
    sched = _ddpm(steps)
    sampler = DDPMSampler(sched.alphas_cumprod, steps)
    x, eps = _tensors((2, 4, 8, 8), (2, 4, 8, 8))
    abar = sched.alphas_cumprod.double()
    timesteps = sched.timesteps.tolist()
    for t in ([999, 998, 500, 10, 1, 0] if steps is None else timesteps[:2] + timesteps[-2:]):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))  # what diffusers' step draws
        expected = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        with _backend(backend_name):
            out = sampler.step(eps, t, x, noise=noise)
        prev = timesteps[timesteps.index(t) + 1] if steps is not None and t != timesteps[-1] else t - 1
        coefs = step_coefficients(abar[t], abar[prev] if prev >= 0 else 1.0, "ddpm")
        exact = sampler_step_reference(eps.double(), x.double(), coefs, noise.double() if t > 0 else None)
        assert_close_to_exact(out, exact, expected)
        torch.testing.assert_close(out, expected, rtol=0, atol=5e-5)


def test_trailing_ddim_lands_on_the_next_listed_timestep():
    """diffusers' DDIM step goes to ``t - T // S``: for trailing 30 steps 966 -> 933, then the model runs at
    932. Here the step from 966 lands on 932, the timestep the next model call uses."""
    sched = _ddim("trailing", 30)
    sampler = DDIMSampler(sched.alphas_cumprod, 30, spacing="trailing")
    assert sched.timesteps[1:3].tolist() == [966, 932]
    x, eps = _tensors((1, 4, 4, 4), (1, 4, 4, 4))
    abar = sched.alphas_cumprod.double()
    out = sampler.step(eps, 966, x)
    expected = sampler_step_reference(eps, x, step_coefficients(abar[966], abar[932]))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(sched.step(eps, 966, x).prev_sample, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_cfg_combine_is_uncond_first(backend_name):
    sampler = DDIMSampler(ldm_fast.make_schedule(), 20)
    x, eps_u, eps_c = _tensors((2, 4, 6, 6), (2, 4, 6, 6), (2, 4, 6, 6))
    with _backend(backend_name):
        out = sampler.step(torch.cat([eps_u, eps_c]), 501, x, guidance_scale=7.5)
        expected = sampler.step(eps_u + 7.5 * (eps_c - eps_u), 501, x)
        swapped = sampler.step(eps_c + 7.5 * (eps_u - eps_c), 501, x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, swapped, rtol=1e-3, atol=1e-3)


def test_step_takes_a_device_timestep_through_the_table(triton_backend):
    """A t tensor on the device reads row t of ``coefficient_table`` in the kernel (no host sync); the
    same numbers as the host coefficients. (CPU tensors take the host path: the table is called here.)"""
    sampler = DDIMSampler(ldm_fast.make_schedule(), 20, eta=0.3)
    x, eps, noise = _tensors((2, 4, 5, 5), (2, 4, 5, 5), (2, 4, 5, 5))
    table = sampler.coefficient_table("cpu")
    assert torch.isnan(table[500]).all() and not torch.isnan(table[501]).any()
    for t in (951, 1):
        out = ldm_fast.functional.sampler_step(eps, x, coefficients=table, index=torch.tensor(t), noise=noise)
        torch.testing.assert_close(out, sampler.step(eps, t, x, noise=noise), rtol=0, atol=0)
    with pytest.raises(ValueError, match="t=500 is not one of this sampler's timesteps"):
        sampler.step(eps, 500, x)


# ---------------------------------------------------------------------------------------------
# whole loops


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_guided_ddim_trajectory_equals_diffusers_loop(backend_name):
    sched = _ddim("leading", 20)
    sampler = DDIMSampler(sched.alphas_cumprod, 20)
    x_T, cond, uncond = _tensors((2, 4, 8, 8), (2, 5, 8), (1, 5, 8))
    model = StandIn()
    with _backend(backend_name):
        ours = sampler.sample(model, x_T, cond=cond, uncond=uncond, guidance_scale=7.5, progress=False)
    assert len(model.calls) == 20 and all(x.shape[0] == 4 for x, _, _ in model.calls)  # [uncond, cond] once per step
    # diffusers' StableDiffusionPipeline loop
    x = x_T.clone()
    embeddings = torch.cat([uncond.expand(2, -1, -1), cond])
    for t in sched.timesteps:
        noise_pred = model(torch.cat([x] * 2), t.expand(4), embeddings)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + 7.5 * (noise_pred_text - noise_pred_uncond)
        x = sched.step(noise_pred, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_img2img_starts_at_the_timestep_it_noised_to(backend_name):
    sched = _ddim("leading", 20)
    sampler = DDIMSampler(sched.alphas_cumprod, 20)
    x0, noise, cond = _tensors((1, 4, 8, 8), (1, 4, 8, 8), (1, 5, 8))
    model = StandIn()
    with _backend(backend_name):
        ours = sampler.img2img(model, x0, 0.75, noise=noise, cond=cond, progress=False)
    # diffusers' StableDiffusionImg2ImgPipeline: int(20 * 0.75) = 15 steps from timesteps[5], noised to timesteps[5]
    timesteps = sched.timesteps[5:]
    assert [int(t[0]) for _, t, _ in model.calls] == timesteps.tolist()
    x = sched.add_noise(x0, noise, timesteps[:1])
    torch.testing.assert_close(model.calls[0][0], x, rtol=1e-6, atol=1e-6)
    for t in timesteps:
        x = sched.step(model(x, t.expand(1), cond), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="runs no step"):
        sampler.img2img(model, x0, 0.04, progress=False)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inpainting_renoises_the_kept_region_at_each_step_before_it(backend_name):
    sampler = DDIMSampler(ldm_fast.make_schedule(), 10)
    abar = sampler.alphas_cumprod.double()
    x0 = torch.full((1, 4, 16, 16), 100.0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:, :] = 1  # keep the bottom half
    model = StandIn()
    with _backend(backend_name):
        sampler.inpaint(model, x0, mask, strength=0.8, seed=3, progress=False)
    timesteps = sampler.timesteps[2:].tolist()
    assert [int(t[0]) for _, t, _ in model.calls] == timesteps
    keep = mask.expand_as(x0).bool()
    n = int(keep.sum())
    for i, ((x, _, eps), t) in enumerate(zip(model.calls, timesteps)):
        z = (x.double()[keep] - abar[t].sqrt() * 100.0) / (1 - abar[t]).sqrt()  # q_sample(x0, t)'s noise
        assert abs(z.mean().item()) < 5 / n**0.5 and abs(z.std().item() - 1) < 0.25, (t, z.mean(), z.std())
        if i:  # the rest is the previous step's result, untouched
            prev_x, prev_t, prev_eps = model.calls[i - 1]
            stepped = sampler.step(prev_eps, int(prev_t[0]), prev_x)
            assert torch.equal(x[~keep], stepped[~keep])


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_ddpm_sample_is_seeded_and_has_no_host_sync(backend_name):
    sampler = DDPMSampler(ldm_fast.make_schedule(), 10)
    cond, uncond = _tensors((2, 5, 8), (2, 5, 8))
    model = StandIn()
    before = ops.kernel_launches["sampler_step"]
    with _backend(backend_name), _Record() as rec:
        a = sampler.sample(model, (2, 4, 6, 6), cond=cond, uncond=uncond, guidance_scale=3.0, seed=1, progress=False)
    assert not [op for op in rec.ops if op in ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero")], rec.ops
    if backend_name == "triton":
        assert ops.kernel_launches["sampler_step"] - before == 10  # one launch per step
    with _backend(backend_name):
        b = sampler.sample(model, (2, 4, 6, 6), cond=cond, uncond=uncond, guidance_scale=3.0, seed=1, progress=False)
        c = sampler.sample(model, (2, 4, 6, 6), cond=cond, uncond=uncond, guidance_scale=3.0, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()


def test_sample_without_tqdm_and_with_it(monkeypatch):
    sampler = DDIMSampler(ldm_fast.make_schedule(), 3)
    model = StandIn()
    with_bar = sampler.sample(model, (1, 4, 4, 4), seed=0, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    assert torch.equal(sampler.sample(model, (1, 4, 4, 4), seed=0, progress=True), with_bar)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 1001), ValueError,
         r"num_inference_steps must be an int in \[1, 1000\]"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 0), ValueError, "num_inference_steps"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10, spacing="uniform"), ValueError, "spacing must be one of"),
        (lambda: DDIMSampler(torch.zeros(3, 3), 2), TypeError, "schedule must be"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10, eta=-1.0), ValueError, "eta must be >= 0"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10).sample(StandIn(), (1, 4, 2, 2), guidance_scale=5.0),
         ValueError, "needs cond and uncond"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10).sample(StandIn(), (1, 4, 2, 2), strength=0.5),
         ValueError, "need x0"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10).img2img(StandIn(), torch.zeros(1, 4, 2, 2), 1.5),
         ValueError, r"strength must lie in \(0, 1\]"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10).inpaint(StandIn(), torch.zeros(1, 4, 2, 2),
                                                                    torch.ones(3, 2)), ValueError, "mask must broadcast"),
        (lambda: DDIMSampler(ldm_fast.make_schedule(), 10).step(torch.zeros(1, 2), 1.5, torch.zeros(1, 2)),
         TypeError, "t must be an int"),
    ],
    ids=["too-many-steps", "zero-steps", "spacing", "schedule", "eta", "cfg-without-uncond", "strength-without-x0",
         "strength-range", "mask-shape", "float-t"],
)
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


# ---------------------------------------------------------------------------------------------
# from_diffusers: the sampler of any DDIMScheduler / DDPMScheduler these kernels can reproduce

_TRAINED_BETAS = torch.linspace(2e-4, 0.03, T, dtype=torch.float64).tolist()
DDIM_CONFIGS = {
    "sd": dict(SD, set_alpha_to_one=False, steps_offset=1),
    # diffusers' class defaults: linear 1e-4..0.02, clip_sample=True (range 1), set_alpha_to_one=True, offset 0
    "class-defaults": {},
    "linear-trailing-alpha-one": dict(beta_schedule="linear", set_alpha_to_one=True, steps_offset=0,
                                      timestep_spacing="trailing", clip_sample=False),
    "cosine-linspace-clip2": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample_range=2.0),
    "trained-betas-offset3": dict(trained_betas=_TRAINED_BETAS, steps_offset=3, clip_sample=False),
}
DDPM_CONFIGS = {
    "sd-20": (dict(SD, steps_offset=1), 20),
    "class-defaults-full-chain": ({}, None),
    "linear-trailing-clip1.5-log": (dict(timestep_spacing="trailing", clip_sample_range=1.5,
                                         variance_type="fixed_small_log"), 25),
    "cosine-linspace": (dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", clip_sample=False), 30),
}


def _eps_model(seed=0):
    """eps = tanh(W x) for x [N, 4, H, W] of any float dtype (float64 for the exact trajectory)."""
    (w,) = _tensors((4, 4), seed=seed)
    return lambda x: torch.tanh(torch.einsum("oc,nchw->nohw", 0.5 * w.to(x.dtype), x))


def _run(step, x, timesteps, noises, model):
    for t, noise in zip(timesteps, noises):
        x = step(model(x), t, x, noise)
    return x


def _exact_run(sampler, x, noises, model):
    """The float64 trajectory of ``sampler``'s own coefficients (step_coefficients, float64)."""
    def step(eps, t, x, noise):
        c = sampler.step_coefficients(t)
        return sampler_step_reference(eps, x, c, noise if c.std > 0 else None, clip_sample=sampler.clip_sample)
    return _run(step, x.double(), sampler.timesteps.tolist(), [n.double() for n in noises], model)


@pytest.mark.parametrize("eta", [0.0, 0.5], ids=["eta0", "eta0.5"])
@pytest.mark.parametrize("steps", [20, 30])
@pytest.mark.parametrize("name", list(DDIM_CONFIGS))
def test_ddim_from_diffusers_follows_diffusers_trajectory(name, steps, eta):
    """Timesteps, landing points (diffusers' ``t - T // S``: 30 steps of trailing or linspace land off
    the next listed timestep), final alpha, clipping and schedule, from the scheduler and from its config."""
    sched = DDIMScheduler(**DDIM_CONFIGS[name])
    sched.set_timesteps(steps)
    sampler = DDIMSampler.from_diffusers(sched, eta=eta)
    from_config = DDIMSampler.from_diffusers(dict(sched.config), steps, eta=eta)
    assert torch.equal(sampler.timesteps, sched.timesteps) and torch.equal(from_config.timesteps, sched.timesteps)
    assert from_config._steps == sampler._steps and from_config.prev_timesteps == sampler.prev_timesteps
    assert sampler.final_alpha_cumprod == pytest.approx(float(sched.final_alpha_cumprod), rel=1e-6)
    torch.testing.assert_close(sampler.alphas_cumprod, sched.alphas_cumprod, rtol=2e-6, atol=1e-7)
    (x,) = _tensors((2, 4, 4, 4), seed=1)
    noises = _tensors(*[(2, 4, 4, 4)] * steps, seed=2)
    model = _eps_model()
    theirs = _run(lambda eps, t, x, z: sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample, x,
                  sched.timesteps, noises, model)
    ours = _run(lambda eps, t, x, z: sampler.step(eps, int(t), x, noise=z), x, sched.timesteps, noises, model)
    assert_close_to_exact(ours, _exact_run(sampler, x, noises, model), theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # and to diffusers' fp32 rounding


@pytest.mark.parametrize("name", list(DDPM_CONFIGS))
def test_ddpm_from_diffusers_follows_diffusers_trajectory(name):
    config, steps = DDPM_CONFIGS[name]
    sched = DDPMScheduler(**config)
    if steps is not None:
        sched.set_timesteps(steps)
    sampler = DDPMSampler.from_diffusers(sched)  # the scheduler's own step count
    assert torch.equal(sampler.timesteps, sched.timesteps)
    assert DDPMSampler.from_diffusers(dict(sched.config), steps)._steps == sampler._steps
    (x,) = _tensors((2, 4, 4, 4), seed=1)
    timesteps = sched.timesteps.tolist()
    noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(t)) for t in timesteps]  # diffusers' draws
    model = _eps_model()
    theirs = _run(lambda eps, t, x, z: sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample,
                  x, timesteps, noises, model)
    ours = _run(lambda eps, t, x, z: sampler.step(eps, t, x, noise=z), x, timesteps, noises, model)
    assert_close_to_exact(ours, _exact_run(sampler, x, noises, model), theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_from_diffusers_sample_loop_runs_the_kernel(triton_backend):
    """A non-SD scheduler (linear, trailing, set_alpha_to_one, no offset, clip) through ``sample`` on the kernel."""
    sched = DDIMScheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")
    sched.set_timesteps(7)
    sampler = DDIMSampler.from_diffusers(sched)
    (x_T,) = _tensors((1, 4, 4, 4), seed=3)
    model = StandIn()
    ours = sampler.sample(model, x_T, progress=False)
    assert triton_backend("sampler_step")
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(1), None), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_from_diffusers_takes_a_config_dict_without_diffusers(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # any import of diffusers now fails
    pndm_config = {"_class_name": "PNDMScheduler", "skip_prk_steps": True, **SD, "set_alpha_to_one": False,
                   "steps_offset": 1}  # SD's scheduler config; PNDM's own fields ignored, as from_config does
    sampler = DDIMSampler.from_diffusers(pndm_config, 50)
    direct = DDIMSampler(ldm_fast.make_schedule("scaled_linear"), 50)
    assert torch.equal(sampler.timesteps, direct.timesteps) and sampler._steps == direct._steps
    assert sampler.prev_timesteps == direct.prev_timesteps
    ddpm = DDPMSampler.from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "clip_sample": False})
    assert ddpm._steps == DDPMSampler(ldm_fast.make_schedule("scaled_linear"))._steps


def _custom_timesteps():
    sched = DDPMScheduler()
    sched.set_timesteps(timesteps=[900, 500, 1])
    return sched


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: DDIMSampler.from_diffusers(DDIMScheduler(prediction_type="v_prediction"), 10), ValueError,
         "prediction_type='v_prediction' cannot be reproduced"),
        (lambda: DDIMSampler.from_diffusers(DDIMScheduler(thresholding=True), 10), ValueError, "thresholding=True"),
        (lambda: DDIMSampler.from_diffusers({"rescale_betas_zero_snr": True}, 10), ValueError,
         "rescale_betas_zero_snr=True"),
        (lambda: DDPMSampler.from_diffusers(DDPMScheduler(beta_schedule="sigmoid")), ValueError,
         "beta_schedule='sigmoid'"),
        (lambda: DDPMSampler.from_diffusers(DDPMScheduler(variance_type="learned_range")), ValueError,
         "variance_type='learned_range'"),
        (lambda: DDIMSampler.from_diffusers({"timestep_spacing": "karras"}, 10), ValueError,
         "timestep_spacing='karras'"),
        (lambda: DDIMSampler.from_diffusers({"trained_betas": [0.01] * 10}, 5), ValueError,
         "trained_betas holds 10 betas, but num_train_timesteps=1000"),
        (lambda: DDIMSampler.from_diffusers(DDIMScheduler()), ValueError, "num_inference_steps is needed"),
        (lambda: DDIMSampler.from_diffusers(DDPMScheduler(), 10), TypeError, r"DDIMScheduler .*got a DDPMScheduler"),
        (lambda: DDIMSampler.from_diffusers([("beta_start", 0.1)], 10), TypeError, "config \\(a mapping\\)"),
        (lambda: DDPMSampler.from_diffusers(_custom_timesteps()), ValueError, "custom timesteps"),
    ],
    ids=["v-prediction", "thresholding", "zero-snr", "sigmoid", "learned-variance", "karras", "trained-betas-length",
         "no-steps", "other-class", "not-a-mapping", "custom-timesteps"],
)
def test_from_diffusers_names_what_it_cannot_reproduce(make, error, match):
    with pytest.raises(error, match=match):
        make()
