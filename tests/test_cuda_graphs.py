"""On a CUDA GPU: every op captured in a CUDA graph replays correctly, noise stays random under
replay, a t on the GPU is checked on the device. Needs a GPU and compiled kernels, so run it there as

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda_graphs.py

Without one each test is skipped with that reason (the CPU suite proves the same call path's pieces:
tests/test_call_path.py). Tier 1 of the GPU session (benchmarks/gpu_session.py) runs this file and
fails on any failure, and on any skip but the two-GPU one (so a missing diffusers fails loudly).

What only a GPU shows (issue 25): ``optimize(model, cuda_graph=True)`` replays graphs (counted) that
equal eager within the error rule for fp16/bf16, channels_last, CUDA autocast and inference_mode,
after an in-place weight update and a LoRA fuse; every op captured and replayed; CUDA autocast's
dtypes for group_norm and add_layer_norm; a launch on another device than the current one;
attention with batch x heads above CUDA's 65,535 grid limit.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as TF

import ldm_fast
from ldm_fast import backend, ops
from ldm_fast import functional as F
from ldm_fast.kernels import _grid
from ldm_fast.kernels.attention import attention_reference
from ldm_fast.kernels.sampler_step import step_coefficients

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or backend.interpreting(),
    reason="needs a CUDA GPU with compiled kernels: run TRITON_INTERPRET=0 python -m pytest tests/test_cuda_graphs.py",
)
#: The skip reason of the one test tier 1 allows to skip (on a machine with one GPU).
TWO_GPUS = "needs two CUDA devices"


def _capture(fn):
    """Warm up ``fn`` on a side stream, capture it in a CUDA graph; return (graph, its output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("shape", [(2, 640, 16, 16), (1, 320, 64, 64)], ids=["one-pass", "split"])
def test_group_norm_replays(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    w = torch.randn(shape[1], device="cuda", dtype=torch.float16)
    graph, y = _capture(lambda: F.group_norm(x, 32, w, w, 1e-5, activation="silu"))
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        with ldm_fast.use_backend("eager"):
            ref = F.group_norm(x.float(), 32, w.float(), w.float(), 1e-5, activation="silu")
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_unseeded_noise_is_fresh_at_every_replay_and_a_seed_reproduces():
    moments = torch.randn(2, 8, 64, 64, device="cuda")
    graph, z = _capture(lambda: F.reparameterize_moments(moments, scale=0.18215))
    graph.replay()
    first = z.clone()
    graph.replay()
    assert not torch.equal(first, z)
    graph, z = _capture(lambda: F.reparameterize_moments(moments, seed=7, scale=0.18215))
    graph.replay()
    first = z.clone()
    graph.replay()
    assert torch.equal(first, z) and torch.equal(z, F.reparameterize_moments(moments, seed=7, scale=0.18215))


def test_q_sample_with_a_gpu_t_captures_and_replays():
    table = ldm_fast.make_schedule().alphas_cumprod.cuda()
    x0 = torch.randn(4, 4, 32, 32, device="cuda")
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999], device="cuda")
    graph, (x_t, _) = _capture(lambda: F.q_sample(x0, t, table, noise=noise))
    for values in ([1, 2, 3, 4], [999, 0, 400, 7]):
        t.copy_(torch.tensor(values))
        graph.replay()
        abar = table[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)
    graph, (_, eps) = _capture(lambda: F.q_sample(x0, t, table))
    graph.replay()
    first = eps.clone()
    graph.replay()
    assert not torch.equal(first, eps)


def test_a_gpu_t_out_of_range_fails_on_the_device():
    """As torch's own indexing: a device-side assertion, raised at the next synchronization (it
    leaves the CUDA context unusable, so it runs in a child process)."""
    code = textwrap.dedent(
        """
        import torch, ldm_fast
        from ldm_fast import functional as F
        table = ldm_fast.make_schedule().alphas_cumprod.cuda()
        F.q_sample(torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor([3, 1000], device="cuda"), table)
        torch.cuda.synchronize()
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "t must lie in" in result.stderr or "device-side assert" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "heads,nq,nk,d,dtype",
    [(8, 4096, 4096, 40, torch.float16), (8, 4096, 77, 40, torch.float16), (8, 256, 256, 160, torch.bfloat16),
     (1, 4096, 4096, 512, torch.float16), (2, 333, 77, 64, torch.float32)],
    ids=["sd-d40-self", "sd-d40-cross", "sd-d160-bf16", "vae-d512", "fp32-tf32"],
)
def test_attention_kernel_on_cuda_matches_sdpa_and_replays(heads, nq, nk, d, dtype):
    """The compiled kernels (not the interpreter) against float64 and SDPA, forward and backward,
    then captured in a CUDA graph and replayed on new inputs."""
    from _numerics import assert_close_to_exact

    from ldm_fast.kernels.attention import attention_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, nq, heads * d, device="cuda", generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, nk, heads * d, device="cuda", generator=g).to(dtype).requires_grad_()
    v = torch.randn(2, nk, heads * d, device="cuda", generator=g).to(dtype).requires_grad_()
    grad = torch.randn(2, nq, heads * d, device="cuda", generator=g).to(dtype)

    def sdpa(q, k, v):
        split = lambda x: x.unflatten(2, (heads, d)).transpose(1, 2)  # noqa: E731
        return torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)

    before = ops.kernel_launches["attention"]
    out = F.attention(q, k, v, heads=heads, impl="triton")
    assert ops.kernel_launches["attention"] > before
    grads = torch.autograd.grad(out, (q, k, v), grad)
    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = sdpa(*exact_in)
    exact_grads = torch.autograd.grad(exact, exact_in, grad.double())
    eager_in = [x.detach().requires_grad_() for x in (q, k, v)]
    # the yardstick for fp32 is eager attention with TF32 matmuls (what the kernel's tensor cores do)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    try:
        split = lambda x: x.unflatten(2, (heads, d)).transpose(1, 2)  # noqa: E731
        eager = attention_reference(*(split(x) for x in eager_in)).transpose(1, 2).flatten(2)
        eager_grads = torch.autograd.grad(eager, eager_in, grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert_close_to_exact(out.detach(), exact.detach(), eager.detach())
    for got, want, ref in zip(grads, exact_grads, eager_grads):
        assert_close_to_exact(got, want, ref)

    qs, ks, vs = (x.detach().clone() for x in (q, k, v))
    graph, out = _capture(lambda: F.attention(qs, ks, vs, heads=heads, impl="triton"))
    for _ in range(2):
        for x in (qs, ks, vs):
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, sdpa(qs, ks, vs), rtol=2e-2, atol=2e-2)
