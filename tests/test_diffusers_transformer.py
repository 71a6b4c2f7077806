"""The ``add_layer_norm`` patch (ldm_fast/integrations/diffusers/transformer.py) on diffusers'
BasicTransformerBlock: each residual add + LayerNorm in one kernel (both pairs, in NCHW and
channels-last U-Nets), the feed-forward's residual in its output GEMM, and what steps aside per call
(adapters, hooks, chunking, autocast on the CPU, training); and Transformer2DModel's output layout
(part of ``channels_last``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm_fast import optimize, restore
from ldm_fast.integrations.diffusers.transformer import TransformerBlockForward, TransformerOutput

diffusers = pytest.importorskip("diffusers")

import _diffusers_models as dm  # noqa: E402
from _dispatch import DispatchedOps  # noqa: E402
from _numerics import assert_close_to_exact  # noqa: E402


def _block(**kwargs):
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    return BasicTransformerBlock(16, 2, 8, cross_attention_dim=12, **kwargs).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, 16, generator=g), torch.randn(2, 3, 12, generator=g)


def _blocks(model):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_unet_blocks_fuse_both_pairs_and_restore(channels_last):
    """Every BasicTransformerBlock's two residual-add + LayerNorm pairs run add_layer_norm, in an NCHW
    U-Net too (the first residual is the permuted view of proj_in's output, read in place); output and
    gradients within the kernels' error; the CPU's default backend bit for bit."""
    unet, inputs = dm.unet(), dm.unet_inputs()
    if channels_last:
        inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    ref = dm.run_unet(unet, inputs)
    blocks = _blocks(unet)
    assert len(blocks) == 4  # down 1, mid 1, up 2
    report = optimize(unet, channels_last=channels_last)
    assert sorted(report.paths("add_layer_norm")) == sorted(name for name, _ in blocks) and report.left == []
    if not channels_last:  # (channels-last weights change the CPU convolutions' summation order)
        assert torch.equal(dm.run_unet(unet, inputs), ref)
    with dm.kernels_forced() as launched:
        with torch.no_grad(), DispatchedOps() as ops:
            out = unet(*inputs).sample
        dm.assert_close_rel(out, ref)
        sample = inputs[0].clone().requires_grad_(True)
        unet(sample, *inputs[1:]).sample.square().sum().backward()
    assert launched["add_layer_norm"] == 2 * 2 * len(blocks)  # both pairs of every block, inference and training
    assert ops.names.count("aten::native_layer_norm") == len(blocks), ops.names  # norm1 only
    fused_dx = sample.grad.clone()
    fused_dw = unet.down_blocks[0].attentions[0].transformer_blocks[0].norm2.weight.grad
    restore(unet)
    assert all("forward" not in m.__dict__ for _, m in blocks)
    unet.zero_grad()
    sample.grad = None
    unet(sample, *inputs[1:]).sample.square().sum().backward()
    dm.assert_close_rel(fused_dx, sample.grad)
    dm.assert_close_rel(fused_dw, unet.down_blocks[0].attentions[0].transformer_blocks[0].norm2.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_feed_forward_residual_goes_into_its_output_gemm(dtype):
    """Inference on the Triton backend: norm3's add_layer_norm writes s + ff.net[2].bias and the
    output GEMM accumulates onto it in place (addmm_): no add in the block; as close to the float64
    block as diffusers' own. A chunked feed-forward and a gradient to record run diffusers'
    statements."""
    block = _block()
    x, ctx = _inputs()
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double(), encoder_hidden_states=ctx.double())
        eager = copy.deepcopy(block).to(dtype)(x.to(dtype), encoder_hidden_states=ctx.to(dtype))
    block.to(dtype)
    x, ctx = x.to(dtype), ctx.to(dtype)
    optimize(block)
    assert isinstance(block.forward, TransformerBlockForward) and block.forward.ff_class is not None
    with torch.no_grad():
        assert torch.equal(block(x, encoder_hidden_states=ctx), eager)  # the CPU: diffusers' own forward
    with dm.kernels_forced() as launched:
        with torch.no_grad():
            with DispatchedOps() as ops:
                out = block(x, encoder_hidden_states=ctx)
            assert ops.names.count("aten::add") == 0 and "aten::addmm_" in ops.names, ops.names
            assert_close_to_exact(out, exact.to(dtype), eager)
            block.set_chunk_feed_forward(3, 1)  # chunked: diffusers' _chunked_feed_forward and its add
            with DispatchedOps() as ops:
                chunked = block(x, encoder_hidden_states=ctx)
            assert ops.names[-2:] == ["aten::cat", "aten::add"]
            assert_close_to_exact(chunked, exact.to(dtype), eager)
            block.set_chunk_feed_forward(None, 0)
        xg = x.clone().requires_grad_(True)
        with DispatchedOps() as ops:
            block(xg, encoder_hidden_states=ctx).float().sum().backward()
        assert ops.names.count("aten::add") >= 1 and xg.grad is not None  # training: diffusers' residual add
    assert launched["add_layer_norm"] == 2 * 3
    restore(block)


class _LoRALinear(nn.Module):
    """A LoRA layer as peft puts it in place of a Linear: the base layer plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.5)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("where", ["ff.net.2", "ff.net.0.proj", "norm2", "norm3", "attn1.to_out.0"])
def test_a_module_swapped_in_after_optimize_is_called(where):
    """A LoRA layer (or another module) put in place of a submodule after optimize is called, as
    diffusers calls it (kohya-style SD LoRAs include ff.net.2)."""
    block = _block()
    x, ctx = _inputs()
    twin = dm.twin(block)
    optimize(block)
    for model in (block, twin):
        parent_path, _, name = where.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name) if not name.isdigit() else parent[int(name)]
        torch.manual_seed(3)
        new = _LoRALinear(old) if isinstance(old, nn.Linear) else nn.LayerNorm(old.normalized_shape, eps=0.5)
        if name.isdigit():
            parent[int(name)] = new
        else:
            setattr(parent, name, new)
    with torch.no_grad():
        ref = twin(x, encoder_hidden_states=ctx)
        with dm.kernels_forced() as launched:
            out = block(x, encoder_hidden_states=ctx)
    assert launched["add_layer_norm"] >= 1
    dm.assert_close_rel(out, ref)


@pytest.mark.parametrize("where", ["norm2", "norm3", "ff", "ff.net.2"])
def test_hooks_added_after_optimize_see_what_they_see_without_ldm_fast(where):
    block = _block()
    x, ctx = _inputs()
    twin = dm.twin(block)
    optimize(block)
    seen = {"block": [], "twin": []}
    for name, model in (("block", block), ("twin", twin)):
        module = model.get_submodule(where)
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].clone()))
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(out.clone()) or out * 1.5)
    with torch.no_grad():
        ref = twin(x, encoder_hidden_states=ctx)
        with dm.kernels_forced():
            out = block(x, encoder_hidden_states=ctx)
    assert len(seen["block"]) == len(seen["twin"]) == 2
    for a, b in zip(seen["block"], seen["twin"]):
        dm.assert_close_rel(a, b)
    dm.assert_close_rel(out, ref)


def test_in_place_weight_updates_without_a_version_bump_and_inference_mode():
    block = _block()
    x, ctx = _inputs()
    twin = dm.twin(block)
    optimize(block)
    with torch.inference_mode(), dm.kernels_forced():
        before = block(x, encoder_hidden_states=ctx)
        for p, q in zip(block.parameters(), twin.parameters()):
            delta = 0.1 * torch.randn_like(p)
            p.data.add_(delta)
            q.data.add_(delta)
        out = block(x, encoder_hidden_states=ctx)
        ref = twin(x, encoder_hidden_states=ctx)
    dm.assert_close_rel(out, ref)
    assert (out - before).abs().max() > 1e-2


def test_cpu_autocast_runs_diffusers_statements():
    """Under CPU autocast the fused forward runs diffusers' own statements (CUDA autocast fuses, with
    the norm's output in fp32 as autocast gives it: tests/test_add_layer_norm.py)."""
    block = _block()
    x, ctx = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = block(x.bfloat16(), encoder_hidden_states=ctx)
    optimize(block, geglu=False)
    with torch.no_grad(), dm.kernels_forced() as launched, torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(block(x.bfloat16(), encoder_hidden_states=ctx), ref)
    assert "add_layer_norm" not in launched
    restore(block)


@pytest.mark.parametrize("kwargs, reason", [
    ({"norm_type": "ada_norm", "num_embeds_ada_norm": 5}, "norm_type='ada_norm'"),
    ({"norm_type": "layer_norm", "positional_embeddings": "sinusoidal", "num_positional_embeddings": 8},
     "positional embedding"),
])
def test_other_variants_left_with_the_reason(kwargs, reason):
    block = _block(**kwargs)
    report = optimize(block)
    assert "forward" not in block.__dict__
    assert any(item.what == "add_layer_norm" and reason in item.reason for item in report.left), report.left
    restore(block)


def test_a_feed_forward_with_a_final_dropout_keeps_its_add():
    block = _block(final_dropout=True)
    x, ctx = _inputs()
    ref = block(x, encoder_hidden_states=ctx).detach()
    report = optimize(block)
    assert any(item.path == "ff" and "stays a separate add" in item.reason for item in report.left)
    assert block.forward.ff_class is None
    with torch.no_grad(), dm.kernels_forced() as launched:
        dm.assert_close_rel(block(x, encoder_hidden_states=ctx), ref)
    assert launched["add_layer_norm"] == 2
    restore(block)


# ---------------------------------------------------------------------------------------------
# Transformer2DModel's output layout (channels_last)


@pytest.mark.slow
def test_transformer_output_keeps_the_channels_last_layout_and_restore():
    unet, inputs = dm.unet(), dm.unet_inputs()
    inputs = (inputs[0].contiguous(memory_format=torch.channels_last),) + inputs[1:]
    ref = dm.run_unet(unet, inputs)
    optimize(unet, channels_last=True)
    transformer = unet.down_blocks[0].attentions[0]
    assert isinstance(transformer.__dict__["_get_output_for_continuous_inputs"], TransformerOutput)
    seen = []
    transformer.register_forward_hook(lambda m, a, out: seen.append(out.sample if hasattr(out, "sample") else out[0]))
    with dm.kernels_forced():
        out = dm.run_unet(unet, inputs)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    dm.assert_close_rel(out, ref)
    restore(unet)
    assert all("_get_output_for_continuous_inputs" not in m.__dict__ for m in unet.modules())
