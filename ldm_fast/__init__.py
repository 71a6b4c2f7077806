"""ldm_fast: fused Triton kernels and a thin PyTorch API for latent diffusion models.

    import ldm_fast
    z = ldm_fast.functional.reparameterize_moments(moments, scale=0.18215)
    x_t, noise = ldm_fast.functional.q_sample(z, t, schedule.alphas_cumprod)
    out = ldm_fast.functional.attention(q, k, v, heads=8)   # q/k/v [B, N, heads*D], read in place
    report = ldm_fast.optimize(unet)   # an existing model's GroupNorms (+SiLU) fused, in place
    x = ldm_fast.samplers.DDIMSampler(schedule, 50).sample(model_fn, (1, 4, 64, 64), guidance_scale=7.5, ...)

Models: ``ldm_fast.models`` (SD VAE and U-Net with CompVis keys, the vector LDM); training:
``ldm_fast.train``; the demo: ``python -m ldm_fast demo``.

See README.md for the backends, the error bounds and the benchmarks.
"""

from . import backend, functional, nn, samplers, schedules
from .backend import use_backend
from .latent_diffusion import LatentDiffusion
from .optimize import OptimizeReport, optimize, restore
from .schedules import Schedule, make_schedule

__version__ = "0.1.0"

__all__ = ["LatentDiffusion", "OptimizeReport", "Schedule", "backend", "functional", "make_schedule", "nn", "optimize",
           "restore", "samplers", "schedules", "use_backend", "__version__"]
