"""ldm_fast.optimize used the way diffusers users use their models, against the same model without
ldm_fast (a deepcopy made before optimize) under the same user actions.

Every scenario runs the optimized model on the kernel path (``kernels_forced()``: the Triton
kernels under the interpreter, the code path a GPU runs; fp32 relative error <= TRITON_RTOL, the
kernels' launches asserted) and on the default backend (the CPU: the model's own code, bit for bit).

1. peft LoRA on attention, feed-forward and conv layers, before and after optimize; set_adapters,
   fuse/unfuse, disable/enable, delete, unload; LoRA training      -> test_lora_*
2. pipelines: SD + load_lora_weights (kohya and diffusers format), SDXL, ControlNet
                                                                    -> test_*_pipeline*
3. weights updated in place without a version bump (EMA, .data.copy_, load_state_dict, an
   optimizer step); reparametrized (weight_norm, spectral_norm, prune, parametrize), or substituted
   by torch.func.functional_call                                    -> test_in_place_update, test_ema_*,
                                                                       test_reparametrized_weights,
                                                                       test_functional_call
4. hooks added after optimize (module, in-place, global, backward); block classes patched after
   optimize (tomesd)                                                -> test_hook*, test_global_module_hooks,
                                                                       test_block_class_patched_after_optimize
5. torch.inference_mode / no_grad                                   -> test_inference_mode*
6. torch.save / deepcopy / pickle, save_pretrained                  -> test_copy, test_save_pretrained
7. .half(), CPU autocast, training + backward (+ checkpointing), input gradients, requires_grad_(False),
   diffusers features (chunking, FreeU, fused QKV, slicing, channels_last), set_attn_processor after
   attention=True, accelerate's cpu_offload                         -> test_half_*, test_training_*, ...
8. diffusers versions: an unknown source (monkeypatched SUPPORTED) and the 0.30.3 venv
                                                                    -> test_unknown_source_*, test_diffusers_version_matrix

Fast loop: ``python -m pytest -m "not slow" tests/test_diffusers_scenarios.py``; ``-m slow`` runs the
pipelines, the subprocess and the multi-call scenarios.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import pickle
import subprocess
import warnings
from collections import Counter

import pytest
import torch

import ldm_fast
from ldm_fast.optimize import report_of

from _diffusers_models import (TRITON_RTOL, assert_close_rel, image, kernels_forced, run_unet, run_vae, twin, unet,
                               unet_inputs, vae)

diffusers = pytest.importorskip("diffusers")

from _pipelines import (LORA_TARGETS, call, control_image, controlnet_pipeline, kohya_lora_state_dict,  # noqa: E402
                        peft_lora_state_dict, sd_pipeline, sdxl_pipeline)

pytestmark = pytest.mark.slow  # whole models and pipelines, as users run them

UNET_OPS = ("group_norm", "add_layer_norm", "geglu", "timestep_embedding")
VAE_OPS = ("group_norm",)
#: fp16 on the kernel path vs diffusers in fp16 (both on the CPU): the kernels compute in fp32 and
#: round once, ATen rounds per op; a LoRA ignored or a stale weight is O(1e-2) or more.
FP16_RTOL = 5e-3

slow = pytest.mark.slow


# --- helpers ----------------------------------------------------------------------------------


def _compare(actual, expected, exact: bool, rtol: float = TRITON_RTOL, what: str = "output") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if exact:
        diff = (actual.float() - expected.float()).abs().max().item()
        assert torch.equal(actual, expected), f"{what}: not bit for bit (max abs diff {diff:.3g})"
    else:
        try:
            assert_close_rel(actual.float(), expected.float(), rtol)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


def on_kernels(fn, ops=UNET_OPS):
    """``fn()`` with the kernels forced; asserts each op in ``ops`` launched."""
    with kernels_forced() as launched:
        out = fn()
    missing = [op for op in ops if not launched.get(op)]
    assert not missing, f"kernels not launched: {missing} (launched: {dict(launched)})"
    return out


def check_both(opt_fn, ref_fn, ops=UNET_OPS, rtol: float = TRITON_RTOL, what: str = "output",
               default_exact: bool = True):
    """The twin's result; the optimized model's on the kernel path (close, launches asserted) and on
    the default backend (bit for bit; ``default_exact=False``: within ``rtol``, for channels_last=True,
    whose channels-last convolutions round differently from the twin's NCHW ones)."""
    expected = ref_fn()
    _compare(on_kernels(opt_fn, ops), expected, exact=False, rtol=rtol, what=f"{what} (kernel path)")
    _compare(opt_fn(), expected, exact=default_exact, rtol=rtol, what=f"{what} (default backend)")
    return expected


def optimized(build=unet, **options):
    """(optimized model, its untouched twin made before optimize, the report)."""
    model = build()
    ref = twin(model)
    report = ldm_fast.optimize(model, **options)
    return model, ref, report


def rel_change(a, b) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.fixture
def fused(monkeypatch):
    """Counts of the fused paths that ran (returned a result) on the kernel path: the 1x1 shortcut
    GEMM, the feed-forward epilogue, the packed time projections. Proves a scenario exercised them."""
    from ldm_fast._packing import PackedTimeProjections
    from ldm_fast.integrations.diffusers import resnet, transformer

    counts = Counter()

    def spy(owner, name, key):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            counts[key] += out is not None
            return out

        monkeypatch.setattr(owner, name, wrapper)

    spy(resnet, "shortcut_gemm", "shortcut_gemm")
    spy(transformer, "add_norm_feed_forward", "ff_epilogue")
    spy(PackedTimeProjections, "project", "packed_time")
    return counts


def add_lora(model, name: str = "default", seed: int = 11, targets=LORA_TARGETS, rank: int = 4) -> None:
    """A peft LoRA (``unet.add_adapter``) on ``targets``, random non-zero A and B."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False),
                      adapter_name=name)


def lora_tensors(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def assert_same_lora(a, b) -> None:
    la, lb = lora_tensors(a), lora_tensors(b)
    assert la and la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def no_kernels(fn):
    """``fn()`` with the kernels forced; asserts no ldm_fast kernel launched (a restored model)."""
    with kernels_forced() as launched:
        out = fn()
    assert not launched, f"a restored model launched ldm_fast kernels: {dict(launched)}"
    return out


def inputs_b(batch: int = 2):
    """Inputs other than unet_inputs() (other noise, other timesteps): a second call must not
    reuse anything computed for the first."""
    sample, _, context = unet_inputs(seed=9, batch=batch)
    return sample, torch.tensor([700, 3, 250, 999][:batch]), context


# === 1. peft LoRA ==============================================================================


ALL_ON = {"attention": True, "channels_last": True}
OPTION_SETS = [pytest.param({}, id="defaults"), pytest.param(ALL_ON, id="attention+channels_last", marks=slow)]


def ops_for(options, monkeypatch):
    """The kernels a U-Net optimized with ``options`` launches; with attention=True the attention
    kernel is chosen (LDM_FAST_ATTENTION=triton: 'auto' picks SDPA on a CPU) so it runs too."""
    if options.get("attention"):
        monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
        return UNET_OPS + ("attention",)
    return UNET_OPS


@pytest.mark.parametrize("options", OPTION_SETS)
def test_lora_after_optimize_every_layer_kind(options, fused, monkeypatch):
    """unet.add_adapter AFTER optimize, on attention, feed-forward (ff.net.0.proj, ff.net.2) and
    ResNet layers (conv1, conv2, conv_shortcut, time_emb_proj): every layer's LoRA is applied."""
    ops = ops_for(options, monkeypatch)
    model, ref, _ = optimized(**options)
    x = unet_inputs(batch=1)
    before = run_unet(ref, x)
    add_lora(model)
    add_lora(ref)
    assert_same_lora(model, ref)
    expected = check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), ops,
                          default_exact=not options.get("channels_last"))
    assert rel_change(expected, before) > 1e-2, "the LoRA does not change the output: the test proves nothing"
    assert fused["shortcut_gemm"] == 0 and fused["ff_epilogue"] == 0, "a fused path ran over a LoRA layer"


def test_lora_before_optimize_every_layer_kind():
    """unet.add_adapter BEFORE optimize: the LoRA layers are left (reported), their LoRA applied."""
    model = unet()
    add_lora(model)
    ref = twin(model)
    report = ldm_fast.optimize(model)
    left = {(item.what, item.path) for item in report.left}
    assert ("pack_weights", "down_blocks.0.resnets.0") in left  # its time_emb_proj is a LoRA layer
    assert any(what == "resnet" and path.endswith("conv_shortcut") for what, path in left)
    x = unet_inputs(batch=1)
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x))


LORA_KINDS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "ff.net.0.proj": ["ff.net.0.proj"],
    "ff.net.2": ["ff.net.2"],
    "conv1+conv2": ["conv1", "conv2"],
    "conv_shortcut": ["conv_shortcut"],
    "time_emb_proj": ["time_emb_proj"],
}


@slow
@pytest.mark.parametrize("kind", list(LORA_KINDS))
def test_lora_after_optimize_one_layer_kind(kind):
    """Each layer kind on its own (a LoRA on one kind only must not hide behind the others')."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    before = run_unet(ref, x)
    add_lora(model, targets=LORA_KINDS[kind])
    add_lora(ref, targets=LORA_KINDS[kind])
    expected = check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x))
    assert rel_change(expected, before) > 1e-3


@slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
@pytest.mark.parametrize("when", ["before", "after"])
def test_lora_lifecycle(when):
    """Two adapters, set_adapters with weights, a scale change, fuse_lora/unfuse_lora,
    disable/enable, delete_adapters, unload_lora, and restore with a LoRA loaded: after each step
    the optimized U-Net computes what the twin computes (kernel path and default backend)."""
    model = unet()
    if when == "before":
        add_lora(model, "a", seed=11)
        add_lora(model, "b", seed=12)
        ref = twin(model)
        ldm_fast.optimize(model)
    else:
        ref = twin(model)
        ldm_fast.optimize(model)
        for m in (model, ref):
            add_lora(m, "a", seed=11)
            add_lora(m, "b", seed=12)
    assert_same_lora(model, ref)
    x = unet_inputs(batch=1)

    def step(what, action):
        action(model)
        action(ref)
        check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), what=what)

    step("set_adapters a, b at 0.5, 1.5", lambda m: m.set_adapters(["a", "b"], weights=[0.5, 1.5]))
    step("set_adapters a at 0.3", lambda m: m.set_adapters("a", weights=0.3))
    step("fuse_lora", lambda m: m.fuse_lora(lora_scale=0.8))
    step("unfuse_lora", lambda m: m.unfuse_lora())
    step("disable_adapters", lambda m: m.disable_adapters())
    step("enable_adapters", lambda m: m.enable_adapters())
    step("delete_adapters b", lambda m: m.delete_adapters("b"))
    step("unload_lora", lambda m: m.unload_lora())
    assert not lora_tensors(model)
    # LoRA loaded again, then restore: the twin's code, bit for bit, no kernel (diffusers 0.30 cannot
    # add an adapter after unload_lora, a peft_config AttributeError of its own: restore without)
    try:
        add_lora(ref, "c", seed=13)
    except AttributeError:
        assert not hasattr(ref, "peft_config")
    else:
        add_lora(model, "c", seed=13)
    ldm_fast.restore(model)
    _compare(no_kernels(lambda: run_unet(model, x)), run_unet(ref, x), exact=True, what="restored")


@slow
def test_lora_training_step():
    """LoRA training as diffusers' train_text_to_image_lora.py does it, on an optimized U-Net: the
    base frozen, a peft LoRA added after optimize, forward + backward in train mode (the LoRA
    gradients as the twin's), an AdamW step on the LoRA parameters, then inference follows."""
    model, ref, _ = optimized()
    x = unet_inputs()
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for m in (model, ref):
        m.requires_grad_(False)
        add_lora(m)
        m.train()
    out_ref, grads_ref = _train_step(ref, x, w)
    out, grads = on_kernels(lambda: _train_step(model, x, w), ("group_norm", "add_layer_norm", "geglu"))
    _compare(out, out_ref, exact=False, what="output")
    trained = [name for name, g in grads_ref.items() if g is not None]
    assert trained and all("lora_" in name for name in trained)
    for name in trained:
        _compare(grads[name], grads_ref[name], exact=False, rtol=1e-3, what=f"grad of {name}")
    for m in (model, ref):  # the same step on both (the twin's gradients)
        params = dict(m.named_parameters())
        for name in trained:
            params[name].grad = grads_ref[name].clone()
        torch.optim.AdamW([params[name] for name in trained], lr=1e-2).step()
        m.eval()
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), what="after the step")


# === 2. pipelines ==============================================================================


@slow
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sd_pipeline_load_lora_weights(fmt):
    """optimize(pipe), then pipe.load_lora_weights(a LoRA dict generated here, in kohya's or the
    diffusers/peft format, on attention, ff.net.0.proj, ff.net.2, conv1, conv2, conv_shortcut and
    time_emb_proj): images as the twin pipeline's. kohya: then a LoRA scale in
    cross_attention_kwargs, fuse_lora + unload_lora_weights (the fused weights kept: diffusers'
    recipe for speed), and restore(pipe)."""
    pipe = sd_pipeline()
    ref = copy.deepcopy(pipe)
    report = ldm_fast.optimize(pipe)
    assert report.counts["resnet"] > 0 and any(item.path.startswith("vae.decoder") for item in report.changed)
    base = call(ref)
    state = kohya_lora_state_dict() if fmt == "kohya" else {f"unet.{k}": v for k, v in peft_lora_state_dict().items()}
    for p in (pipe, ref):
        p.load_lora_weights(dict(state), adapter_name="x")
    kinds = {name.rsplit(".", 1)[-1] for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert {"to_q", "2", "proj", "conv1", "conv2", "conv_shortcut", "time_emb_proj"} <= kinds, kinds
    images = check_both(lambda: call(pipe), lambda: call(ref), what="images with the LoRA")
    assert rel_change(images, base) > 1e-2
    if fmt == "kohya":
        kwargs = {"cross_attention_kwargs": {"scale": 0.5}}
        _compare(on_kernels(lambda: call(pipe, **kwargs)), call(ref, **kwargs), exact=False, what="LoRA scale 0.5")
        for p in (pipe, ref):
            p.fuse_lora(lora_scale=0.7)
            p.unload_lora_weights()
        assert not lora_tensors(pipe.unet)
        _compare(on_kernels(lambda: call(pipe)), call(ref), exact=False, what="fused and unloaded")
    ldm_fast.restore(pipe)
    _compare(no_kernels(lambda: call(pipe)), call(ref), exact=True, what="restored")


@slow
def test_sdxl_pipeline():
    """A tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning)."""
    pipe = sdxl_pipeline()
    ref = copy.deepcopy(pipe)
    report = ldm_fast.optimize(pipe)
    assert report.counts["timestep_embedding"] == 2  # time_proj and add_time_proj
    check_both(lambda: call(pipe), lambda: call(ref), what="SDXL images")
    ldm_fast.restore(pipe)
    _compare(no_kernels(lambda: call(pipe)), call(ref), exact=True, what="restored")


@slow
def test_controlnet_pipeline():
    """A tiny StableDiffusionControlNetPipeline (the U-Net takes the ControlNet's residuals)."""
    pipe = controlnet_pipeline()
    ref = copy.deepcopy(pipe)
    ldm_fast.optimize(pipe)
    control = control_image()
    without = call(ref, image=control, controlnet_conditioning_scale=0.0)
    images = check_both(lambda: call(pipe, image=control), lambda: call(ref, image=control), what="ControlNet images")
    assert rel_change(images, without) > 1e-3, "the control image does not matter: the test proves nothing"
    ldm_fast.restore(pipe)
    _compare(no_kernels(lambda: call(pipe, image=control)), call(ref, image=control), exact=True, what="restored")


# === 3. weights updated in place =================================================================


def _ema_copy_to(foreach):
    def update(model, ref):
        from diffusers.training_utils import EMAModel

        for m in (model, ref):
            ema = EMAModel(unet(seed=5).parameters(), decay=0.999, foreach=foreach)  # another model's weights
            ema.copy_to(m.parameters())
    return update


def _scale_params(which):
    def update(model, ref):
        with torch.no_grad():
            for m in (model, ref):
                for name, p in m.named_parameters():
                    if name.endswith(which):
                        p.data.copy_(p.data * 1.5 + 0.05)
    return update


def _load_state_dict(assign):
    def update(model, ref):
        state = unet(seed=5).state_dict()
        for m in (model, ref):
            m.load_state_dict(state, assign=assign)
    return update


def _optimizer_step(model, ref):
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(p.shape, generator=g) for p in ref.parameters()]
    for m in (model, ref):
        params = list(m.parameters())
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        torch.optim.AdamW(params, lr=1e-2).step()


UPDATES = {
    "EMAModel.copy_to": _ema_copy_to(False),
    "EMAModel(foreach=True).copy_to": _ema_copy_to(True),
    "biases .data.copy_": _scale_params("bias"),
    "weights .data.copy_": _scale_params("weight"),
    "load_state_dict": _load_state_dict(False),
    "load_state_dict(assign=True)": _load_state_dict(True),
    "optimizer step": _optimizer_step,
}
FAST_UPDATES = ("EMAModel.copy_to", "biases .data.copy_")


@pytest.mark.parametrize("update", [u if u in FAST_UPDATES else pytest.param(u, marks=slow) for u in UPDATES]
                         + [pytest.param("EMAModel.copy_to+all", marks=slow)])
def test_in_place_update(update, fused, monkeypatch):
    """Between two calls of the optimized U-Net (the fused paths warm), its weights change in place
    without a version bump (or through load_state_dict / an optimizer): the second call follows.
    ``+all``: optimized with attention=True, channels_last=True (packed q/k/v too)."""
    update, _, all_on = update.partition("+")
    options = ALL_ON if all_on else {}
    ops = ops_for(options, monkeypatch)
    model, ref, _ = optimized(**options)
    x = unet_inputs(batch=1)
    _compare(on_kernels(lambda: run_unet(model, x), ops), run_unet(ref, x), exact=False, what="before the update")
    assert fused["shortcut_gemm"] > 0 and fused["packed_time"] > 0 and fused["ff_epilogue"] > 0
    before = run_unet(ref, x)
    UPDATES[update](model, ref)
    fused.clear()
    expected = check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), ops, what=f"after {update}",
                          default_exact=not all_on)
    assert rel_change(expected, before) > 1e-2
    if update != "load_state_dict(assign=True)":  # (new Parameters: the packed GEMM steps aside)
        assert fused["shortcut_gemm"] > 0 and fused["packed_time"] > 0 and fused["ff_epilogue"] > 0


@slow
def test_ema_store_copy_to_restore_vae():
    """The validation step of diffusers' training scripts on the VAE: ema.store, ema.copy_to, run,
    ema.restore, run (the 1x1 shortcut's bias sum must follow both)."""
    from diffusers.training_utils import EMAModel

    model, ref, _ = optimized(vae)
    x = image()
    _compare(on_kernels(lambda: run_vae(model, x), VAE_OPS), run_vae(ref, x), exact=False)
    emas = [EMAModel(vae(seed=5).parameters(), decay=0.999) for _ in range(2)]
    for ema, m in zip(emas, (model, ref)):
        ema.store(m.parameters())
        ema.copy_to(m.parameters())
    check_both(lambda: run_vae(model, x), lambda: run_vae(ref, x), VAE_OPS, what="EMA weights")
    for ema, m in zip(emas, (model, ref)):
        ema.restore(m.parameters())
    check_both(lambda: run_vae(model, x), lambda: run_vae(ref, x), VAE_OPS, what="weights restored")


# === 3b. weights reparametrized (torch.nn.utils) ===================================================


def _weight_norm(module):
    torch.nn.utils.weight_norm(module)  # (deprecated for torch.nn.utils.parametrizations; still in use)
    with torch.no_grad():
        module.weight_g.mul_(1.5)  # (as training would: the identity at first)


def _spectral_norm(module):
    torch.manual_seed(0)  # (the power iteration's random start: the same in both models)
    torch.nn.utils.spectral_norm(module)


def _prune(module):
    import torch.nn.utils.prune as prune

    prune.l1_unstructured(module, "weight", amount=0.3)


def _parametrize(module):
    import torch.nn.utils.parametrize as parametrize

    class Scale(torch.nn.Module):
        def forward(self, w):
            return w * 1.5

    parametrize.register_parametrization(module, "weight", Scale())


#: weight_norm, spectral_norm and prune take ``weight`` out of the module's Parameters and keep a
#: plain attribute that a forward pre-hook computes; parametrize swaps the module's class.
REPARAMETRIZATIONS = {"weight_norm": _weight_norm, "spectral_norm": _spectral_norm, "prune": _prune,
                      "parametrize": _parametrize}


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("when", ["after", pytest.param("before", marks=slow)])
@pytest.mark.parametrize("how", [h if h == "prune" else pytest.param(h, marks=slow) for h in REPARAMETRIZATIONS])
def test_reparametrized_weights(how, when):
    """torch.nn.utils' weight reparametrizations on a ResNet block's GroupNorms, convolutions and time
    projection and a transformer block's LayerNorms and feed-forward output (each in its own block,
    the HOOKED modules), applied after optimize (the fused paths warm) or before it: the optimized
    model computes what the twin computes and restore() gives the twin's code back. (They crashed
    the fused paths once: a weight read from ``_parameters`` before the hook check.)"""
    model = unet()
    ref = twin(model)
    x = unet_inputs(batch=1)
    paths = [p for p in _hooked(model, ref) if isinstance(getattr(model.get_submodule(p), "weight", None), torch.Tensor)]
    assert len(paths) >= 7
    if when == "after":
        ldm_fast.optimize(model)
        on_kernels(lambda: run_unet(model, x))
    for m in (model, ref):
        for path in paths:
            REPARAMETRIZATIONS[how](m.get_submodule(path))
    if when == "before":
        ldm_fast.optimize(model)
    before = run_unet(unet(), x)
    expected = check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), what=f"{how} {when} optimize")
    if how != "spectral_norm":  # (spectral_norm divides by the top singular value: a small change here)
        assert rel_change(expected, before) > 1e-2
    if how == "parametrize" and when == "after":
        # the GroupNorms' class is now torch's Parametrized subclass of ldm_fast's: restore refuses, naming
        # them, until the parametrizations are removed (which gives each module its class back)
        with pytest.raises(ValueError, match="down_blocks.1.resnets.0.norm1 .*ParametrizedGroupNorm"):
            ldm_fast.restore(model)
        import torch.nn.utils.parametrize as parametrize

        for m in (model, ref):
            for path in paths:
                parametrize.remove_parametrizations(m.get_submodule(path), "weight")
    ldm_fast.restore(model)
    _compare(no_kernels(lambda: run_unet(model, x)), run_unet(ref, x), exact=True, what="restored")
    packed = [name for name, p in model.named_parameters() if p.untyped_storage().nbytes() != p.nbytes]
    assert not packed, f"restore left parameters in a packed buffer: {packed}"  # (the renamed weight_orig too)


def test_functional_call():
    """``torch.func.functional_call`` with other weights (the optimized model's own unchanged): the
    fused paths read the substituted tensors, as the twin's modules do."""
    model, ref, _ = optimized(**ALL_ON)
    x = unet_inputs(batch=1)
    on_kernels(lambda: run_unet(model, x))
    new = {name: p.detach() * 1.2 + 0.01 for name, p in ref.named_parameters()}

    def call(m):
        return torch.func.functional_call(m, new, x).sample

    expected = check_both(lambda: call(model), lambda: call(ref), what="functional_call", default_exact=False)
    assert rel_change(expected, run_unet(ref, x)) > 1e-2


# === 4. hooks added after optimize ===============================================================

#: Each hooked module in its own block, so one module's hook does not switch off the fused path that
#: another's guard is meant to catch.
HOOKED = [
    "down_blocks.1.resnets.0.norm1",
    "up_blocks.0.resnets.0.norm2",
    "mid_block.resnets.0.nonlinearity",
    "up_blocks.0.resnets.1.conv2",
    "up_blocks.1.resnets.0.conv_shortcut",
    "up_blocks.1.resnets.1.time_emb_proj",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm2",
    "mid_block.attentions.0.transformer_blocks.0.norm3",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
]


def _hooked(model, ref) -> list:
    """The HOOKED paths whose module is held at that one place: diffusers before 0.33 hands every
    ResnetBlock2D one process-wide activation module (get_activation's table), which a hook on one
    block would put on every block of every model (and leave on the next test's models)."""
    places = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return [p for p in HOOKED if places[id(model.get_submodule(p))] == 1]


def _register(model, pre=None, post=None, paths=HOOKED):
    modules = dict(model.named_modules(remove_duplicate=False))
    handles = []
    for path in paths:
        if pre is not None:
            handles.append(modules[path].register_forward_pre_hook(lambda m, args, p=path: pre(p, args)))
        if post is not None:
            handles.append(modules[path].register_forward_hook(lambda m, args, out, p=path: post(p, args, out)))
    return handles


def _recorder(log):
    def pre(path, args):
        log.append((path, "input", args[0].detach().clone()))

    def post(path, args, out):
        log.append((path, "output", out.detach().clone()))

    return pre, post


def _compare_logs(got, expected, exact):
    assert [entry[:2] for entry in got] == [entry[:2] for entry in expected], "the hooks saw other calls"
    for (path, kind, a), (_, _, b) in zip(got, expected):
        _compare(a, b, exact, what=f"{kind} of {path}")
    return True


@pytest.mark.parametrize("options", OPTION_SETS)
def test_hooks_record(options, monkeypatch):
    """Forward pre-hooks and forward hooks added after optimize on a ResnetBlock2D's norm1, norm2,
    nonlinearity, conv2, conv_shortcut, time_emb_proj and a BasicTransformerBlock's norm2, norm3,
    ff.net.2 see what they see without ldm_fast (norm2 of a ResNet block: h + temb)."""
    model, ref, _ = optimized(**options)
    x = unet_inputs(batch=1)
    paths = _hooked(model, ref)
    expected = []
    handles = _register(ref, *_recorder(expected), paths=paths)
    run_unet(ref, x)
    for h in handles:
        h.remove()
    assert {entry[0] for entry in expected} == set(paths)
    ops = ops_for(options, monkeypatch)
    for backend in ("kernel", "default"):
        got = []
        handles = _register(model, *_recorder(got), paths=paths)
        if backend == "default":
            run_unet(model, x)
        else:
            on_kernels(lambda: run_unet(model, x), ops)
        for h in handles:
            h.remove()
        _compare_logs(got, expected, exact=backend == "default" and not options.get("channels_last"))


@pytest.mark.parametrize("where", ["input", "output"])
def test_hooks_replace(where):
    """Hooks that return a replacement input (pre-hook) or output (forward hook) change the output
    exactly as they change the twin's."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    before = run_unet(ref, x)
    if where == "input":
        def pre(path, args):
            return (args[0] * 0.5 + 0.25,) + tuple(args[1:])
        hooks = {"pre": pre}
    else:
        hooks = {"post": lambda path, args, out: out * 0.5 + 0.25}
    paths = _hooked(model, ref)
    handles = _register(model, **hooks, paths=paths) + _register(ref, **hooks, paths=paths)
    try:
        expected = check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x))
    finally:
        for h in handles:
            h.remove()
    assert rel_change(expected, before) > 1e-2


@pytest.mark.parametrize("backend", [
    "default",
    "kernel",
])
def test_hook_changing_input_in_place(backend):
    """A forward pre-hook on the first block's time_emb_proj that scales its input IN PLACE (returns
    None): without ldm_fast that input is this block's own silu(temb); only this block changes."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)

    def scale(module, args):
        args[0].mul_(3.0)

    for m in (model, ref):
        m.down_blocks[0].resnets[0].time_emb_proj.register_forward_pre_hook(scale)
    expected = run_unet(ref, x)
    if backend == "kernel":
        _compare(on_kernels(lambda: run_unet(model, x)), expected, exact=False)
    else:
        _compare(run_unet(model, x), expected, exact=True)


def _global_recorder(model, log):
    names = {id(m): name for name, m in model.named_modules()}

    def hook(module, args, out):
        if id(module) in names and isinstance(out, torch.Tensor):
            log.append((names[id(module)] or "<root>", "output", out.detach().clone()))

    return hook


@pytest.mark.parametrize("backend", [
    "default",
    "kernel",
])
def test_global_module_hooks(backend):
    """torch.nn.modules.module.register_module_forward_hook added after optimize sees every module
    call, with the same outputs, as without ldm_fast."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    expected, got = [], []
    handle = torch.nn.modules.module.register_module_forward_hook(_global_recorder(ref, expected))
    try:
        run_unet(ref, x)
    finally:
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(_global_recorder(model, got))
    try:
        if backend == "kernel":
            on_kernels(lambda: run_unet(model, x), ("group_norm",))
        else:
            run_unet(model, x)
    finally:
        handle.remove()
    missing = Counter(e[0].rsplit(".", 1)[-1] for e in expected) - Counter(e[0].rsplit(".", 1)[-1] for e in got)
    assert not missing, f"calls the global hook did not see: {dict(missing)}"
    _compare_logs(got, expected, exact=backend == "default")


def _patched_class(cls):
    """A subclass whose forward changes the block's input (what tomesd's class swap, or a user's own
    block subclass, does: ``module.__class__ = make_tome_block(module.__class__)``)."""
    class Patched(cls):
        def forward(self, hidden_states, *args, **kwargs):
            return super().forward(hidden_states * 0.5, *args, **kwargs)

    Patched.__name__ = Patched.__qualname__ = f"Patched{cls.__name__}"
    return Patched


def _class_swap(name):
    def apply(model, monkeypatch):
        for m in model.modules():
            if type(m).__name__ == name:
                m.__class__ = _patched_class(type(m))
    return apply


def _class_attribute(model, monkeypatch):
    """BasicTransformerBlock.forward replaced on the class (once: it serves every model)."""
    from diffusers.models.attention import BasicTransformerBlock

    original = BasicTransformerBlock.forward
    if getattr(original, "_scenario_patch", False):
        return

    def forward(self, hidden_states, *args, **kwargs):
        return original(self, hidden_states * 0.5, *args, **kwargs)

    forward._scenario_patch = True
    monkeypatch.setattr(BasicTransformerBlock, "forward", forward)


CLASS_PATCHES = {
    "BasicTransformerBlock.__class__ swapped (tomesd)": _class_swap("BasicTransformerBlock"),
    "ResnetBlock2D.__class__ swapped": _class_swap("ResnetBlock2D"),
    "BasicTransformerBlock.forward monkeypatched": _class_attribute,
}


@pytest.mark.parametrize("patch", list(CLASS_PATCHES))
def test_block_class_patched_after_optimize(patch, monkeypatch):
    """A library that patches the blocks' CLASS after optimize (tomesd swaps each
    BasicTransformerBlock's __class__; others assign the class's forward): its forward runs."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    before = run_unet(ref, x)
    for m in (model, ref):
        CLASS_PATCHES[patch](m, monkeypatch)
    expected = run_unet(ref, x)
    assert rel_change(expected, before) > 1e-2
    _compare(run_unet(model, x), expected, exact=True, what="default backend")
    _compare(on_kernels(lambda: run_unet(model, x), ("group_norm",)), expected, exact=False, what="kernel path")


@slow
def test_backward_hooks_in_training():
    """Full backward hooks (and forward hooks) added after optimize on a ResNet block's norm2 and a
    transformer block's ff.net.2 and norm3, in training: the gradients they see as without ldm_fast."""
    model, ref, _ = optimized()
    paths = ["down_blocks.1.resnets.0.norm2", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
             "mid_block.attentions.0.transformer_blocks.0.norm3"]
    x = unet_inputs()
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def record(model, log):
        modules = dict(model.named_modules())
        for path in paths:
            modules[path].register_full_backward_hook(
                lambda m, gin, gout, p=path: log.append((p, "grad_output", gout[0].detach().clone())))

    logs = []
    for m in (ref, model):
        m.train()
        logs.append([])
        record(m, logs[-1])
    _train_step(ref, x, w)
    on_kernels(lambda: _train_step(model, x, w), ("group_norm", "add_layer_norm", "geglu"))
    assert {entry[0] for entry in logs[0]} == set(paths)
    got, expected = logs[1], logs[0]
    assert [e[:2] for e in got] == [e[:2] for e in expected]
    for (path, kind, a), (_, _, b) in zip(got, expected):
        _compare(a, b, exact=False, rtol=1e-3, what=f"{kind} of {path}")


def unet2d(seed: int = 0):
    """A tiny UNet2DModel (DDPM-style: attention blocks with a GroupNorm and a residual inside)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


@slow
@pytest.mark.parametrize("which", ["vae", "UNet2DModel"])
def test_attention_patch_on_other_models(which, monkeypatch):
    """optimize(attention=True) where diffusers' Attention has a group_norm, a residual connection
    and a rescale factor inside (the VAE's mid-block, a DDPM UNet2DModel)."""
    monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
    if which == "vae":
        model, ref, report = optimized(vae, attention=True)
        x = image()
        run = lambda m: run_vae(m, x)  # noqa: E731
    else:
        model, ref, report = optimized(unet2d, attention=True)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))

        def run(m):
            with torch.no_grad():
                return m(x, torch.tensor([300])).sample
    assert report.counts["attention"] > 0
    check_both(lambda: run(model), lambda: run(ref), ("group_norm", "attention"))


# === 5. inference_mode / no_grad ==================================================================


@pytest.mark.parametrize("mode", ["inference_mode", pytest.param("no_grad", marks=slow)])
@pytest.mark.parametrize("which", ["unet", "vae"])
def test_inference_mode(which, mode):
    """Two calls (other inputs, other timesteps) of the optimized U-Net / VAE inside
    torch.inference_mode() / torch.no_grad(), on both backends."""
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    if which == "unet":
        model, ref, _ = optimized(unet)
        calls = [lambda m: m(*unet_inputs(batch=1)).sample, lambda m: m(*inputs_b(batch=1)).sample]
        ops = UNET_OPS
    else:
        model, ref, _ = optimized(vae)
        calls = [lambda m: m(image(), sample_posterior=False).sample,
                 lambda m: m(image(seed=8), sample_posterior=False).sample]
        ops = VAE_OPS
    for i, fn in enumerate(calls):
        with context():
            expected = fn(ref)
            with kernels_forced() as launched:
                got = fn(model)
            default = fn(model)
        assert all(launched.get(op) for op in ops), dict(launched)
        _compare(got, expected, exact=False, what=f"call {i} (kernel path)")
        _compare(default, expected, exact=True, what=f"call {i} (default backend)")


@slow
def test_inference_mode_pipeline():
    pipe = sd_pipeline()
    ref = copy.deepcopy(pipe)
    ldm_fast.optimize(pipe)
    with torch.inference_mode():
        check_both(lambda: call(pipe), lambda: call(ref), what="images under inference_mode")


# === 6. copies =====================================================================================


def _torch_save_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "torch.save": _torch_save_load,
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
}


@pytest.mark.parametrize("how", list(COPIES))
def test_copy(how):
    """A copy of an optimized U-Net (made after a call, caches warm) runs on the kernel path and
    matches; it shares nothing with the original (the original's weights scaled in place do not
    reach it); ldm_fast.restore(copy) works and leaves the twin's code."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    on_kernels(lambda: run_unet(model, x))
    clone = COPIES[how](model)
    assert report_of(clone) is not None
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.1)
    check_both(lambda: run_unet(clone, x), lambda: run_unet(ref, x), what=f"the {how} copy")
    ldm_fast.restore(clone)
    assert report_of(clone) is None
    assert not any(type(m).__module__.startswith("ldm_fast") for m in clone.modules())
    _compare(no_kernels(lambda: run_unet(clone, x)), run_unet(ref, x), exact=True, what="the restored copy")
    assert report_of(model) is not None  # the original is still optimized


# === 7. dtype, training, chunking, processors, accelerate =========================================


def assert_low_precision_close(got, expected, exact_fp32) -> None:
    """``got`` (ldm_fast, low precision) as close to diffusers' low-precision ``expected`` as
    FP16_RTOL, and no farther from the fp32 result than twice diffusers' own rounding error."""
    _compare(got, expected, exact=False, rtol=FP16_RTOL, what="vs diffusers in low precision")
    ours, theirs = rel_change(got.float(), exact_fp32), rel_change(expected.float(), exact_fp32)
    assert ours <= 2 * theirs + 1e-4, f"error vs fp32 {ours:.3g}, diffusers' own {theirs:.3g}"


@pytest.mark.parametrize("how", ["to(float16)", pytest.param("half()", marks=slow)])
def test_half_after_optimize(how):
    """.to(torch.float16) / .half() after optimize (the packed weights re-allocated): the fp16
    model on the kernel path as diffusers' in fp16; bit for bit on the default backend."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    fp32 = run_unet(ref, x)
    for m in (model, ref):
        m.to(torch.float16) if how == "to(float16)" else m.half()
    x = tuple(t.half() if t.is_floating_point() else t for t in x)
    expected = run_unet(ref, x)
    assert_low_precision_close(on_kernels(lambda: run_unet(model, x)), expected, fp32)
    _compare(run_unet(model, x), expected, exact=True, what="default backend")


@slow
def test_cpu_autocast_bfloat16():
    """torch.autocast("cpu", bfloat16) around the fp32 optimized U-Net (the kernels take the bf16
    activations autocast gives; add+LayerNorm steps aside under CPU autocast by design)."""
    model, ref, _ = optimized()
    x = unet_inputs(batch=1)
    fp32 = run_unet(ref, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run_unet(ref, x)
        got = on_kernels(lambda: run_unet(model, x), ("group_norm", "geglu", "timestep_embedding"))
        default = run_unet(model, x)
    assert got.dtype == expected.dtype == torch.bfloat16
    ours, theirs = rel_change(got.float(), fp32), rel_change(expected.float(), fp32)
    assert ours <= 2 * theirs + 1e-4, f"error vs fp32 {ours:.3g}, diffusers' own {theirs:.3g}"
    _compare(default, expected, exact=True, what="default backend")


def _train_step(model, x, w):
    model.zero_grad(set_to_none=True)
    out = model(*x).sample
    (out * w).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


@slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_backward(checkpointing):
    """model.train() + backward after optimize (and gradient checkpointing enabled after it): the
    output and every parameter's gradient as the twin's (kernel path: fused backward kernels)."""
    model, ref, _ = optimized()
    for m in (model, ref):
        m.train()
        if checkpointing:
            m.enable_gradient_checkpointing()
    x = unet_inputs()
    w = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out_ref, grads_ref = _train_step(ref, x, w)
    for exact in (False, True):
        if exact:
            out, grads = _train_step(model, x, w)
        else:
            out, grads = on_kernels(lambda: _train_step(model, x, w), ("group_norm", "add_layer_norm", "geglu"))
        _compare(out, out_ref, exact, what="output")
        assert grads.keys() == grads_ref.keys()
        for name, g in grads.items():
            assert g is not None, f"no gradient for {name}"
            _compare(g, grads_ref[name], exact, rtol=1e-3 if not exact else 0, what=f"grad of {name}")


def test_requires_grad_false_without_no_grad(fused):
    """requires_grad_(False) after optimize, called without torch.no_grad(): inference, the fused
    inference paths run."""
    model, ref, _ = optimized()
    for m in (model, ref):
        m.requires_grad_(False)
    x = unet_inputs()
    check_both(lambda: model(*x).sample, lambda: ref(*x).sample)
    assert fused["shortcut_gemm"] > 0 and fused["packed_time"] > 0 and fused["ff_epilogue"] > 0


def _chunk_feed_forward(model):
    blocks = [m for m in model.modules() if hasattr(m, "set_chunk_feed_forward")]
    assert blocks
    for block in blocks:  # (what UNet3DConditionModel.enable_forward_chunking does)
        block.set_chunk_feed_forward(4, dim=1)


FEATURES = {
    "feed-forward chunking": _chunk_feed_forward,
    "freeu": lambda m: m.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
    "fuse_qkv_projections": lambda m: m.fuse_qkv_projections(),
    "attention slicing": lambda m: m.set_attention_slice(1),
    "to(memory_format=channels_last)": lambda m: m.to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("feature", [f if f in ("feed-forward chunking", "to(memory_format=channels_last)")
                                     else pytest.param(f, marks=slow) for f in FEATURES])
def test_diffusers_feature_after_optimize(feature):
    """A diffusers feature switched on after optimize (on both models)."""
    model, ref, _ = optimized()
    for m in (model, ref):
        FEATURES[feature](m)
    sample, t, context = unet_inputs(batch=1)
    if "channels_last" in feature:
        sample = sample.contiguous(memory_format=torch.channels_last)
    x = (sample, t, context)
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x))


@slow
def test_timestep_forms():
    """Timesteps as a float tensor (Euler-type schedulers), a python int, a 0-d tensor, int32."""
    model, ref, _ = optimized()
    sample, _, context = unet_inputs(batch=1)
    for t in (torch.tensor([999.5]), 321, torch.tensor(17.25), torch.tensor([5], dtype=torch.int32)):
        x = (sample, t, context)
        check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), what=f"timesteps {t!r}")


@slow
def test_input_gradient_of_frozen_model():
    """Guidance by gradients (the U-Net frozen, the latents requiring grad): d(out * w)/d(latents)."""
    model, ref, _ = optimized()
    sample, t, context = unet_inputs(batch=1)
    w = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))

    def grad(m):
        s = sample.clone().requires_grad_(True)
        return torch.autograd.grad((m(s, t, context).sample * w).sum(), s)[0]

    for m in (model, ref):
        m.requires_grad_(False)
    check_both(lambda: grad(model), lambda: grad(ref), ("group_norm", "add_layer_norm", "geglu"))


def test_save_pretrained(tmp_path):
    """save_pretrained of an optimized U-Net writes the twin's weights (the packed views saved as
    their own tensors); the loaded model is plain diffusers and computes what the twin's reload does."""
    from diffusers import UNet2DConditionModel

    model, ref, _ = optimized()
    model.save_pretrained(tmp_path / "opt")
    ref.save_pretrained(tmp_path / "ref")
    loaded, loaded_ref = (UNet2DConditionModel.from_pretrained(tmp_path / d).eval() for d in ("opt", "ref"))
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(type(m).__module__.startswith("ldm_fast") for m in loaded.modules())
    x = unet_inputs(batch=1)
    _compare(run_unet(loaded, x), run_unet(loaded_ref, x), exact=True)


def test_set_attn_processor_after_attention_patch():
    """optimize(attention=True), then the user's unet.set_attn_processor(AttnProcessor()): diffusers'
    processor runs (outputs as the twin's); restore refuses with a ValueError saying the processor
    was replaced, and changes nothing."""
    from diffusers.models.attention_processor import AttnProcessor

    model, ref, report = optimized(attention=True)
    assert report.counts["attention"] == 8
    for m in (model, ref):
        m.set_attn_processor(AttnProcessor())
    x = unet_inputs(batch=1)
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x))
    with pytest.raises(ValueError, match="cannot undo exactly, nothing was changed") as info:
        ldm_fast.restore(model)
    message = str(info.value)
    assert "processor" in message and "replaced after optimize" in message
    assert report_of(model) is not None
    assert type(model.conv_norm_out).__module__.startswith("ldm_fast")


def test_restore_refusal_names_the_modules():
    from diffusers.models.attention_processor import AttnProcessor

    model, _, _ = optimized(attention=True)
    model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(AttnProcessor())
    with pytest.raises(ValueError) as info:
        ldm_fast.restore(model)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in str(info.value)


def test_accelerate_cpu_offload_after_optimize():
    """accelerate's cpu_offload (weights on the meta device, an AlignDevicesHook on every module
    with parameters) after optimize: the hooked modules are called, outputs as the twin's."""
    from accelerate import cpu_offload

    model, ref, _ = optimized()
    for m in (model, ref):
        cpu_offload(m, execution_device=torch.device("cpu"))
    x = unet_inputs(batch=1)
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), ("group_norm",))


def test_restore_after_accelerate_hooks_removed():
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    model, ref, _ = optimized()
    for m in (model, ref):
        cpu_offload(m, execution_device=torch.device("cpu"))
        remove_hook_from_module(m, recurse=True)
    ldm_fast.restore(model)
    x = unet_inputs(batch=1)
    _compare(no_kernels(lambda: run_unet(model, x)), run_unet(ref, x), exact=True)


@pytest.mark.parametrize("options", [
    pytest.param({}, id="NCHW"),
    pytest.param({"channels_last": True}, id="channels_last"),
])
def test_report_matches_what_runs(options):
    """What the report says is fused runs as one kernel: each BasicTransformerBlock reported under
    add_layer_norm adds attn1's residual into norm2 and attn2's into norm3 (2 launches a block,
    less the norms reported left), each GroupNorm and GEGLU one kernel, the Timesteps one."""
    model, _, report = optimized(**options)
    with kernels_forced() as launched:
        run_unet(model, unet_inputs(batch=1))
    counts = report.counts
    assert launched["group_norm"] == counts["group_norm"]
    assert launched["geglu"] == counts["geglu"] and launched["timestep_embedding"] == counts["timestep_embedding"]
    left_norms = [item for item in report.left if item.what == "add_layer_norm"]
    assert launched["add_layer_norm"] == 2 * counts["add_layer_norm"] - len(left_norms), (
        f"{counts['add_layer_norm']} blocks reported fused, {launched['add_layer_norm']} add+LayerNorm launches, "
        f"{len(left_norms)} norms reported left")


# === 8. diffusers versions =========================================================================


def _drop_resnet_digests(monkeypatch):
    from ldm_fast.integrations.diffusers import supported

    monkeypatch.setitem(supported.SUPPORTED, "ResnetBlock2D.forward", {})


def _runtime_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_unknown_source_one_warning(monkeypatch):
    """An installed ResnetBlock2D.forward ldm_fast does not know (SUPPORTED without its digests):
    ONE RuntimeWarning naming the installed diffusers; every block in report.left with the reason;
    str(report) prints every left item; the output unchanged on both backends."""
    _drop_resnet_digests(monkeypatch)
    model = unet()
    ref = twin(model)
    report, caught = _runtime_warnings(lambda: ldm_fast.optimize(model))
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"diffusers {diffusers.__version__}" in message and "ResnetBlock2D" in message
    blocks = {name for name, m in model.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    left = {item.path: item.reason for item in report.left if item.what == "resnet"}
    assert set(left) == blocks
    assert all("not the code ldm_fast reproduces" in r and diffusers.__version__ in r for r in left.values())
    assert "resnet" not in report.counts and report.counts["group_norm"] == 21
    text = str(report)
    for item in report.left:
        assert item.path in text and item.reason in text
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m).__name__ == "ResnetBlock2D")
    x = unet_inputs(batch=1)
    check_both(lambda: run_unet(model, x), lambda: run_unet(ref, x), ("group_norm",))


def test_unknown_source_one_warning_for_a_pipeline(monkeypatch):
    _drop_resnet_digests(monkeypatch)
    pipe = sd_pipeline()
    report, caught = _runtime_warnings(lambda: ldm_fast.optimize(pipe))
    assert {item.path.split(".")[0] for item in report.left} == {"unet", "vae"}
    assert len(caught) == 1, [str(w.message) for w in caught]


def test_unknown_source_pipeline_report_lists_every_item(monkeypatch):
    _drop_resnet_digests(monkeypatch)
    pipe = sd_pipeline()
    report, caught = _runtime_warnings(lambda: ldm_fast.optimize(pipe))
    assert caught and all(f"diffusers {diffusers.__version__}" in str(w.message) for w in caught)
    blocks = {f"unet.{n}" for n, m in pipe.unet.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    blocks |= {f"vae.decoder.{n}" for n, m in pipe.vae.decoder.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    assert {item.path for item in report.left if item.what == "resnet"} == blocks
    text = str(report)
    assert all(path in text for path in blocks)
    ldm_fast.restore(pipe)


OLD_DIFFUSERS_VENV = os.environ.get("LDM_FAST_OLD_DIFFUSERS_VENV", "/work/survey/venv-030")


@slow
def test_diffusers_version_matrix(tmp_path):
    """The oldest supported diffusers (0.30.3, in its own venv): a tiny U-Net and VAE optimized with
    this checkout's ldm_fast get every patch (no module left for unknown source, no warning, the
    same counts as here), match their twins on the kernel path and bit for bit on the default
    backend, and take a LoRA after optimize."""
    python = os.path.join(OLD_DIFFUSERS_VENV, "bin", "python")
    if not os.path.exists(python):
        pytest.skip(f"no venv with an older diffusers at {OLD_DIFFUSERS_VENV} (set LDM_FAST_OLD_DIFFUSERS_VENV)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shim = tmp_path / "shim"  # triton for a venv with a CPU-only torch (and nothing else of this env)
    shim.mkdir()
    found = subprocess.run([python, "-c", "import triton"], capture_output=True).returncode == 0
    if not found:
        spec = importlib.util.find_spec("triton")
        if spec is None:
            pytest.skip("triton is not installed here to lend to the venv")
        os.symlink(spec.submodule_search_locations[0], shim / "triton")
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{root}", "TRITON_INTERPRET": "1"}
    env.pop("LDM_FAST_BACKEND", None)
    proc = subprocess.run([python, os.path.join(root, "tests", "_diffusers_version_check.py"), root],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@JSON@@")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("@@JSON@@"):])
    assert result["ldm_fast.kernels"].startswith(os.path.join(root, "kernels"))
    assert result["triton_available"]
    here, _, _ = optimized()
    expected_counts = report_of(here).counts
    for name, case in result["cases"].items():
        assert "exception" not in case, f"{name} on diffusers {result['diffusers']}:\n{case['exception']}"
        assert case["warnings"] == [], (name, case["warnings"])
        assert case["left"] == [], (name, case["left"])
        assert case["missing_launches"] == [], (name, case)
        assert case["kernel_close"], (name, case.get("kernel_error"))
        assert case["restored_bit_for_bit"], name
        if name != "unet_attention_channels_last":  # (channels-last convolutions round differently)
            assert case["default_bit_for_bit"], name
    assert result["cases"]["unet"]["counts"] == expected_counts, (result["cases"]["unet"]["counts"], expected_counts)
    assert result["cases"]["vae"]["counts"]["resnet"] == 10
