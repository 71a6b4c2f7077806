"""The ``timestep_embedding`` patch (ldm_fast/integrations/diffusers/timesteps.py) on diffusers'
Timesteps: one kernel for the sinusoidal embedding, diffusers' own forward elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_fast import optimize, restore
from ldm_fast.integrations.diffusers.timesteps import TimestepsForward

diffusers = pytest.importorskip("diffusers")
from diffusers.models.embeddings import Timesteps  # noqa: E402

import _diffusers_models as dm  # noqa: E402


def test_unet_timesteps_run_one_kernel_and_restore():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref_emb = unet.time_proj(t)
    report = optimize(unet)
    assert report.paths("timestep_embedding") == ["time_proj"]
    assert isinstance(unet.time_proj.forward, TimestepsForward)
    assert torch.equal(unet.time_proj(t), ref_emb) and torch.equal(dm.run_unet(unet, inputs), ref)
    with dm.kernels_forced() as launched:
        emb = unet.time_proj(t)
        out = dm.run_unet(unet, inputs)
    assert launched["timestep_embedding"] == 2
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=1e-5)  # |sin|, |cos| <= 1: libm vs numpy ulps
    dm.assert_close_rel(out, ref)
    restore(unet)
    assert "forward" not in unet.time_proj.__dict__
    report = optimize(unet, timestep_embedding=False)
    assert report.paths("timestep_embedding") == [] and "timestep_embedding: off" in report.notes
    restore(unet)


@pytest.mark.parametrize("kwargs", [dict(flip_sin_to_cos=False, downscale_freq_shift=1.0),
                                    dict(flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=2.0)])
def test_module_attributes_are_read_per_call(kwargs):
    module = Timesteps(32, **kwargs)
    t = torch.tensor([3.5, 999.0])
    ref = module(t)
    optimize(module)
    module.scale = 0.5  # changed after optimize: read on the call
    ref_changed = Timesteps.forward(module, t)
    with dm.kernels_forced() as launched:
        out = module(t)
    assert launched["timestep_embedding"] == 1 and not torch.equal(ref_changed, ref)
    torch.testing.assert_close(out, ref_changed, rtol=0, atol=1e-5)


def test_a_division_by_zero_configuration_is_left():
    odd = Timesteps(7, flip_sin_to_cos=False, downscale_freq_shift=3)  # dim // 2 - shift == 0
    report = optimize(nn.ModuleDict({"odd": odd}))
    assert [(i.path, i.what, "division by zero" in i.reason) for i in report.left] == [("odd", "timestep_embedding", True)]
