"""Regression tests for the defects fuzzing, bad input and a newcomer's run found (issue #17): each
failed before its fix."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.optimize import passes as opt_passes

T = 1000
ABAR = ldm_fast.make_schedule("scaled_linear").alphas_cumprod


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32], ids=str)
def test_q_sample_takes_t_of_every_integer_dtype(backend_name, dtype):
    """A uint8 t once indexed the table as a boolean mask, an int16 one raised IndexError."""
    x0, noise = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0, 7, 200])
    with ldm_fast.use_backend(backend_name):
        expected = F.q_sample(x0, t, ABAR, noise=noise)
        got = F.q_sample(x0, t.to(dtype), ABAR, noise=noise)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
def test_q_sample_one_element_t_broadcasts(backend_name):
    x0, noise = torch.randn(3, 8), torch.randn(3, 8)
    with ldm_fast.use_backend(backend_name):
        torch.testing.assert_close(F.q_sample(x0, torch.tensor([5]), ABAR, noise=noise),
                                   F.q_sample(x0, 5, ABAR, noise=noise), rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", ["eager", "triton"])
def test_q_sample_target_has_x0s_dtype_on_every_backend(backend_name):
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3, dtype=torch.float16)
    with ldm_fast.use_backend(backend_name):
        x_t, target = F.q_sample(x0, 3, ABAR, noise=noise)
    assert x_t.dtype == target.dtype == torch.float32
    torch.testing.assert_close(target, noise.float(), rtol=0, atol=0)


def _double_backward(fn, *inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
    sum(g.sum() for g in grads).backward()


@pytest.mark.parametrize("op", ["group_norm", "attention", "reparameterize"])
def test_double_backward_raises_instead_of_dropping_terms(triton_backend, op):
    g = torch.Generator().manual_seed(0)
    if op == "group_norm":
        fn, inputs = (lambda x: F.group_norm(x, 2)), (torch.randn(2, 4, 3, generator=g, requires_grad=True),)
    elif op == "attention":
        fn = lambda q: F.attention(q, q, q, impl="triton")  # noqa: E731
        inputs = (torch.randn(1, 4, 8, generator=g, requires_grad=True),)
    else:
        fn = lambda m: F.reparameterize(m, m, seed=1)  # noqa: E731
        inputs = (torch.randn(2, 3, generator=g, requires_grad=True),)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate twice"):
        _double_backward(fn, *inputs)
    assert triton_backend(op)


@pytest.mark.parametrize("kwargs,match", [
    (dict(eta=float("nan")), "eta must be finite"),
    (dict(eta=float("inf")), "eta must be finite"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be finite"),
    (dict(clip_sample=float("inf")), "clip_sample must be finite"),
    (dict(alpha_t=float("nan")), "alpha_t must be finite"),
])
def test_sampler_step_rejects_non_finite_scalars(kwargs, match):
    x = torch.randn(2, 3)
    args = dict(alpha_t=0.5, alpha_prev=0.6)
    args.update(kwargs)
    eps = torch.randn(4, 3) if "guidance_scale" in kwargs else torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        F.sampler_step(eps, x, args.pop("alpha_t"), args.pop("alpha_prev"), **args)


def test_ddim_sampler_rejects_nan_eta():
    with pytest.raises(ValueError, match="eta must be finite"):
        ldm_fast.samplers.DDIMSampler(ldm_fast.make_schedule("scaled_linear"), 10, eta=float("nan"))


@pytest.mark.parametrize("call", [
    lambda: F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), scale=float("nan")),
    lambda: F.q_sample(torch.zeros(2, 3), 1, ABAR, noise_offset=float("inf")),
    lambda: F.attention(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), scale=float("nan")),
], ids=["reparameterize-scale", "q_sample-noise_offset", "attention-scale"])
def test_other_scalars_must_be_finite(call):
    with pytest.raises(ValueError, match="must be finite"):
        call()


@pytest.mark.parametrize("groups", [0, 3])
def test_group_norm_bad_groups_is_a_value_error_and_a_runtime_error(groups):
    with pytest.raises(ValueError, match="num_groups"):
        F.group_norm(torch.zeros(2, 8, 4), groups)
    with pytest.raises(RuntimeError):  # torch's own group_norm raises RuntimeError: still caught as one
        F.group_norm(torch.zeros(2, 8, 4), groups)


def test_meta_tensors_with_a_seed():
    """Shape propagation on the meta device (no data): a seed once crashed ("META ... not an accelerator")."""
    x = torch.empty(2, 4, 8, 8, device="meta")
    assert F.q_sample(x, 3, ABAR.to("meta"), seed=1)[0].device.type == "meta"
    assert F.reparameterize(x, x, seed=1).shape == x.shape
    assert F.sampler_step(x, x, 0.5, 0.6, eta=1.0, seed=1).device.type == "meta"


def test_numpy_num_groups_after_optimize():
    norm = torch.nn.GroupNorm(np.int64(4), 16)
    x = torch.randn(2, 16, 3)
    expected = norm(x)
    ldm_fast.optimize(norm)
    torch.testing.assert_close(norm(x), expected, rtol=0, atol=0)
    ldm_fast.restore(norm)


def test_concurrent_interpreted_calls_from_threads(triton_backend):
    """Triton's interpreter patches triton.language globally: two threads interpreting at once failed
    ("Did you forget to add @triton.jit?"); interpreted launches are serialized."""
    x = torch.randn(2, 8, 5)
    expected = F.group_norm(x, 4, activation="silu")
    errors, results = [], []

    def work():
        try:
            with ldm_fast.use_backend("triton"):
                for _ in range(3):
                    results.append(F.group_norm(x, 4, activation="silu"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(results) == 12 and triton_backend("group_norm")
    for y in results:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_group_norm32_check_keeps_no_class_alive():
    """The CompVis GroupNorm32 recognition cached every class it saw forever (an lru_cache)."""
    cls = type("GroupNorm32", (torch.nn.GroupNorm,), {"forward": lambda self, x: x})
    assert not opt_passes._is_compvis_group_norm32(cls)
    ref = weakref.ref(cls)
    del cls
    gc.collect()
    assert ref() is None


class _CompVisResBlock(torch.nn.Module):
    """The shape of CompVis/ADM ``ResBlock``: with ``use_scale_shift_norm`` it calls ``out_layers[0]``
    (the norm) alone, modulates, then ``out_layers[1:]`` (SiLU, dropout, conv)."""

    def __init__(self, channels: int, use_scale_shift_norm: bool, updown: bool = False):
        super().__init__()
        self.use_scale_shift_norm, self.updown = use_scale_shift_norm, updown
        self.in_layers = torch.nn.Sequential(torch.nn.GroupNorm(4, channels), torch.nn.SiLU(),
                                             torch.nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = torch.nn.Linear(8, 2 * channels if use_scale_shift_norm else channels)
        self.out_layers = torch.nn.Sequential(torch.nn.GroupNorm(4, channels), torch.nn.SiLU(), torch.nn.Dropout(0.0),
                                              torch.nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(in_rest(x))
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return x + h


@pytest.mark.parametrize("use_scale_shift_norm", [False, True])
def test_optimize_fuses_a_sequential_only_where_it_is_called_whole(use_scale_shift_norm, triton_backend):
    torch.manual_seed(0)
    block = _CompVisResBlock(8, use_scale_shift_norm, updown=use_scale_shift_norm)
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 8)
    with torch.no_grad():
        expected = block(x, emb)
        report = ldm_fast.optimize(block)
        got = block(x, emb)
    fused = set(report.paths("GroupNorm+SiLU fused"))
    assert "in_layers.0" in fused
    # The check reads the source, not the flag: out_layers[0] is called apart in one branch, so it is
    # never fused (in_layers[:-1] keeps the norm and its SiLU together, so in_layers is).
    assert "out_layers.0" not in fused, report
    assert any(item.path == "out_layers.0" and "apart" in item.reason for item in report.left), report.left
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert triton_backend("group_norm")
    ldm_fast.restore(block)


def test_report_says_a_cpu_model_runs_the_eager_reference():
    report = ldm_fast.optimize(torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU()))
    assert "eager reference" in str(report) and "no speed-up" in str(report)


class _Pipeline:
    """What a diffusers pipeline holds (not an nn.Module): a U-Net and a VAE."""

    def __init__(self):
        self.unet = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU(), torch.nn.Conv2d(4, 4, 1))
        self.vae = torch.nn.Module()
        self.vae.decoder = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.SiLU())


def test_optimize_takes_a_pipeline():
    pipe = _Pipeline()
    x = torch.randn(1, 4, 3, 3)
    expected = pipe.vae.decoder(pipe.unet(x))
    report = ldm_fast.optimize(pipe, channels_last=True)
    assert report.paths("GroupNorm+SiLU fused") == ["unet.0", "vae.decoder.1"]
    assert pipe.unet[2].weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder[0].weight.is_contiguous()  # the decoder stays NCHW
    torch.testing.assert_close(pipe.vae.decoder(pipe.unet(x)), expected, rtol=0, atol=0)
    ldm_fast.restore(pipe)
    assert type(pipe.unet[1]) is torch.nn.SiLU and type(pipe.vae.decoder[1]) is torch.nn.GroupNorm
    with pytest.raises(TypeError, match="diffusers pipeline"):
        ldm_fast.optimize(object())
