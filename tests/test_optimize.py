"""ldm_fast.optimize / restore: the patch loop, options, the report, exact restore, identity of
modules and parameters, copies, the model-agnostic patches (group_norm, group_norm_silu,
channels_last) and the CUDA-graph cache logic (emulated on CPU: there is no GPU here). The diffusers
blocks' patches have a test file each (tests/test_diffusers_*.py)."""

from __future__ import annotations

import copy
import importlib
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import ldm_fast
from ldm_fast import optimize, restore
from ldm_fast.nn import GroupNorm as LdmGroupNorm
from ldm_fast.nn import GroupNorm32 as LdmGroupNorm32
from ldm_fast.optimize import cuda_graph as opt_cuda_graph
from ldm_fast.optimize import patches as opt_patches

opt_mod = importlib.import_module("ldm_fast.optimize")  # the package (ldm_fast.optimize is the function)

diffusers = pytest.importorskip("diffusers")
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput  # noqa: E402

import _diffusers_models as dm  # noqa: E402


class GroupNorm32(nn.GroupNorm):
    """The CompVis / SD ``ldm.modules.diffusionmodules.util.GroupNorm32``, verbatim."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class ScaledGroupNorm(nn.GroupNorm):
    """A subclass whose forward optimize cannot know."""

    def forward(self, x):
        return super().forward(x) * 2


def _compvis_block(ch=16):
    """CompVis ResBlock's ``in_layers``: ``nn.Sequential(normalization(ch), nn.SiLU(), conv_nd(...))``."""
    return nn.Sequential(GroupNorm32(4, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))


# ---------------------------------------------------------------------------------------------
# the whole U-Net and VAE: report, exactness, restore


def test_unet_report_exact_on_the_default_backend_and_restore_round_trip():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    norms = {name: type(m) for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)}
    report = optimize(unet)

    blocks = sorted(name for name, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D")
    assert report.counts["group_norm"] == len(norms) == 21
    assert sorted(report.paths("resnet")) == blocks and sorted(report.paths("pack_weights")) == blocks
    assert report.counts["geglu"] == report.counts["add_layer_norm"] == 4 and report.paths("timestep_embedding") == [
        "time_proj"]
    assert report.left == []
    text = str(report)
    assert "group_norm 21" in text and "0 left as is" in text and "cuda_graph: off" in text
    assert "channels_last: off" in text and "attention: off" in text
    assert opt_mod.report_of(unet) is report
    assert torch.equal(dm.run_unet(unet, inputs), ref)  # a CPU model runs its own code

    assert restore(unet) is unet
    assert {name: type(m) for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)} == norms
    assert all("activation" not in m.__dict__ and "forward" not in m.__dict__ for m in unet.modules())
    assert opt_mod.report_of(unet) is None
    assert torch.equal(dm.run_unet(unet, inputs), ref)


@pytest.mark.slow
def test_unet_kernel_path_matches_and_launches():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    optimize(unet)
    with dm.kernels_forced() as launched:
        out = dm.run_unet(unet, inputs)
    # 21 norms: the ResNet blocks' pairs, the transformers' norms, conv_norm_out
    assert launched["group_norm"] == 21 and launched["timestep_embedding"] == 1 and launched["geglu"] == 4
    assert launched["add_layer_norm"] == 8  # both pairs of every block (the NCHW norm2 input: a strided view)
    dm.assert_close_rel(out, ref)


@pytest.mark.slow
def test_vae_exact_on_the_default_backend_and_kernel_path_matches():
    vae, x = dm.vae(), dm.image()
    ref = dm.run_vae(vae, x)
    report = optimize(vae)
    n_norms = sum(isinstance(m, nn.GroupNorm) for m in vae.modules())
    n_blocks = sum(type(m).__name__ == "ResnetBlock2D" for m in vae.modules())
    assert report.counts["group_norm"] == n_norms and report.counts["resnet"] == n_blocks
    assert torch.equal(dm.run_vae(vae, x), ref)
    with dm.kernels_forced() as launched:
        out = dm.run_vae(vae, x)
    assert launched["group_norm"] == n_norms
    dm.assert_close_rel(out, ref)
    restore(vae)
    assert torch.equal(dm.run_vae(vae, x), ref)


# ---------------------------------------------------------------------------------------------
# options


def test_options_are_the_patches_checked_by_name_and_type():
    assert list(opt_mod.OPTIONS) == [p.name for p in opt_mod.PATCHES]
    assert opt_mod.OPTIONS == {"group_norm": True, "group_norm_silu": True, "resnet": True, "geglu": True,
                               "add_layer_norm": True, "timestep_embedding": True, "channels_last": False,
                               "attention": False, "pack_weights": True, "cuda_graph": False}
    model = _compvis_block()
    with pytest.raises(TypeError, match="unknown option 'fuse_everything'.*group_norm, group_norm_silu"):
        optimize(model, fuse_everything=True)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        optimize(model, channels_last="yes")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        optimize(lambda x: x)
    assert opt_mod.report_of(model) is None  # nothing was done


def test_group_norm_false_turns_off_the_patches_that_need_it():
    unet = dm.unet()
    report = optimize(unet, group_norm=False)
    assert "group_norm: off" in report.notes and "resnet: off (needs group_norm)" in report.notes
    assert "group_norm_silu: off (needs group_norm)" in report.notes
    assert report.counts.get("group_norm", 0) == report.counts.get("resnet", 0) == 0
    assert report.counts["geglu"] == 4  # the others still apply
    assert all(type(m) is not LdmGroupNorm for m in unet.modules())
    restore(unet)


def test_each_option_off_leaves_its_modules():
    for name in ("resnet", "geglu", "add_layer_norm", "timestep_embedding", "pack_weights"):
        unet = dm.unet()
        report = optimize(unet, **{name: False})
        assert f"{name}: off" in report.notes and report.paths(name) == [], name
        restore(unet)


# ---------------------------------------------------------------------------------------------
# identity: parameters, state dict, hooks, optimizer, gradients, copies


def test_parameter_identity_state_dict_hooks_and_optimizer():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ids = [id(p) for p in unet.parameters()]
    keys = list(unet.state_dict().keys())
    module_ids = [id(m) for m in unet.modules()]
    seen = []
    unet.conv_norm_out.register_forward_hook(lambda m, i, o: seen.append("conv_norm_out"))
    sgd = torch.optim.SGD(unet.parameters(), lr=0.1)
    optimize(unet)
    assert [id(p) for p in unet.parameters()] == ids
    assert list(unet.state_dict().keys()) == keys
    assert [id(m) for m in unet.modules()] == module_ids
    out = unet(*inputs).sample
    assert seen == ["conv_norm_out"]
    # an optimizer built before optimize still drives the parameters the model uses
    out.square().mean().backward()
    sgd.step()
    with torch.no_grad():
        assert not torch.allclose(unet(*inputs).sample, out)
    restore(unet)
    assert [id(p) for p in unet.parameters()] == ids and list(unet.state_dict().keys()) == keys


@pytest.mark.slow
def test_gradients_match_the_plain_model_on_the_kernel_path():
    ref_model = dm.unet()
    model = dm.twin(ref_model)
    optimize(model)
    inputs = dm.unet_inputs()
    ref_model(*inputs).sample.square().mean().backward()
    with dm.kernels_forced() as launched:
        model(*inputs).sample.square().mean().backward()
    assert launched["group_norm"] == 2 * 21  # each norm's forward and backward kernels
    ref_grads = dict(ref_model.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        g = ref_grads[name].grad
        if g is None:
            assert p.grad is None, name
            continue
        n += 1
        dm.assert_close_rel(p.grad, g, 1e-3)
    assert n > 100


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle"])
def test_copies_of_an_optimized_model_run_fused_and_restore_on_their_own(how):
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    optimize(unet, attention=True, cuda_graph=True)
    if how == "deepcopy":
        copied = copy.deepcopy(unet)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(unet))
    else:
        buf = io.BytesIO()
        torch.save(unet, buf)
        buf.seek(0)
        copied = torch.load(buf, weights_only=False)
    assert isinstance(copied.forward, opt_mod.CUDAGraphForward) and copied.forward.model is copied
    block = copied.down_blocks[0].resnets[0]
    assert block.forward.block is block
    pack = block.forward.time_pack  # the copy's weights are views of the copy's packed buffer again
    assert all(pack.intact(i) for i in range(len(pack.modules))) and pack.modules[0] is block.time_emb_proj
    with dm.kernels_forced() as launched:
        out = dm.run_unet(copied, inputs)
    assert launched["group_norm"] == 21
    dm.assert_close_rel(out, ref)
    restore(copied)
    assert all(type(x) is not LdmGroupNorm and "forward" not in x.__dict__ for x in copied.modules())
    assert torch.equal(dm.run_unet(copied, inputs), ref)
    assert type(unet.conv_norm_out) is LdmGroupNorm  # the original is untouched by the copy's restore


@pytest.mark.slow
def test_inference_mode_on_both_backends():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    optimize(unet, attention=True)
    with torch.inference_mode():
        assert torch.equal(unet(*inputs).sample, ref)
        with dm.kernels_forced() as launched:
            out = unet(*inputs).sample
    assert launched["group_norm"] == 21
    dm.assert_close_rel(out, ref)
    restore(unet)


# ---------------------------------------------------------------------------------------------
# restore


def test_optimize_twice_raises_and_restore_unoptimized_raises():
    model = _compvis_block()
    with pytest.raises(ValueError, match="was not optimized"):
        restore(model)
    optimize(model)
    with pytest.raises(RuntimeError, match="already optimized"):
        optimize(model)
    with pytest.raises(RuntimeError, match="submodule '0' is already optimized"):
        optimize(nn.Sequential(model))
    restore(model)
    with pytest.raises(ValueError, match="already restored"):
        restore(model)
    optimize(model, channels_last=True)  # after restore, optimize again with other options
    restore(model)


def test_restore_refuses_when_a_change_was_replaced():
    model = _compvis_block()
    optimize(model)
    model.forward = lambda x: x  # the Sequential forward optimize put there, replaced by the user
    with pytest.raises(ValueError, match=r"<root> \(Sequential\): its forward was replaced after optimize"):
        restore(model)
    assert type(model[0]) is LdmGroupNorm32  # nothing was undone


def test_a_failing_patch_undoes_what_was_done(monkeypatch):
    model = _compvis_block()

    def boom(self, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(opt_patches.PackWeightsPatch, "run", boom)
    with pytest.raises(RuntimeError, match="boom"):
        optimize(model)
    assert type(model[0]) is GroupNorm32 and "forward" not in model.__dict__ and opt_mod.report_of(model) is None


# ---------------------------------------------------------------------------------------------
# group_norm


def test_group_norm_class_swap_keeps_hooks_and_values():
    norm = nn.GroupNorm(4, 16)
    seen = []
    norm.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 16, 3, 3)
    ref = norm(x).detach()
    report = optimize(norm)
    assert type(norm) is LdmGroupNorm and norm.activation is None and report.paths("group_norm") == ["<root>"]
    assert torch.equal(norm(x), ref) and torch.equal(seen[-1], ref)
    restore(norm)
    assert type(norm) is nn.GroupNorm and "activation" not in norm.__dict__


def test_compvis_group_norm32_becomes_ldm_group_norm32_and_its_sequential_fuses():
    torch.manual_seed(0)
    model = nn.Sequential(_compvis_block(), _compvis_block())
    for block in model:  # CompVis convert_to_fp16: convolutions in half precision, norms stay fp32
        block[2].to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    ref = model(x).detach()
    report = optimize(model)
    assert report.paths("group_norm") == ["0.0", "1.0"] and report.paths("group_norm_silu") == ["0", "1"]
    assert all(type(block[0]) is LdmGroupNorm32 and block[0].activation is None for block in model)
    assert all(type(block[1]) is nn.SiLU for block in model)  # the modules stay as they are
    assert torch.equal(model(x), ref)  # GroupNorm32: fp32 norm, cast, SiLU in bf16, as before
    with dm.kernels_forced() as launched:
        out = model(x)
    assert launched["group_norm"] == 2
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    restore(model)
    assert all(type(block[0]) is GroupNorm32 for block in model)


def test_unknown_subclass_and_instance_forward_left_with_the_reason():
    hooked_forward = nn.GroupNorm(2, 16)
    hooked_forward.forward = lambda x: nn.GroupNorm.forward(hooked_forward, x)  # as accelerate does
    model = nn.Sequential(ScaledGroupNorm(4, 16), nn.SiLU(), nn.GroupNorm(2, 16), hooked_forward)
    x = torch.randn(1, 16, 4, 4)
    ref = model(x).detach()
    report = optimize(model)
    assert type(model[0]) is ScaledGroupNorm and type(model[2]) is LdmGroupNorm and type(model[3]) is nn.GroupNorm
    left = {(item.path, item.what): item.reason for item in report.left}
    assert "whose forward is not known" in left["0", "group_norm"]
    assert "instance-level forward" in left["3", "group_norm"]
    assert "not a plain ldm_fast GroupNorm" in left["<root>", "group_norm_silu"]
    text = str(report)
    assert "left by group_norm (1): a GroupNorm subclass" in text and "\n    0\n" in text
    assert torch.equal(model(x), ref)
    restore(model)


def test_group_norm32_with_another_forward_left():
    class GroupNorm32(nn.GroupNorm):  # same name, not the CompVis forward (no upcast)
        def forward(self, x):
            return super().forward(x).type(x.dtype)

    model = nn.Sequential(GroupNorm32(4, 16), nn.SiLU())
    report = optimize(model)
    assert type(model[0]) is GroupNorm32 and "whose forward is not known" in report.left[0].reason
    restore(model)


def test_swap_sets_up_the_whole_ldm_fast_state():
    """A swapped module holds exactly what a freshly built ldm_fast GroupNorm holds (if ldm_fast.nn
    grows new state, the class swap must learn it: optimize refuses meanwhile)."""
    assert opt_patches._unknown_state(LdmGroupNorm) == () and opt_patches._unknown_state(LdmGroupNorm32) == ()
    swapped = nn.GroupNorm(4, 16)
    optimize(swapped)
    fresh = LdmGroupNorm(4, 16)
    assert set(swapped.__dict__) - {"_ldm_fast_optimized"} == set(fresh.__dict__)
    assert repr(swapped) == repr(fresh)
    assert type(restore(swapped)) is nn.GroupNorm and set(swapped.__dict__) == set(nn.GroupNorm(4, 16).__dict__)


# ---------------------------------------------------------------------------------------------
# group_norm_silu


def test_sequential_pair_runs_as_one_kernel_and_steps_aside_per_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1))
    norm, silu = model[0], model[1]
    x = torch.randn(2, 16, 8, 8)
    ref = model(x).detach()
    report = optimize(model)
    assert report.paths("group_norm_silu") == ["<root>"] and model[1] is silu
    assert list(model.state_dict().keys()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(model(x), ref)
    with torch.no_grad(), dm.kernels_forced() as launched:
        out = model(x)
        # a hook added after optimize sees the norm's output without the SiLU, as without ldm_fast
        seen = []
        handle = norm.register_forward_hook(lambda m, i, o: seen.append(o))
        hooked = model(x)
        handle.remove()
        model[1] = nn.Tanh()  # an entry replaced: the entries run one by one
        replaced = model(x)
        model[1] = silu
    assert launched["group_norm"] == 3
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, ref, rtol=1e-5, atol=1e-5)
    assert seen[0].min() < -0.5  # a norm's output, no SiLU applied (SiLU >= -0.28)
    torch.testing.assert_close(replaced, model[2](torch.tanh(norm(x))), rtol=1e-5, atol=1e-5)
    restore(model)
    assert model[1] is silu and type(model[0]) is nn.GroupNorm and "forward" not in model.__dict__


class _CompVisResBlock(nn.Module):
    """The shape of CompVis/ADM ``ResBlock``: with ``use_scale_shift_norm`` it calls ``out_layers[0]``
    (the norm) alone, modulates, then ``out_layers[1:]`` (SiLU, dropout, conv)."""

    def __init__(self, channels: int, use_scale_shift_norm: bool):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = nn.Linear(8, 2 * channels if use_scale_shift_norm else channels)
        self.out_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return x + h


@pytest.mark.parametrize("use_scale_shift_norm", [False, True])
def test_sequential_fused_only_where_its_holder_calls_it_whole(use_scale_shift_norm):
    torch.manual_seed(0)
    block = _CompVisResBlock(8, use_scale_shift_norm)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        expected = block(x, emb)
        report = optimize(block)
        with dm.kernels_forced() as launched:
            got = block(x, emb)
    # the class's code indexes and slices out_layers (in one branch: the check reads the code, not the
    # flag): reported left, with the reason; in_layers is only ever called whole
    assert report.paths("group_norm_silu") == ["in_layers"]
    assert any(item.path == "out_layers" and "other than by calling it whole" in item.reason for item in report.left)
    assert launched["group_norm"] == 2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    restore(block)


# ---------------------------------------------------------------------------------------------
# channels_last


def test_channels_last_identity_and_output():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    conv = unet.conv_in.weight
    params = [id(p) for p in unet.parameters()]
    report = optimize(unet, channels_last=True)
    assert [id(p) for p in unet.parameters()] == params
    assert unet.conv_in.weight is conv and conv.is_contiguous(memory_format=torch.channels_last)
    transformers = sorted(n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel")
    assert sorted(report.paths("channels_last")) == ["<root>"] + transformers
    # convolutions in another layout: another summation order on CPU, so not bit-identical
    torch.testing.assert_close(dm.run_unet(unet, inputs), ref, rtol=1e-5, atol=1e-5)
    restore(unet)
    assert unet.conv_in.weight is conv and all(p.is_contiguous() for p in unet.parameters())
    assert torch.equal(dm.run_unet(unet, inputs), ref)


# ---------------------------------------------------------------------------------------------
# pipelines


class _Pipeline:
    """What a diffusers pipeline holds (not an nn.Module): a U-Net and a VAE."""

    def __init__(self):
        self.unet = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, 4, 1))
        self.vae = nn.Module()
        self.vae.decoder = nn.Sequential(nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4), nn.SiLU())


def test_optimize_takes_a_pipeline():
    pipe = _Pipeline()
    x = torch.randn(1, 4, 3, 3)
    expected = pipe.vae.decoder(pipe.unet(x))
    report = optimize(pipe, channels_last=True)
    assert report.paths("group_norm_silu") == ["unet", "vae.decoder"]
    assert pipe.unet[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder[0].weight.is_contiguous()  # the decoder stays NCHW
    torch.testing.assert_close(pipe.vae.decoder(pipe.unet(x)), expected, rtol=0, atol=0)
    restore(pipe)
    assert type(pipe.vae.decoder[1]) is nn.GroupNorm and "forward" not in pipe.unet.__dict__
    with pytest.raises(TypeError, match="diffusers pipeline"):
        optimize(object())


def test_report_says_a_cpu_model_runs_its_own_code():
    report = optimize(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()))
    assert "runs its own code there" in str(report) and "no speed-up" in str(report)


# ---------------------------------------------------------------------------------------------
# cuda_graph: on CPU the plain forward; the cache logic through a CPU emulation of the CUDA calls


def test_cuda_graph_on_cpu_falls_back_and_reports():
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    report = optimize(unet, cuda_graph=True)
    note = next(n for n in report.notes if n.startswith("cuda_graph:"))
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        assert "not on CUDA" in note
    else:
        assert "CUDA is not available" in note
    assert isinstance(unet.forward, opt_mod.CUDAGraphForward)
    assert "encoder_hidden_states" in str(__import__("inspect").signature(unet.forward))
    assert torch.equal(dm.run_unet(unet, inputs), ref)
    assert unet.forward.stats == {"plain: inputs not on CUDA": 1}
    unet(*inputs).sample.sum().backward()  # gradients flow through the wrapper too (plain forward)
    assert unet.conv_in.weight.grad is not None
    restore(unet)
    assert "forward" not in unet.__dict__


def test_graph_key():
    x = torch.randn(2, 4, 8, 8)
    key, tensors = opt_mod.graph_key((x, 3), {"b": None, "a": {"s": 1.5, "t": [x]}})
    assert tensors == [x, x]
    same, _ = opt_mod.graph_key((torch.randn(2, 4, 8, 8), 3), {"a": {"s": 1.5, "t": [torch.zeros(2, 4, 8, 8)]}, "b": None})
    assert key == same  # values of tensors and the order of kwargs do not matter
    variants = [
        ((torch.randn(2, 4, 8, 9), 3), {}),  # shape
        ((x.double(), 3), {}),  # dtype
        ((x.contiguous(memory_format=torch.channels_last), 3), {}),  # layout (strides)
        ((x.requires_grad_(False).clone().requires_grad_(), 3), {}),  # requires_grad
        ((x, 4), {}),  # a non-tensor argument by value
        ((x, 3.0), {}),  # ... and type
        ((x, 3), {"return_dict": False}),
    ]
    keys = {opt_mod.graph_key(a, k)[0] for a, k in variants} | {opt_mod.graph_key((x, 3), {})[0]}
    assert len(keys) == len(variants) + 1
    with pytest.raises(opt_cuda_graph._NotGraphable, match="Generator"):
        opt_mod.graph_key((x,), {"generator": torch.Generator()})


def test_map_output_rebuilds_types():
    t = torch.randn(3)
    out = UNet2DConditionOutput(sample=t)
    rebuilt = opt_mod.map_output(torch.clone, out)
    assert type(rebuilt) is UNet2DConditionOutput and rebuilt.sample is not t and torch.equal(rebuilt.sample, t)
    assert rebuilt[0] is rebuilt.sample and rebuilt["sample"] is rebuilt.sample
    nested = opt_mod.map_output(torch.clone, ({"a": [t, None, 2]}, t))
    assert type(nested) is tuple and torch.equal(nested[0]["a"][0], t) and nested[0]["a"][1:] == [None, 2]
    assert nested[1] is not t
    with pytest.raises(opt_cuda_graph._NotGraphable):
        opt_mod.map_output(torch.clone, object())


class _FakeGraph:
    """A CPU stand-in for a captured graph: replay recomputes the captured function and writes the
    results into the captured output tensors (a real graph rewrites the same memory)."""

    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        fresh = []
        opt_mod.map_output(lambda t: fresh.append(t) or t, self.fn())
        it = iter(fresh)
        opt_mod.map_output(lambda t: t.copy_(next(it)), self.output)


class _FakeAPI(opt_mod.CUDAGraphAPI):
    device_type = "cpu"

    def __init__(self, fail=False):
        self.fail, self.warmups, self.captures = fail, 0, 0
        self.pools, self.capture_pools = 0, []

    def is_capturing(self):
        return False

    def warmup(self, device, fn, iters):
        self.warmups += iters
        for _ in range(iters):
            out = fn()
        return out

    def new_pool(self):
        self.pools += 1
        return ("pool", self.pools)

    def capture(self, device, fn, pool=None):
        self.captures += 1
        self.capture_pools.append(pool)
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = fn()
        return _FakeGraph(fn, out), out


class _Tiny(nn.Module):
    def __init__(self, inplace=False, output="tensor"):
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 1)
        self.inplace, self.output = inplace, output

    def forward(self, x, scale=1.0):
        if self.inplace:
            x.mul_(1.0)
        y = self.conv(self.norm(x)) * scale
        if self.output == "dict":
            return {"y": y, "n": None}
        if self.output == "base":
            return UNet2DConditionOutput(sample=y)
        return y


def _graphed(model, api):
    optimize(model, cuda_graph=True)
    model.forward.api = api
    return model


def test_cuda_graph_cache_logic_emulated():
    api = _FakeAPI()
    model = _graphed(_Tiny(), api)
    x1, x2 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        r1, r2 = type(model).forward(model, x1), type(model).forward(model, x2)
        y1 = model(x1)
        y2 = model(x2)
        assert api.captures == 1 and api.warmups == 3
        assert torch.equal(y1, r1) and torch.equal(y2, r2)  # y1 not overwritten by the second replay
        y3 = model(torch.randn(1, 4, 3, 3))  # new shape: a new graph
        model(x1, scale=2.0)  # new non-tensor value: a new graph
        assert api.captures == 3 and y3.shape[0] == 1
        assert model.forward.stats["graph replay"] == 4 and model.forward.stats["graph capture"] == 3
        stats = model.forward.stats
        # a model-wide re-assignment (.to()/.half()/.cuda() move every pointer, the sampled first and
        # last parameter's too): every graph dropped, captured again at the next call
        model.to(torch.float64).to(torch.float32)
        assert torch.equal(model(x1), r1) and stats["reset: parameters re-assigned"] == 1 and api.captures == 4
        # a parameter registered (module.w = nn.Parameter(...), load_state_dict(assign=True), an adapter
        # wrapping a layer): torch's registration hooks count it, the next call re-reads the model
        model.conv.weight = nn.Parameter(model.conv.weight.detach().clone())
        assert torch.equal(model(x1), r1) and stats["reset: parameters re-assigned"] == 2 and api.captures == 5
        # ... and a registration elsewhere in the process costs one re-read, no reset (nothing here moved)
        nn.Linear(2, 2)
        assert torch.equal(model(x1), r1) and stats["reset: parameters re-assigned"] == 2 and api.captures == 5
        # in-place updates are seen by the (emulated and real) graph
        model.conv.bias.add_(1.0)
        assert torch.allclose(model(x1), r1 + 1.0)
        # by contract not seen: ``.data =`` on a parameter that is not sampled. The storage the graphs
        # read stays allocated (a real graph computes with the old values, never reads freed memory)
        # until reset()
        old_pointer = model.conv.weight.data_ptr()
        model.conv.weight.data = model.conv.weight.detach().clone()
        model(x1)
        assert stats["reset: parameters re-assigned"] == 2 and api.captures == 5
        assert any(storage.data_ptr() == old_pointer for storage in model.forward._alive)
        model.forward.reset()
        model(x1)
        assert api.captures == 6 and all(storage.data_ptr() != old_pointer for storage in model.forward._alive)
        assert len(set(api.capture_pools)) == 4  # one pool per model shared by its graphs, a new one per reset
    # autograd needed: the plain forward
    out = model(x1)
    assert out.requires_grad and model.forward.stats["plain: autograd needed (grad enabled and something requires grad)"] == 1


@pytest.mark.parametrize("output", ["dict", "base"])
def test_cuda_graph_output_types_emulated(output):
    model = _graphed(_Tiny(output=output), _FakeAPI())
    x = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        a = model(x)
        b = model(x * 2)
    assert type(a) is type(b) and (dict if output == "dict" else UNet2DConditionOutput) is type(a)
    ya, yb = (a["y"], b["y"]) if output == "dict" else (a.sample, b.sample)
    assert not torch.equal(ya, yb) and model.forward.stats["graph replay"] == 2


def test_cuda_graph_ungraphable_calls_warn_once_and_run_plainly():
    model = _graphed(_Tiny(inplace=True), _FakeAPI())
    x = torch.randn(1, 4, 2, 2)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ref = type(model).forward(model, x.clone())
        assert torch.equal(model(x.clone()), ref) and torch.equal(model(x.clone()), ref)
    assert [str(w.message) for w in caught if "in place" in str(w.message)] != []
    assert len([w for w in caught if "ldm_fast cuda_graph" in str(w.message)]) == 1

    api = _FakeAPI(fail=True)
    model = _graphed(_Tiny(), api)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="capture failed: RuntimeError"):
        assert torch.equal(model(x), type(model).forward(model, x))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second capture
        model(x)
    assert api.captures == 1

    model = _graphed(_Tiny(), _FakeAPI())
    model.forward.max_signatures = 1
    with torch.no_grad():
        model(x)
        with pytest.warns(RuntimeWarning, match="more than 1 call signatures"):
            model(torch.randn(1, 4, 3, 3))


def test_cuda_graph_unet_emulated():
    """The whole diffusers UNet through the graph path (emulated): UNet2DConditionOutput rebuilt,
    outputs equal to the plain model's, the caller's output not overwritten by the next replay."""
    unet = dm.unet()
    a, b = dm.unet_inputs(1), dm.unet_inputs(2)
    ref_a, ref_b = dm.run_unet(unet, a), dm.run_unet(unet, b)
    api = _FakeAPI()
    _graphed(unet, api)
    with torch.no_grad():
        out_a = unet(*a)
        out_b = unet(*b)
    assert type(out_a) is UNet2DConditionOutput and api.captures == 1
    assert torch.equal(out_a.sample, ref_a) and torch.equal(out_b.sample, ref_b)
    assert unet.forward.stats["graph replay"] == 2


class _Timed(nn.Module):
    """A forward whose ``t`` is annotated as diffusers annotates ``timestep``: a tensor or a number."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.cache_states = []

    def forward(self, x, t: "torch.Tensor | float | int", scale=1.0):
        self.cache_states.append(torch.is_autocast_cache_enabled())
        t = t if torch.is_tensor(t) else torch.tensor([t], device=x.device)  # diffusers' own conversion
        return self.conv(x) * (t.float() * scale)


def test_cuda_graph_scalar_timesteps_are_inputs_emulated():
    """A Python number for a parameter annotated tensor-or-number is an input (a 0-d tensor filled per
    call): one graph for every timestep, its replays equal the plain forward at each value; other
    numbers are keyed by value; the ints and floats get one graph each (their dtypes differ)."""
    assert opt_cuda_graph.scalar_parameters(_Timed().forward) == ("t",)
    assert opt_cuda_graph.scalar_parameters(dm.unet().forward) == ("timestep",)
    api = _FakeAPI()
    model = _graphed(_Timed(), api)
    x = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        for t in (1, 500, 999):
            assert torch.equal(model(x, t), type(model).forward(model, x, t)), t
        assert api.captures == 1 and model.forward.stats["graph replay"] == 3
        for t in (7, 8):  # by keyword too (the call's structure is part of the key: one more graph)
            assert torch.equal(model(x, t=t), type(model).forward(model, x, t))
        assert api.captures == 2
        assert torch.equal(model(x, 0.5), type(model).forward(model, x, 0.5)) and api.captures == 3
        model(x, 3, 2.0)  # ``scale`` is not annotated: keyed by value
        model(x, 4, 2.0)
        assert api.captures == 4
    assert model.forward.scalar_inputs == ("t",)
    assert set(api.capture_pools) == {("pool", 1)}  # the graphs share one memory pool

    unet = dm.unet()
    sample, _, context = dm.unet_inputs()
    api = _FakeAPI()
    _graphed(unet, api)
    with torch.no_grad():
        for t in (10, 500, 999):
            want = type(unet).forward(unet, sample, t, encoder_hidden_states=context).sample
            assert torch.equal(unet(sample, t, encoder_hidden_states=context).sample, want), t
    assert api.captures == 1 and unet.forward.stats["graph replay"] == 3


def test_cuda_graph_captures_without_the_autocast_weight_cache_emulated():
    """Under autocast the warm-up and the capture run with autocast's weight-cast cache off (a cached
    cast freed at the end of the caller's autocast region would be read by later replays); the
    caller's cache setting is back afterwards; autocast on or off are two graphs."""
    api = _FakeAPI()
    model = _graphed(_Timed(), api)
    x = torch.randn(1, 4, 2, 2)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.is_autocast_cache_enabled()
            y = model(x, 3)
            assert torch.is_autocast_cache_enabled()
        assert y.dtype == torch.bfloat16 and api.captures == 1
        assert model.cache_states and not any(model.cache_states), model.cache_states  # warm-up, capture, replay
        model.cache_states.clear()
        assert model(x, 3).dtype == torch.float32 and api.captures == 2
        assert model.cache_states == [True] * len(model.cache_states)  # no autocast: nothing changed


def test_cuda_graph_under_inference_mode_emulated():
    """Under inference_mode the inputs are inference tensors, which have no version counter: the
    static inputs are normal tensors, so the in-place check and the replays work."""
    api = _FakeAPI()
    model = _graphed(_Tiny(), api)
    with torch.inference_mode():
        xs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
        outs = [model(x) for x in xs]
        refs = [type(model).forward(model, x) for x in xs]
    assert api.captures == 1 and model.forward.stats["graph replay"] == 3
    assert all(torch.equal(a, b) for a, b in zip(outs, refs))
    inplace = _graphed(_Tiny(inplace=True), _FakeAPI())
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="modifies its inputs in place"):
        inplace(torch.randn(1, 4, 2, 2))


def test_cuda_graph_replay_does_not_walk_the_model_emulated(monkeypatch):
    """O(inputs) per call under no_grad: after the capture a replay never lists the parameters or
    buffers (they raise here); with grad enabled it reads requires_grad of the parameters it knows."""
    api = _FakeAPI()
    model = _graphed(_Tiny(), api)
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        model(x)

    def walked(*args, **kwargs):
        raise AssertionError("the replay path walked the model")

    monkeypatch.setattr(model, "parameters", walked)
    monkeypatch.setattr(model, "buffers", walked)
    with torch.no_grad():
        model(x)
        model(x)
    for p in model.forward._params:
        p.requires_grad_(False)
    model(x)  # grad enabled, every parameter frozen: the graph
    assert model.forward.stats["graph replay"] == 4 and api.captures == 2  # (grad mode is part of the key)
    model.forward._params[0].requires_grad_(True)
    assert model(x).requires_grad  # a parameter that wants a gradient: the plain forward


def test_cuda_graph_keys_on_the_global_switches_emulated(monkeypatch):
    """TF32 / cuDNN switches, the SDPA backends, LDM_FAST_ATTENTION (after reload_env) and global
    forward hooks each change which kernels eager torch or ldm_fast would run: a new graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    api = _FakeAPI()
    model = _graphed(_Tiny(), api)
    x = torch.randn(2, 4, 3, 3)
    tf32 = torch.backends.cudnn.allow_tf32
    with torch.no_grad():
        model(x)
        model(x)
        assert api.captures == 1
        torch.backends.cudnn.allow_tf32 = not tf32
        try:
            model(x)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        assert api.captures == 2
        with sdpa_kernel(SDPBackend.MATH):
            model(x)
        assert api.captures == 3
        monkeypatch.setenv("LDM_FAST_ATTENTION", "sdpa")
        ldm_fast.backend.reload_env()
        model(x)
        assert api.captures == 4
        monkeypatch.delenv("LDM_FAST_ATTENTION")
        ldm_fast.backend.reload_env()
        handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
        try:
            model(x)
        finally:
            handle.remove()
        assert api.captures == 5
        model(x)  # everything back: the first graph again
        assert api.captures == 5 and model.forward.stats["graph replay"] == 7


@pytest.mark.slow
def test_cuda_graph_sees_a_lora_adapter_and_its_fuse_emulated():
    """A PEFT LoRA adapter added after capture wraps the attention projections: torch's registration
    hooks count it, the next call re-reads the model and captures again (the adapter is in the new
    graph); fuse_lora merges in place but switches the layers' forward (Python state): by contract
    reset() after it, then the graph equals the plain forward with the fused weights."""
    pytest.importorskip("peft", reason="peft (diffusers' LoRA backend) is not installed")
    from peft import LoraConfig

    unet = dm.unet()
    sample, t, context = dm.unet_inputs()
    api = _FakeAPI()
    _graphed(unet, api)
    plain = unet.forward._plain
    with torch.no_grad():
        before = unet(sample, t, encoder_hidden_states=context).sample
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
        with_adapter = unet(sample, t, encoder_hidden_states=context).sample
        assert api.captures == 2 and unet.forward.stats["reset: parameters re-assigned"] == 1
        assert torch.equal(with_adapter, plain(sample, t, encoder_hidden_states=context).sample)
        assert not torch.allclose(with_adapter, before, atol=1e-3)  # the adapter changes the output
        unet.fuse_lora()
        unet.forward.reset()
        fused = unet(sample, t, encoder_hidden_states=context).sample
        assert api.captures == 3
        torch.testing.assert_close(fused, plain(sample, t, encoder_hidden_states=context).sample)
        torch.testing.assert_close(fused, with_adapter, rtol=1e-4, atol=1e-5)  # merged == adapter applied


# ---------------------------------------------------------------------------------------------
# torch.compile over an optimized model


def _compiled_graph_ops(model, sample, t, context):
    """The call_function targets of every FX graph torch.compile builds for one U-Net call, and the
    number of graphs (one: no graph break)."""
    import collections

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(sample, t, encoder_hidden_states=context)
    ops = collections.Counter(str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function")
    return ops, len(graphs)


@pytest.mark.slow
def test_compile_over_optimize_builds_the_graph_compile_builds_without(monkeypatch):
    """LDM_FAST_COMPILE=auto at U-Net-sized groups: torch.compile of the optimized U-Net traces
    exactly the ops it traces for the plain one, in one graph, so Inductor compiles the same code
    (compile with ldm_fast is never slower there). With LDM_FAST_COMPILE=kernel every norm that is
    a module is one ldm_fast op in the graph (the fused blocks trace diffusers' own forwards)."""
    monkeypatch.delenv("LDM_FAST_COMPILE", raising=False)
    ldm_fast.backend.reload_env()
    model = dm.unet()
    sample, t, context = dm.unet_inputs()
    with ldm_fast.use_backend("triton"):
        plain, n_plain = _compiled_graph_ops(model, sample, t, context)
        optimize(model)
        ours, n_ours = _compiled_graph_ops(model, sample, t, context)
        assert n_plain == n_ours == 1 and ours == plain
        monkeypatch.setenv("LDM_FAST_COMPILE", "kernel")
        ldm_fast.backend.reload_env()
        kernel_ops, _ = _compiled_graph_ops(model, sample, t, context)
    norms = sum(1 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert kernel_ops["ldm_fast.group_norm"] == norms
    restore(model)
