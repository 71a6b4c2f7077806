"""timestep_embedding (kernels/timestep_embedding.py, ldm_fast.functional.timestep_embedding) in the
interpreter, against the eager reference, diffusers' ``get_timestep_embedding`` and float64.

The eager reference is diffusers' function bit for bit; the kernel is judged by the project's rule
(tests/_numerics.py: its error against float64 within a small multiple of eager fp32's own), the
odd dim's pad column exactly 0. Under the interpreter the kernel's exp/sin/cos are numpy's fp32
functions, so it is also checked bit for bit against numpy running eager's fp32 statements: the
same rounding steps in the same order. ``triton_backend`` and the ``runs`` fixture prove one
kernel launch ran; ``poison`` fills fresh outputs with NaN.
"""

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from diffusers.models.embeddings import get_timestep_embedding

import ldm_fast
import ldm_fast.functional as lf
from ldm_fast.kernels import timestep_embedding as te
from ldm_fast.kernels.timestep_embedding import timestep_embedding_fwd, timestep_embedding_reference

from _numerics import assert_close_to_exact

DIMS = {  # dim -> half = dim // 2 frequencies
    "sd-320": 320,  # SD 1.5's U-Net: 160 frequencies in a block of 256
    "dim-1": 1,  # no frequency: the pad column alone
    "dim-2": 2,  # one frequency, exp(0) = 1
    "odd-7": 7,  # three frequencies and the pad column
    "odd-33": 33,  # 16 frequencies: one whole block of 16, and the pad column
}
T_SMALL = [0, 1, 17, 500, 999]  # both ends of SD's 1000 training steps


@pytest.fixture
def runs(monkeypatch):
    """Count the kernel's launches (the whole op is one)."""
    kernel = te._timestep_embedding_kernel.fn  # (the JIT function inside ldm_fast's Kernel: kernels/_launch.py)
    counts = Counter()

    def counted(*args, _run=kernel.run, **kwargs):
        counts["kernel"] += 1
        return _run(*args, **kwargs)

    monkeypatch.setitem(kernel.__dict__, "run", counted)  # an instance attribute, removed afterwards (test_geglu)
    return counts


def _exact(t, dim, flip, shift, scale, max_period):
    """The same formula in float64, from the timesteps' own values."""
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift))
    arg = scale * t.double()[:, None] * freq[None, :]
    emb = torch.cat([torch.cos(arg), torch.sin(arg)] if flip else [torch.sin(arg), torch.cos(arg)], dim=-1)
    return TF.pad(emb, (0, dim % 2))


def _check_kernel(t, dim, flip=True, shift=0.0, scale=1.0, max_period=10000):
    """Run the op on the kernel (one launch, the caller's fixtures) and judge it; returns it."""
    out = lf.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                max_period=max_period)
    assert out.shape == (t.shape[0], dim) and out.dtype == torch.float32 and out.is_contiguous()
    if dim % 2:
        assert torch.equal(out[:, -1], torch.zeros(t.shape[0]))
    diffusers = get_timestep_embedding(t, dim, flip, shift, scale, max_period)
    assert torch.equal(timestep_embedding_reference(t, dim, flip, shift, scale, max_period), diffusers)
    assert_close_to_exact(out, _exact(t, dim, flip, shift, scale, max_period), diffusers)
    return out


@pytest.mark.parametrize("max_period", [10000, 100])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "sin-first"])
@pytest.mark.parametrize("dim", DIMS.values(), ids=DIMS.keys())
def test_matches_reference_diffusers_and_float64(dim, flip, shift, scale, max_period, poison, triton_backend, runs):
    t = torch.tensor(T_SMALL)
    if dim == 2 and shift == 1:  # half - shift = 0: diffusers divides by 0 (NaN); the op refuses
        with pytest.raises(ValueError, match="downscale_freq_shift"):
            lf.timestep_embedding(t, dim, downscale_freq_shift=shift)
        return
    _check_kernel(t, dim, flip, shift, scale, max_period)
    assert triton_backend("timestep_embedding") and runs["kernel"] == 1


TIMESTEPS = {  # name -> timesteps [N]
    "int64": lambda: torch.tensor(T_SMALL),
    "int32": lambda: torch.tensor(T_SMALL, dtype=torch.int32),
    "uint8": lambda: torch.tensor([0, 1, 17, 200, 255], dtype=torch.uint8),
    "float32-fractional": lambda: torch.tensor([0.5, 1.25, 17.3, 0.001, 999.75]),
    "float16": lambda: torch.tensor([0.5, 1.0, 17.0, 500.0, 999.0], dtype=torch.float16),
    "bfloat16": lambda: torch.tensor([0.5, 1.0, 17.0, 500.0, 996.0], dtype=torch.bfloat16),
    "float64-fractional": lambda: torch.tensor([0.1, 1.7, 17.3, 500.123456789, 999.9], dtype=torch.float64),
    "expanded-0-stride": lambda: torch.tensor([981]).expand(4),  # the U-Net's timesteps.expand(B)
    "strided": lambda: torch.arange(0.0, 1000.0, 37.0)[::3],  # stride 3
    "column-of-2d": lambda: torch.tensor([[0, 5], [1, 250], [2, 999]])[:, 1],  # stride 2, offset 1
}


@pytest.mark.parametrize("dim", [320, 33])
@pytest.mark.parametrize("name", TIMESTEPS.keys())
def test_timestep_dtypes_and_layouts_read_in_place(name, dim, poison, triton_backend, runs, monkeypatch):
    t = TIMESTEPS[name]()
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: pytest.fail("copied"))
    out = lf.timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    monkeypatch.undo()
    assert triton_backend("timestep_embedding") and runs["kernel"] == 1
    assert torch.equal(out, _check_kernel(t, dim))  # judged by the rule (the same result again)
    # converted in the kernel exactly as .float() converts: the result of contiguous fp32 timesteps
    assert torch.equal(out, lf.timestep_embedding(t.float().contiguous(), dim, flip_sin_to_cos=True,
                                                  downscale_freq_shift=0))


def test_sd15_every_timestep_and_a_multi_block_odd_dim(poison, triton_backend, runs):
    """SD 1.5's 1000 training timesteps (500 row blocks of 2 x 256); dim 1101 with 3 timesteps: two
    column blocks of 512 (the second with 38 of its lanes in use) in each of 3 row blocks, the pad
    column written once a row."""
    _check_kernel(torch.arange(1000), 320)
    _check_kernel(torch.tensor([3, 400, 998]), 1101, flip=False, shift=1, scale=2.5)
    assert runs["kernel"] == 2


@pytest.mark.skipif(not ldm_fast.backend.interpreting(), reason="the interpreter's exp/sin/cos are numpy's")
@pytest.mark.parametrize("flip", [True, False], ids=["flip", "sin-first"])
def test_same_fp32_rounding_steps_as_eager(flip, triton_backend):
    """The kernel is eager's statements in fp32, step for step: with numpy's functions (the
    interpreter's: exp in fp64 rounded once, sin and cos in fp32) in place of torch's it is the numpy
    result bit for bit. (Eager itself differs from it only where torch's functions round otherwise.)"""
    t, dim, shift, scale = torch.tensor([0, 1, 17, 500, 999, 12345]), 67, 1.0, 2.5
    half = dim // 2
    exponent = np.float32(-math.log(10000)) * np.arange(0, half, dtype=np.float32)
    exponent = exponent / np.float32(half - shift)
    freq = np.exp(exponent.astype(np.float64)).astype(np.float32)  # the kernel's exp: fp64, rounded once
    arg = np.float32(scale) * (t.numpy().astype(np.float32)[:, None] * freq[None, :])
    parts = [np.cos(arg), np.sin(arg)] if flip else [np.sin(arg), np.cos(arg)]
    expected = np.concatenate(parts + [np.zeros((t.shape[0], 1), np.float32)], axis=-1)
    out = lf.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale)
    assert triton_backend("timestep_embedding")
    assert np.array_equal(out.numpy(), expected)
    assert torch.equal(torch.from_numpy(exponent), (-math.log(10000) * torch.arange(0, half, dtype=torch.float32))
                       / (half - shift))  # the exponent is torch's, bit for bit


def test_eager_backend_is_diffusers_bit_for_bit():
    for t, dim, kwargs in [(torch.tensor([0, 999]), 320, dict(flip_sin_to_cos=True, downscale_freq_shift=0)),
                           (torch.tensor([0.5, 7.25], dtype=torch.float16), 7, dict(scale=2.5, max_period=100)),
                           (torch.tensor([981]).expand(3), 33, {})]:
        expected = get_timestep_embedding(t, dim, **kwargs)
        with ldm_fast.use_backend("eager"):
            assert torch.equal(lf.timestep_embedding(t, dim, **kwargs), expected)
        assert torch.equal(lf.timestep_embedding(t, dim, **kwargs), expected)  # auto on CPU tensors: eager


def test_uncovered_inputs_run_the_reference(triton_backend):
    """No launch for an empty batch, a timesteps tensor that asks for a gradient (the reference
    carries it), a dtype the kernel does not read, or under torch.compile (the reference is traced)."""
    assert lf.timestep_embedding(torch.zeros(0, dtype=torch.int64), 320).shape == (0, 320)
    t = torch.tensor([1.0, 500.0], requires_grad=True)
    out = lf.timestep_embedding(t, 8, downscale_freq_shift=0)
    assert out.grad_fn is not None
    assert torch.equal(out, get_timestep_embedding(t, 8, downscale_freq_shift=0))
    t32 = torch.tensor([1, 500], dtype=torch.uint32)
    assert torch.equal(lf.timestep_embedding(t32, 8), get_timestep_embedding(t32, 8))
    compiled = torch.compile(lambda t: lf.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0),
                             backend="eager", fullgraph=True)
    t = torch.tensor([3, 999])
    assert torch.equal(compiled(t), get_timestep_embedding(t, 320, True, 0))
    assert not triton_backend("timestep_embedding")


def test_bad_arguments_name_the_argument():
    t = torch.tensor([1, 2])
    cases = [
        (TypeError, "timesteps", ([1, 2], 8), {}),
        (ValueError, "timesteps", (torch.ones(2, 1), 8), {}),
        (ValueError, "timesteps", (torch.tensor(5), 8), {}),
        (TypeError, "timesteps", (torch.tensor([True, False]), 8), {}),
        (TypeError, "timesteps", (torch.tensor([1 + 2j]), 8), {}),
        (ValueError, "dim", (t, 0), {}),
        (ValueError, "dim", (t, -4), {}),
        (TypeError, "dim", (t, 8.0), {}),
        (TypeError, "dim", (t, True), {}),
        (TypeError, "flip_sin_to_cos", (t, 8), dict(flip_sin_to_cos="yes")),
        (ValueError, "downscale_freq_shift", (t, 320), dict(downscale_freq_shift=160)),
        (ValueError, "downscale_freq_shift", (t, 8), dict(downscale_freq_shift=float("nan"))),
        (ValueError, "scale", (t, 8), dict(scale=float("inf"))),
        (ValueError, "scale", (t, 8), dict(scale=float("nan"))),
        (TypeError, "scale", (t, 8), dict(scale="2")),
        (ValueError, "max_period", (t, 8), dict(max_period=0)),
        (ValueError, "max_period", (t, 8), dict(max_period=float("inf"))),
        (TypeError, "max_period", (t, 8), dict(max_period="10000")),
    ]
    for error, name, args, kwargs in cases:
        with pytest.raises(error, match=name):
            lf.timestep_embedding(*args, **kwargs)
    with pytest.raises(TypeError, match="positional"):
        lf.timestep_embedding(t, 8, True)  # flip_sin_to_cos and the rest are keyword-only
    with pytest.raises(TypeError, match="timesteps"):
        timestep_embedding_fwd(torch.tensor([1, 2], dtype=torch.uint32), 8)  # the launcher: dtypes it reads
    lf.timestep_embedding(torch.tensor([1]), 1, downscale_freq_shift=0)  # dim 1: nothing divided, no error


def test_block_plan():
    """``(ROWS, BLOCK, column blocks, programs, num_warps)``: 4 elements a thread, tiles of at most 512."""
    assert te._plan(2, 160) == (2, 256, 1, 1, 4)  # SD 1.5 at batch 2: one program
    assert te._plan(1000, 160) == (2, 256, 1, 500, 4)
    assert te._plan(8, 640) == (1, 512, 2, 16, 4)  # SDXL's 1280
    assert te._plan(64, 128) == (4, 128, 1, 16, 4)
    assert te._plan(5, 3) == (8, 16, 1, 1, 1)
    assert te._plan(3, 0) == (4, 16, 1, 1, 1)  # dim 1: one column block for the pad column
