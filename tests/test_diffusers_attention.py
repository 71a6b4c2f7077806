"""The ``attention`` patch (ldm_fast/integrations/diffusers/attention.py) on whole diffusers models:
the default processors swapped for ldm_fast's (falling back to them off the Triton backend), the
q/k/v projections packed into one GEMM (``pack_weights``), custom processors, adapters and hooks
left to diffusers, and restore."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ldm_fast
from ldm_fast import optimize, restore
from ldm_fast.integrations.diffusers import AttnProcessor as LdmAttnProcessor
from ldm_fast.integrations.diffusers.attention import PACK_ATTR, PackedProjections

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

import _diffusers_models as dm  # noqa: E402
from _numerics import check_attention as _check  # noqa: E402

# ---------------------------------------------------------------------------------------------
# optimize(attention=True)


def _unet():
    return dm.unet()


def _unet_inputs(dtype=torch.float32):
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in dm.unet_inputs())


def _vae():
    return dm.vae()


def _image(dtype=torch.float32):
    return dm.image().to(dtype)


def _run_model(model, inputs):
    with torch.no_grad():
        if isinstance(model, AutoencoderKL):
            return model(inputs, sample_posterior=False).sample
        return model(*inputs).sample


def _processors(model):
    return {name: m.processor for name, m in model.named_modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("model_kind", ["unet", "vae"])
def test_optimize_attention_swaps_default_processors_and_restore_gives_them_back(model_kind):
    model, inputs = (_unet(), _unet_inputs()) if model_kind == "unet" else (_vae(), _image())
    ref = _run_model(model, inputs)
    originals = _processors(model)
    # the U-Net's attn1/attn2 of each transformer block; the VAE's encoder and decoder mid-block attention
    assert len(originals) == (8 if model_kind == "unet" else 2)
    report = optimize(model, attention=True)

    assert sorted(report.paths("attention")) == sorted(originals)
    assert all(type(p) is LdmAttnProcessor for p in _processors(model).values())
    assert report.left == [] and report.options["attention"] is True
    assert f"attention {len(originals)}" in str(report)
    assert any(n.startswith(f"attention: {len(originals)} diffusers Attention modules") for n in report.notes)
    assert torch.equal(_run_model(model, inputs), ref)  # default backend on CPU: exactly the original

    restore(model)
    assert all(m.processor is originals[name] for name, m in model.named_modules() if isinstance(m, Attention))
    assert torch.equal(_run_model(model, inputs), ref)


@pytest.mark.parametrize("model_kind", ["unet", "vae"])
def test_optimize_attention_with_the_triton_kernel(model_kind, run_on):
    """The optimized model with the Triton attention kernel (interpreted; GroupNorms left to torch to
    keep it fast) against the float64 original, judged by the fp32 original's own error."""
    make, inputs = (_unet, _unet_inputs) if model_kind == "unet" else (_vae, _image)
    exact = _run_model(make().double(), inputs(torch.float64))
    eager = _run_model(make(), inputs())
    model = make()
    optimize(model, group_norm=False, attention=True)
    norms_before = ldm_fast.ops.kernel_launches["group_norm"]
    with run_on("triton"):
        out = _run_model(model, inputs())
    assert ldm_fast.ops.kernel_launches["group_norm"] == norms_before  # torch's norms: only attention forced
    _check(out, exact, eager, "triton", run_on)


class _ModuleProcessor(nn.Module):
    """A processor that is an nn.Module (IP-Adapter style: weights of its own)."""

    def __init__(self):
        super().__init__()
        self.inner = AttnProcessor2_0()
        self.scale = nn.Parameter(torch.ones(()))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * self.scale


def test_optimize_attention_leaves_custom_processors_with_reasons():
    class _CustomProcessor(AttnProcessor2_0):
        """A processor of the user's own (its module is not diffusers')."""

    unet = _unet()
    attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    mid1 = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    custom, module_proc, classic = _CustomProcessor(), _ModuleProcessor(), AttnProcessor()
    attn1.set_processor(custom)
    attn2.set_processor(module_proc)
    mid1.set_processor(classic)  # diffusers' classic default with the default scale: swapped
    ref = _run_model(unet, _unet_inputs())
    report = optimize(unet, group_norm=False, attention=True)

    left = {item.path: item.reason for item in report.left}
    assert set(left) == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                         "down_blocks.0.attentions.0.transformer_blocks.0.attn2"}
    assert "custom processor" in left["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert "_CustomProcessor" in left["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert "nn.Module" in left["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    assert attn1.processor is custom and attn2.processor is module_proc
    assert type(mid1.processor) is LdmAttnProcessor and len(report.paths("attention")) == 6
    torch.testing.assert_close(_run_model(unet, _unet_inputs()), ref, rtol=1e-6, atol=1e-6)  # classic: other rounding
    restore(unet)
    assert mid1.processor is classic and attn1.processor is custom and attn2.processor is module_proc


def test_optimize_attention_leaves_other_scales_and_other_attention_classes():
    classic = Attention(query_dim=32, heads=4, dim_head=8, scale_qk=False)  # scale 1.0: AttnProcessor
    assert type(classic.processor) is AttnProcessor and classic.scale == 1.0
    modules = {"classic": classic, "plain": Attention(query_dim=32, heads=4, dim_head=8)}
    flux = getattr(pytest.importorskip("diffusers.models.transformers.transformer_flux"), "FluxAttention", None)
    if flux is not None:  # (diffusers >= 0.35: an Attention class of Flux's own)
        modules["flux"] = flux(query_dim=32, heads=4, dim_head=8)
    report = optimize(nn.ModuleDict(modules), group_norm=False, attention=True)
    left = {item.path: item.reason for item in report.left}
    assert set(left) == set(modules) - {"plain"}
    assert "scale=1.0" in left["classic"]
    assert flux is None or "not diffusers' Attention" in left["flux"]
    assert report.paths("attention") == ["plain"]


def test_optimize_attention_restore_refuses_a_replaced_processor_and_copies_restore_alone():
    unet = _unet()
    originals = _processors(unet)
    optimize(unet, group_norm=False, attention=True)
    twin = copy.deepcopy(unet)
    restore(twin)
    assert all(type(p) is AttnProcessor2_0 for p in _processors(twin).values())
    assert all(type(p) is LdmAttnProcessor for p in _processors(unet).values())  # the original is untouched
    unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn1 \(Attention\): its processor was replaced after optimize.*and 5 more"):
        restore(unet)
    assert all(p is not originals[n] for n, p in _processors(unet).items())


def test_optimize_attention_off_by_default_and_type_checked():
    unet = _unet()
    originals = _processors(unet)
    report = optimize(unet)
    assert "attention: off" in report.notes and report.options["attention"] is False
    assert all(p is originals[n] for n, p in _processors(unet).items())
    restore(unet)
    with pytest.raises(TypeError, match="attention must be a bool"):
        optimize(unet, attention=1)



# ---------------------------------------------------------------------------------------------
# optimize(attention=True): the projections as one GEMM on packed weights



class _PackedGemms:
    """Counts ``F.linear`` calls on a packed buffer (``weight`` is a PackedProjections' weight or
    kv_weight) and on anything else, inside the ``with`` block."""

    def __init__(self, monkeypatch, model):
        packs = [m.__dict__[PACK_ATTR] for m in model.modules() if PACK_ATTR in m.__dict__]
        self.buffers = {id(t) for p in packs for t in (p.weight, p.kv_weight)}
        self.packed = self.other = 0
        linear = torch.nn.functional.linear

        def counting(x, weight, bias=None):
            if id(weight) in self.buffers:
                self.packed += 1
            else:
                self.other += 1
            return linear(x, weight, bias)

        monkeypatch.setattr(torch.nn.functional, "linear", counting)


def _projection_params(model):
    return {name: p for name, p in model.named_parameters() if any(f".{t}." in name for t in ("to_q", "to_k", "to_v"))}


@pytest.mark.parametrize("model_kind", ["unet", "vae"])
def test_packed_projections_one_gemm_per_attention_same_parameters_and_restore(model_kind, monkeypatch):
    """Every Attention's projection weights become row blocks of one buffer (the same Parameter
    objects, state dict keys and values); on the Triton backend, in inference, a self-attention runs
    one GEMM for q, k and v and a cross-attention one for k and v, with the output of the unpacked
    GEMMs; the eager backend runs diffusers' three GEMMs bit for bit; restore gives each weight its own
    storage back."""
    model, inputs = (_unet(), _unet_inputs()) if model_kind == "unet" else (_vae(), _image())
    ref = _run_model(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = _projection_params(model)
    report = optimize(model, group_norm=False, attention=True)
    attns = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}
    assert sorted(report.paths("pack_weights")) == sorted(attns) and report.left == []
    packs = {name: m.__dict__[PACK_ATTR] for name, m in attns.items()}
    assert all(isinstance(p, PackedProjections) for p in packs.values())
    assert _projection_params(model) == params  # the same Parameter objects under the same names
    for name, p in params.items():
        pack = packs[name.rsplit(".", 2)[0]]
        buffer = pack.bias if name.endswith("bias") else pack.weight
        in_buffer = p.untyped_storage()._cdata == buffer.untyped_storage()._cdata  # a view of the buffer
        assert in_buffer == (pack.with_q or ".to_q." not in name), name
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    # self-attention (the U-Net's attn1, the VAE's mid-block): q/k/v; attn2 (cross) packs k/v only when
    # to_q's input width differs (here cross_attention_dim = the first level's width: q/k/v)
    assert [p.with_q for p in packs.values()] == [not (n.endswith("attn2") and p.width == 64) for n, p in packs.items()]

    gemms = _PackedGemms(monkeypatch, model)
    assert torch.equal(_run_model(model, inputs), ref)  # the eager backend: diffusers' GEMMs, bit for bit
    assert gemms.packed == 0
    with ldm_fast.use_backend("triton"):
        out = _run_model(model, inputs)
    assert gemms.packed == len(attns)  # one packed GEMM per attention: q/k/v (self) or k/v (cross)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the same products, summed in another order

    restore(model)
    assert _projection_params(model) == params
    storages = [p.untyped_storage()._cdata for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # every parameter has its own storage again
    assert all(PACK_ATTR not in m.__dict__ for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(_run_model(model, inputs), ref)


def test_packed_projections_follow_in_place_updates_and_step_aside_otherwise(monkeypatch, tmp_path):
    """load_state_dict (in place) lands in the packed buffer; a gradient to record, a weight
    re-allocated (``.to(dtype)``), a projection swapped for another module, or a hook on it make the
    processor run diffusers' GEMMs: always the unpacked model's values. safetensors saves the
    state dict (disjoint views of one buffer)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    unet, inputs = _unet(), _unet_inputs()
    torch.manual_seed(5)
    other = UNet2DConditionModel(**unet.config).eval()
    ref_other = _run_model(other, inputs)
    optimize(unet, group_norm=False, attention=True)
    gemms = _PackedGemms(monkeypatch, unet)
    unet.load_state_dict(other.state_dict())
    with ldm_fast.use_backend("triton"):
        torch.testing.assert_close(_run_model(unet, inputs), ref_other, rtol=1e-5, atol=1e-5)
        assert gemms.packed == 8
        # training: the weights need their gradients, so diffusers' three GEMMs run
        gemms.packed = 0
        unet(*inputs).sample.square().sum().backward()
        assert gemms.packed == 0
        assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad is not None
        other(*inputs).sample.square().sum().backward()
        for (name, p), q in zip(unet.named_parameters(), other.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
        # a projection swapped after optimize (e.g. a LoRA layer) and a hooked one: that attention unpacked
        attn1 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        old_k = attn1.to_k
        attn1.to_k = nn.Linear(old_k.in_features, old_k.out_features, bias=False)
        attn1.to_k.weight.data.copy_(old_k.weight)
        mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1
        seen = []
        mid.to_v.register_forward_hook(lambda *a: seen.append(1))
        gemms.packed = 0
        torch.testing.assert_close(_run_model(unet, inputs), ref_other, rtol=1e-5, atol=1e-5)
        assert gemms.packed == 6 and seen == [1]
    path = tmp_path / "unet.safetensors"
    safetensors_torch.save_file(unet.state_dict(), str(path))
    loaded = safetensors_torch.load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in unet.state_dict().items())
    # a dtype change re-allocates every weight: the packs no longer match, diffusers' GEMMs run
    unet.to(torch.float64)
    gemms.packed = 0
    with ldm_fast.use_backend("triton"):
        out = _run_model(unet, tuple(t.double() if t.is_floating_point() else t for t in inputs))
    assert gemms.packed == 0 and out.dtype == torch.float64
    restore(unet)  # nothing left in the buffers to unpack: restore still succeeds


def test_packed_projections_left_when_shared_or_not_linear():
    """A projection whose weight is tied to another module's, or that is not a plain nn.Linear, is
    left unpacked with the reason (the processor is still swapped)."""
    tied = Attention(query_dim=16, heads=2, dim_head=8)
    plain = Attention(query_dim=16, heads=2, dim_head=8)
    lora_like = Attention(query_dim=16, heads=2, dim_head=8)
    lora_like.to_q = nn.Sequential(nn.Linear(16, 16, bias=False))
    model = nn.ModuleDict({"tied": tied, "plain": plain, "lora": lora_like, "head": nn.Linear(16, 16, bias=False)})
    model["head"].weight = tied.to_v.weight
    report = optimize(model, group_norm=False, attention=True)
    left = {item.path: item.reason for item in report.left}
    assert set(left) == {"tied", "lora"}
    assert "shared" in left["tied"] and "to_v" in left["tied"]
    assert "to_q is a Sequential" in left["lora"]
    assert report.paths("pack_weights") == ["plain"]
    assert sorted(report.paths("attention")) == ["lora", "plain", "tied"]
    assert model["head"].weight is tied.to_v.weight


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_packed_projections_of_a_copy_follow_its_in_place_updates(how, monkeypatch):
    """A copy of an optimized model is packed too: its projection weights are views of its own
    buffer (k/v rows included), so an in-place update of the copy's weights (an EMA's copy_to) is
    what its packed GEMMs read."""
    import pickle

    unet, inputs = _unet(), _unet_inputs()
    optimize(unet, group_norm=False, attention=True)
    copied = copy.deepcopy(unet) if how == "deepcopy" else pickle.loads(pickle.dumps(unet))
    plain = copy.deepcopy(unet)
    restore(plain)
    for model in (copied, plain):
        for name, p in model.named_parameters():
            if ".to_k." in name or ".to_v." in name:
                p.data.mul_(1.5)
    gemms = _PackedGemms(monkeypatch, copied)
    with ldm_fast.use_backend("triton"):
        out = _run_model(copied, inputs)
    assert gemms.packed == 8
    torch.testing.assert_close(out, _run_model(plain, inputs), rtol=1e-5, atol=1e-5)
