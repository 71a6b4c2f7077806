"""timestep_embedding at the U-Net's shapes: ``Timesteps(dim)(t) -> [B, dim]`` fp32, once per step.

SD 1.5 (``dim`` 320, ``flip_sin_to_cos=True``, ``downscale_freq_shift=0``) at batch 2 (classifier-free
guidance) and 16 (a batched server), SDXL's 1280, and an odd width (the pad column), with int64,
fp32 and fp16 timesteps as samplers pass them. The work is tiny: what counts is one launch instead
of eager's ~10 (the U-Net step pays each launch's fixed cost), and the bytes are the output once.

Baseline: diffusers' ``get_timestep_embedding`` statements (arange, the exponent's scale and
division, exp, the outer product with ``t.float()``, the scale, sin, cos, the cat, the flip's cat,
the odd dim's pad), eager. Fused: ``ldm_fast.functional.timestep_embedding``, one launch. Minimum
traffic: read the timesteps once, write ``[B, dim]`` fp32 once; target 1.0.
"""

from __future__ import annotations

import torch

import ldm_fast.functional as lf
from ldm_fast.kernels.timestep_embedding import timestep_embedding_reference

from .common import Case, benchmark_tests, nbytes

# (batch, dim, timestep dtype, quick)
SHAPES = [(2, 320, torch.int64, True), (16, 320, torch.float32, False), (2, 1280, torch.float32, False),
          (4, 257, torch.float16, True)]
_KWARGS = {"flip_sin_to_cos": True, "downscale_freq_shift": 0.0}


def _make(batch: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        t = torch.randint(0, 1000, (batch,), generator=g)
        return {"t": t.to(device=device, dtype=dtype)}

    return make


def _case(dim: int):
    def fused(inputs):
        return lf.timestep_embedding(inputs["t"], dim, **_KWARGS)

    def eager(inputs):
        return timestep_embedding_reference(inputs["t"], dim, True, 0.0, 1.0, 10000)

    def min_bytes(inputs):
        return nbytes(inputs["t"]) + inputs["t"].shape[0] * dim * 4  # read t, write [B, dim] fp32

    return fused, eager, min_bytes


def cases() -> list[Case]:
    out = []
    for batch, dim, dtype, quick in SHAPES:
        fused, eager, min_bytes = _case(dim)
        name = f"b{batch}-{dim}-{str(dtype).removeprefix('torch.')}"
        out.append(Case("timestep_embedding", name, _make(batch, dtype), fused, eager, min_bytes, quick=quick))
    return out


test_eager, test_fused = benchmark_tests(cases)
