"""ldm_fast.optimize / restore: diffusers UNet and VAE, CompVis-style Sequentials, identity of modules
and parameters, hooks, optimizers, gradients, channels_last, and the CUDA-graph cache logic
(emulated on CPU: there is no GPU here)."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import ldm_fast
import importlib


from ldm_fast.optimize import cuda_graph as opt_cuda_graph
from ldm_fast.optimize import passes as opt_passes
from ldm_fast.optimize import undo as opt_undo

opt_mod = importlib.import_module("ldm_fast.optimize")  # the package (ldm_fast.optimize is the function)
from ldm_fast.nn import GroupNorm as LdmGroupNorm
from ldm_fast.nn import GroupNorm32 as LdmGroupNorm32
from ldm_fast import optimize, restore
from _numerics import assert_close_to_exact

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput  # noqa: E402

# Whole-model tolerance with the Triton kernels (interpreted, fp32): each GroupNorm's statistics
# are computed in fp32 in another order than ATen's (chunked two-pass sums), ~1e-6 relative per
# norm; ~20 norms, convolutions and attention in sequence amplify that to a few 1e-6..1e-5. 1e-4
# relative to the output's scale leaves an order of magnitude of margin yet catches any real
# mistake (a missing SiLU or a wrong group is O(1)).
TRITON_RTOL = 1e-4


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 32, generator=g)


def _vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()


def _image(seed=2):
    return torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def _run_vae(vae, image):
    with torch.no_grad():
        return vae(image, sample_posterior=False).sample


def _assert_close_rel(actual, expected, rtol):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


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
# diffusers models: outputs, report, restore


def test_unet_default_backend_exact_and_restore_round_trip():
    unet = _unet()
    inputs = _unet_inputs()
    ref = _run_unet(unet, inputs)
    norms = {name: type(m) for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)}
    report = optimize(unet)

    assert report.counts["GroupNorm -> ldm_fast GroupNorm"] == len(norms) == 21
    # every ResnetBlock2D (down, mid, up) is fused, both norms
    blocks = [name for name, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]
    assert sorted(report.paths(opt_mod.RESNET_FORWARD)) == sorted(blocks)
    # and conv_norm_out, which the U-Net's forward calls right before conv_act
    assert sorted(report.paths(opt_mod.FUSED)) == sorted(
        [f"{b}.{n}" for b in blocks for n in ("norm1", "norm2")] + ["conv_norm_out"])
    assert report.left == []
    text = str(report)
    assert "21 GroupNorm -> ldm_fast" in text and f"{2 * len(blocks) + 1} GroupNorm+SiLU fused" in text
    assert "cuda_graph: off" in text and "channels_last: off" in text
    block = unet.down_blocks[0].resnets[0]
    assert type(block.norm1) is LdmGroupNorm and block.norm1.activation == "silu"
    assert type(unet.conv_norm_out) is LdmGroupNorm and unet.conv_norm_out.activation == "silu"
    assert isinstance(unet.conv_act, nn.Identity)
    assert type(block.nonlinearity) is nn.SiLU  # still applied to temb
    assert opt_mod.report_of(unet) is report

    # eager backend on CPU: F.silu(F.group_norm(...)), the very ops the original ran
    assert torch.equal(_run_unet(unet, inputs), ref)

    assert restore(unet) is unet
    assert {name: type(m) for name, m in unet.named_modules() if isinstance(m, nn.GroupNorm)} == norms
    assert all("activation" not in m.__dict__ and "forward" not in m.__dict__ for m in unet.modules())
    assert opt_mod.report_of(unet) is None
    assert torch.equal(_run_unet(unet, inputs), ref)


def test_unet_triton_kernels_match():
    unet = _unet()
    inputs = _unet_inputs()
    ref = _run_unet(unet, inputs)
    optimize(unet)
    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("triton"):
        out = _run_unet(unet, inputs)
    # 21 norms, each at least one launch (the kernels ran, under the interpreter)
    assert ldm_fast.ops.kernel_launches["group_norm"] - before >= 21
    _assert_close_rel(out, ref, TRITON_RTOL)


def test_vae_default_backend_exact_and_triton_kernels_match():
    vae = _vae()
    image = _image()
    ref = _run_vae(vae, image)
    report = optimize(vae)
    n_norms = sum(isinstance(m, nn.GroupNorm) for m in vae.modules())
    assert report.counts["GroupNorm -> ldm_fast GroupNorm"] == n_norms
    n_blocks = sum(isinstance(m, ResnetBlock2D) for m in vae.modules())
    # (+ the encoder's conv_norm_out, called right before its conv_act; the decoder's is left)
    assert report.counts[opt_mod.RESNET_FORWARD] == n_blocks and report.counts[opt_mod.FUSED] == 2 * n_blocks + 1
    assert torch.equal(_run_vae(vae, image), ref)

    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("triton"):
        out = _run_vae(vae, image)
    assert ldm_fast.ops.kernel_launches["group_norm"] - before >= n_norms
    _assert_close_rel(out, ref, TRITON_RTOL)
    restore(vae)
    assert torch.equal(_run_vae(vae, image), ref)


# ---------------------------------------------------------------------------------------------
# identity: parameters, state dict, hooks, optimizer, gradients


def test_parameter_identity_state_dict_hooks_and_optimizer():
    unet = _unet()
    inputs = _unet_inputs()
    ids = [id(p) for p in unet.parameters()]
    keys = list(unet.state_dict().keys())
    module_ids = [id(m) for m in unet.modules()]
    seen = []
    unet.conv_norm_out.register_forward_hook(lambda m, i, o: seen.append("conv_norm_out"))
    hooked = unet.down_blocks[0].resnets[0].norm1
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    sgd = torch.optim.SGD(unet.parameters(), lr=0.1)

    report = optimize(unet)
    assert [id(p) for p in unet.parameters()] == ids
    assert list(unet.state_dict().keys()) == keys
    assert [id(m) for m in unet.modules()] == module_ids
    # the hooked norm is converted but not fused (its hook would see the SiLU output); reported
    assert type(hooked) is LdmGroupNorm and hooked.activation is None
    left = {item.path: item.reason for item in report.left}
    assert "forward hooks" in left["down_blocks.0.resnets.0.norm1"]
    assert "down_blocks.0.resnets.0.norm2" in report.paths(opt_mod.FUSED)

    out = unet(*inputs).sample
    assert "conv_norm_out" in seen
    hooked_out = [s for s in seen if isinstance(s, torch.Tensor)]
    assert len(hooked_out) == 1 and hooked_out[0].min() < -0.5  # a norm's output, no SiLU applied (SiLU >= -0.28)

    # an optimizer built before optimize still drives the parameters the model uses
    loss = out.square().mean()
    loss.backward()
    sgd.step()
    with torch.no_grad():
        assert not torch.allclose(unet(*inputs).sample, out)

    restore(unet)
    assert [id(p) for p in unet.parameters()] == ids
    assert list(unet.state_dict().keys()) == keys


def test_gradients_match_original():
    ref_model = _unet()
    model = copy.deepcopy(ref_model)
    optimize(model)
    inputs = _unet_inputs()
    ref_model(*inputs).sample.square().mean().backward()
    model(*inputs).sample.square().mean().backward()
    ref_grads = dict(ref_model.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        g = ref_grads[name].grad
        if g is None:
            assert p.grad is None
            continue
        n += 1
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7, msg=name)
    assert n > 100


def test_deepcopy_and_pickle_of_an_optimized_model_restore_on_their_own():
    unet = _unet()
    inputs = _unet_inputs()
    ref = _run_unet(unet, inputs)
    optimize(unet, cuda_graph=True)
    twin = copy.deepcopy(unet)
    buf = io.BytesIO()
    torch.save(unet, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (twin, loaded):
        assert isinstance(m.forward, opt_mod.CUDAGraphForward) and m.forward.model is m
        assert m.down_blocks[0].resnets[0].forward.block is m.down_blocks[0].resnets[0]
        assert torch.equal(_run_unet(m, inputs), ref)
        restore(m)
        assert all(type(x) is not LdmGroupNorm and "forward" not in x.__dict__ for x in m.modules())
        assert torch.equal(_run_unet(m, inputs), ref)
    assert type(unet.conv_norm_out) is LdmGroupNorm  # the original is untouched by the copies' restore


# ---------------------------------------------------------------------------------------------
# pass rules


def test_sequential_fused_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1))
    silu = model[1]
    x = torch.randn(2, 16, 8, 8)
    ref = model(x).detach()
    report = optimize(model)
    assert report.paths(opt_mod.FUSED) == ["0"] and report.paths(opt_mod.SEQUENTIAL_SILU) == ["1"]
    assert type(model[0]) is LdmGroupNorm and model[0].activation == "silu" and type(model[1]) is nn.Identity
    assert list(model.state_dict().keys()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(model(x), ref)
    before = ldm_fast.ops.kernel_launches["group_norm"]
    with ldm_fast.use_backend("triton"):
        out = model(x)
    assert ldm_fast.ops.kernel_launches["group_norm"] > before
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    restore(model)
    assert model[1] is silu and type(model[0]) is nn.GroupNorm and "activation" not in model[0].__dict__
    assert torch.equal(model(x), ref)


def test_compvis_group_norm32_becomes_ldm_group_norm32_and_fuses():
    torch.manual_seed(0)
    model = nn.Sequential(_compvis_block(), _compvis_block())
    for block in model:  # CompVis convert_to_fp16: convolutions in half precision, norms stay fp32
        block[2].to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16)
    ref = model(x).detach()
    report = optimize(model)
    assert report.counts["GroupNorm32 -> ldm_fast GroupNorm32"] == 2
    assert report.paths(opt_mod.FUSED) == ["0.0", "1.0"]
    assert all(type(block[0]) is LdmGroupNorm32 and block[0].activation == "silu" for block in model)
    assert torch.equal(model(x), ref)  # eager GroupNorm32: fp32 norm, cast, SiLU in bf16, as before
    restore(model)
    assert all(type(block[0]) is GroupNorm32 and type(block[1]) is nn.SiLU for block in model)


def test_conv_norm_out_and_conv_act_fused_where_called_as_one_pair():
    """UNet2DConditionModel and the VAE Encoder call ``conv_norm_out`` then ``conv_act`` as one
    adjacent pair (read from the class source): the norm takes the SiLU and conv_act becomes
    nn.Identity (exact on the eager backend; restore puts the SiLU object back). The VAE Decoder calls
    them apart (its latent_embeds branch): left with the reason."""
    unet, vae = _unet(), _vae()
    inputs, image = _unet_inputs(), _image()
    ref_unet, ref_vae = _run_unet(unet, inputs), _run_vae(vae, image)
    silu, enc_silu, dec_silu = unet.conv_act, vae.encoder.conv_act, vae.decoder.conv_act
    report = optimize(unet)
    assert isinstance(unet.conv_act, nn.Identity) and unet.conv_norm_out.activation == "silu"
    assert "conv_act" in report.paths(opt_mod.SEQUENTIAL_SILU)
    assert torch.equal(_run_unet(unet, inputs), ref_unet)
    report = optimize(vae)
    assert isinstance(vae.encoder.conv_act, nn.Identity) and vae.decoder.conv_act is dec_silu
    left = {item.path: item.reason for item in report.left}
    assert "adjacent pair" in left["decoder.conv_norm_out"]
    assert torch.equal(_run_vae(vae, image), ref_vae)
    restore(unet)
    restore(vae)
    assert unet.conv_act is silu and vae.encoder.conv_act is enc_silu
    assert unet.conv_norm_out.__dict__.get("activation") is None


def test_attribute_pair_check_reads_every_use():
    """A norm/SiLU pair used anywhere else (apart, or the SiLU on another tensor) is not fused."""
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_norm_out, self.conv_act = nn.GroupNorm(2, 4), nn.SiLU()

    class Together(Pair):
        def forward(self, x):
            x = self.conv_norm_out(x)
            x = self.conv_act(x)
            return x

    class Apart(Pair):
        def forward(self, x):
            x = self.conv_norm_out(x)
            x = self.conv_act(x)
            return x + self.conv_act(x)  # a second SiLU use

    assert not opt_passes._class_calls_as_pair(Apart, "conv_norm_out", "conv_act")
    assert opt_passes._class_calls_as_pair(Together, "conv_norm_out", "conv_act")
    model = nn.ModuleDict({"apart": Apart(), "together": Together()})
    x = torch.randn(2, 4, 3, 3)
    ref = (model["apart"](x), model["together"](x))
    report = optimize(model)
    assert isinstance(model["together"].conv_act, nn.Identity) and type(model["apart"].conv_act) is nn.SiLU
    assert "apart.conv_norm_out" in {item.path for item in report.left}
    assert torch.equal(model["apart"](x), ref[0]) and torch.equal(model["together"](x), ref[1])
    restore(model)


def test_unknown_subclass_left_with_reason():
    model = nn.Sequential(ScaledGroupNorm(4, 16), nn.SiLU(), nn.GroupNorm(2, 16))
    x = torch.randn(1, 16, 4, 4)
    ref = model(x).detach()
    report = optimize(model)
    assert type(model[0]) is ScaledGroupNorm and type(model[1]) is nn.SiLU and type(model[2]) is LdmGroupNorm
    left = {item.path: item for item in report.left}
    # one item per module, with the root cause (not also "not fused" for the Sequential pattern)
    assert len(report.left) == 1 and left["0"].what == "ScaledGroupNorm"
    assert "whose forward is not known" in left["0"].reason
    assert "left: 0 (ScaledGroupNorm)" in str(report)
    assert torch.equal(model(x), ref)


def test_group_norm32_with_another_forward_left():
    class GroupNorm32(nn.GroupNorm):  # same name, not the CompVis forward (no upcast)
        def forward(self, x):
            return super().forward(x).type(x.dtype)

    model = nn.Sequential(GroupNorm32(4, 16), nn.SiLU())
    report = optimize(model)
    assert type(model[0]) is GroupNorm32 and type(model[1]) is nn.SiLU
    assert "whose forward is not known" in report.left[0].reason
    restore(model)


def test_shared_norm_and_instance_forward_not_fused():
    shared = nn.GroupNorm(4, 16)
    hooked_forward = nn.GroupNorm(4, 16)
    hooked_forward.forward = lambda x: nn.GroupNorm.forward(hooked_forward, x)  # as accelerate does
    model = nn.Sequential(nn.Sequential(shared, nn.SiLU()), nn.Sequential(shared), nn.Sequential(hooked_forward, nn.SiLU()))
    x = torch.randn(1, 16, 4, 4)
    ref = model(x).detach()
    report = optimize(model)
    left = {item.path: item.reason for item in report.left}
    assert "shared" in left["0.0"] and "instance-level forward" in left["2.0"]
    assert type(hooked_forward) is nn.GroupNorm and type(shared) is LdmGroupNorm and shared.activation is None
    assert report.counts.get(opt_mod.FUSED, 0) == 0
    assert torch.equal(model(x), ref)
    restore(model)


@pytest.mark.parametrize("kwargs", [
    dict(time_embedding_norm="scale_shift"),
    dict(time_embedding_norm="default", up=True),
    dict(time_embedding_norm="default", down=True, out_channels=32),
])
def test_resnet_block_variants(kwargs):
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, **kwargs).eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    ref = block(x, temb).detach()
    report = optimize(block)
    scale_shift = kwargs["time_embedding_norm"] == "scale_shift"
    assert report.paths(opt_mod.FUSED) == (["norm1"] if scale_shift else ["norm1", "norm2"])
    if scale_shift:
        assert "scale_shift" in {i.path: i.reason for i in report.left}["norm2"]
        assert block.norm2.activation is None
    assert block.forward.fuse_norm1 and block.forward.fuse_norm2 is not scale_shift
    assert torch.equal(block(x, temb), ref)
    with ldm_fast.use_backend("triton"):
        torch.testing.assert_close(block(x, temb), ref, rtol=1e-5, atol=1e-5)
    restore(block)
    assert "forward" not in block.__dict__
    assert torch.equal(block(x, temb), ref)


from _dispatch import DispatchedOps as _DispatchedOps  # noqa: E402


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_resnet_block_skips_a_division_by_one_bit_for_bit(factor):
    """``(x + h) / output_scale_factor`` is x + h bit for bit when the factor is 1: no divide is dispatched."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, output_scale_factor=factor).eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    with torch.no_grad():
        ref = block(x, temb)
        optimize(block)
        with _DispatchedOps() as ops:
            out = block(x, temb)
    assert torch.equal(out, ref)
    assert ("aten::div" in ops.names) == (factor != 1.0), ops.names
    restore(block)


def test_resnet_block_other_activation_or_other_forward_not_fused(monkeypatch):
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4, non_linearity="mish")
    report = optimize(block)
    assert "Mish" in report.left[0].reason and report.counts.get(opt_mod.FUSED, 0) == 0
    assert report.counts["GroupNorm -> ldm_fast GroupNorm"] == 2  # still converted, just not fused
    restore(block)

    # another diffusers version's ResnetBlock2D.forward: never run through the 0.42 reimplementation
    monkeypatch.setattr(ldm_fast.integrations.diffusers, "_RESNET_FORWARD_AST_SHA256", set())
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4)
    report = optimize(block)
    assert "differs from the diffusers 0.42 forward" in report.left[0].reason
    assert "forward" not in block.__dict__ and block.norm1.activation is None
    assert report.counts["GroupNorm -> ldm_fast GroupNorm"] == 2


def test_swap_sets_up_the_whole_ldm_fast_state():
    """A swapped module holds exactly what a freshly built ldm_fast GroupNorm holds (if ldm_fast.nn
    grows new state, the class swap must learn it: optimize refuses meanwhile)."""
    assert opt_passes._unknown_state(LdmGroupNorm) == () and opt_passes._unknown_state(LdmGroupNorm32) == ()
    swapped = nn.GroupNorm(4, 16)
    optimize(swapped)
    fresh = LdmGroupNorm(4, 16)
    assert set(swapped.__dict__) - {opt_undo._STATE_ATTR} == set(fresh.__dict__)
    assert repr(swapped) == repr(fresh)
    assert type(restore(swapped)) is nn.GroupNorm and set(swapped.__dict__) == set(nn.GroupNorm(4, 16).__dict__)


def test_optimize_twice_raises_and_restore_unoptimized_raises():
    model = _compvis_block()
    with pytest.raises(ValueError, match="was not optimized"):
        restore(model)
    optimize(model)
    with pytest.raises(RuntimeError, match="already optimized"):
        optimize(model)
    outer = nn.Sequential(model)
    with pytest.raises(RuntimeError, match="submodule '0' is already optimized"):
        optimize(outer)
    restore(model)
    with pytest.raises(ValueError, match="already restored"):
        restore(model)
    optimize(model, channels_last=True)  # after restore, optimize again with other options
    restore(model)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        optimize(model, channels_last="yes")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        optimize(lambda x: x)


def test_restore_refuses_when_a_change_was_replaced():
    model = _compvis_block()
    optimize(model)
    model[1] = nn.ReLU()  # the Identity optimize put there was replaced by the user
    with pytest.raises(ValueError, match="entry '1'.*replaced after optimize"):
        restore(model)
    assert type(model[0]) is LdmGroupNorm32  # nothing was undone


def test_group_norm_false_changes_nothing():
    model = _compvis_block()
    report = optimize(model, group_norm=False)
    assert report.changed == [] and type(model[0]) is GroupNorm32
    restore(model)


# ---------------------------------------------------------------------------------------------
# channels_last


def test_channels_last_identity_and_output():
    unet = _unet()
    inputs = _unet_inputs()
    ref = _run_unet(unet, inputs)
    params = list(unet.parameters())
    conv = unet.conv_in.weight
    report = optimize(unet, channels_last=True)
    assert [id(p) for p in unet.parameters()] == [id(p) for p in params]
    assert unet.conv_in.weight is conv and conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    assert any(n.startswith("channels_last: ") and "stored channels-last" in n for n in report.notes)
    # convolutions in another layout: another summation order on CPU, so not bit-identical
    torch.testing.assert_close(_run_unet(unet, inputs), ref, rtol=1e-5, atol=1e-5)
    restore(unet)
    assert unet.conv_in.weight is conv and conv.is_contiguous()
    assert all(p.is_contiguous() for p in unet.parameters())
    assert torch.equal(_run_unet(unet, inputs), ref)


# ---------------------------------------------------------------------------------------------
# cuda_graph: on CPU the plain forward; the cache logic through a CPU emulation of the CUDA calls


def test_cuda_graph_on_cpu_falls_back_and_reports():
    unet = _unet()
    inputs = _unet_inputs()
    ref = _run_unet(unet, inputs)
    report = optimize(unet, cuda_graph=True)
    note = next(n for n in report.notes if n.startswith("cuda_graph:"))
    if torch.cuda.is_available():  # pragma: no cover - CPU-only CI
        assert "not on CUDA" in note
    else:
        assert "CUDA is not available" in note
    assert isinstance(unet.forward, opt_mod.CUDAGraphForward)
    assert "encoder_hidden_states" in str(__import__("inspect").signature(unet.forward))
    assert torch.equal(_run_unet(unet, inputs), ref)
    assert unet.forward.stats == {"plain: inputs not on CUDA": 1}
    # gradients flow through the wrapper too (plain forward)
    unet(*inputs).sample.sum().backward()
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
    unet = _unet()
    a, b = _unet_inputs(1), _unet_inputs(2)
    ref_a, ref_b = _run_unet(unet, a), _run_unet(unet, b)
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
    assert opt_cuda_graph.scalar_parameters(_unet().forward) == ("timestep",)
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

    unet = _unet()
    sample, _, context = _unet_inputs()
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


def test_cuda_graph_sees_a_lora_adapter_and_its_fuse_emulated():
    """A PEFT LoRA adapter added after capture wraps the attention projections: torch's registration
    hooks count it, the next call re-reads the model and captures again (the adapter is in the new
    graph); fuse_lora merges in place but switches the layers' forward (Python state): by contract
    reset() after it, then the graph equals the plain forward with the fused weights."""
    pytest.importorskip("peft", reason="peft (diffusers' LoRA backend) is not installed")
    from peft import LoraConfig

    unet = _unet()
    sample, t, context = _unet_inputs()
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


def test_compile_over_optimize_builds_the_graph_compile_builds_without(monkeypatch):
    """LDM_FAST_COMPILE=auto at U-Net-sized groups: torch.compile of the optimized U-Net traces
    exactly the ops it traces for the plain one, in one graph, so Inductor compiles the same code
    (compile with ldm_fast is never slower there). With LDM_FAST_COMPILE=kernel every fused norm is
    one ldm_fast op in the graph."""
    monkeypatch.delenv("LDM_FAST_COMPILE", raising=False)
    ldm_fast.backend.reload_env()
    model = _unet()
    sample, t, context = _unet_inputs()
    with ldm_fast.use_backend("triton"):
        plain, n_plain = _compiled_graph_ops(model, sample, t, context)
        report = optimize(model)
        ours, n_ours = _compiled_graph_ops(model, sample, t, context)
        assert n_plain == n_ours == 1 and ours == plain
        monkeypatch.setenv("LDM_FAST_COMPILE", "kernel")
        ldm_fast.backend.reload_env()
        kernel_ops, _ = _compiled_graph_ops(model, sample, t, context)
    norms = sum(1 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert kernel_ops["ldm_fast.group_norm"] == norms and report.counts
    restore(model)


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_block_adds_the_time_embedding_inside_norm2(channels_last, poison):
    """time_embedding_norm="default": norm2(h + temb) becomes norm2(h, shift=temb): bit for bit on the eager
    backend, within the kernel's error bound interpreted (forward and gradients), the add never dispatched."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=16, temb_channels=8, groups=4).eval()
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, 8)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = block(x, temb).detach()
    x.requires_grad_(True)
    block(x, temb).square().sum().backward()
    ref_dx, ref_dw = x.grad.clone(), block.time_emb_proj.weight.grad.clone()
    x.grad = None
    block.zero_grad()
    optimize(block, channels_last=channels_last)
    assert block.forward.fuse_shift
    with torch.no_grad():
        assert torch.equal(block(x, temb), ref)  # eager backend: exactly norm2(h + temb)
    with ldm_fast.use_backend("triton"):
        before = ldm_fast.ops.kernel_launches["group_norm"]
        with torch.no_grad(), _DispatchedOps() as ops:
            out = block(x, temb)
        assert ldm_fast.ops.kernel_launches["group_norm"] - before == 2  # norm1, norm2 (+temb) fused
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert ops.names.count("aten::add") == 1, ops.names  # only the residual add; temb's is in norm2
        block(x, temb).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.time_emb_proj.weight.grad, ref_dw, rtol=1e-4, atol=1e-4)
    restore(block)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_resnet_block_runs_its_1x1_shortcut_as_a_gemm_onto_conv2(channels_last, dtype):
    """A ResnetBlock2D with a 1x1 conv_shortcut (channels change): in inference on the Triton backend,
    conv2 carries both biases and the shortcut is one GEMM accumulating onto conv2's output (addmm on the
    channels-last [B*H*W, C] views, baddbmm on NCHW [B, C, H*W] views): no shortcut convolution, no add;
    the output in the input's layout, as close to the float64 block as diffusers' own; an in-place bias
    update is seen; on the eager backend and with a gradient to record, diffusers' statements."""
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=12, out_channels=20, temb_channels=8, groups=4).eval()
    x, temb = torch.randn(2, 12, 5, 7), torch.randn(2, 8)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double(), temb.double())
        eager = copy.deepcopy(block).to(dtype)(x.to(dtype).contiguous(memory_format=fmt), temb.to(dtype))
    block.to(dtype)
    x, temb = x.to(dtype).contiguous(memory_format=fmt), temb.to(dtype)
    report = optimize(block, channels_last=channels_last)
    assert block.forward.shortcut_gemm
    assert any(n.startswith("silu_fusion: 1 ResnetBlock2D 1x1 shortcuts run as a GEMM") for n in report.notes)
    with torch.no_grad():
        assert torch.equal(block(x, temb), eager)  # the eager backend: diffusers' statements bit for bit
    with ldm_fast.use_backend("triton"):
        with torch.no_grad():
            first = block(x, temb)  # (computes and caches conv2.bias + conv_shortcut.bias)
            with _DispatchedOps() as ops:
                out = block(x, temb)
        assert torch.equal(first, out)
        assert ops.names.count("aten::convolution") == 2, ops.names  # conv1, conv2: the shortcut is a GEMM
        gemms = ops.names.count("aten::addmm"), ops.names.count("aten::baddbmm")  # (time_emb_proj: one addmm)
        assert gemms == ((2, 0) if channels_last else (1, 1)), ops.names
        assert ops.names.count("aten::add") == 0, ops.names  # (time_emb_proj's addmm, the temb add in norm2)
        assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype
        assert_close_to_exact(out, exact.to(dtype), eager)
        with torch.no_grad():
            block.conv_shortcut.bias.add_(1.0)  # the cached bias sum follows the in-place update
            torch.testing.assert_close(block(x, temb).double(), out.double() + 1.0, rtol=0, atol=0.02)
            block.conv_shortcut.bias.sub_(1.0)
        xg = x.clone().requires_grad_(True)
        with _DispatchedOps() as ops:
            block(xg, temb).float().sum().backward()
        assert ops.names.count("aten::convolution") == 3 and xg.grad is not None  # training: diffusers' own
    restore(block)


def test_unet_time_projections_packed_into_one_gemm_a_step_and_restore(monkeypatch):
    """pack_weights (the default): the time_emb_proj of every ResnetBlock2D becomes a row block of one
    buffer (the same Parameters, state dict and values); in inference on the Triton backend one GEMM a
    step computes them all (each block slices its columns, read in place by norm2's shift); the eager
    backend and a step with gradients run the blocks' own GEMMs; restore unpacks; pack_weights=False
    leaves the storages alone."""
    unet, inputs = _unet(), _unet_inputs()
    ref = _run_unet(unet, inputs)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    blocks = sorted(n for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D")
    report = optimize(unet)
    assert sorted(report.paths(opt_mod.TIME_PROJECTIONS)) == blocks
    packs = {id(m.forward.time_pack) for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"}
    assert len(packs) == 1
    pack = unet.down_blocks[0].resnets[0].forward.time_pack
    assert isinstance(pack, ldm_fast.integrations.diffusers.PackedTimeProjections)
    assert pack.weight.shape == (sum(m.time_emb_proj.out_features for m in _time_blocks(unet)), 128)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: calls.append(w is pack.weight) or linear(x, w, b))
    assert torch.equal(_run_unet(unet, inputs), ref) and not any(calls)  # eager backend: the blocks' own
    with ldm_fast.use_backend("triton"):
        calls.clear()
        out = _run_unet(unet, inputs)
        assert calls.count(True) == 1  # one packed GEMM for every block of the step
        _assert_close_rel(out, ref, TRITON_RTOL)
        # the kept output is reused only while the block's own weights are unchanged: an in-place update
        # between two calls with the same embedding tensor is seen
        block = unet.down_blocks[0].resnets[0]
        temb = torch.randn(2, 128)
        with torch.no_grad():
            before = pack.project(block.time_emb_proj, temb).clone()
            saved = block.time_emb_proj.bias.clone()
            block.time_emb_proj.bias.add_(1.0)
            after = pack.project(block.time_emb_proj, temb)
            block.time_emb_proj.bias.copy_(saved)
        torch.testing.assert_close(after, before + 1.0, rtol=0, atol=1e-5)
        calls.clear()
        unet(*inputs).sample.sum().backward()  # gradients to record: the blocks' own GEMMs
        assert not any(calls) and unet.down_blocks[0].resnets[0].time_emb_proj.weight.grad is not None
    restore(unet)
    storages = [p.untyped_storage()._cdata for p in unet.parameters()]
    assert len(set(storages)) == len(storages)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    report = optimize(unet, pack_weights=False)
    assert report.paths(opt_mod.TIME_PROJECTIONS) == [] and unet.down_blocks[0].resnets[0].forward.time_pack is None
    storages = [p.untyped_storage()._cdata for p in unet.parameters()]
    assert len(set(storages)) == len(storages)
    restore(unet)


def test_unet_timesteps_run_the_timestep_embedding_kernel_and_restore():
    """timestep_embedding (the default): the U-Net's Timesteps runs one kernel (interpreted here),
    the embedding within the kernel's error of diffusers'; diffusers' statements bit for bit on the
    eager backend; restore removes the forward; timestep_embedding=False leaves it."""
    from diffusers.models.embeddings import Timesteps

    unet, inputs = _unet(), _unet_inputs()
    ref = _run_unet(unet, inputs)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ref_emb = unet.time_proj(t)
    report = optimize(unet)
    assert report.paths(opt_mod.TIMESTEPS) == ["time_proj"]
    assert isinstance(unet.time_proj.forward, ldm_fast.integrations.diffusers.FusedTimestepsForward)
    assert torch.equal(unet.time_proj(t), ref_emb) and torch.equal(_run_unet(unet, inputs), ref)
    with ldm_fast.use_backend("triton"):
        before = ldm_fast.ops.kernel_launches["timestep_embedding"]
        emb = unet.time_proj(t)
        out = _run_unet(unet, inputs)
        assert ldm_fast.ops.kernel_launches["timestep_embedding"] - before == 2
    torch.testing.assert_close(emb, ref_emb, rtol=0, atol=1e-5)  # |sin|, |cos| <= 1: libm vs numpy ulps
    _assert_close_rel(out, ref, TRITON_RTOL)
    restore(unet)
    assert "forward" not in unet.time_proj.__dict__
    report = optimize(unet, timestep_embedding=False)
    assert report.paths(opt_mod.TIMESTEPS) == [] and "timestep_embedding: off" in report.notes
    restore(unet)
    odd = Timesteps(7, flip_sin_to_cos=False, downscale_freq_shift=3)  # dim // 2 - shift == 0: left
    report = optimize(nn.ModuleDict({"odd": odd}))
    assert [(i.path, "division by zero" in i.reason) for i in report.left] == [("odd", True)]


def _time_blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "ResnetBlock2D" and m.time_emb_proj is not None]


# ---------------------------------------------------------------------------------------------
# BasicTransformerBlock: the residual add + LayerNorm in one kernel; the shared time-embedding SiLU


def _transformer_blocks(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_transformer_blocks_fuse_add_layer_norm_exactly_and_restore(channels_last):
    """Every BasicTransformerBlock's two residual-add + LayerNorm pairs become add_layer_norm: on the
    eager backend the U-Net's output is bit for bit diffusers'; interpreted, the kernels ran (in NCHW
    the block's input is a transposed view of proj_in's output, so the attn1 pair runs the eager
    statements), the output and the gradients within the kernels' error."""
    unet = _unet()
    inputs = _unet_inputs()
    if channels_last:
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    ref = _run_unet(unet, inputs)
    blocks = _transformer_blocks(unet)
    assert len(blocks) == 4  # down 1, mid 1, up 2
    report = optimize(unet, channels_last=channels_last)
    transformers = sorted(n for n, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel")
    assert sorted(report.paths(opt_mod.TRANSFORMER_LAYOUT)) == (transformers if channels_last else [])
    assert sorted(report.paths(opt_mod.TRANSFORMER_FORWARD)) == sorted(name for name, _ in blocks)
    assert report.left == [] and "add_layer_norm: 4 diffusers BasicTransformerBlocks" in str(report)
    if not channels_last:  # (channels-last weights change the CPU convolutions' summation order)
        assert torch.equal(_run_unet(unet, inputs), ref)
    with ldm_fast.use_backend("triton"):
        before = ldm_fast.ops.kernel_launches["add_layer_norm"]
        with torch.no_grad(), _DispatchedOps() as ops:
            out = unet(*inputs).sample
        fused_pairs = ldm_fast.ops.kernel_launches["add_layer_norm"] - before
        # NCHW: the attn2 pair of every block; channels_last: the attn1 pair too where proj_in's output is
        # channels-last (on the CPU the up blocks' convolutions return NCHW after the skip cat)
        assert fused_pairs > len(blocks) if channels_last else fused_pairs == len(blocks)
        assert ops.names.count("aten::native_layer_norm") == 3 * len(blocks) - fused_pairs, ops.names
        _assert_close_rel(out, ref, TRITON_RTOL)
        sample = inputs[0].clone().requires_grad_(True)
        unet(sample, *inputs[1:]).sample.square().sum().backward()
    fused_dx, fused_dw = sample.grad.clone(), unet.down_blocks[0].attentions[0].transformer_blocks[0].norm2.weight.grad
    restore(unet)
    assert all("forward" not in m.__dict__ for _, m in blocks)
    assert all("_get_output_for_continuous_inputs" not in m.__dict__ for m in unet.modules())
    unet.zero_grad()
    sample.grad = None
    unet(sample, *inputs[1:]).sample.square().sum().backward()
    ref_dw = unet.down_blocks[0].attentions[0].transformer_blocks[0].norm2.weight.grad
    _assert_close_rel(fused_dx, sample.grad, 1e-4)
    _assert_close_rel(fused_dw, ref_dw, 1e-4)
    if not channels_last:
        assert torch.equal(_run_unet(unet, inputs), ref)


def _basic_block(**kwargs):
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    return BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_transformer_block_adds_the_feed_forward_residual_in_its_output_gemm(dtype):
    """In inference on the Triton backend the norm3 add_layer_norm writes s + ff.net[2].bias and the
    feed-forward's output GEMM accumulates onto it (addmm): no add is dispatched in the block; the
    output as close to the float64 block as diffusers' own. A chunked feed-forward, a hook on the
    output Linear and a gradient to record run diffusers' statements."""
    block = _basic_block()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 3, 12)
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double(), encoder_hidden_states=ctx.double())
        eager = copy.deepcopy(block).to(dtype)(x.to(dtype), encoder_hidden_states=ctx.to(dtype))
    block.to(dtype)
    x, ctx = x.to(dtype), ctx.to(dtype)
    report = optimize(block)
    assert block.forward.ff_epilogue and any("1 add the feed-forward's residual in its output GEMM" in n for n in report.notes)
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=ctx), eager)  # the eager backend: diffusers' statements
    with ldm_fast.use_backend("triton"):
        with torch.no_grad():
            before = ldm_fast.ops.kernel_launches["add_layer_norm"]
            with _DispatchedOps() as ops:
                out = block(x, encoder_hidden_states=ctx)
            assert ldm_fast.ops.kernel_launches["add_layer_norm"] - before == 2
            assert ops.names.count("aten::add") == 0, ops.names
            assert_close_to_exact(out, exact.to(dtype), eager)
            block.set_chunk_feed_forward(3, 1)  # chunked: diffusers' _chunked_feed_forward and its add
            with _DispatchedOps() as ops:
                chunked = block(x, encoder_hidden_states=ctx)
            assert ops.names[-2:] == ["aten::cat", "aten::add"]  # the chunks joined, then the residual add
            assert_close_to_exact(chunked, exact.to(dtype), eager)
            block.set_chunk_feed_forward(None, 0)
            seen = []
            handle = block.ff.net[2].register_forward_hook(lambda *a: seen.append(1))
            assert_close_to_exact(block(x, encoder_hidden_states=ctx), exact.to(dtype), eager)
            assert seen == [1]
            handle.remove()
        xg = x.clone().requires_grad_(True)
        with _DispatchedOps() as ops:
            block(xg, encoder_hidden_states=ctx).float().sum().backward()
        assert ops.names.count("aten::add") >= 1 and xg.grad is not None  # training: diffusers' residual add
    restore(block)


def test_transformer_block_under_cpu_autocast_runs_diffusers_statements():
    """Under CPU autocast the fused forward runs diffusers' own statements (ldm_fast fuses the pairs
    under CUDA autocast, with the norm's output in fp32 as autocast gives it:
    tests/test_add_layer_norm.py): the same result as the block before optimize, no kernel; without
    autocast, the kernels."""
    block = _basic_block()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 3, 12)
    with torch.no_grad():
        ref = block(x, encoder_hidden_states=ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_ac = block(x.bfloat16(), encoder_hidden_states=ctx)
    optimize(block, geglu=False)  # (the GEGLU kernel computes in fp32 under autocast too: not bit for bit)
    assert isinstance(block.forward, ldm_fast.integrations.diffusers.FusedTransformerBlockForward)
    with torch.no_grad(), ldm_fast.use_backend("triton"):
        before = ldm_fast.ops.kernel_launches["add_layer_norm"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(block(x.bfloat16(), encoder_hidden_states=ctx), ref_ac)
        assert ldm_fast.ops.kernel_launches["add_layer_norm"] == before
        torch.testing.assert_close(block(x, encoder_hidden_states=ctx), ref, rtol=1e-5, atol=1e-5)
        assert ldm_fast.ops.kernel_launches["add_layer_norm"] == before + 2
    restore(block)


@pytest.mark.parametrize("kwargs, reason", [
    ({"norm_type": "ada_norm", "num_embeds_ada_norm": 5}, "norm_type='ada_norm'"),
    ({"norm_type": "layer_norm", "positional_embeddings": "sinusoidal", "num_positional_embeddings": 8},
     "positional embedding"),
])
def test_transformer_block_variants_left_with_the_reason(kwargs, reason):
    block = _basic_block(**kwargs)
    report = optimize(block)
    assert "forward" not in block.__dict__
    assert any(reason in item.reason for item in report.left), report.left
    restore(block)


def test_transformer_block_with_a_hooked_norm_left():
    block = _basic_block()
    block.norm2.register_forward_hook(lambda *a: None)
    report = optimize(block)
    assert "forward" not in block.__dict__
    assert any("norm2 has hooks" in item.reason for item in report.left), report.left
    restore(block)


def test_time_embedding_silu_computed_once_per_step_in_inference():
    """Every ResnetBlock2D applies the same SiLU to the one time embedding: after optimize, inference
    dispatches it once (the U-Net's output unchanged bit for bit); with autograd each block its own."""
    unet = _unet()
    inputs = _unet_inputs()
    with torch.no_grad(), _DispatchedOps() as ops:
        ref = unet(*inputs).sample
    silu_before = ops.names.count("aten::silu")
    resnets = sum(isinstance(m, ResnetBlock2D) for m in unet.modules())
    optimize(unet)
    with torch.no_grad(), _DispatchedOps() as ops:
        out = unet(*inputs).sample
    assert torch.equal(out, ref)
    # (the norms' fused SiLUs are F.silu on the eager backend, so they still dispatch here)
    assert ops.names.count("aten::silu") == silu_before - (resnets - 1)
    with _DispatchedOps() as ops:
        unet(inputs[0], inputs[1], inputs[2]).sample.sum().backward()
    assert ops.names.count("aten::silu") == silu_before
    restore(unet)
