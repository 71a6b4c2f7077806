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
from ldm_fast.optimize import patches as opt_patches

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


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x * factor

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def test_ops_apply_is_function_apply():
    """``ops._common.apply`` (the ops' Function call without ``Function.apply``'s Python preamble)
    records the same node and gradients as ``Function.apply``; under a functorch transform it is
    ``Function.apply`` itself (which raises for a Function without ``setup_context``)."""
    from ldm_fast.ops._common import apply

    x = torch.randn(3, requires_grad=True)
    y, y_ref = apply(_Scale, x, 2.0), _Scale.apply(x, 2.0)
    assert type(y.grad_fn) is type(y_ref.grad_fn) and torch.equal(y, y_ref)
    (g,), (g_ref,) = torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_ref.sum(), x)
    assert torch.equal(g, g_ref)
    with torch.no_grad():
        assert apply(_Scale, x, 2.0).grad_fn is None
    for call in (apply, lambda fn, *args: fn.apply(*args)):
        with pytest.raises(RuntimeError, match="setup_context"):
            torch.func.vmap(lambda a, call=call: call(_Scale, a, 2.0))(torch.randn(2, 3))


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
    assert not opt_patches._is_compvis_group_norm32(cls)
    ref = weakref.ref(cls)
    del cls
    gc.collect()
    assert ref() is None
