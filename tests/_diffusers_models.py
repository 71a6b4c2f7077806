"""Tiny diffusers models built from configs (no weights are fetched), their inputs, and the
comparisons the optimize tests make against the same model without ldm_fast."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

import ldm_fast

# Whole-model tolerance with the Triton kernels (interpreted, fp32): each GroupNorm's statistics
# are computed in fp32 in another order than ATen's (chunked two-pass sums), ~1e-6 relative per
# norm; ~20 norms, convolutions and attention in sequence amplify that to a few 1e-6..1e-5. 1e-4
# relative to the output's scale leaves an order of magnitude of margin yet catches any real
# mistake (a missing SiLU, an ignored LoRA, a stale weight are O(1e-2) or more).
TRITON_RTOL = 1e-4


def unet(seed: int = 0, **overrides):
    """A two-level SD-1.x-shaped UNet2DConditionModel (cross-attention on the first level and in the
    middle, a channel-changing 1x1 shortcut, 8x8 latents), in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def unet_inputs(seed: int = 1, batch: int = 2):
    """(sample [B, 4, 8, 8], timesteps [B], encoder_hidden_states [B, 3, 32])."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([10, 500, 999, 0][:batch])
    return torch.randn(batch, 4, 8, 8, generator=g), t, torch.randn(batch, 3, 32, generator=g)


def vae(seed: int = 0):
    """A two-level AutoencoderKL on 16x16 images, in eval mode."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()


def image(seed: int = 2):
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run_unet(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def run_vae(model, x):
    with torch.no_grad():
        return model(x, sample_posterior=False).sample


def assert_close_rel(actual, expected, rtol: float = TRITON_RTOL) -> None:
    """``max|actual - expected| <= rtol * max|expected|``."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


@contextmanager
def kernels_forced():
    """The Triton kernels forced (interpreted on CPU); yields a dict-like of launches per op made
    inside the block (``launched["group_norm"]``)."""
    before = ldm_fast.ops.kernel_launches.copy()
    launched = {}
    with ldm_fast.use_backend("triton"):
        yield launched
    launched.update({op: n - before[op] for op, n in ldm_fast.ops.kernel_launches.items() if n - before[op]})


def twin(model):
    """An independent copy of ``model`` (the reference a test compares the optimized model against)."""
    return copy.deepcopy(model)
