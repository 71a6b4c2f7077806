"""The ``geglu`` patch (ldm_fast/integrations/diffusers/geglu.py) on diffusers' GEGLU: the gate in one
kernel, ``proj`` always called (a LoRA layer on it is honoured), diffusers' own forward elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ldm_fast import optimize, restore
from ldm_fast.integrations.diffusers.geglu import GEGLUForward

diffusers = pytest.importorskip("diffusers")
from diffusers.models.activations import GEGLU  # noqa: E402

import _diffusers_models as dm  # noqa: E402
from _numerics import assert_close_to_exact  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_gate_runs_one_kernel(dtype):
    torch.manual_seed(0)
    module = GEGLU(16, 24).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        exact = GEGLU(16, 24).double().eval()
        exact.load_state_dict(module.state_dict())
        exact = exact(x.double())
        eager = module.to(dtype)(x.to(dtype))
    report = optimize(module)
    assert report.paths("geglu") == ["<root>"] and isinstance(module.forward, GEGLUForward)
    with torch.no_grad():
        assert torch.equal(module(x.to(dtype)), eager)  # the CPU: diffusers' own forward
        with dm.kernels_forced() as launched:
            out = module(x.to(dtype))
    assert launched["geglu"] == 1
    assert_close_to_exact(out, exact.to(dtype), eager)
    restore(module)
    assert "forward" not in module.__dict__


def test_a_lora_layer_on_proj_is_called_and_the_scale_argument_runs_diffusers():
    torch.manual_seed(0)
    module, x = GEGLU(16, 24).eval(), torch.randn(2, 5, 16)
    twin = dm.twin(module)
    optimize(module)
    for m in (module, twin):
        torch.manual_seed(1)
        m.proj = nn.Sequential(m.proj, nn.Linear(48, 48))
    with torch.no_grad(), dm.kernels_forced() as launched:
        dm.assert_close_rel(module(x), twin(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(module(x, 1.0), twin(x))
    assert launched["geglu"] == 1


def test_an_instance_level_forward_is_left():
    module = GEGLU(16, 24)
    module.forward = lambda x: GEGLU.forward(module, x)
    report = optimize(module)
    assert report.left[0].what == "geglu" and "instance-level forward" in report.left[0].reason
