"""The SD v1 VAE (CompVis ``AutoencoderKL``; labml ``Autoencoder``), built from ldm_fast's fused modules.

State dict keys are CompVis' (a checkpoint's ``first_stage_model.*`` section loads with
``strict=True``); :mod:`ldm_fast.models.convert` maps diffusers' ``AutoencoderKL`` keys both ways,
and :meth:`AutoencoderKL.from_diffusers` builds one from a diffusers model.

What runs fused: every GroupNorm+SiLU (ResnetBlock ``norm1``/``norm2``, ``norm_out``) is one
:class:`ldm_fast.nn.GroupNorm` with ``activation="silu"``; the mid-block attention is
:class:`ldm_fast.nn.SpatialSelfAttention` (one head of ``C`` = 512 dims at SD size); sampling the
posterior is the fused reparameterize kernel. Convolutions are torch's.

Shapes (SD defaults): image ``[B, 3, H, W]`` -> moments ``[B, 8, H/8, W/8]`` -> latent
``[B, 4, H/8, W/8]`` -> image ``[B, 3, H, W]``. Parameter count at the defaults: 83,653,863.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from .. import functional as lf
from .._fusion import shortcut_gemm
from ..nn import GroupNorm, SpatialSelfAttention

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "Encoder", "Decoder", "ResnetBlock"]

EPS = 1e-6  # the VAE's GroupNorm eps (CompVis ``Normalize``)


class ResnetBlock(nn.Module):
    """``nin_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))``; no time embedding, no dropout.
    Keys: norm1, conv1, norm2, conv2 (3x3), nin_shortcut (1x1, only when the channel count changes;
    in inference on the Triton backend a GEMM onto conv2's output, ``ldm_fast._fusion.shortcut_gemm``)."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, groups: int = 32) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = GroupNorm(groups, in_channels, EPS, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, EPS, activation="silu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm2(self.conv1(self.norm1(x)))
        if type(self.nin_shortcut) is nn.Conv2d:  # inference on the Triton backend: the 1x1 shortcut as a GEMM onto conv2
            out = shortcut_gemm(self.conv2, h, self.nin_shortcut, x)
            if out is not None:
                return out
        return self.nin_shortcut(x) + self.conv2(h)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 convolution without padding (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(TF.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(TF.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = SpatialSelfAttention(channels, num_groups=groups, eps=EPS)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """image ``[B, in_channels, H, W]`` -> ``[B, 2*z_channels, H/2^(L-1), W/2^(L-1)]`` (L = len(ch_mult)).

    Keys: conv_in, down.{i}.block.{j}, down.{i}.downsample (all levels but the last), mid.{block_1,
    attn_1, block_2}, norm_out, conv_out (CompVis ``Encoder`` with ``attn_resolutions=[]``)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 in_channels: int = 3, z_channels: int = 4, double_z: bool = True, groups: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            down = nn.Module()
            block_in = ch * in_mult[level]
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, groups))
                block_in = ch * mult
            down.block = nn.ModuleList(blocks)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in, groups)
        self.norm_out = GroupNorm(groups, block_in, EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    """latent ``[B, z_channels, h, w]`` -> image ``[B, out_channels, h*2^(L-1), w*2^(L-1)]``.

    Keys: conv_in, mid.*, up.{i}.block.{0..num_res_blocks}, up.{i}.upsample (levels i > 0), norm_out,
    conv_out; ``up[0]`` is the highest resolution (CompVis ``Decoder``; the forward runs up[L-1] first)."""

    def __init__(self, *, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 out_channels: int = 3, z_channels: int = 4, groups: int = 32) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, groups)
        ups = []
        for level in reversed(range(len(ch_mult))):
            up = nn.Module()
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * ch_mult[level], groups))
                block_in = ch * ch_mult[level]
            up.block = nn.ModuleList(blocks)
            if level != 0:
                up.upsample = Upsample(block_in)
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = GroupNorm(groups, block_in, EPS, activation="silu")
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(self.norm_out(h))


class DiagonalGaussianDistribution:
    """The posterior ``N(mean, exp(logvar))`` of moments ``[B, 2C, h, w]`` (mean = first C channels,
    logvar = the rest, clamped to [-30, 20] as CompVis and diffusers do).

    ``sample(noise=None, seed=None, scale=1.0)`` is the fused reparameterize kernel (noise drawn in
    the kernel from ``seed`` unless given); ``mode()`` the mean; ``kl()`` the KL divergence to
    N(0, I) summed over ``[C, h, w]`` (``[B]``, fp32 math); ``nll(x)`` likewise.
    """

    def __init__(self, moments: Tensor, deterministic: bool = False) -> None:
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic

    def sample(self, noise: Optional[Tensor] = None, seed: Optional[int] = None, scale: float = 1.0) -> Tensor:
        """``(mean + std * noise) * scale``, ``[B, C, h, w]`` (std = 0 when deterministic)."""
        if self.deterministic:
            return self.mean * scale
        return lf.reparameterize_moments(self.moments, noise=noise, seed=seed, scale=scale)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> Tensor:
        """``0.5 * sum(mean^2 + var - 1 - logvar)`` over ``[C, h, w]`` (against ``other`` when given)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0], dtype=torch.float32)
        mean, logvar = self.mean.float(), self.logvar.float()
        dims = tuple(range(1, mean.dim()))
        if other is None:
            return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dims)
        om, olv = other.mean.float(), other.logvar.float()
        return 0.5 * ((mean - om).pow(2) / olv.exp() + (logvar - olv).exp() - 1.0 - logvar + olv).sum(dims)

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood of ``x`` ``[B, C, h, w]``, summed over ``[C, h, w]``."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0], dtype=torch.float32)
        mean, logvar = self.mean.float(), self.logvar.float()
        log_2pi = 1.8378770664093453
        return 0.5 * (log_2pi + logvar + (x.float() - mean).pow(2) / logvar.exp()).sum(tuple(range(1, x.dim())))


class AutoencoderKL(nn.Module):
    """The KL autoencoder of latent diffusion: ``encode(x)`` -> :class:`DiagonalGaussianDistribution`,
    ``decode(z)`` -> image; keys ``encoder.*``, ``decoder.*``, ``quant_conv``, ``post_quant_conv``.

    Defaults are SD v1's (CompVis ``ddconfig``: ch 128, ch_mult (1, 2, 4, 4), 2 res blocks,
    z_channels 4, embed_dim 4); ``scale_factor`` (0.18215) is the latent scale LDMs apply to samples.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2, z_channels: int = 4,
                 embed_dim: int = 4, groups: int = 32, scale_factor: float = 0.18215) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks, z_channels=z_channels, embed_dim=embed_dim, groups=groups,
                           scale_factor=scale_factor)
        self.scale_factor = scale_factor
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, in_channels=in_channels,
                               z_channels=z_channels, groups=groups)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, out_channels=out_channels,
                               z_channels=z_channels, groups=groups)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """image ``[B, in_channels, H, W]`` -> the posterior over ``[B, embed_dim, H/f, W/f]``."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """latent ``[B, embed_dim, h, w]`` (unscaled) -> image ``[B, out_channels, h*f, w*f]``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample_posterior: bool = True, seed: Optional[int] = None):
        """``(reconstruction, posterior)`` as CompVis' ``AutoencoderKL.forward``."""
        posterior = self.encode(x)
        z = posterior.sample(seed=seed) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> "AutoencoderKL":
        """Ours, built from a diffusers ``AutoencoderKL``'s config and weights (a ValueError names the
        config field our architecture cannot express)."""
        from .convert import vae_config_from_diffusers, vae_from_diffusers

        ours = cls(**vae_config_from_diffusers(model.config))
        param = next(model.parameters())
        ours.to(device=param.device, dtype=param.dtype)
        ours.load_state_dict(vae_from_diffusers(model.state_dict()), strict=True)
        return ours
