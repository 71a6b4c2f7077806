"""reparameterize at SD latent shapes: the encoder's moments [B, 8, 64, 64] -> scaled latents [B, 4, 64, 64].

Baseline: diffusers' ``DiagonalGaussianDistribution(moments).sample() * scaling_factor``, eager.
Minimum traffic: read moments once, write z once (noise drawn in-kernel, never stored).
"""

from __future__ import annotations

import torch

from ldm_fast import functional as F

from .common import DTYPES, Case, benchmark_tests, nbytes

SCALE = 0.18215


def _make(batch: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        moments = torch.randn(batch, 8, 64, 64, generator=g).to(device=device, dtype=dtype)
        return {"moments": moments}

    return make


def _fused(inputs):
    return F.reparameterize_moments(inputs["moments"], seed=1234, scale=SCALE)


def _eager(inputs):
    # diffusers DiagonalGaussianDistribution.__init__ + sample(), then * scaling_factor
    mean, logvar = torch.chunk(inputs["moments"], 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * logvar)
    var = torch.exp(logvar)  # noqa: F841  (diffusers computes it on construction)
    sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return sample * SCALE


def _min_bytes(inputs):
    moments = inputs["moments"]
    return nbytes(moments) + nbytes(moments) // 2  # read moments, write z (half its channels)


def cases() -> list[Case]:
    return [
        Case("reparameterize", f"sd-latent-b{b}-{name}", _make(b, dtype), _fused, _eager, _min_bytes, traffic_target=1.0)
        for b in (1, 2, 8)
        for name, dtype in DTYPES.items()
    ]


test_eager, test_fused = benchmark_tests(cases)
