"""State dicts between diffusers and CompVis (ldm_fast's own key names), both ways, losslessly.

``vae_from_diffusers``/``vae_to_diffusers`` map diffusers ``AutoencoderKL`` keys to CompVis
``first_stage_model`` keys (without the prefix) and back; ``unet_from_diffusers``/``unet_to_diffusers``
the ``UNet2DConditionModel`` keys to ``model.diffusion_model`` keys. The rules are diffusers' own
single-file converter's (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``), written
here as key renames plus the one shape change: the VAE mid-block attention's q/k/v/out are
``Linear`` ``[C, C]`` in diffusers and 1x1 ``Conv2d`` ``[C, C, 1, 1]`` in CompVis (and a U-Net with
``use_linear_projection`` has Linear ``proj_in``/``proj_out``). Tensors are never copied (views).
A key no rule knows raises ``KeyError`` naming it.

``load_state_dict_file(path)`` reads a checkpoint: safetensors for ``.safetensors`` files,
``torch.load(weights_only=True)`` otherwise; ``split_compvis_checkpoint`` takes the U-Net and VAE
sections out of a full CompVis checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["vae_from_diffusers", "vae_to_diffusers", "unet_from_diffusers", "unet_to_diffusers",
           "vae_config_from_diffusers", "unet_config_from_diffusers", "load_state_dict_file",
           "split_compvis_checkpoint"]

StateDict = Dict[str, Tensor]

# ResnetBlock2D names inside a diffusers U-Net block -> CompVis ResBlock names.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_RESNET_BACK = {v: k for k, v in _UNET_RESNET.items()}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_BACK = {v: k for k, v in _VAE_ATTN.items()}


def _rename(state: Mapping[str, Tensor], rule: Callable[[str], str], what: str) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        new = rule(key)
        if new in out:
            raise KeyError(f"{what}: two keys map to {new!r} (the second is {key!r})")
        out[new] = value
    return out


def _unknown(key: str, what: str) -> KeyError:
    return KeyError(f"{what}: no conversion rule for key {key!r} (an architecture ldm_fast's models do not express)")


def _split(name: str, table: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    """``(table[prefix], rest)`` for the longest table prefix of ``name`` ('prefix.rest'), else None."""
    for prefix in sorted(table, key=len, reverse=True):
        if name.startswith(prefix + "."):
            return table[prefix], name[len(prefix) + 1:]
    return None


# ---------------------------------------------------------------------------------------------
# VAE


def _conv_1x1(t: Tensor) -> Tensor:
    return t[:, :, None, None] if t.dim() == 2 else t


def _linear(t: Tensor) -> Tensor:
    return t[:, :, 0, 0] if t.dim() == 4 else t


def _levels(state: Mapping[str, str], pattern: str) -> int:
    found = [int(m.group(1)) for k in state for m in [re.match(pattern, k)] if m]
    return max(found) + 1 if found else 0


def vae_from_diffusers(state: Mapping[str, Tensor]) -> StateDict:
    """diffusers ``AutoencoderKL.state_dict()`` -> CompVis keys (``encoder.down.0.block.0.norm1.weight`` ...)."""
    what = "vae_from_diffusers"
    n_up = _levels(state, r"decoder\.up_blocks\.(\d+)\.")

    def rule(key: str) -> str:
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets\.(\d)|attentions\.0)\.(.+)$", key)
        if m:
            side, _, res, rest = m.groups()
            if res is not None:
                return f"{side}.mid.block_{int(res) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            hit = _split(rest, _VAE_ATTN)
            if hit is None:
                raise _unknown(key, what)
            return f"{side}.mid.attn_1.{hit[0]}.{hit[1]}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)$", key)
        if m:
            level, _, j, rest = m.groups()
            if j is None:
                return f"encoder.down.{level}.downsample.{rest}"
            return f"encoder.down.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", key)
        if m:
            block, _, j, rest = m.groups()
            level = n_up - 1 - int(block)
            if j is None:
                return f"decoder.up.{level}.upsample.{rest}"
            return f"decoder.up.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        m = re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", key)
        if m:
            return f"{m.group(1)}.norm_out.{m.group(2)}"
        if re.match(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)$", key):
            return key
        raise _unknown(key, what)

    out = _rename(state, rule, what)
    for key in out:
        if ".mid.attn_1." in key and key.endswith(".weight") and ".norm." not in key:
            out[key] = _conv_1x1(out[key])
    return out


def vae_to_diffusers(state: Mapping[str, Tensor]) -> StateDict:
    """CompVis VAE keys -> diffusers ``AutoencoderKL`` keys (the inverse of :func:`vae_from_diffusers`)."""
    what = "vae_to_diffusers"
    n_up = _levels(state, r"decoder\.up\.(\d+)\.")

    def rule(key: str) -> str:
        m = re.match(r"(encoder|decoder)\.mid\.(block_(\d)|attn_1)\.(.+)$", key)
        if m:
            side, _, res, rest = m.groups()
            if res is not None:
                return f"{side}.mid_block.resnets.{int(res) - 1}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
            hit = _split(rest, _VAE_ATTN_BACK)
            if hit is None:
                raise _unknown(key, what)
            return f"{side}.mid_block.attentions.0.{hit[0]}.{hit[1]}"
        m = re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)|downsample)\.(.+)$", key)
        if m:
            level, _, j, rest = m.groups()
            if j is None:
                return f"encoder.down_blocks.{level}.downsamplers.0.{rest}"
            return f"encoder.down_blocks.{level}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        m = re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.(.+)$", key)
        if m:
            level, _, j, rest = m.groups()
            block = n_up - 1 - int(level)
            if j is None:
                return f"decoder.up_blocks.{block}.upsamplers.0.{rest}"
            return f"decoder.up_blocks.{block}.resnets.{j}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
        m = re.match(r"(encoder|decoder)\.norm_out\.(.+)$", key)
        if m:
            return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        if re.match(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.(weight|bias)$", key):
            return key
        raise _unknown(key, what)

    out = _rename(state, rule, what)
    for key in out:
        if ".mid_block.attentions.0." in key and key.endswith(".weight") and ".group_norm." not in key:
            out[key] = _linear(out[key])
    return out


# ---------------------------------------------------------------------------------------------
# U-Net


def _layers_per_block(state: Mapping[str, Tensor], pattern: str) -> int:
    n = _levels(state, pattern)
    if not n:
        raise KeyError(f"no keys match {pattern!r}: not a U-Net state dict")
    return n


def unet_from_diffusers(state: Mapping[str, Tensor]) -> StateDict:
    """diffusers ``UNet2DConditionModel.state_dict()`` -> CompVis ``model.diffusion_model`` keys (no prefix)."""
    what = "unet_from_diffusers"
    per = _layers_per_block(state, r"down_blocks\.0\.resnets\.(\d+)\.") + 1  # input blocks per level
    up_with_attention = {int(m.group(1)) for k in state for m in [re.match(r"up_blocks\.(\d+)\.attentions\.", k)] if m}

    def resnet(rest: str) -> str:
        hit = _split(rest, _UNET_RESNET)
        if hit is None:
            raise _unknown(rest, what)
        return f"{hit[0]}.{hit[1]}"

    def rule(key: str) -> str:
        simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
        hit = _split(key, simple)
        if hit:
            return f"{hit[0]}.{hit[1]}"
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", key)
        if m:
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "downsamplers":
                if not rest.startswith("conv."):
                    raise _unknown(key, what)
                return f"input_blocks.{(b + 1) * per}.0.op.{rest[5:]}"
            i = 1 + b * per + l
            return f"input_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
        if m:
            kind, l, rest = m.group(1), int(m.group(2)), m.group(3)
            return f"middle_block.{2 * l}.{resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", key)
        if m:
            b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "upsamplers":
                slot = 2 if b in up_with_attention else 1
                return f"output_blocks.{b * per + per - 1}.{slot}.{rest}"
            i = b * per + l
            return f"output_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        raise _unknown(key, what)

    out = _rename(state, rule, what)
    for key in out:
        if re.search(r"\.(proj_in|proj_out)\.weight$", key):
            out[key] = _conv_1x1(out[key])
    return out


def unet_to_diffusers(state: Mapping[str, Tensor], *, linear_projection: bool = False) -> StateDict:
    """CompVis U-Net keys -> diffusers ``UNet2DConditionModel`` keys (the inverse of
    :func:`unet_from_diffusers`; ``linear_projection=True`` for a diffusers config with
    ``use_linear_projection``, whose proj_in/proj_out are Linear)."""
    what = "unet_to_diffusers"
    # input (and output) blocks per level = layers_per_block + 1: the index of the first downsampler
    down_at = sorted({int(m.group(1)) for k in state for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)] if m})
    per = down_at[0] if down_at else _layers_per_block(state, r"input_blocks\.(\d+)\.")

    def resnet(rest: str) -> str:
        hit = _split(rest, _UNET_RESNET_BACK)
        if hit is None:
            raise _unknown(rest, what)
        return f"{hit[0]}.{hit[1]}"

    def rule(key: str) -> str:
        simple = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
                  "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
        hit = _split(key, simple)
        if hit:
            return f"{hit[0]}.{hit[1]}"
        m = re.match(r"input_blocks\.(\d+)\.(\d)\.(.+)$", key)
        if m:
            i, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            b, l = (i - 1) // per, (i - 1) % per
            if rest.startswith("op."):
                return f"down_blocks.{b}.downsamplers.0.conv.{rest[3:]}"
            return f"down_blocks.{b}.resnets.{l}.{resnet(rest)}" if slot == 0 else f"down_blocks.{b}.attentions.{l}.{rest}"
        m = re.match(r"middle_block\.(\d)\.(.+)$", key)
        if m:
            slot, rest = int(m.group(1)), m.group(2)
            return f"mid_block.attentions.0.{rest}" if slot == 1 else f"mid_block.resnets.{slot // 2}.{resnet(rest)}"
        m = re.match(r"output_blocks\.(\d+)\.(\d)\.(.+)$", key)
        if m:
            i, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            b, l = i // per, i % per
            if rest.startswith("conv."):
                return f"up_blocks.{b}.upsamplers.0.{rest}"
            return f"up_blocks.{b}.resnets.{l}.{resnet(rest)}" if slot == 0 else f"up_blocks.{b}.attentions.{l}.{rest}"
        raise _unknown(key, what)

    out = _rename(state, rule, what)
    if linear_projection:
        for key in out:
            if re.search(r"\.(proj_in|proj_out)\.weight$", key):
                out[key] = _linear(out[key])
    return out


# ---------------------------------------------------------------------------------------------
# configs


def _require(config, field: str, allowed, why: str) -> None:
    value = config.get(field) if isinstance(config, Mapping) else getattr(config, field, None)
    ok = value in allowed if isinstance(allowed, (tuple, list, set)) else value == allowed
    if not ok:
        raise ValueError(f"diffusers config {field}={value!r} is not supported: {why}")


def _get(config, field: str, default=None):
    return config.get(field, default) if isinstance(config, Mapping) else getattr(config, field, default)


def vae_config_from_diffusers(config) -> dict:
    """Our :class:`~ldm_fast.models.autoencoder.AutoencoderKL` arguments for a diffusers
    ``AutoencoderKL`` config; ValueError names a field we cannot express."""
    channels = list(_get(config, "block_out_channels"))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"diffusers config block_out_channels={channels} is not supported: each must be a "
                         "multiple of the first (ch * ch_mult)")
    for field, allowed in (("down_block_types", ("DownEncoderBlock2D",)), ("up_block_types", ("UpDecoderBlock2D",))):
        if set(_get(config, field)) - set(allowed):
            raise ValueError(f"diffusers config {field}={tuple(_get(config, field))!r} is not supported: only {allowed}")
    _require(config, "act_fn", "silu", "the VAE uses SiLU")
    _require(config, "mid_block_add_attention", (True, None), "the mid block has attention")
    _require(config, "use_quant_conv", (True, None), "quant_conv is part of the model")
    _require(config, "use_post_quant_conv", (True, None), "post_quant_conv is part of the model")
    return dict(in_channels=_get(config, "in_channels"), out_channels=_get(config, "out_channels"), ch=ch,
                ch_mult=tuple(c // ch for c in channels), num_res_blocks=_get(config, "layers_per_block"),
                z_channels=_get(config, "latent_channels"), embed_dim=_get(config, "latent_channels"),
                groups=_get(config, "norm_num_groups"), scale_factor=_get(config, "scaling_factor", 0.18215))


def unet_config_from_diffusers(config) -> dict:
    """Our :class:`~ldm_fast.models.unet.UNetModel` arguments for a diffusers ``UNet2DConditionModel``
    config; ValueError names a field we cannot express."""
    channels = list(_get(config, "block_out_channels"))
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"diffusers config block_out_channels={channels} is not supported: each must be a "
                         "multiple of the first (model_channels * channel_mult)")
    down = list(_get(config, "down_block_types"))
    up = list(_get(config, "up_block_types"))
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or set(up) - {"CrossAttnUpBlock2D", "UpBlock2D"}:
        raise ValueError(f"diffusers config down_block_types={tuple(down)!r} / up_block_types={tuple(up)!r} is not "
                         "supported: only (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D")
    attention_levels = tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D")
    if [t == "CrossAttnUpBlock2D" for t in reversed(up)] != [t == "CrossAttnDownBlock2D" for t in down]:
        raise ValueError(f"diffusers config up_block_types={tuple(up)!r} is not supported: it must mirror down_block_types")
    _require(config, "mid_block_type", ("UNetMidBlock2DCrossAttn", None), "the middle block is Res + Transformer + Res")
    _require(config, "act_fn", "silu", "the U-Net uses SiLU")
    _require(config, "norm_eps", 1e-5, "ResBlock norms use eps 1e-5")
    _require(config, "flip_sin_to_cos", True, "the time embedding is cos first")
    _require(config, "freq_shift", 0, "the time embedding has no frequency shift")
    _require(config, "resnet_time_scale_shift", "default", "the time embedding is added, not scale-shift")
    _require(config, "time_embedding_type", "positional", "the time embedding is sinusoidal")
    for field in ("class_embed_type", "addition_embed_type", "encoder_hid_dim", "time_cond_proj_dim",
                  "num_class_embeds", "time_embedding_dim"):
        _require(config, field, None, "an extra embedding ldm_fast's U-Net does not have")
    for field in ("only_cross_attention", "dual_cross_attention", "upcast_attention", "center_input_sample"):
        value = _get(config, field, False)
        if value if isinstance(value, bool) else any(value):
            raise ValueError(f"diffusers config {field}={value!r} is not supported")
    depth = _get(config, "transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        if len(set(depth)) != 1:
            raise ValueError(f"diffusers config transformer_layers_per_block={depth!r} is not supported: one depth")
        depth = depth[0]
    layers = _get(config, "layers_per_block")
    if not isinstance(layers, int):
        raise ValueError(f"diffusers config layers_per_block={layers!r} is not supported: one int")
    heads = _get(config, "num_attention_heads") or _get(config, "attention_head_dim")  # diffusers issue #2011
    heads = heads if isinstance(heads, int) else tuple(heads)
    cross = _get(config, "cross_attention_dim")
    if not isinstance(cross, int):
        raise ValueError(f"diffusers config cross_attention_dim={cross!r} is not supported: one int")
    return dict(in_channels=_get(config, "in_channels"), out_channels=_get(config, "out_channels"), model_channels=ch,
                channel_mult=tuple(c // ch for c in channels), num_res_blocks=layers,
                attention_levels=attention_levels, num_heads=heads, transformer_depth=depth,
                context_dim=cross, groups=_get(config, "norm_num_groups"))


# ---------------------------------------------------------------------------------------------
# files


def load_state_dict_file(path, map_location="cpu") -> StateDict:
    """A checkpoint's state dict: safetensors for ``.safetensors``, else ``torch.load(weights_only=True)``
    (a CompVis ``.ckpt`` whose tensors sit under ``"state_dict"`` is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    state = torch.load(path, map_location=map_location, weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def split_compvis_checkpoint(state: Mapping[str, Tensor]) -> Tuple[StateDict, StateDict]:
    """``(unet, vae)`` state dicts from a full CompVis checkpoint: the ``model.diffusion_model.`` and
    ``first_stage_model.`` sections with the prefixes removed (schedule buffers, EMA and text encoder
    keys are not part of either)."""
    unet = {k[len("model.diffusion_model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    vae = {k[len("first_stage_model."):]: v for k, v in state.items() if k.startswith("first_stage_model.")}
    return unet, vae
