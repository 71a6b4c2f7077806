"""reparameterize at SD latent shapes: the encoder's moments [B, 8, 64, 64] -> scaled latents [B, 4, 64, 64].

Forward (``sd-latent-*``): baseline diffusers' ``DiagonalGaussianDistribution(moments).sample() *
scaling_factor``, eager. Minimum traffic: read moments once, write z once (noise drawn in-kernel,
never stored).

Backward (``bwd-sd-latent-*``, what VAE fine-tuning runs): dL/dz [B, 4, 64, 64] -> (dmean, dlogvar),
logvar a channel slice of the moments as in training. Fused: ``torch.ops.ldm_fast.reparameterize_backward``
alone, the noise drawn again in-kernel from the forward's seed. Baseline: the backward only of the
diffusers expression above: its forward graph is built once in ``make`` (moments a leaf that requires
grad) and each call runs ``torch.autograd.grad(out, (mean, logvar), grad, retain_graph=True)``, so
neither the timing nor the dispatch counter sees the forward. Minimum traffic: read grad and logvar
once, write dmean and dlogvar once (target 1.0: the noise is regenerated, not read).
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


def _diffusers_sample(moments):
    """(mean, logvar, z): diffusers DiagonalGaussianDistribution.__init__ + sample(), then * scaling_factor."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    clamped = torch.clamp(logvar, -30.0, 20.0)
    std = torch.exp(0.5 * clamped)
    var = torch.exp(clamped)  # noqa: F841  (diffusers computes it on construction)
    sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    return mean, logvar, sample * SCALE


def _eager(inputs):
    return _diffusers_sample(inputs["moments"])[2]


def _min_bytes(inputs):
    moments = inputs["moments"]
    return nbytes(moments) + nbytes(moments) // 2  # read moments, write z (half its channels)


def _make_bwd(batch: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        moments = torch.randn(batch, 8, 64, 64, generator=g).to(device=device, dtype=dtype)
        grad = torch.randn(batch, 4, 64, 64, generator=g).to(device=device, dtype=dtype)
        with torch.enable_grad():  # the baseline's forward graph, built once: eager() runs its backward only
            mean, logvar, out = _diffusers_sample(moments.clone().requires_grad_())
        return {
            "grad": grad,  # dL/dz [B, 4, 64, 64]
            "logvar": moments[:, 4:],  # [B, 4, 64, 64], a channel slice of moments (row stride 8*64*64)
            "seed": torch.full((1,), 1234, dtype=torch.int64, device=device),  # the forward's seed, on the device
            "graph": (out, (mean, logvar)),
        }

    return make


def _fused_bwd(inputs):
    return torch.ops.ldm_fast.reparameterize_backward(inputs["grad"], inputs["logvar"], None, inputs["seed"], SCALE)


def _eager_bwd(inputs):
    out, wrt = inputs["graph"]
    return torch.autograd.grad(out, wrt, inputs["grad"], retain_graph=True)


def _min_bytes_bwd(inputs):
    grad, logvar = inputs["grad"], inputs["logvar"]
    return nbytes(grad, logvar) + 2 * nbytes(logvar)  # read grad, logvar; write dmean, dlogvar


def cases() -> list[Case]:
    # quick: the first forward case of each dtype (the subset before there were backward cases) and one backward
    fwd = [
        Case("reparameterize", f"sd-latent-b{b}-{name}", _make(b, dtype), _fused, _eager, _min_bytes,
             traffic_target=1.0, quick=b == 1)
        for b in (1, 2, 8)
        for name, dtype in DTYPES.items()
    ]
    bwd = [
        Case("reparameterize", f"bwd-sd-latent-b{b}-{name}", _make_bwd(b, dtype), _fused_bwd, _eager_bwd,
             _min_bytes_bwd, traffic_target=1.0, quick=(b, name) == (1, "fp16"))
        for b in (1, 8)
        for name, dtype in DTYPES.items()
    ]
    return fwd + bwd


test_eager, test_fused = benchmark_tests(cases)
