"""The SD-style models: CompVis key names, diffusers parity on the same weights, lossless conversion."""

import pytest
import torch

import ldm_fast
from ldm_fast.models import convert
from ldm_fast.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from ldm_fast.models.unet import UNetModel, timestep_embedding

diffusers = pytest.importorskip("diffusers", reason="diffusers (the test extra) is the parity reference")


def _diffusers_vae(levels=3, layers=1, groups=8):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64)[:levels], down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=layers, norm_num_groups=groups,
        latent_channels=4,
    ).eval()


def _diffusers_unet(**overrides):
    """SD 1.5's block structure (CrossAttn x2 + plain down block, mirrored up; 2 res blocks per level)
    at toy widths, heads per level as diffusers' attention_head_dim tuples give them."""
    torch.manual_seed(0)
    config = dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=(2, 4, 4), sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    config.update(overrides)
    return diffusers.UNet2DConditionModel(**config).eval()


# ---------------------------------------------------------------------------------------------
# SD defaults: the known parameter counts and CompVis key names


def test_sd_parameter_counts_and_compvis_keys():
    with torch.device("meta"):
        unet, vae = UNetModel(), AutoencoderKL()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in vae.encoder.parameters()) == 34_163_592
    assert sum(p.numel() for p in vae.decoder.parameters()) == 49_490_179
    keys = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    expected = {
        "time_embed.0.weight": (1280, 320), "time_embed.2.weight": (1280, 1280), "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,), "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280), "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1), "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "middle_block.1.transformer_blocks.0.norm3.weight": (1280,), "middle_block.2.out_layers.0.bias": (1280,),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "out.0.weight": (320,), "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert keys.get(key) == shape, key
    assert not any(".to_q.bias" in k for k in keys)
    vae_keys = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    for key, shape in {
        "encoder.conv_out.weight": (8, 512, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1), "decoder.up.0.block.2.norm1.weight": (128,),
    }.items():
        assert vae_keys.get(key) == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in vae_keys and "decoder.up.0.upsample.conv.weight" not in vae_keys


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 500, 999])
    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, 320), expected)


# ---------------------------------------------------------------------------------------------
# parity with diffusers on the same weights


@pytest.mark.parametrize("kernels", [False, True], ids=["eager", "triton-interpreted"])
def test_vae_matches_diffusers(kernels, monkeypatch):
    ref = _diffusers_vae()
    ours = AutoencoderKL.from_diffusers(ref).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments_ref = ref.quant_conv(ref.encoder(x))
        image_ref = ref.decode(z).sample
        if kernels:
            monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
            ldm_fast.backend.reload_env()
        before = ldm_fast.ops.kernel_launches.copy()
        with ldm_fast.use_backend("triton" if kernels else "eager"):
            moments = ours.encode(x).moments
            image = ours.decode(z)
    if kernels:
        assert ldm_fast.ops.kernel_launches["attention"] > before["attention"]
        assert ldm_fast.ops.kernel_launches["group_norm"] > before["group_norm"]
    tol = dict(rtol=1e-4, atol=1e-4) if kernels else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments, moments_ref, **tol)
    torch.testing.assert_close(image, image_ref, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [False, True], ids=["eager", "triton-interpreted"])
def test_unet_matches_diffusers(kernels, monkeypatch):
    ref = _diffusers_unet()
    ours = UNetModel.from_diffusers(ref).eval()
    assert ours.config["attention_levels"] == (0, 1) and ours.config["num_heads"] == (2, 4, 4)
    g = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g), torch.tensor([3, 999])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=context).sample
        if kernels:
            monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
            ldm_fast.backend.reload_env()
        before = ldm_fast.ops.kernel_launches.copy()
        with ldm_fast.use_backend("triton" if kernels else "eager"):
            out = ours(x, t, context)
    if kernels:
        assert ldm_fast.ops.kernel_launches["attention"] > before["attention"]
    tol = dict(rtol=1e-4, atol=1e-4) if kernels else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)


@pytest.mark.slow
def test_unet_trains_through_the_kernels(monkeypatch):
    """Gradients through our U-Net (GroupNorm and attention backward kernels, interpreted) equal
    diffusers' on the same weights."""
    ref = _diffusers_unet(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, layers_per_block=1)
    ours = UNetModel.from_diffusers(ref)
    g = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 24, generator=g), torch.tensor([10])
    ref(x, t, encoder_hidden_states=context).sample.square().mean().backward()
    monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
    ldm_fast.backend.reload_env()
    with ldm_fast.use_backend("triton"):
        ours(x, t, context).square().mean().backward()
    ours_grads = dict(ours.named_parameters())
    for name, grad in convert.unet_to_diffusers({k: p.grad for k, p in ours_grads.items()}).items():
        torch.testing.assert_close(grad, dict(ref.named_parameters())[name].grad, rtol=1e-3, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# conversion


def test_state_dict_round_trips_are_lossless():
    for model, there, back in ((_diffusers_vae(), convert.vae_from_diffusers, convert.vae_to_diffusers),
                               (_diffusers_unet(), convert.unet_from_diffusers, convert.unet_to_diffusers)):
        state = model.state_dict()
        again = back(there(state))
        assert set(again) == set(state)
        for key, value in state.items():
            assert again[key].shape == value.shape and torch.equal(again[key], value), key


def test_compvis_checkpoint_loads_strict(tmp_path):
    """A full CompVis-layout checkpoint (model.diffusion_model.*, first_stage_model.*, schedule
    buffers) written as .ckpt and as .safetensors loads into our models with strict=True."""
    unet, vae = UNetModel.from_diffusers(_diffusers_unet()), AutoencoderKL.from_diffusers(_diffusers_vae())
    full = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    full.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    full["alphas_cumprod"] = torch.rand(1000)
    torch.save({"state_dict": full}, tmp_path / "model.ckpt")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "model.safetensors"))
    for name in ("model.ckpt", "model.safetensors"):
        unet_state, vae_state = convert.split_compvis_checkpoint(convert.load_state_dict_file(tmp_path / name))
        fresh_unet = UNetModel(**unet.config)
        fresh_unet.load_state_dict(unet_state, strict=True)
        AutoencoderKL(**vae.config).load_state_dict(vae_state, strict=True)
        assert torch.equal(fresh_unet.out[2].weight, unet.out[2].weight)


def test_missing_and_misshaped_keys_are_named():
    unet = UNetModel.from_diffusers(_diffusers_unet())
    state = unet.state_dict()
    missing = dict(state)
    del missing["out.2.weight"]
    with pytest.raises(RuntimeError, match=r"out\.2\.weight"):
        UNetModel(**unet.config).load_state_dict(missing, strict=True)
    bad = dict(state, **{"time_embed.0.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match=r"time_embed\.0\.weight"):
        UNetModel(**unet.config).load_state_dict(bad, strict=True)
    with pytest.raises(KeyError, match="extra_thing"):
        convert.unet_from_diffusers(dict(_diffusers_unet().state_dict(), extra_thing=torch.zeros(1)))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift"),
        (dict(up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")), "up_block_types"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(block_out_channels=(32, 48, 64)), "block_out_channels"),
    ],
    ids=["scale-shift", "asymmetric-up-blocks", "class-embedding", "channel-multiples"],
)
def test_unsupported_diffusers_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        UNetModel.from_diffusers(_diffusers_unet(**overrides))


# ---------------------------------------------------------------------------------------------
# the posterior


def test_posterior_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Reference

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(3)) * 3
    ours, ref = DiagonalGaussianDistribution(moments), Reference(moments)
    torch.testing.assert_close(ours.kl(), ref.kl())
    torch.testing.assert_close(ours.nll(moments[:, :4]), ref.nll(moments[:, :4]))
    other_m = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(ours.kl(DiagonalGaussianDistribution(other_m)), ref.kl(Reference(other_m)))
    assert torch.equal(ours.mode(), ref.mode())
    noise = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(ours.sample(noise=noise), ref.mean + ref.std * noise)
    assert torch.equal(ours.sample(seed=5), ours.sample(seed=5))
    torch.testing.assert_close(ours.sample(noise=noise, scale=0.18215), (ref.mean + ref.std * noise) * 0.18215)


def test_encode_prompts_wraps_a_clip_text_model():
    """With stand-ins for transformers' CLIPTokenizer / CLIPTextModel (nothing downloaded)."""
    from types import SimpleNamespace

    from ldm_fast.models.text import encode_prompts

    class Tokenizer:
        def __call__(self, prompts, padding, max_length, truncation, return_tensors):
            assert padding == "max_length" and truncation and return_tensors == "pt"
            ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, : len(p)] = torch.tensor([ord(c) for c in p[:max_length]])
            return SimpleNamespace(input_ids=ids)

    class TextModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 6)

        def forward(self, input_ids):
            return SimpleNamespace(last_hidden_state=self.embed(input_ids))

    model = TextModel()
    out = encode_prompts(["a cat", ""], Tokenizer(), model)
    assert out.shape == (2, 77, 6)
    assert torch.equal(out[1], model.embed(torch.zeros(77, dtype=torch.long)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_transformer_block_residual_stream_fused(dtype):
    """ldm_fast's BasicTransformerBlock: both residual add + LayerNorm pairs are add_layer_norm kernels
    and, in inference on the Triton backend, the feed-forward's residual goes into its output GEMM (no
    add dispatched); the output as close to the float64 block as the eager statements; the eager
    backend computes the plain statements bit for bit; with gradients the GEMM epilogue steps aside."""
    import copy

    from _dispatch import DispatchedOps as Ops
    from _numerics import assert_close_to_exact
    from ldm_fast.models.unet import BasicTransformerBlock

    def plain(block, x, ctx):  # the block's statements without the fusions
        x = block.attn1(block.norm1(x)) + x
        x = block.attn2(block.norm2(x), ctx) + x
        return block.ff(block.norm3(x)) + x

    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, 12).eval()
    x, ctx = torch.randn(2, 6, 16), torch.randn(2, 3, 12)
    with torch.no_grad():
        exact = plain(copy.deepcopy(block).double(), x.double(), ctx.double())
        block.to(dtype)
        x, ctx = x.to(dtype), ctx.to(dtype)
        eager = plain(block, x, ctx)
        with ldm_fast.use_backend("eager"):
            assert torch.equal(block(x, ctx), eager)
        with ldm_fast.use_backend("triton"):
            before = ldm_fast.ops.kernel_launches["add_layer_norm"]
            with Ops() as ops:
                out = block(x, ctx)
            assert ldm_fast.ops.kernel_launches["add_layer_norm"] - before == 2
            assert ops.names.count("aten::add") == 0, ops.names
    assert_close_to_exact(out, exact.to(dtype), eager)
    with ldm_fast.use_backend("triton"):
        xg = x.clone().requires_grad_(True)
        with Ops() as ops:
            block(xg, ctx).float().sum().backward()
    assert ops.names.count("aten::add") >= 1 and xg.grad is not None


@pytest.mark.parametrize("kind", ["unet-resblock", "vae-resnetblock"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_blocks_run_their_1x1_shortcut_as_a_gemm(kind, channels_last):
    """ldm_fast's ResBlock (U-Net) and ResnetBlock (VAE) with a channel change: in inference on the
    Triton backend the 1x1 shortcut is one GEMM accumulating onto the last conv's output (no shortcut
    convolution, no add), the output in the input's layout and as close to the float64 block as the
    eager statements; the eager backend computes those statements bit for bit."""
    import copy

    from _dispatch import DispatchedOps
    from _numerics import assert_close_to_exact
    from ldm_fast.models.autoencoder import ResnetBlock
    from ldm_fast.models.unet import ResBlock

    torch.manual_seed(0)
    block = (ResBlock(16, 8, 24, groups=4) if kind == "unet-resblock" else ResnetBlock(16, 24, groups=4)).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = block.to(memory_format=fmt)
    x = torch.randn(2, 16, 5, 6).contiguous(memory_format=fmt)
    args = (torch.randn(2, 8),) if kind == "unet-resblock" else ()

    def run(b, *a):
        with torch.no_grad():
            return b(*a)

    twin = copy.deepcopy(block).double()
    for m in twin.modules():
        if isinstance(m, ldm_fast.nn.GroupNorm32):
            m.__class__ = ldm_fast.nn.GroupNorm  # (GroupNorm32 computes in fp32: the float64 twin in float64)
    with ldm_fast.use_backend("eager"):
        exact = run(twin, x.double(), *(a.double() for a in args))
        eager = run(block, x, *args)
        if kind == "unet-resblock":
            conv = block.out_layers[3]
            h = block.out_layers[2](block.out_layers[0](block.in_layers(x), shift=block.emb_layers(args[0])))
            plain = block.skip_connection(x) + conv(h)
        else:
            plain = block.nin_shortcut(x) + block.conv2(block.norm2(block.conv1(block.norm1(x))))
        assert torch.equal(eager, plain.detach())
    with ldm_fast.use_backend("triton"):
        with DispatchedOps() as ops:
            out = run(block, x, *args)
    # one add: the [C] bias sum, computed per call (in-place weight updates are always seen)
    assert ops.names.count("aten::convolution") == 2 and ops.names.count("aten::add") == 1, ops.names
    assert ops.names.count("aten::addmm_" if channels_last else "aten::baddbmm_") == 1, ops.names
    assert out.is_contiguous(memory_format=fmt)
    assert_close_to_exact(out, exact.float(), eager)


def test_resblocks_share_the_time_embedding_silu_in_inference():
    """Every ResBlock of a step gets the same embedding and applies the same SiLU: in inference it is
    computed once (ldm_fast.nn.shared_silu), the blocks' outputs unchanged bit for bit; with a gradient
    to record each block computes its own."""
    from _dispatch import DispatchedOps
    from ldm_fast.models.unet import ResBlock

    torch.manual_seed(0)
    blocks = [ResBlock(16, 8, groups=4).eval() for _ in range(3)]
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        ref = [b.out_layers[3](b.out_layers[0](b.in_layers(x), shift=b.emb_layers(emb))) + x for b in blocks]
        with DispatchedOps() as ops:
            outs = [b(x, emb) for b in blocks]
    assert ops.names.count("aten::silu") == 2 * len(blocks) + 1, ops.names  # (the norms' SiLUs: eager backend)
    assert all(torch.equal(o, r) for o, r in zip(outs, ref))
    xg = x.clone().requires_grad_(True)
    with DispatchedOps() as ops:
        sum(b(xg, emb.requires_grad_(True)).sum() for b in blocks).backward()
    assert ops.names.count("aten::silu") == 3 * len(blocks)


@pytest.mark.slow
def test_own_unet_time_projections_packed_by_optimize(monkeypatch):
    """optimize(pack_weights=True) packs ldm_fast's own ResBlocks' emb_layers[1] too: one GEMM a step
    for every block in inference on the Triton backend (the output within the kernels' error), the same
    Parameters and state dict; restore unpacks and clears the blocks' pack."""
    from ldm_fast.models.unet import ResBlock

    ours = UNetModel.from_diffusers(_diffusers_unet()).eval()
    blocks = [m for m in ours.modules() if type(m) is ResBlock]
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        ref = ours(x, t, ctx)
    report = ldm_fast.optimize(ours)
    assert len(report.paths("pack_weights")) == len(blocks)
    packs = {id(b.time_pack) for b in blocks}
    assert len(packs) == 1 and None not in {b.time_pack for b in blocks}
    pack = blocks[0].time_pack
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda a, w, b=None: calls.append(w is pack.weight) or linear(a, w, b))
    with torch.no_grad(), ldm_fast.use_backend("triton"):
        out = ours(x, t, ctx)
    assert calls.count(True) == 1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ldm_fast.restore(ours)
    assert all(b.time_pack is None for b in blocks)
    storages = [p.untyped_storage()._cdata for b in blocks for p in b.emb_layers[1].parameters()]
    assert len(set(storages)) == len(storages)  # (the attention modules' q/k/v share storage by design)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in state.items())
