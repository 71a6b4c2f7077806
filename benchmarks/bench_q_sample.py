"""q_sample at SD training shapes: latents [B, 4, 64, 64], one timestep per sample, noise drawn in-kernel.

Baseline: the diffusers training loop, ``noise = torch.randn_like(latents)`` then
``DDPMScheduler.add_noise(latents, noise, timesteps)`` (which casts the schedule to the latents'
dtype and gathers it), eager. Minimum traffic: read x0 once, write x_t and the noise once.
"""

from __future__ import annotations

import torch

import ldm_fast
from ldm_fast import functional as F

from .common import DTYPES, Case, benchmark_tests, nbytes

ALPHAS_CUMPROD = ldm_fast.make_schedule("scaled_linear").alphas_cumprod


def _make(batch: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x0 = torch.randn(batch, 4, 64, 64, generator=g).to(device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        return {"x0": x0, "t": t, "alphas_cumprod": ALPHAS_CUMPROD.to(device)}

    return make


def _fused(inputs):
    return F.q_sample(inputs["x0"], inputs["t"], inputs["alphas_cumprod"], seed=1234)


def _fused_device_t(inputs):
    """What a call with t on the GPU runs: t checked by the kernel's device-side assertion (the
    variant compiled with ``debug=True``), so the audit covers it; on a CPU it is forced here."""
    from ldm_fast import ops

    return ops.q_sample.kernel_call(inputs["x0"], inputs["t"], inputs["alphas_cumprod"], None, None, 1234, 0.0, False, True)


def _eager(inputs):
    # diffusers: train_text_to_image.py + DDPMScheduler.add_noise
    x0, t = inputs["x0"], inputs["t"]
    noise = torch.randn_like(x0)
    alphas_cumprod = inputs["alphas_cumprod"].to(device=x0.device, dtype=x0.dtype)
    sqrt_alpha_prod = (alphas_cumprod[t] ** 0.5).flatten()
    sqrt_one_minus_alpha_prod = ((1 - alphas_cumprod[t]) ** 0.5).flatten()
    while len(sqrt_alpha_prod.shape) < len(x0.shape):
        sqrt_alpha_prod = sqrt_alpha_prod.unsqueeze(-1)
        sqrt_one_minus_alpha_prod = sqrt_one_minus_alpha_prod.unsqueeze(-1)
    return sqrt_alpha_prod * x0 + sqrt_one_minus_alpha_prod * noise, noise


def _min_bytes(inputs):
    x0 = inputs["x0"]
    return 3 * nbytes(x0)  # read x0, write x_t and the noise


def cases() -> list[Case]:
    return [
        Case("q_sample", f"sd-latent-b{b}-{name}", _make(b, dtype), _fused, _eager, _min_bytes, traffic_target=1.0,
             quick=b == 1)
        for b in (1, 2, 8)
        for name, dtype in DTYPES.items()
    ] + [
        Case("q_sample", "sd-latent-b8-fp16-device-t", _make(8, torch.float16), _fused_device_t, _eager, _min_bytes,
             traffic_target=1.0, quick=True),
    ]


test_eager, test_fused = benchmark_tests(cases)
