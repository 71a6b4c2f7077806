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


# ---------------------------------------------------------------------------------------------
# every op inside a capture (issue 25): captured after a warm-up, replayed on new inputs, equal to the
# same kernel called outside the graph; unseeded noise fresh at every replay (and the capture itself
# succeeds: the warm-up loads the kernel variant the capture records, item 4)


def _op_cases():
    """``(name, op, make(g) -> inputs, fn(*inputs), random)``; ``random``: unseeded noise (fresh per
    replay) rather than a deterministic function of the inputs."""
    table = ldm_fast.make_schedule().alphas_cumprod.cuda()
    steps = torch.tensor([list(step_coefficients(a, b, "ddim", 0.5)) for a, b in ((0.3, 0.5), (0.6, 0.7))],
                         dtype=torch.float64).float().cuda()
    lat = (4, 4, 32, 32)

    def randn(g, shape, dtype=torch.float16, **kw):
        return torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(**kw)

    def moments(g):
        return [randn(g, (4, 8, 32, 32))]

    def noised(g):
        return [randn(g, lat), torch.randint(0, 1000, (lat[0],), device="cuda", generator=g), randn(g, lat)]

    def step_inputs(g):
        return [randn(g, (2 * lat[0],) + lat[1:]), randn(g, lat), torch.randint(0, 2, (lat[0],), device="cuda", generator=g)]

    def gn_inputs(g):
        return [randn(g, (2, 320, 32, 32), memory_format=torch.channels_last), randn(g, (320,)), randn(g, (2, 320))]

    def aln_inputs(g):
        return [randn(g, (2, 1024, 320)), randn(g, (2, 1024, 320)), randn(g, (320,)), randn(g, (320,))]

    def attn_inputs(g):
        return [randn(g, (2, 1024, 320)) for _ in range(3)]

    return [
        ("reparameterize seeded", "reparameterize", moments, lambda m: F.reparameterize_moments(m, seed=3, scale=0.18), False),
        ("reparameterize unseeded", "reparameterize", moments, lambda m: F.reparameterize_moments(m, scale=0.18), True),
        ("q_sample noise given", "q_sample", noised, lambda x0, t, n: F.q_sample(x0, t, table, noise=n, target="v"), False),
        ("q_sample seeded", "q_sample", noised, lambda x0, t, n: F.q_sample(x0, t, table, seed=5), False),
        ("q_sample unseeded", "q_sample", noised, lambda x0, t, n: F.q_sample(x0, t, table)[1], True),
        ("sampler_step table+index seeded", "sampler_step", step_inputs,
         lambda e, x, i: F.sampler_step(e, x, coefficients=steps, index=i, guidance_scale=7.5, seed=11), False),
        ("sampler_step table+index unseeded", "sampler_step", step_inputs,
         lambda e, x, i: F.sampler_step(e, x, coefficients=steps, index=i, guidance_scale=7.5), True),
        ("group_norm+silu+shift channels_last", "group_norm", gn_inputs,
         lambda x, w, s: F.group_norm(x, 32, w, w, 1e-5, activation="silu", shift=s), False),
        ("add_layer_norm", "add_layer_norm", aln_inputs, lambda x, r, w, b: F.add_layer_norm(x, r, w, b), False),
        ("geglu bf16", "geglu", lambda g: [randn(g, (2, 1024, 2560), torch.bfloat16)], F.geglu, False),
        ("timestep_embedding", "timestep_embedding", lambda g: [torch.randint(0, 1000, (2,), device="cuda", generator=g)],
         lambda t: F.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0.0), False),
        ("attention", "attention", attn_inputs, lambda q, k, v: F.attention(q, k, v, heads=8, impl="triton"), False),
    ]


def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("case", _op_cases() if torch.cuda.is_available() else [], ids=lambda c: c[0])
def test_every_op_replays_inside_a_capture(case):
    name, op, make, fn, random = case
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = make(g)
    before = ops.kernel_launches[op]
    with ldm_fast.use_backend("triton"):
        graph, out = _capture(lambda: fn(*inputs))
        assert ops.kernel_launches[op] > before, f"{name}: the kernel did not run"
        if random:  # the same inputs, two replays: two different draws of standard normal noise
            graph.replay()
            first = [o.clone() for o in _outputs(out)]
            graph.replay()
            for a, b in zip(first, _outputs(out)):
                assert torch.isfinite(b).all() and not torch.equal(a, b), name
            return
        for _ in range(2):  # new values in the static inputs: the replay computes on them
            for static, new in zip(inputs, make(g)):
                static.copy_(new)
            graph.replay()
            want = _outputs(fn(*inputs))  # the same kernel, outside the graph
            for got, expected in zip(_outputs(out), want):
                assert torch.equal(got, expected), name


def _kernels_direct() -> int:
    """Launches made directly (kernels/_launch.py) by every ldm_fast kernel so far."""
    import importlib

    from ldm_fast.kernels._launch import Kernel

    names = ("add_layer_norm", "attention", "geglu", "group_norm", "q_sample", "reparameterize", "sampler_step",
             "timestep_embedding")
    modules = [importlib.import_module(f"ldm_fast.kernels.{name}") for name in names]
    return sum(v.direct for m in modules for v in vars(m).values() if isinstance(v, Kernel))


@pytest.mark.parametrize("case", [c for c in _op_cases() if not c[4]] if torch.cuda.is_available() else [],
                         ids=lambda c: c[0])
def test_every_op_launches_directly_after_its_first_call_with_the_same_results(case):
    """The second call of a specialization goes to the compiled kernel's launcher (counted), and
    gives bit for bit what ``kernel[grid]`` gives (LDM_FAST_DIRECT_LAUNCH=0), also inside a capture."""
    from ldm_fast.kernels._launch import Switch

    name, op, make, fn, _ = case
    inputs = make(torch.Generator(device="cuda").manual_seed(0))
    with ldm_fast.use_backend("triton"):
        saved, Switch.enabled = Switch.enabled, False
        try:
            via_run = [o.clone() for o in _outputs(fn(*inputs))]
        finally:
            Switch.enabled = saved
        fn(*inputs)  # the first call of the specialization: kernel[grid], cached
        before = _kernels_direct()
        direct = _outputs(fn(*inputs))
        assert _kernels_direct() > before, f"{name}: no direct launch"
        graph, out = _capture(lambda: fn(*inputs))
        graph.replay()
    for a, b, c in zip(via_run, direct, _outputs(out)):
        assert torch.equal(a, b) and torch.equal(a, c), name


# ---------------------------------------------------------------------------------------------
# CUDA autocast: group_norm and add_layer_norm give torch's dtypes, within the error rule (item 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_group_norm_and_add_layer_norm_follow_cuda_autocast(dtype):
    from _numerics import assert_close_to_exact

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 320).cuda()  # fp32 parameters, as in mixed-precision training
    ln = torch.nn.LayerNorm(320).cuda()
    with torch.no_grad():
        for p in (norm.weight, norm.bias, ln.weight, ln.bias):
            p.copy_(1 + 0.2 * torch.randn_like(p))
    x = torch.randn(2, 320, 32, 32, device="cuda").to(dtype).requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        want = TF.silu(norm(x))  # torch: group_norm on autocast's fp32 list
        before = ops.kernel_launches["group_norm"]
        with ldm_fast.use_backend("triton"):
            got = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps, activation="silu")
        assert ops.kernel_launches["group_norm"] > before
    assert got.dtype == want.dtype == torch.float32
    exact = TF.silu(TF.group_norm(x.detach().double(), 32, norm.weight.double(), norm.bias.double(), norm.eps))
    assert_close_to_exact(got.detach(), exact, want.detach())
    dy = torch.randn_like(want)
    (dx,) = torch.autograd.grad(got, x, dy)
    (dx_torch,) = torch.autograd.grad(want, x, dy)
    xe = x.detach().double().requires_grad_()
    (dx_exact,) = torch.autograd.grad(TF.silu(TF.group_norm(xe, 32, norm.weight.double(), norm.bias.double(), norm.eps)),
                                      xe, dy.double())
    assert dx.dtype == dx_torch.dtype == dtype
    assert_close_to_exact(dx, dx_exact, dx_torch)

    a, r = (torch.randn(2, 1024, 320, device="cuda").to(dtype) for _ in range(2))
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        s_torch = a + r
        out_torch = ln(s_torch)  # layer_norm: fp32 list
        before = ops.kernel_launches["add_layer_norm"]
        with ldm_fast.use_backend("triton"):
            s, out = ldm_fast.nn.add_norm(a, r, ln)  # what optimize() runs in the transformer blocks
        assert ops.kernel_launches["add_layer_norm"] > before
    assert s.dtype == s_torch.dtype == dtype and out.dtype == out_torch.dtype == torch.float32
    assert torch.equal(s, s_torch)
    exact = TF.layer_norm(s_torch.double(), (320,), ln.weight.double(), ln.bias.double(), ln.eps)
    assert_close_to_exact(out, exact, out_torch)


# ---------------------------------------------------------------------------------------------
# the device guard (item 5) and the grid limits (item 7)


def test_launches_follow_their_tensors_device():
    """Triton launches on the current device: tensors on cuda:0 while cuda:1 is current (and the
    reverse) must still be computed on their own device, equal to the same call made there."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"{TWO_GPUS} (this machine has {torch.cuda.device_count()}): a launch on cuda:0 while cuda:1 "
                    "is current cannot be tried")
    table = ldm_fast.make_schedule().alphas_cumprod
    for home, other in ((0, 1), (1, 0)):
        dev = torch.device("cuda", home)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, 64, 16, 16, device=dev, generator=g, dtype=torch.float16)
        w = torch.randn(64, device=dev, generator=g, dtype=torch.float16)
        q = torch.randn(2, 256, 320, device=dev, generator=g, dtype=torch.float16)
        lat = torch.randn(2, 4, 8, 8, device=dev, generator=g)
        t = torch.tensor([3, 999], device=dev)

        def calls():
            return (F.group_norm(x, 32, w, w, activation="silu"), F.attention(q, q, q, heads=8, impl="triton"),
                    F.q_sample(lat, t, table.to(dev), seed=4)[0])

        with ldm_fast.use_backend("triton"):
            with torch.cuda.device(home):
                want = calls()
            with torch.cuda.device(other):
                got = calls()
                assert torch.cuda.current_device() == other
        torch.cuda.synchronize(home)
        for a, b in zip(got, want):
            assert a.device == dev and torch.equal(a, b)
        # unseeded noise drawn on the tensors' device, inside the guard too
        with ldm_fast.use_backend("triton"), torch.cuda.device(other):
            x_t, eps = F.q_sample(lat, t, table.to(dev))
        assert eps.device == dev and torch.isfinite(eps).all()


def test_attention_with_batch_times_heads_above_the_grid_limit():
    """Temporal attention over every latent pixel: batch 2 x 64 x 64 pixels, 16 frames, 8 heads of 40
    is 65,536 (batch, head) pairs, one more than CUDA's 65,535 on grid axis 1: launched in slabs."""
    from _numerics import assert_close_to_exact

    B, N, H, D = 2 * 64 * 64, 16, 8, 40
    assert len(_grid.axis_launches((1, B * H, 1), 1)) == 2
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, N, H * D, device="cuda", generator=g).half() for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    before = ops.kernel_launches["attention"]
    out = F.attention(q, k, v, heads=H, impl="triton")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert ops.kernel_launches["attention"] > before

    def reference(*xs):
        split = [x.unflatten(2, (H, D)).transpose(1, 2) for x in xs]
        return attention_reference(*split).transpose(1, 2).flatten(2)

    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = reference(*exact_in)
    exact_grads = torch.autograd.grad(exact, exact_in, dout.double())
    eager_in = [x.detach().requires_grad_() for x in (q, k, v)]
    eager = reference(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in, dout)
    assert_close_to_exact(out.detach(), exact.detach(), eager.detach())
    for got, want, yardstick in zip(grads, exact_grads, eager_grads):
        assert_close_to_exact(got, want, yardstick)
    # the last (batch, head) pairs, past the first slab, are computed (not left unwritten)
    assert torch.isfinite(out[-1]).all() and out[-1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# optimize(model, cuda_graph=True) on a diffusers U-Net: replays counted and judged (items 2, 3, 11, 12)


def _diffusers():
    """diffusers, or a FAILED test (never a skip: tier 1 must not pass without its model tests)."""
    if importlib.util.find_spec("diffusers") is None:
        pytest.fail("diffusers is not installed: put its wheel under .whl/ (the pip download command is in "
                    "benchmarks/gpu_session.py) or pip install diffusers")
    import diffusers

    return diffusers


def _tiny_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=8, sample_size=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).cuda().eval()


def _mode(mode: str, dtype: torch.dtype):
    """The context a call runs in: no_grad, inference_mode, or no_grad + CUDA autocast (fp32 model)."""
    import contextlib

    stack = contextlib.ExitStack()
    if mode == "inference_mode":
        stack.enter_context(torch.inference_mode())
    else:
        stack.enter_context(torch.no_grad())
    if mode == "autocast":
        stack.enter_context(torch.autocast("cuda", dtype=dtype))
    return stack


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_optimize_cuda_graph_replays_a_diffusers_unet(dtype, layout, mode, record_property):
    """Python int timesteps (one graph for all of them), the graph actually replayed (counted, no plain
    call), each output within the error rule of the float64 model with eager diffusers at the same
    precision as the yardstick; then an in-place weight update, seen by the same graph."""
    from _numerics import assert_close_to_exact

    diffusers = _diffusers()
    base = _tiny_unet(diffusers)
    exact_model = copy.deepcopy(base).double()
    model_dtype = torch.float32 if mode == "autocast" else dtype  # autocast: fp32 weights, low-precision math
    eager_model = copy.deepcopy(base).to(model_dtype)
    unet = copy.deepcopy(base).to(model_dtype)
    channels_last = layout == "channels_last"
    ldm_fast.optimize(unet, channels_last=channels_last, cuda_graph=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 7, 32, device="cuda", generator=g)

    def call(model, t, cast, mode=mode):
        with _mode(mode, dtype):
            return model(x.to(cast), t, encoder_hidden_states=context.to(cast)).sample

    def judged(t):
        got = call(unet, t, model_dtype)
        exact = call(exact_model, t, torch.float64, mode="no_grad")
        eager = call(eager_model, t, model_dtype)
        assert got.dtype == eager.dtype, (got.dtype, eager.dtype)
        assert_close_to_exact(got, exact, eager)

    timesteps = (10, 500, 999)
    for t in timesteps:
        judged(t)
    stats = unet.forward.stats
    record_property("graph_stats", dict(stats))
    assert stats["graph capture"] == 1 and stats["graph replay"] == len(timesteps), dict(stats)
    assert not [k for k in stats if k.startswith("plain")], dict(stats)

    with torch.no_grad():  # an in-place update (an optimizer step, an EMA copy): the same graph sees it
        for model in (unet, eager_model, exact_model):
            model.conv_in.weight.mul_(1.25)
            model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(0.75)
    judged(500)
    assert stats["graph capture"] == 1 and stats["graph replay"] == len(timesteps) + 1, dict(stats)
    record_property("graph_stats_after_update", dict(stats))


def test_optimize_cuda_graph_after_a_lora_fuse(record_property):
    """A LoRA adapter added after capture is detected (a new capture), fused (then reset(), the
    documented contract: the fuse changes the layers' forward) and replayed, each time equal to the
    plain forward of the same model. Without peft the fuse is done as PEFT's merge does it: W += s B A
    in place on every attention projection, which the existing graph sees with no reset."""
    diffusers = _diffusers()
    unet = _tiny_unet(diffusers).half()
    ldm_fast.optimize(unet, cuda_graph=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=g).half()
    context = torch.randn(2, 7, 32, device="cuda", generator=g).half()
    stats = unet.forward.stats

    def both():
        with torch.no_grad():
            got = unet(x, 500, encoder_hidden_states=context).sample
            plain = unet.forward._plain(x, 500, encoder_hidden_states=context).sample
        torch.testing.assert_close(got, plain, rtol=2e-3, atol=2e-3)
        return got

    before = both()
    try:
        from diffusers.utils import USE_PEFT_BACKEND
        from peft import LoraConfig
    except ImportError as exc:
        USE_PEFT_BACKEND, why = False, f"peft not importable ({exc})"
    else:
        why = "diffusers' PEFT backend is off (peft or transformers too old or missing)"
    record_property("lora", "peft add_adapter + fuse_lora" if USE_PEFT_BACKEND else f"{why}: merged by hand")
    if USE_PEFT_BACKEND:
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
        adapted = both()
        assert stats["graph capture"] == 2 and stats["reset: parameters re-assigned"] == 1, dict(stats)
        unet.fuse_lora()
        unet.forward.reset()
        fused = both()
        assert stats["graph capture"] == 3, dict(stats)
        torch.testing.assert_close(fused, adapted, rtol=1e-2, atol=1e-2)
    else:
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(module, torch.nn.Linear):
                    out_f, in_f = module.weight.shape
                    b, a = (torch.randn(out_f, 4, device="cuda", generator=g) * 0.3,
                            torch.randn(4, in_f, device="cuda", generator=g) * 0.3)
                    module.weight.add_((b @ a).half())
        fused = both()
        assert stats["graph capture"] == 1, dict(stats)
    assert not torch.allclose(fused, before, atol=1e-2)  # the LoRA changed the output: the check means something
    assert stats["graph replay"] >= 3 and not [k for k in stats if k.startswith("plain")], dict(stats)
    record_property("graph_stats", dict(stats))
