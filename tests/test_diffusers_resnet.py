"""The ``resnet`` patch (ldm_fast/integrations/diffusers/resnet.py) on diffusers' ResnetBlock2D:
GroupNorm+SiLU, the time-embedding add inside norm2, the shared time-embedding SiLU, the 1x1 shortcut
as a GEMM, the packed time projections (``pack_weights``) - each against the block without ldm_fast,
and each stepping aside per call for what the user does after optimize."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ldm_fast import optimize, restore
from ldm_fast._packing import PackedTimeProjections
from ldm_fast.integrations.diffusers import ResnetForward, supported

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

import _diffusers_models as dm  # noqa: E402
from _dispatch import DispatchedOps  # noqa: E402
from _numerics import assert_close_to_exact  # noqa: E402


def _block(seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"in_channels": 16, "temb_channels": 8, "groups": 4, **kwargs}
    return ResnetBlock2D(**kwargs).eval()


def _inputs(channels=16, seed=1, hw=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *hw, generator=g), torch.randn(2, 8, generator=g)


@pytest.mark.parametrize("kwargs", [
    dict(time_embedding_norm="default"),
    dict(time_embedding_norm="scale_shift"),
    dict(time_embedding_norm="default", up=True),
    dict(time_embedding_norm="default", down=True, out_channels=32),
    dict(time_embedding_norm="default", skip_time_act=True, output_scale_factor=2.0),
    dict(time_embedding_norm="default", non_linearity="mish"),
])
def test_block_variants_match_on_both_backends(kwargs):
    block = _block(**kwargs)
    x, temb = _inputs()
    ref = block(x, temb).detach()
    report = optimize(block)
    assert report.paths("resnet") == ["<root>"] and isinstance(block.forward, ResnetForward)
    with torch.no_grad():
        assert torch.equal(block(x, temb), ref)  # the CPU: diffusers' own forward
        with dm.kernels_forced() as launched:
            out = block(x, temb)
    # mish is not a SiLU: the norms run as modules (the class-swapped kernels), then mish
    assert launched["group_norm"] == 2
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    restore(block)
    assert "forward" not in block.__dict__
    assert torch.equal(block(x, temb), ref)


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_a_division_by_one_is_skipped_bit_for_bit(factor):
    block = _block(output_scale_factor=factor)
    x, temb = _inputs()
    with torch.no_grad():
        ref = block(x, temb)
    optimize(block)
    with torch.no_grad(), dm.kernels_forced(), DispatchedOps() as ops:
        out = block(x, temb)
    assert ("aten::div" in ops.names) == (factor != 1.0), ops.names
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    restore(block)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_time_embedding_is_added_inside_norm2(channels_last, poison):
    """norm2(h + temb) + SiLU as one group_norm(h, shift=temb, activation="silu"): within the kernel's
    error (forward and gradients), the add never dispatched."""
    block = _block()
    x, temb = _inputs()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = block(x, temb).detach()
    x.requires_grad_(True)
    block(x, temb).square().sum().backward()
    ref_dx, ref_dw = x.grad.clone(), block.time_emb_proj.weight.grad.clone()
    x.grad = None
    block.zero_grad()
    optimize(block, channels_last=channels_last)
    with dm.kernels_forced() as launched:
        with torch.no_grad(), DispatchedOps() as ops:
            out = block(x, temb)
        block(x, temb).square().sum().backward()
    assert launched["group_norm"] == 3 * 2  # norm1, norm2 (+temb, +SiLU): inference, forward, backward
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ops.names.count("aten::add") == 1, ops.names  # only the residual add; temb's is in norm2
    assert "aten::silu" in ops.names  # the time embedding's SiLU only
    torch.testing.assert_close(x.grad, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block.time_emb_proj.weight.grad, ref_dw, rtol=1e-4, atol=1e-4)
    restore(block)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_1x1_shortcut_runs_as_a_gemm_onto_conv2(channels_last, dtype):
    """A channel-changing block: in inference on the Triton backend conv2 carries both biases (summed
    per call) and the shortcut is one GEMM accumulating in place onto conv2's output (addmm_ on
    channels-last [B*H*W, C] views, baddbmm_ on NCHW [B, C, H*W] views): no shortcut convolution, no
    add; as close to the float64 block as diffusers' own; in-place updates of either bias, also
    through ``.data`` (no version bump, as an EMA's copy_to does), are seen."""
    block = _block(in_channels=12, out_channels=20)
    x, temb = _inputs(12, hw=(5, 7))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        exact = copy.deepcopy(block).double()(x.double(), temb.double())
        eager = copy.deepcopy(block).to(dtype)(x.to(dtype).contiguous(memory_format=fmt), temb.to(dtype))
    block.to(dtype)
    x, temb = x.to(dtype).contiguous(memory_format=fmt), temb.to(dtype)
    optimize(block, channels_last=channels_last)
    assert block.forward.shortcut_gemm
    with dm.kernels_forced():
        with torch.no_grad(), DispatchedOps() as ops:
            out = block(x, temb)
        assert ops.names.count("aten::convolution") == 2, ops.names  # conv1, conv2: the shortcut is a GEMM
        gemms = ops.names.count("aten::addmm_"), ops.names.count("aten::baddbmm_")
        assert gemms == ((1, 0) if channels_last else (0, 1)), ops.names
        assert "aten::addmm" in ops.names  # time_emb_proj
        assert out.is_contiguous(memory_format=fmt) and out.dtype == dtype
        assert_close_to_exact(out, exact.to(dtype), eager)
        with torch.no_grad():
            block.conv_shortcut.bias.data.add_(1.0)  # no version bump
            moved = block(x, temb)
            block.conv_shortcut.bias.data.sub_(1.0)
            block.conv2.bias.data.sub_(1.0)
            moved_back = block(x, temb)
            block.conv2.bias.data.add_(1.0)
        torch.testing.assert_close(moved.double(), out.double() + 1.0, rtol=0, atol=0.02)
        torch.testing.assert_close(moved_back.double(), out.double() - 1.0, rtol=0, atol=0.02)
        xg = x.clone().requires_grad_(True)
        with DispatchedOps() as ops:
            block(xg, temb).float().sum().backward()
        assert ops.names.count("aten::convolution") == 3 and xg.grad is not None  # training: diffusers' own
    restore(block)


def test_fp32_follows_the_tf32_settings_of_the_convolution_it_replaces(monkeypatch):
    """On CUDA an fp32 GEMM runs TF32 only when matmuls may; the 1x1 convolution it replaces follows
    cuDNN's flag: the GEMM runs only when both agree (emulated: the check reads the flags)."""
    from ldm_fast import _fusion

    x = torch.randn(1, 2, 2, 2)
    assert _fusion.gemm_like_conv(x)  # a CPU tensor: no TF32 anywhere
    assert _fusion.gemm_like_conv(x.half())
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    try:  # (the flags are set and put back by hand: monkeypatch cannot delete these properties)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        assert not _fusion.gemm_like_conv(x) and _fusion.gemm_like_conv(x.half())
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _fusion.gemm_like_conv(x)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _LoCon(nn.Module):
    """A LoCon/LyCORIS-style adapter: wraps a convolution, adds a low-rank convolution (no stride,
    padding or groups attributes of its own)."""

    def __init__(self, base: nn.Conv2d, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, padding=base.padding, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("where", ["conv2", "conv_shortcut", "conv1", "time_emb_proj", "norm2", "nonlinearity",
                                   "dropout"])
def test_a_module_swapped_in_after_optimize_is_called(where):
    """An adapter (or any module) put in place of a submodule after optimize: that module is called
    as diffusers calls it (the fusions that read it step aside on that call)."""
    block = _block(in_channels=12, out_channels=20)
    x, temb = _inputs(12)
    twin = dm.twin(block)
    optimize(block)
    for model in (block, twin):
        old = getattr(model, where)
        if isinstance(old, nn.Conv2d):
            torch.manual_seed(3)
            new = _LoCon(old)
        elif isinstance(old, nn.Linear):
            torch.manual_seed(3)
            new = nn.Sequential(old, nn.Linear(old.out_features, old.out_features))
        elif isinstance(old, nn.GroupNorm):
            new = nn.GroupNorm(old.num_groups, old.num_channels, eps=0.5)  # another eps: another result
        else:
            new = nn.Tanh()
        setattr(model, where, new)
    with torch.no_grad():
        ref = twin(x, temb)
        with dm.kernels_forced() as launched:
            out = block(x, temb)
    assert launched["group_norm"] >= 1
    dm.assert_close_rel(out, ref)


@pytest.mark.parametrize("where", ["norm1", "norm2", "nonlinearity", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
                                   "dropout"])
def test_hooks_added_after_optimize_see_what_they_see_without_ldm_fast(where):
    block = _block(in_channels=12, out_channels=20)
    x, temb = _inputs(12)
    twin = dm.twin(block)
    optimize(block)
    seen = {"block": [], "twin": []}
    for name, model in (("block", block), ("twin", twin)):
        module = getattr(model, where)
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(("in", args[0].clone())))
        # a hook that replaces the output changes the block's output the same way
        module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(("out", out.clone())) or out * 1.5)
    with torch.no_grad():
        ref = twin(x, temb)
        with dm.kernels_forced():
            out = block(x, temb)
    assert [k for k, _ in seen["block"]] == [k for k, _ in seen["twin"]] and seen["twin"]
    for (_, a), (_, b) in zip(seen["block"], seen["twin"]):
        dm.assert_close_rel(a, b)
    dm.assert_close_rel(out, ref)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_training_dropout_is_skipped_only_where_it_returns_its_input(p):
    """In training a Dropout with p = 0 (diffusers' default) returns its input without drawing random
    numbers: the fused forward skips its call (same output and gradients, the generator untouched);
    with p > 0 it is called, drawing the same mask diffusers' forward draws."""
    from ldm_fast._fusion import inert_dropout

    block = _block(in_channels=12, out_channels=20, dropout=p).train()
    x, temb = _inputs(12)
    twin = dm.twin(block)
    optimize(block)
    assert inert_dropout(block.dropout) == (p == 0)
    grads = {}
    for name, model in (("twin", twin), ("block", block)):
        torch.manual_seed(11)
        xg = x.clone().requires_grad_(True)
        with dm.kernels_forced() if name == "block" else torch.enable_grad():
            out = model(xg, temb)
        grads[name] = (out, torch.get_rng_state(), torch.autograd.grad(out.square().sum(), xg)[0])
    (ref, ref_rng, ref_grad), (out, rng, grad) = grads["twin"], grads["block"]
    assert torch.equal(rng, ref_rng)
    dm.assert_close_rel(out, ref)
    dm.assert_close_rel(grad, ref_grad)


def test_inference_mode_and_in_place_weight_updates_without_a_version_bump():
    """EMAModel.copy_to / p.data.copy_(): the next call uses the new weights (nothing derived from
    weights is cached); inference_mode: no version counter is read."""
    block = _block(in_channels=12, out_channels=20)
    x, temb = _inputs(12)
    twin = dm.twin(block)
    optimize(block)
    new = dm.twin(block)
    for p in new.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    with torch.inference_mode(), dm.kernels_forced():
        before = block(x, temb)
        for p, q, r in zip(block.parameters(), new.parameters(), twin.parameters()):
            p.data.copy_(q.data)
            r.data.copy_(q.data)
        after = block(x, temb)
        ref = twin(x, temb)
    dm.assert_close_rel(after, ref)
    assert (after - before).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# the whole U-Net: the shared time-embedding SiLU and the packed time projections


def _time_blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "ResnetBlock2D" and m.time_emb_proj is not None]


@pytest.mark.slow
def test_time_projections_packed_into_one_gemm_a_step_and_restore(monkeypatch):
    """pack_weights (the default): every block's time_emb_proj is a row block of one buffer (the same
    Parameters, state dict and values); in inference on the Triton backend one GEMM a step computes
    them all (each block reads its columns); a step with gradients runs the blocks' own GEMMs; restore
    unpacks; pack_weights=False leaves the storages alone."""
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    report = optimize(unet)
    blocks = _time_blocks(unet)
    pack = blocks[0].forward.time_pack
    assert isinstance(pack, PackedTimeProjections) and all(b.forward.time_pack is pack for b in blocks)
    assert pack.weight.shape == (sum(b.time_emb_proj.out_features for b in blocks), 128)
    assert len(report.paths("pack_weights")) == len(blocks)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w is pack.weight) or linear(x, w, b))
    assert torch.equal(dm.run_unet(unet, inputs), ref) and not any(calls)  # the CPU: the blocks' own
    with dm.kernels_forced():
        calls.clear()
        out = dm.run_unet(unet, inputs)
        assert calls.count(True) == 1  # one packed GEMM for every block of the step
        dm.assert_close_rel(out, ref)
        # a block called twice with the same embedding (its weights updated in place between) computes anew
        block, temb = blocks[0], torch.randn(2, 128)
        with torch.no_grad():
            first = pack.project(block.time_emb_proj, temb).clone()
            saved = block.time_emb_proj.bias.clone()
            block.time_emb_proj.bias.data.add_(1.0)
            second = pack.project(block.time_emb_proj, temb)
            block.time_emb_proj.bias.data.copy_(saved)
        torch.testing.assert_close(second, first + 1.0, rtol=0, atol=1e-5)
        calls.clear()
        unet(*inputs).sample.sum().backward()  # gradients to record: the blocks' own GEMMs
        assert not any(calls) and blocks[0].time_emb_proj.weight.grad is not None
    restore(unet)
    storages = [p.untyped_storage()._cdata for p in unet.parameters()]
    assert len(set(storages)) == len(storages)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    report = optimize(unet, pack_weights=False)
    assert report.paths("pack_weights") == [] and blocks[0].forward.time_pack is None
    restore(unet)


@pytest.mark.slow
def test_packed_time_projections_step_aside_for_a_swapped_or_reallocated_projection():
    unet, inputs = dm.unet(), dm.unet_inputs()
    twin = dm.twin(unet)
    optimize(unet)
    blocks, twin_blocks = _time_blocks(unet), _time_blocks(twin)
    for model_blocks in (blocks, twin_blocks):
        torch.manual_seed(5)
        lin = model_blocks[1].time_emb_proj
        model_blocks[1].time_emb_proj = nn.Sequential(lin, nn.Linear(lin.out_features, lin.out_features))
        model_blocks[2].time_emb_proj.weight.data = model_blocks[2].time_emb_proj.weight.data * 2  # re-allocated
    with dm.kernels_forced():
        out = dm.run_unet(unet, inputs)
    dm.assert_close_rel(out, dm.run_unet(twin, inputs))


@pytest.mark.slow
def test_time_embedding_silu_computed_once_per_step_in_inference():
    """Every ResnetBlock2D applies the same SiLU to the one time embedding: on the kernel path
    inference dispatches it once; with autograd each block its own."""
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    optimize(unet)
    with dm.kernels_forced():
        with torch.no_grad(), DispatchedOps() as ops:
            out = unet(*inputs).sample
        # one for the time embedding of every block (the norms' SiLUs are in their kernels); the time
        # embedding MLP's own and conv_act's after conv_norm_out
        assert ops.names.count("aten::silu") == 3
        dm.assert_close_rel(out, ref)
        with DispatchedOps() as ops:
            unet(*inputs).sample.sum().backward()
    assert ops.names.count("aten::silu") == len(_time_blocks(unet)) + 2
    restore(unet)


# ---------------------------------------------------------------------------------------------
# what optimize refuses


@pytest.mark.slow
def test_an_unknown_source_is_left_with_one_warning(monkeypatch):
    monkeypatch.setitem(supported.SUPPORTED, "ResnetBlock2D.forward", {})
    unet, inputs = dm.unet(), dm.unet_inputs()
    ref = dm.run_unet(unet, inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = optimize(unet)
    ours = [w for w in caught if "ldm_fast.optimize" in str(w.message)]
    assert len(ours) == 1 and f"diffusers {diffusers.__version__}" in str(ours[0].message)
    assert "resnet on 8 ResnetBlock2D" in str(ours[0].message)
    left = [item for item in report.left if item.what == "resnet"]
    assert len(left) == 8 and all("is not the code ldm_fast reproduces" in item.reason for item in left)
    text = str(report)
    assert all(item.path in text for item in left)
    assert all("forward" not in b.__dict__ for b in _time_blocks(unet))
    with dm.kernels_forced():
        dm.assert_close_rel(dm.run_unet(unet, inputs), ref)
    restore(unet)


def test_a_hooked_or_instance_forward_block_is_left():
    block = _block()
    block.forward = lambda *a, **k: ResnetBlock2D.forward(block, *a, **k)  # as accelerate does
    report = optimize(block)
    assert any(item.what == "resnet" and "instance-level forward" in item.reason for item in report.left)
    restore(block)


def test_deprecated_scale_argument_runs_diffusers_forward():
    block = _block()
    x, temb = _inputs()
    ref = block(x, temb).detach()
    optimize(block)
    with torch.no_grad(), dm.kernels_forced(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = block(x, temb, 1.0)  # diffusers' own forward: its deprecation message, its statements
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    restore(block)
