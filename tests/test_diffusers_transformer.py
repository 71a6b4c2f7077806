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


@pytest.mark.parametrize("where", ["ff.net.2", "ff.net.0.proj", "norm2", "norm3", "attn1.to_out.0", "attn1.to_q",
                                   "attn2.to_k", "attn2.to_v", "attn2.to_out.0"])
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


@pytest.mark.parametrize("where", ["norm2", "norm3", "ff", "ff.net.2", "attn1", "attn2", "attn1.to_q", "attn2.to_v",
                                   "attn2.to_out.0"])
@pytest.mark.parametrize("attention", [False, True])
def test_hooks_added_after_optimize_see_what_they_see_without_ldm_fast(where, attention):
    block = _block()
    x, ctx = _inputs()
    twin = dm.twin(block)
    optimize(block, attention=attention)
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


def _attention(**kwargs):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(16, cross_attention_dim=kwargs.pop("cross_attention_dim", None), heads=2, dim_head=8,
                     **kwargs).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cross", [False, True])
def test_plain_statements_are_attn_processor_2_0_bit_for_bit(dtype, cross):
    """The transformer block's attention call without AttnProcessor2_0's host cost computes what
    AttnProcessor2_0 computes, bit for bit, forward and backward (and the eval-mode dropout and the
    division by 1.0 it skips change nothing)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_fast.integrations.diffusers.attention import plain_statements

    attn = _attention(cross_attention_dim=12 if cross else None).to(dtype)
    x, ctx = (t.to(dtype) for t in _inputs())
    ctx = ctx if cross else None
    out = plain_statements(attn, x, ctx)
    ref = AttnProcessor2_0()(attn, x, ctx)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    xg = x.clone().requires_grad_(True)
    plain_statements(attn, xg, ctx).square().sum().backward()
    grads = [xg.grad] + [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    AttnProcessor2_0()(attn, xr, ctx).square().sum().backward()
    for a, b in zip(grads, [xr.grad] + [p.grad for p in attn.parameters()]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["sdpa", "triton"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_plain_statements_are_ldm_fast_attn_processor_bit_for_bit(impl, packed, cross):
    """For ldm_fast's own AttnProcessor (``optimize(attention=True)``) the plain-case statements compute
    what the processor computes, bit for bit, with its impl (the Triton kernel forced, interpreted;
    SDPA) and with the packed q/k/v projections (inference) or without; under autograd too (the
    packed GEMM steps aside there, as in the processor)."""
    from ldm_fast.integrations.diffusers.attention import AttnProcessor, plain_statements

    attn = _attention(cross_attention_dim=12 if cross else None)
    processor = AttnProcessor(impl=impl)
    attn.set_processor(processor)
    if packed:
        report = optimize(attn, attention=True)
        assert report.paths("pack_weights"), report
        processor = attn.processor
        assert type(processor) is AttnProcessor
    x, ctx = _inputs()
    ctx = ctx if cross else None
    with torch.no_grad(), dm.kernels_forced() as launched:
        out = plain_statements(attn, x, ctx, processor)
        ref = processor(attn, x, ctx)
    assert torch.equal(out, ref)
    assert launched.get("attention", 0) == (2 if impl == "triton" else 0)
    with dm.kernels_forced():
        xg = x.clone().requires_grad_(True)
        plain_statements(attn, xg, ctx, processor).square().sum().backward()
        grads = [xg.grad] + [p.grad.clone() for p in attn.parameters()]
        attn.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        processor(attn, xr, ctx).square().sum().backward()
    for a, b in zip(grads, [xr.grad] + [p.grad for p in attn.parameters()]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, cross", [
    ({"qk_norm": "layer_norm"}, False), ({"residual_connection": True}, False), ({"norm_num_groups": 4}, False),
    ({"cross_attention_norm": "layer_norm", "cross_attention_dim": 12}, True), ({"out_dim": 8}, False),
])
def test_plain_statements_leave_what_is_not_the_plain_case(kwargs, cross):
    """Outside the plain case (q/k norms, a residual connection, a group norm, a cross-attention norm)
    plain_statements declines (None: the caller calls the processor); an output width other than the
    input's still computes AttnProcessor2_0's values."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from ldm_fast.integrations.diffusers.attention import plain_statements

    attn = _attention(**kwargs)
    x, ctx = _inputs()
    ctx = ctx if cross else None
    out = plain_statements(attn, x, ctx)
    if "out_dim" in kwargs:
        assert torch.equal(out, AttnProcessor2_0()(attn, x, ctx))
    else:
        assert out is None


def test_the_block_calls_the_attention_as_diffusers_does_otherwise():
    """The block's direct attention call steps aside for what Attention.forward does beyond calling its
    processor: cross_attention_kwargs reach a processor that takes them (and only those), a processor
    set after optimize is called, an Attention class patched after optimize runs its forward, a
    train-mode dropout with p > 0 is called (a seeded draw: the same mask as diffusers')."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     marker=None):
            seen.append(marker)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    block = _block()
    x, ctx = _inputs()
    twin = dm.twin(block)
    optimize(block)
    for model in (block, twin):
        model.attn1.set_processor(Recording())
    with torch.no_grad():
        ref = twin(x, encoder_hidden_states=ctx, cross_attention_kwargs={"marker": 7})
        with dm.kernels_forced() as launched:
            out = block(x, encoder_hidden_states=ctx, cross_attention_kwargs={"marker": 7})
    assert launched["add_layer_norm"] >= 1 and seen == [7, 7]
    dm.assert_close_rel(out, ref)

    cls = type(block.attn2)
    calls = []
    original = cls.forward

    def patched(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    cls.forward = patched
    try:
        with torch.no_grad(), dm.kernels_forced():
            block(x, encoder_hidden_states=ctx)
    finally:
        cls.forward = original
    assert calls == [1, 1]  # attn1 and attn2

    for model in (block, twin):
        model.attn2.to_out[1].p = 0.5
        model.train()
    with torch.no_grad():
        torch.manual_seed(5)
        ref = twin(x, encoder_hidden_states=ctx)
        with dm.kernels_forced():
            torch.manual_seed(5)
            out = block(x, encoder_hidden_states=ctx)
    dm.assert_close_rel(out, ref)
    assert (out != 0).any()


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
