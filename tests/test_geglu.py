"""GEGLU launchers (kernels/geglu.py) in the interpreter, against the eager reference and float64.

The op is not wired into ldm_fast.functional yet, so the launchers are tested directly; the
``launches`` fixture counts the kernel launches (the Triton path ran, once per call).
"""

from collections import Counter

import pytest
import torch

import ldm_fast

from ldm_fast.kernels import geglu
from ldm_fast.kernels.geglu import geglu_bwd, geglu_fwd, geglu_reference

from _numerics import assert_close_to_exact

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATE = ["none", "tanh"]
SHAPES = {  # proj [..., 2F]
    "sd-ff-scaled": (2, 77, 2 * 320),  # SD's [B, tokens, 2 * 4 * 320] scaled down to F = 320 (tiles of 8 rows x 512 columns)
    "sd-1280-rows": (3, 2 * 1280),  # SD's F = 1280: five blocks of 256 columns, 3 of a tile's 16 rows
    "tokens-odd-F130": (1, 256, 2 * 130),  # [1, 4096 tokens] scaled down; F = 130: one partial block
    "odd-F77": (2, 77, 2 * 77),
    "multi-block-partial": (2, 3, 2 * 4100),  # two blocks of 4096 columns, the last 4 lanes in use
    "odd-F1100": (2, 3, 2 * 1100),  # one block of 2048 columns, 948 lanes masked
    "one-row": (2 * 77,),
}


@pytest.fixture
def launches(monkeypatch):
    """Count launches of the GEGLU kernels by name."""
    counts = Counter()
    for name in ("_geglu_fwd_kernel", "_geglu_bwd_kernel"):
        kernel = getattr(geglu, name).fn  # (the JIT function inside ldm_fast's Kernel: kernels/_launch.py)
        run = kernel.run

        def counted(*args, _run=run, _name=name, **kwargs):
            counts[_name] += 1
            return _run(*args, **kwargs)

        # an instance attribute, removed afterwards (setattr's undo would leave the bound method
        # behind, hiding later class-level patches of run, e.g. the traffic recorder's)
        monkeypatch.setitem(kernel.__dict__, "run", counted)
    return counts


def _proj(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(shape, generator=g)).to(dtype)  # gates over [-6, 6]: both tails of gelu


def _grad_of(proj, grad, approximate):
    """dL/dproj by autograd through the reference, at proj's dtype."""
    leaf = proj.detach().clone().requires_grad_()
    geglu_reference(leaf, approximate).backward(grad)
    return leaf.grad


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_reference(shape, dtype, approximate, poison, launches):
    proj = _proj(shape, dtype)
    out = geglu_fwd(proj, approximate)
    assert launches["_geglu_fwd_kernel"] == 1
    assert out.shape == shape[:-1] + (shape[-1] // 2,) and out.is_contiguous()
    exact = geglu_reference(proj.double(), approximate)
    assert_close_to_exact(out, exact, geglu_reference(proj, approximate))


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_backward_matches_autograd(shape, dtype, approximate, poison, launches):
    proj = _proj(shape, dtype)
    grad = torch.randn(shape[:-1] + (shape[-1] // 2,), generator=torch.Generator().manual_seed(1)).to(dtype)
    dproj = geglu_bwd(grad, proj, approximate)
    assert launches["_geglu_bwd_kernel"] == 1
    assert dproj.shape == shape and dproj.is_contiguous()
    exact = _grad_of(proj.double(), grad.double(), approximate)
    assert_close_to_exact(dproj, exact, _grad_of(proj, grad, approximate))


@pytest.mark.parametrize("approximate", APPROXIMATE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_rows_read_in_place(dtype, approximate, poison, launches, monkeypatch):
    """A slice of wider rows (row stride 2F + 6) is read without a copy; grad may be strided too."""
    F = 96
    proj = _proj((2, 5, 2 * F + 6), dtype)[..., 3:3 + 2 * F]
    grad = torch.randn(2, 5, F + 4).to(dtype)[..., :F]
    assert not proj.is_contiguous() and not grad.is_contiguous()
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copied"))
    out = geglu_fwd(proj, approximate)
    dproj = geglu_bwd(grad, proj, approximate)
    monkeypatch.undo()
    assert launches["_geglu_fwd_kernel"] == 1 and launches["_geglu_bwd_kernel"] == 1
    assert_close_to_exact(out, geglu_reference(proj.double(), approximate), geglu_reference(proj, approximate))
    assert_close_to_exact(dproj, _grad_of(proj.double(), grad.double(), approximate), _grad_of(proj, grad, approximate))


@pytest.mark.parametrize("layout", ["transposed-leading", "strided-last-dim", "expanded-grad"])
def test_other_layouts_are_correct(layout, poison, launches):
    """Leading dims that do not collapse to one stride, and a strided last dim, are copied; an
    expanded grad (stride 0, as ``out.sum().backward()`` gives) is read as is or copied."""
    F = 40
    if layout == "transposed-leading":
        proj = _proj((7, 3, 2 * F), torch.float32).transpose(0, 1)
    elif layout == "strided-last-dim":
        proj = _proj((3, 7, 4 * F), torch.float32)[..., ::2]
    else:
        proj = _proj((3, 7, 2 * F), torch.float32)
    grad = torch.ones(()).expand(3, 7, F) if layout == "expanded-grad" else torch.randn(7, 3, F).transpose(0, 1)
    out = geglu_fwd(proj, "none")
    dproj = geglu_bwd(grad, proj, "none")
    assert launches["_geglu_fwd_kernel"] == 1 and launches["_geglu_bwd_kernel"] == 1
    assert_close_to_exact(out, geglu_reference(proj.double()), geglu_reference(proj))
    assert_close_to_exact(dproj, _grad_of(proj.double(), grad.double(), "none"), _grad_of(proj, grad, "none"))


def test_extreme_gates():
    """gelu's tails: 0 far left (not NaN), the identity far right; the derivative 0 and 1 there."""
    gate = torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4])
    proj = torch.cat([torch.ones(5), gate])
    for approximate in APPROXIMATE:
        out = geglu_fwd(proj, approximate)
        torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 30.0, 1e4]))
        dgate = geglu_bwd(torch.ones(5), proj, approximate)[5:]
        torch.testing.assert_close(dgate, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_empty(launches):
    proj = torch.randn(0, 3, 8)
    assert geglu_fwd(proj).shape == (0, 3, 4)
    assert geglu_bwd(torch.randn(0, 3, 4), proj).shape == (0, 3, 8)
    assert not launches


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="proj"):
        geglu_fwd([1.0, 2.0])
    with pytest.raises(TypeError, match="proj"):
        geglu_fwd(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="proj"):
        geglu_fwd(torch.randn(3, 5))
    with pytest.raises(ValueError, match="approximate"):
        geglu_fwd(torch.randn(3, 4), approximate="erf")
    with pytest.raises(TypeError, match="grad"):
        geglu_bwd(None, torch.randn(3, 4))
    with pytest.raises(ValueError, match="grad"):
        geglu_bwd(torch.randn(3, 4), torch.randn(3, 4))


def test_block_plan():
    """Tiles of 4096 elements; F = 1280 and 2560 (SD 1.5's first two levels) in whole blocks: no masked lane."""
    assert geglu._plan(8192, 1280) == (16, 256, 5, 512 * 5)
    assert geglu._plan(8192, 2560) == (8, 512, 5, 1024 * 5)
    assert geglu._plan(5, 77) == (32, 128, 1, 1)
    assert geglu._plan(6, 1100) == (2, 2048, 1, 3)
    assert geglu._plan(6, 5120) == (4, 1024, 5, 10)
    assert geglu._plan(6, 4100) == (1, 4096, 2, 12)


# ---------------------------------------------------------------------------------------------
# the public op and optimize()'s GEGLU pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_public_geglu_forward_and_backward(dtype, triton_backend, poison):
    import ldm_fast.functional as lf
    from _numerics import assert_close_to_exact

    g = torch.Generator().manual_seed(5)
    proj = torch.randn(2, 7, 2 * 40, generator=g).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 7, 40, generator=g).to(dtype)
    out = lf.geglu(proj)
    assert triton_backend("geglu")
    (dproj,) = torch.autograd.grad(out, proj, grad)

    def run(cast):
        p = proj.detach().to(cast).requires_grad_(True)
        hidden, gate = p.chunk(2, dim=-1)
        o = hidden * torch.nn.functional.gelu(gate)
        return o, torch.autograd.grad(o, p, grad.to(cast))[0]

    (exact, dexact), (eager, deager) = run(torch.float64), run(dtype)
    assert_close_to_exact(out, exact, eager)
    assert_close_to_exact(dproj, dexact, deager)


def test_public_geglu_checks_and_eager_is_diffusers_bit_for_bit():
    import ldm_fast.functional as lf

    with pytest.raises(ValueError, match="even last dim"):
        lf.geglu(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="approximate"):
        lf.geglu(torch.zeros(2, 4), approximate="fast")
    proj = torch.randn(3, 10, dtype=torch.float16)
    hidden, gate = proj.chunk(2, dim=-1)
    with ldm_fast.use_backend("eager"):
        assert torch.equal(lf.geglu(proj), hidden * torch.nn.functional.gelu(gate))


def test_optimize_fuses_diffusers_geglu_and_restores(triton_backend):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    module = GEGLU(16, 24)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = module(x)
        report = ldm_fast.optimize(module)
        assert report.paths("geglu") == ["<root>"]
        with ldm_fast.use_backend("eager"):
            assert torch.equal(module(x), ref)  # the eager statements, bit for bit
        out = module(x)
    assert triton_backend("geglu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ldm_fast.restore(module)
    assert "forward" not in module.__dict__
    report = ldm_fast.optimize(module, geglu=False)
    assert report.paths("geglu") == [] and "geglu: off" in report.notes
    ldm_fast.restore(module)
