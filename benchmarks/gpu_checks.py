"""Tier 1 of the GPU session: every op's kernels run on the device against eager and float64.

Each check calls an op with the Triton kernels forced (``use_backend("triton")``), proves that the
kernel launched (``ldm_fast.ops.kernel_launches``), and judges its output and, where the op has
a backward, its gradients by the project's rule (``tests/_numerics.py``: kernel error <= 2 x the
eager low-precision error + a floor), against the eager reference run at the input's dtype and at
float64. fp16 and bf16; GroupNorm+SiLU in NCHW and channels_last. On a GPU the shapes are SD's;
the dry run (CPU, Triton's interpreter) runs the same code on tiny shapes.

The CUDA-graph capture and replay (fresh noise per replay, q_sample's device-side t check, the
attention kernels against SDPA) are ``tests/test_cuda_graphs.py``, which tier 1 runs beside these.
"""

from __future__ import annotations

import importlib.util
import math
import time
from typing import Callable

import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.kernels.add_layer_norm import add_layer_norm_reference
from ldm_fast.kernels.timestep_embedding import timestep_embedding_reference
from ldm_fast.kernels.attention import attention_reference
from ldm_fast.kernels.geglu import geglu_reference
from ldm_fast.kernels.group_norm import group_norm_reference
from ldm_fast.kernels.q_sample import q_sample_reference
from ldm_fast.kernels.reparameterize import reparameterize_reference

from .common import BENCH_DIR


def _numerics():
    """tests/_numerics.py (the tolerance rule the tests use), loaded by path."""
    spec = importlib.util.spec_from_file_location("_numerics", BENCH_DIR.parent / "tests" / "_numerics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


def checks(small: bool) -> list[tuple[str, str, Callable, Callable, Callable, int]]:
    """``(name, op, make(device, dtype, g) -> inputs, kernel(*inputs), eager(*inputs), n_grad)`` per
    check: the first ``n_grad`` inputs are differentiated (0: a forward-only op). ``small``: the dry
    run's shapes (the interpreter); else SD shapes."""
    gn_shape = (2, 64, 9, 9) if small else (2, 320, 64, 64)
    lat = (2, 4, 8, 8) if small else (8, 4, 64, 64)
    attn_shapes = [(1, 64, 2, 40), (1, 32, 1, 512)] if small else [(2, 1024, 8, 40), (1, 1024, 1, 512)]
    table = ldm_fast.make_schedule().alphas_cumprod

    def gn_make(channels_last):
        def make(device, dtype, g):
            x = torch.randn(gn_shape, generator=g).to(device, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w = (1 + 0.1 * torch.randn(gn_shape[1], generator=g)).to(device, dtype)
            b = (0.1 * torch.randn(gn_shape[1], generator=g)).to(device, dtype)
            return [x, w, b]
        return make

    def gn(x, w, b):
        return F.group_norm(x, 32, w, b, 1e-5, activation="silu")

    def gn_shift_make(device, dtype, g):
        return gn_make(False)(device, dtype, g) + [torch.randn(gn_shape[:2], generator=g).to(device, dtype)]

    def gn_shift(x, w, b, shift):
        return F.group_norm(x, 32, w, b, 1e-5, activation="silu", shift=shift)

    def gn_shift_ref(x, w, b, shift):
        return group_norm_reference(x, 32, w, b, 1e-5, activation="silu", shift=shift)

    ff = (2, 64, 2 * 40) if small else (2, 4096, 2 * 1280)  # the SD U-Net's first-level GEGLU projection

    def geglu_make(device, dtype, g):
        return [torch.randn(ff, generator=g).to(device, dtype)]

    ln = (2, 64, 40) if small else (2, 4096, 320)  # the SD U-Net's first-level residual stream

    def aln_make(device, dtype, g):
        return [torch.randn(ln, generator=g).to(device, dtype), torch.randn(ln, generator=g).to(device, dtype),
                (1 + 0.1 * torch.randn(ln[-1], generator=g)).to(device, dtype),
                (0.1 * torch.randn(ln[-1], generator=g)).to(device, dtype)]

    def temb_make(device, dtype, g):  # integer-valued fp32 timesteps (the output is fp32 whatever the dtype)
        return [torch.randint(0, 1000, (lat[0],), generator=g).to(device, torch.float32)]

    def temb(t):  # SD 1.5's Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)
        return F.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0.0)

    def temb_ref(t):  # diffusers' fp32 statements; the same formula in float64 for the exact reference
        if t.dtype != torch.float64:
            return timestep_embedding_reference(t, 320, True, 0.0, 1.0, 10000)
        freq = torch.exp(-math.log(10000) * torch.arange(160, dtype=torch.float64, device=t.device) / 160)
        arg = t[:, None] * freq[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)

    def aln_fp32(fn):  # the norm's output in fp32 beside a low-precision sum (float64 inputs: the exact one)
        def run(x, r, w, b):
            low = x.dtype in (torch.float16, torch.bfloat16)
            return fn(x, r, w, b, 1e-5, out_dtype=torch.float32 if low else None)
        return run

    def gn_ref(x, w, b):
        return group_norm_reference(x, 32, w, b, 1e-5, activation="silu")

    def rep_make(device, dtype, g):
        return [torch.randn(lat, generator=g).to(device, dtype), (0.5 * torch.randn(lat, generator=g)).to(device, dtype),
                torch.randn(lat, generator=g).to(device, dtype)]

    def q_make(device, dtype, g):
        t = torch.randint(0, 1000, (lat[0],), generator=g).to(device)
        return [torch.randn(lat, generator=g).to(device, dtype), t, table.to(device),
                torch.randn(lat, generator=g).to(device, dtype)]

    def step_make(device, dtype, g):
        return [torch.randn((2 * lat[0], *lat[1:]), generator=g).to(device, dtype),
                torch.randn(lat, generator=g).to(device, dtype)]

    def step(eps, x):
        return F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=7.5)

    def step_ref(eps, x):
        with ldm_fast.use_backend("eager"):
            return F.sampler_step(eps, x, 0.3, 0.5, guidance_scale=7.5)

    def attn_make(b, n, h, d):
        def make(device, dtype, g):
            return [torch.randn(b, n, h * d, generator=g).to(device, dtype) for _ in range(3)]
        return make

    def attn(heads):
        return lambda q, k, v: F.attention(q, k, v, heads=heads, impl="triton")

    def attn_ref(heads):
        return lambda q, k, v: attention_reference(*(_split_heads(x, heads) for x in (q, k, v))).transpose(1, 2).flatten(2)

    out = [
        (f"group_norm+silu NCHW {gn_shape}", "group_norm", gn_make(False), gn, gn_ref, 3),
        (f"group_norm+silu channels_last {gn_shape}", "group_norm", gn_make(True), gn, gn_ref, 3),
        (f"group_norm+silu+shift {gn_shape}", "group_norm", gn_shift_make, gn_shift, gn_shift_ref, 4),
        (f"geglu {ff}", "geglu", geglu_make, F.geglu, geglu_reference, 1),
        (f"add_layer_norm {ln}", "add_layer_norm", aln_make, F.add_layer_norm, add_layer_norm_reference, 4),
        (f"add_layer_norm out fp32 (CUDA autocast) {ln}", "add_layer_norm", aln_make, aln_fp32(F.add_layer_norm),
         aln_fp32(add_layer_norm_reference), 4),
        (f"reparameterize {lat}", "reparameterize",
         rep_make, lambda m, lv, n: F.reparameterize(m, lv, noise=n, scale=0.18215),
         lambda m, lv, n: reparameterize_reference(m, lv, n, 0.18215), 2),
        (f"q_sample {lat}", "q_sample", q_make, lambda x0, t, tab, n: F.q_sample(x0, t, tab, noise=n),
         q_sample_reference, 0),
        (f"sampler_step ddim+cfg {lat}", "sampler_step", step_make, step, step_ref, 0),
        (f"timestep_embedding b{lat[0]} dim 320", "timestep_embedding", temb_make, temb, temb_ref, 0),
    ]
    out += [(f"attention b{b} n{n} h{h} d{d}", "attention", attn_make(b, n, h, d), attn(h), attn_ref(h), 3)
            for b, n, h, d in attn_shapes]
    return out


def _tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def run_check(name, op, make, kernel, eager, n_grad: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One check: the forward outputs and the gradients of the first ``n_grad`` inputs, judged."""
    judge = _numerics().assert_close_to_exact
    g = torch.Generator().manual_seed(0)
    inputs = make(device, dtype, g)
    leaves = [x.detach().requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    before = ldm_fast.ops.kernel_launches[op]
    with ldm_fast.use_backend("triton"):
        outs = _tuple(kernel(*leaves))
    launched = ldm_fast.ops.kernel_launches[op] > before
    if not launched:
        raise AssertionError(f"{op}: the Triton kernel did not launch (an eager fallback ran)")
    wants = [x for x in leaves if x.requires_grad]
    upstream = [torch.randn(o.shape, generator=g).to(device, o.dtype) for o in outs]
    judged = []

    def reference(cast):
        ins = [(x.detach().to(cast) if x.is_floating_point() and cast is not None else x.detach())
               .requires_grad_(x.requires_grad) for x in leaves]
        with ldm_fast.use_backend("eager"):
            res = _tuple(eager(*ins))
        return ins, res

    exact_in, exact = reference(torch.float64)
    eager_in, low = reference(None)
    for i, (o, e, lo) in enumerate(zip(outs, exact, low)):
        judge(o.detach(), e.detach(), lo.detach())
        judged.append(f"out{i}")
    if wants:
        grads = torch.autograd.grad(outs, wants, upstream)
        exact_grads = torch.autograd.grad(exact, [x for x in exact_in if x.requires_grad],
                                          [u.double() for u in upstream])
        low_grads = torch.autograd.grad(low, [x for x in eager_in if x.requires_grad], upstream)
        for i, (gk, ge, gl) in enumerate(zip(grads, exact_grads, low_grads)):
            judge(gk, ge, gl)
            judged.append(f"grad{i}")
    return {"check": name, "op": op, "dtype": str(dtype).removeprefix("torch."), "status": "ok",
            "judged": judged, "kernel_launched": launched}


def run_all(device: torch.device, small: bool, log: Callable[[str], None]) -> list[dict]:
    """Every check in fp16 and bf16 (``small``, the dry run: fp16, the same code path); each result
    printed as it is judged; a failure is a result."""
    results = []
    for name, op, make, kernel, eager, n_grad in checks(small):
        for dtype in (torch.float16,) if small else (torch.float16, torch.bfloat16):
            t0 = time.perf_counter()
            try:
                rec = run_check(name, op, make, kernel, eager, n_grad, device, dtype)
            except Exception as e:  # recorded; the other checks still run
                rec = {"check": name, "op": op, "dtype": str(dtype).removeprefix("torch."), "status": "FAIL",
                       "error": f"{type(e).__name__}: {e}"[:1500]}
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(rec)
            log(f"[tier 1] {name} {rec['dtype']}: {rec['status']}"
                + (f" ({', '.join(rec['judged'])})" if rec["status"] == "ok" else f": {rec['error'][:300]}"))
    return results
