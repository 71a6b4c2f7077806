"""GroupNorm + SiLU forward at SD shapes: the U-Net's ResBlock norms and the VAE decoder's, 32 groups, NCHW.

U-Net levels at 512x512 (latents 64x64): 320x64x64, 640x32x32, 1280x16x16, 1280x8x8, eps 1e-5, at
batch 1 and 8. VAE decoder levels at 512x512: 128x512x512, 256x256x256, 512x128x128, 512x64x64,
eps 1e-6, at batch 1 (the large levels are hundreds of MB per sample). Weights in x's dtype, as in
a ``.half()`` model.

Baseline: ``F.silu(F.group_norm(x, 32, w, b, eps))``, eager (diffusers' ResnetBlock2D:
``self.norm1`` then ``self.nonlinearity``). Minimum traffic: read x, weight and bias once, write y
once. The fused kernel holds a group on chip when ``next_pow2(H*W) * next_pow2(C/32)`` elements fit
(``ONE_PASS_MAX``): it then reads x once (target 1.0); larger groups are split across programs and
x is read twice, once for the statistics and once to normalize (target 1.5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ldm_fast import functional as F
from ldm_fast.kernels.group_norm import one_pass_fits

from .common import DTYPES, Case, benchmark_tests, nbytes

GROUPS = 32
UNET = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # (channels, side); eps 1e-5
VAE = [(128, 512), (256, 256), (512, 128), (512, 64)]  # eps 1e-6


def _make(batch: int, channels: int, side: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, side, side, generator=g).to(device=device, dtype=dtype)
        weight = (1 + 0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype)
        bias = (0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype)
        return {"x": x, "weight": weight, "bias": bias}

    return make


def _fused(eps: float):
    def fused(inputs):
        return F.group_norm(inputs["x"], GROUPS, inputs["weight"], inputs["bias"], eps, activation="silu")

    return fused


def _eager(eps: float):
    def eager(inputs):
        return TF.silu(TF.group_norm(inputs["x"], GROUPS, inputs["weight"], inputs["bias"], eps))

    return eager


def _min_bytes(inputs):
    x = inputs["x"]
    return 2 * nbytes(x) + nbytes(inputs["weight"], inputs["bias"])  # read x, weight, bias; write y


def _case(kind: str, batch: int, channels: int, side: int, dtype_name: str, quick: bool = False) -> Case:
    eps = 1e-5 if kind == "unet" else 1e-6
    shape = (batch, channels, side, side)
    return Case(
        "group_norm",
        f"{kind}-{channels}x{side}x{side}-b{batch}-{dtype_name}",
        _make(batch, channels, side, DTYPES[dtype_name]),
        _fused(eps),
        _eager(eps),
        _min_bytes,
        traffic_target=1.0 if one_pass_fits(shape, GROUPS) else 1.5,
        quick=quick,
    )


def cases() -> list[Case]:
    out = [
        # the quick subset: a one-pass and a split case, small
        _case("unet", 1, 1280, 8, "fp16", quick=True),
        _case("unet", 1, 640, 32, "bf16", quick=True),
        _case("unet", 1, 1280, 16, "fp32", quick=True),
    ]
    for batch in (1, 8):
        for channels, side in UNET:
            for dtype_name in ("fp16", "bf16"):
                if (batch, channels, side, dtype_name) not in ((1, 1280, 8, "fp16"), (1, 640, 32, "bf16")):
                    out.append(_case("unet", batch, channels, side, dtype_name))
    out.append(_case("unet", 8, 320, 64, "fp32"))
    for channels, side in VAE:
        for dtype_name in ("fp16", "bf16"):
            out.append(_case("vae", 1, channels, side, dtype_name))
    out.append(_case("vae", 1, 512, 64, "fp32"))
    return out


test_eager, test_fused = benchmark_tests(cases)
