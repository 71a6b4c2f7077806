"""Run by tests/test_diffusers_scenarios.py::test_diffusers_version_matrix in ANOTHER diffusers
installation (a venv with an older diffusers): optimize a tiny U-Net and VAE with this checkout's
ldm_fast, run them on the kernel path (Triton's interpreter) and on the default backend against
twins without ldm_fast, add a peft LoRA after optimize, and print one JSON object.

    cd <somewhere without a kernels/ folder>
    PYTHONPATH=<shim with triton>:<checkout> TRITON_INTERPRET=1 <venv>/bin/python <checkout>/tests/_diffusers_version_check.py <checkout>

The checkout's ``kernels/`` folder is the package ``ldm_fast.kernels`` (an install maps it; here a
meta path finder does), so a venv without ldm_fast installed imports this checkout's code.
"""

import copy
import importlib.abc
import importlib.util
import json
import os
import sys
import traceback
import warnings

ROOT = os.path.abspath(sys.argv[1])
os.environ.setdefault("TRITON_INTERPRET", "1")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """``ldm_fast.kernels`` -> ``<checkout>/kernels`` (what the editable install's finder does)."""

    def find_spec(self, name, path, target=None):
        if name == "ldm_fast.kernels":
            where = os.path.join(ROOT, "kernels")
            return importlib.util.spec_from_file_location(name, os.path.join(where, "__init__.py"),
                                                          submodule_search_locations=[where])
        return None


sys.meta_path.insert(0, _KernelsFinder())
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

import diffusers  # noqa: E402
import ldm_fast  # noqa: E402
import ldm_fast.kernels  # noqa: E402
from _diffusers_models import (assert_close_rel, image, kernels_forced, run_unet, run_vae, unet,  # noqa: E402
                               unet_inputs, vae)

out = {
    "diffusers": diffusers.__version__,
    "ldm_fast": os.path.abspath(ldm_fast.__file__),
    "ldm_fast.kernels": os.path.abspath(ldm_fast.kernels.__file__),
    "triton_available": ldm_fast.backend.triton_available(),
    "cases": {},
}


def case(name, build, run, options, ops, lora=False):
    result = {}
    try:
        model = build()
        ref = copy.deepcopy(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = ldm_fast.optimize(model, **options)
        result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        result["counts"] = report.counts
        result["left"] = [list(item) for item in report.left]
        result["report"] = str(report)
        if lora:
            from peft import LoraConfig

            targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                       "conv_shortcut", "time_emb_proj"]
            for m in (model, ref):
                torch.manual_seed(11)
                m.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
        expected = run(ref)
        result["default_bit_for_bit"] = bool(torch.equal(run(model), expected))
        with kernels_forced() as launched:
            got = run(model)
        result["launched"] = dict(launched)
        result["missing_launches"] = [op for op in ops if not launched.get(op)]
        scale = expected.abs().max().item()
        result["kernel_rel_err"] = (got - expected).abs().max().item() / scale
        try:
            assert_close_rel(got, expected)
            result["kernel_close"] = True
        except AssertionError as e:
            result["kernel_close"] = False
            result["kernel_error"] = str(e)
        ldm_fast.restore(model)
        result["restored_bit_for_bit"] = bool(torch.equal(run(model), expected))
    except Exception:  # noqa: BLE001 - reported to the test
        result["exception"] = traceback.format_exc()
    out["cases"][name] = result


UNET_OPS = ["group_norm", "add_layer_norm", "geglu", "timestep_embedding"]
x = unet_inputs()
case("unet", unet, lambda m: run_unet(m, x), {}, UNET_OPS)
case("unet_attention_channels_last", unet, lambda m: run_unet(m, x), {"attention": True, "channels_last": True},
     UNET_OPS)
case("unet_lora_after_optimize", unet, lambda m: run_unet(m, x), {}, UNET_OPS, lora=True)
case("vae", vae, lambda m: run_vae(m, image()), {}, ["group_norm"])
print("@@JSON@@" + json.dumps(out))
