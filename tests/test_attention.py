"""attention: the Triton kernels (interpreted) against SDPA and float64, forward and backward, both layouts."""

import json

import pytest
import torch
import torch.nn.functional as TF

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.kernels import attention as attn_kernels
from ldm_fast.kernels.attention import attention_reference

from _numerics import assert_close_to_exact

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# id: (batch, heads, Nq, Nk, head_dim). SD's head dims at token counts the interpreter affords, with
# lengths that are not multiples of any block; 512 (the VAE's single head, D tiled) at a few tokens.
SHAPES = {
    "d40-self-77": (1, 2, 77, 77, 40),  # SD 1.5 level 0 (padded to 64 in registers)
    "d40-cross-130x77": (3, 2, 130, 77, 40),  # cross attention over 77 text tokens, two query blocks
    "d64-one-token": (1, 1, 1, 1, 64),
    "d64-cross-17x200": (1, 1, 17, 200, 64),  # four key blocks, a partial last one
    "d80-self-65": (1, 2, 65, 65, 80),  # level 1 (padded to 128)
    "d128-cross-33x77": (3, 1, 33, 77, 128),
    "d160-self-70": (1, 1, 70, 70, 160),  # level 2 (padded to 256): several query blocks
    "d512-vae-9x70": (1, 1, 9, 70, 512),  # VAE mid block: 4 q.k chunks, 2 output-column programs
    "d512-vae-3x3": (3, 1, 3, 3, 512),
}
GRAD_SHAPES = {k: SHAPES[k] for k in ("d40-cross-130x77", "d64-cross-17x200", "d80-self-65", "d160-self-70",
                                       "d512-vae-9x70")}


def _qkv(batch, heads, nq, nk, d, dtype, layout, seed=0):
    """q, k, v in the given layout: "flat" = [B, N, heads*D] (q, k and v as slices of one fused
    projection output for self attention, as a fused qkv Linear gives them), "bhnd" = [B, H, N, D]
    views of [B, N, H, D] buffers (what SDPA gets from diffusers' transposes)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "flat":
        if nq == nk:
            qkv = torch.randn(batch, nq, 3 * heads * d, generator=g).to(dtype)
            return qkv.chunk(3, dim=-1)
        q = torch.randn(batch, nq, heads * d, generator=g).to(dtype)
        kv = torch.randn(batch, nk, 2 * heads * d, generator=g).to(dtype)
        return (q, *kv.chunk(2, dim=-1))
    q = torch.randn(batch, nq, heads, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, nk, heads, d, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(batch, nk, heads, d, generator=g).to(dtype).transpose(1, 2)
    return q, k, v


def _bhnd(x, heads):
    return x.unflatten(2, (heads, x.shape[2] // heads)).transpose(1, 2) if x.dim() == 3 else x


def _sdpa(q, k, v, heads):
    """The eager equivalent: SDPA on the [B, H, N, D] views, merged back for the flat layout."""
    out = TF.scaled_dot_product_attention(_bhnd(q, heads), _bhnd(k, heads), _bhnd(v, heads))
    return out.transpose(1, 2).flatten(2) if q.dim() == 3 else out


def _kernel(q, k, v, heads, launched):
    out = F.attention(q, k, v, heads=heads if q.dim() == 3 else None, impl="triton")
    assert launched("attention"), "the Triton kernel did not run"
    return out


@pytest.mark.parametrize("layout", ["flat", "bhnd"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_float64(shape, dtype, layout, triton_backend, poison):
    batch, heads, nq, nk, d = shape
    q, k, v = _qkv(*shape, dtype, layout)
    out = _kernel(q, k, v, heads, triton_backend)
    exact = _sdpa(q.double(), k.double(), v.double(), heads)
    eager = _sdpa(q, k, v, heads)
    assert out.shape == eager.shape
    assert_close_to_exact(out, exact, eager)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", GRAD_SHAPES.values(), ids=GRAD_SHAPES.keys())
def test_backward_matches_float64(shape, dtype, triton_backend, poison):
    batch, heads, nq, nk, d = shape
    layout = "flat" if d != 80 else "bhnd"
    q, k, v = (x.detach().requires_grad_() for x in _qkv(*shape, dtype, layout))
    grad = torch.randn(batch, nq, heads * d, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad = grad if layout == "flat" else _bhnd(grad, heads)
    out = _kernel(q, k, v, heads, triton_backend)
    grads = torch.autograd.grad(out, (q, k, v), grad)

    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = torch.autograd.grad(_sdpa(*exact_in, heads), exact_in, grad.double())
    eager_in = [x.detach().requires_grad_() for x in (q, k, v)]
    eager = torch.autograd.grad(_sdpa(*eager_in, heads), eager_in, grad)
    for name, g, g_exact, g_eager in zip("qkv", grads, exact, eager):
        assert g.shape == g_exact.shape, name
        assert_close_to_exact(g, g_exact, g_eager)


def test_backward_is_deterministic(triton_backend):
    q, k, v = (x.detach().requires_grad_() for x in _qkv(1, 2, 70, 90, 40, torch.float16, "flat"))
    grad = torch.randn(1, 70, 80).half()
    first = torch.autograd.grad(_kernel(q, k, v, 2, triton_backend), (q, k, v), grad)
    second = torch.autograd.grad(_kernel(q, k, v, 2, triton_backend), (q, k, v), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("d", [40, 512])
def test_contiguous_bhnd_heads_by_their_stride(d, triton_backend, poison):
    """q, k, v contiguous [B, H, N, D] (head stride N*D, not D: the kernels' runtime head-stride
    path), forward and backward."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, d, generator=g).requires_grad_() for n in (19, 33, 33))
    out = _kernel(q, k, v, None, triton_backend)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = TF.scaled_dot_product_attention(*ref_in)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, ref_in, grad.double())):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_head_dim_stride_is_copied_not_misread(triton_backend):
    """D elements that are not contiguous (a transposed buffer) are copied, never read with a wrong stride."""
    q, k, v = (torch.randn(2, 40, 33).transpose(1, 2) for _ in range(3))  # [2, 33, 40], D stride 33
    out = _kernel(q, k, v, 1, triton_backend)
    torch.testing.assert_close(out, _sdpa(q, k, v, 1), rtol=1e-5, atol=1e-5)


def test_reference_matches_sdpa():
    q, k, v = _qkv(2, 3, 20, 30, 40, torch.float64, "bhnd")
    torch.testing.assert_close(attention_reference(q, k, v), TF.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(attention_reference(q, k, v, 0.3), TF.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_scale_argument(triton_backend):
    q, k, v = _qkv(1, 2, 10, 12, 40, torch.float32, "flat")
    out = F.attention(q, k, v, heads=2, scale=0.05, impl="triton")
    expected = TF.scaled_dot_product_attention(_bhnd(q, 2), _bhnd(k, 2), _bhnd(v, 2), scale=0.05)
    torch.testing.assert_close(out, expected.transpose(1, 2).flatten(2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# routing: impl, LDM_FAST_ATTENTION and the measured routes table


def test_auto_runs_sdpa_where_nothing_was_measured(triton_backend):
    q, k, v = _qkv(1, 1, 8, 8, 64, torch.float32, "flat")
    assert F.attention_route(q.device, q.dtype, 64, 8, 8) == "sdpa"
    out = F.attention(q, k, v)
    assert not triton_backend("attention")
    assert torch.equal(out, _sdpa(q, k, v, 1))


def test_auto_follows_a_measured_route(triton_backend, monkeypatch):
    """A routes entry for this device, dtype and head dim sends cases at least that long to the kernel."""
    routes = {"cpu": [{"device": "cpu", "dtype": "float32", "head_dim": 64, "min_q": 16, "min_k": 16}]}
    monkeypatch.setattr(ldm_fast.ops.attention, "_attention_routes", lambda: routes)
    q, k, v = _qkv(1, 1, 8, 8, 64, torch.float32, "flat")
    F.attention(q, k, v)
    assert not triton_backend("attention")  # shorter than the measured lengths
    q, k, v = _qkv(1, 1, 16, 16, 64, torch.float32, "flat")
    F.attention(q, k, v)
    assert triton_backend("attention")


def test_routes_file_is_valid():
    table = json.loads(F.ATTENTION_ROUTES_FILE.read_text())
    for entry in table["routes"]:
        assert {"device", "dtype", "head_dim", "min_q", "min_k"} <= set(entry)


@pytest.mark.parametrize("setting", ["sdpa", "triton"])
def test_environment_overrides_impl(setting, triton_backend, monkeypatch):
    monkeypatch.setenv("LDM_FAST_ATTENTION", setting)
    ldm_fast.backend.reload_env()
    q, k, v = _qkv(1, 1, 8, 8, 64, torch.float32, "flat")
    F.attention(q, k, v, impl="sdpa" if setting == "triton" else "triton")
    assert triton_backend("attention") == (setting == "triton")


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("LDM_FAST_ATTENTION", "flash")
    q, k, v = _qkv(1, 1, 4, 4, 8, torch.float32, "flat")
    with pytest.raises(ValueError, match="LDM_FAST_ATTENTION"):
        ldm_fast.backend.reload_env()  # the environment is read once, at import or here
        F.attention(q, k, v)


@pytest.mark.parametrize("dtype,d", [(torch.float64, 64), (torch.float32, 520)], ids=["fp64", "d520"])
def test_uncovered_cases_run_sdpa(dtype, d, triton_backend):
    q, k, v = _qkv(1, 1, 5, 6, d, dtype, "flat")
    out = F.attention(q, k, v, impl="triton")
    assert not triton_backend("attention")
    torch.testing.assert_close(out, _sdpa(q, k, v, 1))


def test_eager_backend_is_sdpa_bit_for_bit():
    q, k, v = _qkv(2, 2, 9, 11, 40, torch.float32, "flat")
    with ldm_fast.use_backend("eager"):
        out = F.attention(q, k, v, heads=2, impl="triton")
    assert torch.equal(out, _sdpa(q, k, v, 2))


# ---------------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 8), [1]), {}, TypeError, "v must be a torch.Tensor"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 8).half(), torch.randn(1, 4, 8)), {}, TypeError, "one dtype"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), {"heads": 3}, ValueError,
         "divisible by heads"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 4, 6), torch.randn(1, 4, 8)), {}, ValueError, "k's last dim"),
        (lambda: (torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 4, 8)), {}, ValueError,
         "one sequence length"),
        (lambda: (torch.randn(2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), {}, ValueError, "batch size"),
        (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)), {}, ValueError, "all"),
        (lambda: (torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)), {}, ValueError,
         "heads"),
        (lambda: (torch.randn(1, 2, 4, 8),) * 3, {"heads": 4}, ValueError, "heads=4"),
        (lambda: (torch.randn(1, 4, 8),) * 3, {"heads": 0}, ValueError, "heads"),
        (lambda: (torch.randn(1, 4, 8),) * 3, {"scale": "x"}, TypeError, "scale"),
        (lambda: (torch.randn(1, 4, 8),) * 3, {"impl": "flash"}, ValueError, "impl"),
    ],
    ids=["v-not-tensor", "mixed-dtypes", "heads-not-dividing", "k-dim", "kv-lengths", "batch", "mixed-ranks",
         "kv-heads", "heads-vs-H", "heads-zero", "scale-type", "impl-name"],
)
def test_bad_arguments_name_the_argument(make, kwargs, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        F.attention(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_fullgraph_compile_captures_the_kernel_and_its_backward(triton_backend):
    torch.compiler.reset()
    q, k, v = (x.detach().requires_grad_() for x in _qkv(2, 2, 20, 30, 40, torch.float32, "flat"))

    def f(q, k, v):
        return F.attention(q, k, v, heads=2, impl="triton")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert triton_backend("attention")
    expected_in = [x.detach().requires_grad_() for x in (q, k, v)]
    expected = _sdpa(*expected_in, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, expected_in, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_auto_traces_sdpa(triton_backend):
    """Under torch.compile, impl="auto" leaves attention to SDPA (Inductor's own lowering)."""
    torch.compiler.reset()
    q, k, v = _qkv(1, 2, 8, 8, 16, torch.float32, "flat")
    out = torch.compile(lambda q, k, v: F.attention(q, k, v, heads=2), fullgraph=True, backend="aot_eager")(q, k, v)
    assert not triton_backend("attention")
    torch.testing.assert_close(out, _sdpa(q, k, v, 2))


def test_plans_cover_every_head_dim():
    """Every head dim up to 512 gets tiles that cover it (chunks x chunk width >= D, power-of-two blocks)."""
    for d in (8, 40, 64, 80, 128, 160, 256, 320, 512):
        for plan in (attn_kernels.fwd_plan(d, 2), attn_kernels.bwd_plan(d, 4)):
            assert plan.d_chunks * plan.block_dk >= d
            for block in (plan.block_m, plan.block_n, plan.block_dk, plan.block_dout):
                assert block & (block - 1) == 0
