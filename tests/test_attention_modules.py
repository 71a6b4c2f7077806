"""The attention modules and integrations: ldm_fast.nn.CrossAttention and SpatialSelfAttention against
the eager CompVis formulas (float64 and fp32), ldm_fast.integrations.diffusers.AttnProcessor against
diffusers' AttnProcessor2_0 (optimize(attention=True) on whole models: tests/test_diffusers_attention.py).

Every equality runs with the default backend (on CPU: SDPA through functional.attention) and, at
tiny shapes, with the Triton kernel forced (``use_backend("triton")`` and
``LDM_FAST_ATTENTION=triton``: the kernel runs under Triton's interpreter), which is proven to
have run by the launch counter."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import ldm_fast
from ldm_fast.integrations.diffusers import AttnProcessor as LdmAttnProcessor
from ldm_fast.nn import CrossAttention, SpatialSelfAttention
from ldm_fast.nn import GroupNorm as LdmGroupNorm

from _numerics import check_attention as _check

BACKENDS = ["default", "triton"]
#: (backend, dtype): float64 and fp32 with the default backend; fp32 with the Triton kernel (it takes
#: fp32/fp16/bf16; float64 runs SDPA whatever the backend).
BACKEND_DTYPES = [
    pytest.param("default", torch.float64, id="default-f64"),
    pytest.param("default", torch.float32, id="default-f32"),
    pytest.param("triton", torch.float32, id="triton-f32"),
]


# ---------------------------------------------------------------------------------------------
# CompVis references, as CompVis writes them (einops' rearranges spelled as reshapes)


def compvis_attn_block(m, x):
    """CompVis ``AttnBlock.forward`` (ldm/modules/diffusionmodules/model.py) on m's submodules."""
    h_ = m.norm(x)
    q = m.q(h_)
    k = m.k(h_)
    v = m.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w)
    q = q.permute(0, 2, 1)  # b,hw,c
    k = k.reshape(b, c, h * w)  # b,c,hw
    w_ = torch.bmm(q, k)  # b,hw,hw    w[b,i,j]=sum_c q[b,i,c]k[b,c,j]
    w_ = w_ * (int(c) ** (-0.5))
    w_ = torch.nn.functional.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    w_ = w_.permute(0, 2, 1)  # b,hw,hw (first hw of k, second of q)
    h_ = torch.bmm(v, w_)  # b, c,hw (hw of q) h_[b,c,j] = sum_i v[b,c,i] w_[b,i,j]
    h_ = h_.reshape(b, c, h, w)
    h_ = m.proj_out(h_)
    return x + h_


class CompVisAttnBlock(nn.Module):
    """CompVis ``AttnBlock`` (``Normalize(C)`` = ``GroupNorm(32, C, eps=1e-6, affine=True)``)."""

    def __init__(self, in_channels):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        return compvis_attn_block(self, x)


def compvis_cross_attention(m, x, context=None, mask=None):
    """CompVis ``CrossAttention.forward`` (ldm/modules/attention.py) on m's submodules."""
    h = m.heads
    q = m.to_q(x)
    context = x if context is None else context
    k = m.to_k(context)
    v = m.to_v(context)

    def split(t):  # rearrange(t, 'b n (h d) -> (b h) n d', h=h)
        b, n, hd = t.shape
        return t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3).reshape(b * h, n, hd // h)

    q, k, v = map(split, (q, k, v))
    sim = torch.einsum("b i d, b j d -> b i j", q, k) * m.scale
    if mask is not None:
        mask = mask.reshape(mask.shape[0], -1)  # rearrange(mask, 'b ... -> b (...)')
        max_neg_value = -torch.finfo(sim.dtype).max
        mask = mask[:, None, :].repeat_interleave(h, dim=0)  # repeat(mask, 'b j -> (b h) () j', h=h)
        sim.masked_fill_(~mask, max_neg_value)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("b i j, b j d -> b i d", attn, v)
    bh, n, d = out.shape  # rearrange(out, '(b h) n d -> b n (h d)', h=h)
    out = out.reshape(bh // h, h, n, d).permute(0, 2, 1, 3).reshape(bh // h, n, h * d)
    return m.to_out(out)


def _randomize(module, seed=0):
    """Random parameters: weights ~ N(0, 1/fan-in), norm scales 1 + N(0, 0.3), biases N(0, 0.3)
    (a wrong affine or bias term shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.3 * noise + (1.0 if name.startswith("norm") and name.endswith("weight") else 0.0))
    return module


# ---------------------------------------------------------------------------------------------
# SpatialSelfAttention


def _spatial(channels=64, seed=0):
    return _randomize(SpatialSelfAttention(channels), seed).eval()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_spatial_self_attention_matches_compvis(backend, dtype, layout, run_on, poison):
    m = _spatial()
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))
    exact = compvis_attn_block(copy.deepcopy(m).double(), x.double())
    eager = compvis_attn_block(copy.deepcopy(m).to(dtype), x.to(dtype))
    m = m.to(dtype)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), run_on(backend):
        out = m(x)
    assert out.shape == x.shape and out.dtype == dtype
    # the output keeps x's layout
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    _check(out, exact, eager, backend, run_on)


def test_spatial_self_attention_state_dict_is_compvis():
    """The keys are CompVis AttnBlock's; a CompVis state dict loads strictly (and back) and gives the
    CompVis block's output."""
    theirs = _randomize(CompVisAttnBlock(64), seed=3)
    ours = SpatialSelfAttention(64)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours.norm, LdmGroupNorm) and (ours.norm.num_groups, ours.norm.eps) == (32, 1e-6)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    ours, theirs = ours.double(), theirs.double()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)


def test_spatial_self_attention_reads_packed_weights_without_a_copy(monkeypatch):
    """At inference q/k/v weights and biases are read as one matrix/vector: a view of their packed
    storage (no torch.cat), after .to(), deepcopy, pickle and load_state_dict(assign=True) too; a
    view of the live storage, so in-place updates are seen."""
    m = _spatial()
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        expected = compvis_attn_block(m, x)
    copies = {
        "self": m,
        "double": copy.deepcopy(m).double(),
        "deepcopy": copy.deepcopy(m),
        "assign": copy.deepcopy(m),
    }
    copies["assign"].load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    copies["pickle"] = torch.load(buf, weights_only=False)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called at inference: the packed weights were not used")

    monkeypatch.setattr(torch, "cat", no_cat)
    for name, module in copies.items():
        xin = x.to(module.q.weight.dtype)
        with torch.no_grad():
            out = module(xin)
        torch.testing.assert_close(out.float(), expected, msg=name)
    with torch.no_grad():
        m.v.weight.mul_(-2.0)
        m.k.bias.add_(1.0)
        out = m(x)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(out, compvis_attn_block(m, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_self_attention_gradients(backend, run_on):
    """Gradients of x and of every parameter equal the CompVis formula's (float64; the Triton
    backward on a tiny fp32 case)."""
    dtype, shape = (torch.float64, (2, 64, 4, 4)) if backend == "default" else (torch.float32, (1, 32, 4, 4))
    m = _spatial(shape[1]).to(dtype)
    ref = copy.deepcopy(m)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with run_on(backend):
        m(x).backward(grad)
    compvis_attn_block(ref, x_ref).backward(grad)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=name)
    if backend == "triton":
        assert run_on.launched()


def test_spatial_self_attention_hooked_submodule_is_called():
    """A hook (or a LoRA wrapper) on a projection makes the block call its submodules: the hook
    runs and its change is in the output, as in the CompVis block."""
    m = _spatial()
    calls = []
    m.k.register_forward_hook(lambda mod, args, out: calls.append(1) or out * 0.5)
    m.proj_out.register_forward_pre_hook(lambda mod, args: calls.append(2))
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        out = m(x)
        assert calls == [1, 2]
        expected = compvis_attn_block(m, x)
    torch.testing.assert_close(out, expected)


def test_spatial_self_attention_autocast_keeps_the_residual_dtype():
    """Under autocast the residual stays in x's dtype (x + fp16 projection -> fp32, as eager)."""
    m = _spatial()
    x = torch.randn(1, 64, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        expected = compvis_attn_block(m, x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


def test_spatial_self_attention_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 64, H, W\]"):
        SpatialSelfAttention(64)(torch.randn(2, 32, 4, 4))


# ---------------------------------------------------------------------------------------------
# CrossAttention


def _cross(query_dim=32, context_dim=None, heads=4, dim_head=8, seed=0):
    return _randomize(CrossAttention(query_dim, context_dim, heads=heads, dim_head=dim_head), seed).eval()


CROSS_CASES = {
    # name: (query_dim, context_dim, heads, dim_head, N, L): SD-like layouts at tiny widths
    "self": (32, None, 4, 8, 16, None),  # attn1: q, k, v from one packed GEMM
    "self-n64": (64, None, 4, 16, 64, None),  # more tokens than one kernel block
    "cross-77": (32, 48, 4, 8, 16, 77),  # attn2: the CLIP context length
    "cross-1head": (64, 32, 1, 64, 16, 77),  # one wide head
}


@pytest.mark.parametrize("case", list(CROSS_CASES))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_cross_attention_matches_compvis(backend, dtype, case, run_on, poison):
    query_dim, context_dim, heads, dim_head, n, length = CROSS_CASES[case]
    m = _cross(query_dim, context_dim, heads, dim_head)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, query_dim, generator=g)
    context = None if length is None else torch.randn(2, length, context_dim, generator=g)
    exact = compvis_cross_attention(copy.deepcopy(m).double(), x.double(),
                                    None if context is None else context.double())
    eager = compvis_cross_attention(copy.deepcopy(m).to(dtype), x.to(dtype),
                                    None if context is None else context.to(dtype))
    m = m.to(dtype)
    with torch.no_grad(), run_on(backend):
        out = m(x.to(dtype), None if context is None else context.to(dtype))
    assert out.shape == (2, n, query_dim) and out.dtype == dtype
    _check(out, exact, eager, backend, run_on)


def test_cross_attention_state_dict_keys_and_attributes():
    m = CrossAttention(320, 768, heads=8, dim_head=40)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"to_q.weight": (320, 320), "to_k.weight": (320, 768), "to_v.weight": (320, 768),
                      "to_out.0.weight": (320, 320), "to_out.0.bias": (320,)}
    assert m.heads == 8 and m.scale == 40 ** -0.5 and isinstance(m.to_out[1], nn.Dropout)
    assert m.to_q.bias is None and m.to_k.bias is None and m.to_v.bias is None


def test_cross_attention_gradients():
    m = _cross(32, 48).double()
    ref = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=g, requires_grad=True)
    ctx = torch.randn(2, 77, 48, dtype=torch.float64, generator=g, requires_grad=True)
    x_ref, ctx_ref = (t.detach().clone().requires_grad_() for t in (x, ctx))
    grad = torch.randn(2, 16, 32, dtype=torch.float64, generator=g)
    (m(x, ctx) * grad).sum().backward()
    (compvis_cross_attention(ref, x_ref, ctx_ref) * grad).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ctx.grad, ctx_ref.grad, rtol=1e-10, atol=1e-10)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_cross_attention_mask_runs_the_compvis_formula():
    m = _cross(32, 48).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, dtype=torch.float64, generator=g)
    ctx = torch.randn(2, 77, 48, dtype=torch.float64, generator=g)
    mask = torch.rand(2, 77, generator=g) > 0.3
    mask[1] = False  # a fully masked row: uniform attention, as CompVis
    with torch.no_grad():
        torch.testing.assert_close(m(x, ctx, mask=mask), compvis_cross_attention(m, x, ctx, mask), rtol=0, atol=1e-12)
        with pytest.raises(TypeError, match="bool"):
            m(x, ctx, mask=mask.double())


def test_cross_attention_wrapped_projection_is_called_and_packing_is_kept(monkeypatch):
    """A hook on to_v makes the module call the projections one by one; without one, inference reads
    q/k/v (self) and k/v (cross) as one packed weight, without torch.cat."""
    m = _cross(32, None)
    x = torch.randn(2, 16, 32)
    ctx = torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = (compvis_cross_attention(m, x), compvis_cross_attention(m, x, ctx))
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("torch.cat at inference"))
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected[0])
        torch.testing.assert_close(m(x, ctx), expected[1])
    monkeypatch.undo()
    handle = m.to_v.register_forward_hook(lambda mod, args, out: out * 2)
    with torch.no_grad():
        torch.testing.assert_close(m(x, ctx), compvis_cross_attention(m, x, ctx))
    handle.remove()


def test_cross_attention_self_without_matching_dims_raises():
    with pytest.raises(RuntimeError):
        _cross(32, 48)(torch.randn(2, 16, 32))


def test_modules_compile_to_one_graph():
    """torch.compile traces each module whole (fullgraph: no graph break; the packed-weight view is
    not used under compile, the weights are concatenated in the graph) and computes the same."""
    torch._dynamo.reset()
    spatial, x = _spatial(32), torch.randn(1, 32, 4, 4)
    cross, xc, ctx = _cross(32, 48), torch.randn(2, 16, 32), torch.randn(2, 77, 48)
    self_attn = _cross(32)
    with torch.no_grad():
        for module, args in ((spatial, (x,)), (cross, (xc, ctx)), (self_attn, (xc,))):
            compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(*args), module(*args))


# ---------------------------------------------------------------------------------------------
# diffusers AttnProcessor

try:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
except ImportError:  # the CompVis module tests above run without diffusers
    AutoencoderKL = UNet2DConditionModel = Attention = AttnProcessor = AttnProcessor2_0 = None
needs_diffusers = pytest.mark.skipif(Attention is None, reason="diffusers is not installed: pip install -e '.[test]'")


@pytest.mark.slow
def test_importing_ldm_fast_does_not_import_diffusers():
    code = ("import sys, ldm_fast, ldm_fast.integrations.diffusers; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _attention(kind):
    """(module, hidden_states, call kwargs) for each kind of diffusers Attention."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    if kind == "self":
        attn = Attention(query_dim=32, heads=4, dim_head=8)
        return attn, torch.randn(2, 16, 32, generator=g), {}
    if kind == "cross":
        attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, out_bias=True)
        return attn, torch.randn(2, 16, 32, generator=g), {"encoder_hidden_states": torch.randn(2, 77, 24, generator=g)}
    if kind == "vae":  # diffusers' UNetMidBlock2D attention of the VAE, on 4-d input
        attn = Attention(64, heads=1, dim_head=64, rescale_output_factor=2.0, eps=1e-6, norm_num_groups=32,
                         residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)
        return attn, torch.randn(2, 64, 8, 8, generator=g), {}
    if kind == "spatial_norm":  # the MoVQ-style decoder attention: SpatialNorm(f, zq) instead of group_norm
        attn = Attention(32, heads=2, dim_head=16, spatial_norm_dim=4, residual_connection=True, bias=True)
        return attn, torch.randn(2, 32, 4, 4, generator=g), {"temb": torch.randn(2, 4, 2, 2, generator=g)}
    if kind in ("qk_layer_norm", "qk_rms_norm"):
        attn = Attention(query_dim=32, heads=4, dim_head=8, qk_norm=kind[3:])
        return attn, torch.randn(2, 16, 32, generator=g), {}
    if kind == "cross_norm":  # norm_cross="layer_norm" on the encoder states
        attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, cross_attention_norm="layer_norm")
        return attn, torch.randn(2, 16, 32, generator=g), {"encoder_hidden_states": torch.randn(2, 77, 24, generator=g)}
    raise ValueError(kind)


def _randomize_attention(attn):
    """Random affine parameters too (diffusers initializes norms to 1/0), so a wrong norm shows."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.3 * torch.randn(p.shape, generator=g))
    return attn


def _run(attn, processor, hidden, kwargs, dtype):
    attn = copy.deepcopy(attn).to(dtype)
    attn.set_processor(processor)
    cast = {k: v.to(dtype) for k, v in kwargs.items()}
    with torch.no_grad():
        return attn(hidden.to(dtype), **cast)


ATTENTION_KINDS = ["self", "cross", "vae", "spatial_norm", "qk_layer_norm", "qk_rms_norm", "cross_norm"]
#: With the Triton kernel: the three attention layouts of SD (the norm variants differ from them only
#: outside the attention call).
PROCESSOR_CASES = [pytest.param(b, d, k, id=f"{b}-{str(d)[6:]}-{k}") for k in ATTENTION_KINDS
                   for b, d in (("default", torch.float64), ("default", torch.float32))]
PROCESSOR_CASES += [pytest.param("triton", torch.float32, k, id=f"triton-float32-{k}")
                    for k in ("self", "cross", "vae")]


@needs_diffusers
@pytest.mark.parametrize("backend, dtype, kind", PROCESSOR_CASES)
def test_processor_matches_attn_processor_2_0(backend, dtype, kind, run_on):
    attn, hidden, kwargs = _attention(kind)
    attn = _randomize_attention(attn)
    assert type(attn.processor) is AttnProcessor2_0
    exact = _run(attn, AttnProcessor2_0(), hidden, kwargs, torch.float64)
    eager = _run(attn, AttnProcessor2_0(), hidden, kwargs, dtype)
    with run_on(backend):
        out = _run(attn, LdmAttnProcessor(), hidden, kwargs, dtype)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    if backend == "default" and dtype == torch.float32:
        # on CPU functional.attention runs SDPA on the same views: bit for bit (in float64 its scale
        # D**-0.5 and SDPA's own 1/sqrt(D) may differ in the last bit)
        assert torch.equal(out, eager)
    _check(out, exact, eager, backend, run_on)


@needs_diffusers
@pytest.mark.parametrize("case", ["attention_mask", "other_norm_q"])
def test_processor_uncovered_cases_run_attn_processor_2_0(case):
    """An attention mask, or a q/k norm that is not a per-head row norm: AttnProcessor2_0's own
    statements (bit for bit its result)."""
    if case == "attention_mask":
        attn, hidden, kwargs = _attention("cross")
        mask = torch.zeros(2, 77)
        mask[:, 60:] = -10000.0
        kwargs["attention_mask"] = mask
    else:
        attn, hidden, kwargs = _attention("qk_layer_norm")
        attn.norm_q = nn.Identity()
    before = ldm_fast.ops.kernel_launches["attention"]
    ref = _run(attn, AttnProcessor2_0(), hidden, kwargs, torch.float32)
    out = _run(attn, LdmAttnProcessor(impl="triton"), hidden, kwargs, torch.float32)
    assert torch.equal(out, ref)
    assert ldm_fast.ops.kernel_launches["attention"] == before


@needs_diffusers
def test_processor_scale_argument_warns_as_diffusers():
    attn, hidden, _ = _attention("self")
    with pytest.warns(FutureWarning, match="scale"):
        ours = LdmAttnProcessor()(attn, hidden, None, None, None, 2.0)
    with pytest.warns(FutureWarning, match="scale"):
        theirs = AttnProcessor2_0()(attn, hidden, None, None, None, 2.0)
    assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="impl"):
        LdmAttnProcessor(impl="flash")


def test_spatial_self_attention_keeps_its_convolutions_where_tf32_differs(monkeypatch):
    """An fp32 input on a GPU whose TF32 settings differ for matmuls (off by default) and cuDNN
    convolutions (on): the 1x1 q/k/v/proj_out convolutions run as convolutions, as CompVis computes
    them (emulated on the CPU: the check reads the flags and ``is_cuda``)."""
    from _dispatch import DispatchedOps

    torch.manual_seed(0)
    block = SpatialSelfAttention(8, num_groups=2).eval()
    x = torch.randn(1, 8, 3, 3)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for matmul_tf32, convs in ((True, 0), (False, 4)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, True
            with monkeypatch.context() as m, torch.no_grad(), DispatchedOps() as ops:
                m.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
                block(x)
            assert ops.names.count("aten::convolution") == convs, ops.names
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
