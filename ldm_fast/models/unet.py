"""The SD v1 denoising U-Net (CompVis ``openaimodel.UNetModel``; labml ``UNetModel``) from ldm_fast's fused modules.

State dict keys are CompVis' (a checkpoint's ``model.diffusion_model.*`` section loads with
``strict=True``); :mod:`ldm_fast.models.convert` maps diffusers' ``UNet2DConditionModel`` keys
both ways, and :meth:`UNetModel.from_diffusers` builds one from a diffusers model.

What runs fused: every GroupNorm+SiLU of the ResBlocks and of ``out`` is one
:class:`ldm_fast.nn.GroupNorm32` with ``activation="silu"`` (the SiLU's slot in the CompVis
``Sequential`` is an ``nn.Identity``, so the keys do not move); the attention of every
SpatialTransformer is :class:`ldm_fast.nn.CrossAttention` over ``[B, N, heads*d_head]`` without
head split/merge copies. Convolutions, Linear layers and LayerNorms are torch's.

Shapes: ``forward(x [B, in_channels, h, w], timesteps [B] or scalar, context [B, L, context_dim])``
-> ``[B, out_channels, h, w]`` (h, w divisible by 2^(levels-1)). Parameter count at the SD v1
defaults: 859,520,964.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as lf
from .._fusion import add_norm, add_norm_feed_forward, intercepted, shared_silu, shortcut_gemm
from ..nn import CrossAttention, GroupNorm, GroupNorm32
from .autoencoder import Upsample  # nearest x2 + 3x3 conv (key ``conv``): the same in the VAE and the U-Net

__all__ = ["UNetModel", "ResBlock", "SpatialTransformer", "BasicTransformerBlock", "timestep_embedding"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of integer (or float) timesteps ``[B]``, cos first:
    ``cat(cos(t * f), sin(t * f))`` with ``f_i = max_period^(-i / (dim // 2))`` (CompVis; diffusers'
    ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``)."""
    return lf.timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0.0,
                                 max_period=max_period)  # one kernel (diffusers' statements on the eager backend)


class ResBlock(nn.Module):
    """``skip_connection(x) + out_layers(in_layers(x) + emb_layers(emb)[..., None, None])`` (additive
    time embedding, added inside out_layers' GroupNorm kernel: ``norm(h, shift=emb)``; in inference
    on the Triton backend a 1x1 skip_connection is a GEMM onto the last conv's output,
    ``ldm_fast._fusion.shortcut_gemm``). Keys: in_layers.{0 norm, 2 conv}, emb_layers.1, out_layers.{0 norm, 3 conv},
    skip_connection (1x1 conv when the channel count changes)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: Optional[int] = None, *,
                 groups: int = 32, eps: float = 1e-5, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = channels if out_channels is None else out_channels
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels, eps, activation="silu"), nn.Identity(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels, eps, activation="silu"), nn.Identity(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(channels, out_channels, 1) if out_channels != channels else nn.Identity()
        self.time_pack = None  # a PackedTimeProjections holding emb_layers[1], set by optimize(pack_weights=True)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        norm, _, dropout, conv = self.out_layers  # the embedding is added inside the norm's pass
        act, proj = self.emb_layers
        if intercepted(self.emb_layers) or type(act) is not nn.SiLU:
            e = self.emb_layers(emb)
        else:  # the embedding's SiLU once per step for all blocks (inference), then this block's projection
            e = shared_silu(act, emb, proj)
            packed = None if self.time_pack is None else self.time_pack.project(proj, e)
            e = proj(e) if packed is None else packed  # (packed: this block's columns of one GEMM for all)
        h = dropout(norm(h, shift=e.type(h.dtype)))
        if type(self.skip_connection) is nn.Conv2d:  # inference on the Triton backend: the 1x1 skip as a GEMM onto conv
            out = shortcut_gemm(conv, h, self.skip_connection, x)
            if out is not None:
                return out
        return self.skip_connection(x) + conv(h)


class GEGLU(nn.Module):
    """``a * gelu(gate)`` with ``a, gate = proj(x).chunk(2, -1)`` (exact erf GELU). Key: proj."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return lf.geglu(self.proj(x))  # one kernel reading the projection in place


class FeedForward(nn.Module):
    """GEGLU to ``mult * dim``, dropout, Linear back to ``dim``. Keys: net.0.proj, net.2."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to ``context``, GEGLU feed-forward, each with a
    residual. Keys: attn1, attn2 (to_q, to_k, to_v, to_out.0), norm1-3, ff.net.{0.proj, 2}."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x, normed = add_norm(self.attn1(self.norm1(x)), x, self.norm2)  # the residual add + norm2: one kernel
        attn = self.attn2(normed, context)
        ff = self.ff
        net = ff.net
        fused = None
        if not intercepted(ff) and not intercepted(net):
            fused = add_norm_feed_forward(attn, x, self.norm3, lambda n: net[1](net[0](n)), net[2], (ff, self.norm3))
        if fused is not None:  # inference on the Triton backend: the residual in the output GEMM
            return fused
        x, normed = add_norm(attn, x, self.norm3)
        return self.ff(normed) + x


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6), 1x1 ``proj_in``, transformer blocks over the ``h*w`` tokens, 1x1
    ``proj_out``, residual: ``[B, C, h, w]`` -> same. Keys: norm, proj_in, transformer_blocks.{i},
    proj_out. The norm writes channels-last, so the tokens ``[B, h*w, C]`` are a view."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int = 768, *,
                 groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, 1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        b, _, h, w = x.shape
        y = self.proj_in(self.norm(x)).to(memory_format=torch.channels_last)
        tokens = y.permute(0, 2, 3, 1).reshape(b, h * w, y.shape[1])  # a view of channels-last y
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        y = tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return self.proj_out(y) + x


class Downsample(nn.Module):
    """3x3 stride-2 convolution with padding 1 (key ``op``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """Runs its layers in order, giving ResBlocks the time embedding and SpatialTransformers the context."""

    def forward(self, x: Tensor, emb: Tensor, context: Optional[Tensor] = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """The SD v1 U-Net (CompVis ``UNetModel`` names): ``forward(x, timesteps, context)`` -> eps.

    Defaults are SD v1's: ``model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_levels=(0, 1, 2)`` (CompVis ``attention_resolutions [4, 2, 1]``), ``num_heads=8``
    (an int, or one per level as diffusers' ``attention_head_dim`` tuples give; or set
    ``num_head_channels`` for a fixed head dim as SD 2 does), ``transformer_depth=1``,
    ``context_dim=768``. The middle block always has a SpatialTransformer (with the last level's heads).
    """

    def __init__(self, *, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (0, 1, 2), num_heads: Union[int, Sequence[int]] = 8,
                 num_head_channels: Optional[int] = None, transformer_depth: int = 1, context_dim: int = 768,
                 groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        levels = len(channel_mult)
        heads_per_level = [num_heads] * levels if isinstance(num_heads, int) else list(num_heads)
        if len(heads_per_level) != levels:
            raise ValueError(f"num_heads must be an int or one value per level ({levels}), got {num_heads!r}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_levels=tuple(attention_levels), num_heads=num_heads,
                           num_head_channels=num_head_channels, transformer_depth=transformer_depth,
                           context_dim=context_dim, groups=groups, dropout=dropout)
        self.model_channels = model_channels
        time_dim = 4 * model_channels

        def transformer(ch: int, level: int) -> SpatialTransformer:
            if num_head_channels:
                heads, dim_head = ch // num_head_channels, num_head_channels
            else:
                heads, dim_head = heads_per_level[level], ch // heads_per_level[level]
            return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim, groups=groups,
                                      dropout=dropout)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, time_dim, ch_out, groups=groups, dropout=dropout)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = TimestepEmbedSequential(res(ch, ch), transformer(ch, levels - 1), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, level))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(groups, ch, activation="silu"), nn.Identity(), nn.Conv2d(ch, out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, timesteps: Union[Tensor, int, float], context: Optional[Tensor] = None) -> Tensor:
        """x ``[B, in_channels, h, w]``, timesteps ``[B]`` (or one for all), context ``[B, L, context_dim]``."""
        if not isinstance(timesteps, Tensor):
            timesteps = torch.tensor([timesteps], device=x.device)
        timesteps = timesteps.reshape(-1).expand(x.shape[0]) if timesteps.numel() == 1 else timesteps
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> "UNetModel":
        """Ours, built from a diffusers ``UNet2DConditionModel``'s config and weights (a ValueError names
        the config field our architecture cannot express)."""
        from .convert import unet_config_from_diffusers, unet_from_diffusers

        ours = cls(**unet_config_from_diffusers(model.config))
        param = next(model.parameters())
        ours.to(device=param.device, dtype=param.dtype)
        ours.load_state_dict(unet_from_diffusers(model.state_dict()), strict=True)
        return ours
