"""Scaled dot-product attention at the shapes latent diffusion runs (issue #8), forward and backward.

Shapes (the case names read ``<where>-<Nq>x<Nk>-h<heads>d<head dim>-b<batch>-<dtype>``):

* SD VAE mid-block: one head of 512 at 4096 tokens (512 px) and 16384 (1024 px), q, k and v slices
  of one ``[B, N, 3*512]`` fused qkv projection (rows 3*512 apart, read in place); fp16, bf16, and
  fp32 (SDXL's VAE runs in fp32: ``force_upcast``);
* SD 1.5 U-Net self-attention, 8 heads, batch 2 (classifier-free guidance): D=40 at 4096 tokens
  (64x64 latents), D=80 at 1024, D=160 at 256; cross-attention to the 77 text tokens at D=40;
* SDXL at 1024 px: 10 heads of 64 at 4096 tokens, 20 heads of 64 at 1024; and D=128 (10 heads at
  1024 tokens, the head size of SD3/Flux-style transformers), bf16;
* backward: the U-Net's D=40 (self and cross), 80 and 160, SDXL's 64 at 4096 tokens (bf16, as
  training runs them, D=160 in fp16) and the VAE's 512 (fp16, separate to_q/to_k/to_v).

Inputs are laid out as diffusers' ``to_q``/``to_k``/``to_v`` Linear layers produce them: q
``[B, Nq, H*D]``, k and v ``[B, Nk, H*D]`` (contiguous, or the fused-qkv slices above).

Forward. Fused: ``ldm_fast.functional.attention(q, k, v, heads=H, impl="triton")`` -> ``[B, Nq,
H*D]``. Baseline: diffusers' ``AttnProcessor2_0``, eager: ``q.view(B, -1, H, D).transpose(1, 2)``
(and k, v), ``F.scaled_dot_product_attention``, ``.transpose(1, 2).reshape(B, -1, H*D)``.
Minimum traffic: read q, k and v once, write the output once. FLOPs ``4*B*H*Nq*Nk*D`` (the two
GEMMs, counting multiply and add).

Backward (``bwd-*``, what training runs). Fused: ``torch.ops.ldm_fast.attention_backward(dout, q,
k, v, out, lse, scale)`` alone (dq, then dk and dv: two launches), with ``out`` ``[B, Nq, H, D]``
and the fp32 base-2 log-sum-exp ``lse`` ``[B, H, Nq]`` computed once in ``make`` from a float64
reference (as the forward saves them), ``dout`` ``[B, Nq, H*D]`` as the output projection's
backward hands it over. Baseline: the backward only of the diffusers forward above, graph built
once in ``make`` (q, k, v leaves that require grad), ``torch.autograd.grad(out, (q, k, v), dout,
retain_graph=True)``. Minimum traffic: read q, k, v, out, dout and lse once, write dq, dk and dv
once. FLOPs: 2.5x the forward's (``10*B*H*Nq*Nk*D``), the FlashAttention convention (five GEMMs
in the backward, two in the forward, whatever is recomputed).

Traffic targets come from the kernels' design (``ldm_fast/kernels/attention.py``), not from a fudge
factor: :func:`design_bytes` counts what the kernels load and store for the plan of the case
(``fwd_plan``/``bwd_plan``: BLOCK_M, BLOCK_N, the D chunks and the output-column split), which is
exactly what the interpreter measures; the target is that over the minimum (rounded up to 0.001),
the measured ``fused/min`` is the re-read factor. Per (batch, head), with n_m = cdiv(Nq, BLOCK_M)
query blocks, n_n = cdiv(Nk, BLOCK_N) key blocks, n_d = cdiv(D, output columns per program):

* forward, D <= 256 (one chunk): q read once, K and V once per query block, out written once:
  ``q + n_m*(K + V) + out``, i.e. ``1 + (n_m - 1)*(K + V)/min``;
* forward, D = 512 (q.k in chunks of 128, two programs of 256 output columns per query block):
  each program re-reads its q block per key block (from L1/L2 on a GPU; counted here as global
  loads), the full K rows per query block, its half of the V rows:
  ``n_d*n_n*q + n_d*n_m*K + n_m*V + out``;
* backward dq kernel: ``delta = rowsum(dout*out)`` (dout and out once, delta [B,H,Nq] fp32 written),
  lse, then K and V once per query block (D <= 256: q and dout kept; D = 512: q, dout, K, V
  re-read per block and output-column split); dk/dv kernel: K and V kept, q, dout, lse and delta
  once per key block (D = 512: again per column split); dq, dk, dv written once.

The measured counts equal the model to the byte. ``python -m benchmarks.bench_attention --ratios``
prints every case's design ratio at its real shape and at its CPU shape. At the real shapes (plans
of 2026-11-30): forward 16.5x at 4096 tokens (D <= 128: K and V re-read by each of 32 query
blocks), 4.5x at 1024, 2.5x at 256 (D=160), 1.57x cross-attention; the VAE 112x at 4096 tokens
and 448x at 16384 (fp16; mostly q re-read per 32-key block); backward about 34x at 4096 tokens,
9.2x at 1024, 562x for the VAE at 4096.

Interpreter cost. Triton's interpreter runs these kernels at about 1-2 s per (head x 1024 x 1024
query-key pairs) at D <= 64 forward, several times that backward and about 10x at D=512, so the
real shapes would take minutes to hours. On the CPU (``make(cpu)``: what the traffic counter runs,
and through the launches it records, what the audit compiles) a case therefore runs its ``cpu``
shape: batch 1 and 2 heads (1 for the VAE) -- per (batch, head) the traffic and its ratio are
identical -- and, where the tokens differ, fewer tokens with the same tiles. The audit still
compiles the binaries of the REAL shapes: the kernels' specializations depend on batch, heads and
tokens only through the integer arguments' divisibility by 16, ``== 1`` and 32-bit range (strides,
H, Nq, Nk) and the pointers' 16-byte alignment, which the CPU shapes keep; ``python -m
benchmarks.bench_attention --check-specs`` (and tests/test_audit.py) checks that every CPU shape's
launches have the compile keys of the real shape's. The table's ``min MB`` and ratios are the
CPU shape's; a CUDA run (timings, ``--write-routes``) uses the real shapes.

Note on ``eager/min``: the dispatch counter sees SDPA as one aten op reading q, k, v and writing the
output, so the baseline shows about 1.0x; its kernels' own K/V re-reads are invisible there, unlike
the fused kernels' (counted per load instruction). The two ratios, and the H100 model built on
them, do not compare like for like for attention; the GPU timings do.

``python -m benchmarks.bench_attention --write-routes`` (CUDA only) times the kernel against SDPA on
every forward case at its real shape and writes ``ldm_fast/attention_routes.json`` (where
``impl="auto"`` picks the kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Optional

import torch
import torch.nn.functional as TF

from ldm_fast import functional as F
from ldm_fast.kernels._triton import cdiv
from ldm_fast.kernels.attention import bwd_plan, fwd_plan

from .common import DTYPES, Case, benchmark_tests, gpu_time_ms, nbytes, run_fused


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem: ``kind`` (vae, unet-self, unet-cross, sdxl-self, d128-self), batch,
    heads, query and key tokens, head dim, dtype name, whether q/k/v are slices of one fused qkv
    projection, and the (batch, heads, Nq, Nk) run on the CPU (None: the real shape)."""

    kind: str
    batch: int
    heads: int
    nq: int
    nk: int
    head_dim: int
    dtype_name: str
    packed: bool = False
    cpu: Optional[tuple] = None

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.nq}x{self.nk}-h{self.heads}d{self.head_dim}-b{self.batch}-{self.dtype_name}"

    def on(self, device: torch.device) -> "Shape":
        """The shape run on ``device``: the real one on a GPU, the ``cpu`` one on the CPU."""
        if device.type == "cpu" and self.cpu is not None:
            b, h, nq, nk = self.cpu
            return dataclasses.replace(self, batch=b, heads=h, nq=nq, nk=nk, cpu=None)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5


# ---------------------------------------------------------------------------------------------
# inputs


def _qkv(s: Shape, device: torch.device, g: torch.Generator):
    """q [B, Nq, H*D], k and v [B, Nk, H*D] as diffusers' projections produce them."""
    c = s.heads * s.head_dim
    if s.packed:  # one fused qkv projection [B, N, 3*C], split along the channels (self-attention)
        qkv = torch.randn(s.batch, s.nq, 3 * c, generator=g).to(device=device, dtype=s.dtype)
        return qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    q = torch.randn(s.batch, s.nq, c, generator=g).to(device=device, dtype=s.dtype)
    k = torch.randn(s.batch, s.nk, c, generator=g).to(device=device, dtype=s.dtype)
    v = torch.randn(s.batch, s.nk, c, generator=g).to(device=device, dtype=s.dtype)
    return q, k, v


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """diffusers' head split: [B, N, H*D] -> [B, H, N, D] (a view)."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _diffusers_sdpa(q, k, v, heads: int):
    """diffusers' AttnProcessor2_0 between the projections: head split, SDPA, head merge."""
    b = q.shape[0]
    d = q.shape[-1] // heads
    q4, k4, v4 = (_heads(x, heads) for x in (q, k, v))
    out = TF.scaled_dot_product_attention(q4, k4, v4, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)


def _make(shape: Shape):
    def make(device):
        s = shape.on(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = _qkv(s, device, g)
        return {"q": q, "k": k, "v": v, "heads": s.heads, "shape": s}

    return make


def _fused(inputs):
    return F.attention(inputs["q"], inputs["k"], inputs["v"], heads=inputs["heads"], impl="triton")


def _eager(inputs):
    return _diffusers_sdpa(inputs["q"], inputs["k"], inputs["v"], inputs["heads"])


def _min_bytes(inputs):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    return 2 * nbytes(q) + nbytes(k, v)  # read q, k, v; write out (q's size)


def _flops(inputs):
    s = inputs["shape"]
    return 4 * s.batch * s.heads * s.nq * s.nk * s.head_dim


def _make_bwd(shape: Shape):
    def make(device):
        s = shape.on(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = _qkv(s, device, g)
        dout = torch.randn(q.shape, generator=g).to(device=device, dtype=s.dtype)  # [B, Nq, H*D]
        q4, k4, v4 = (_heads(x, s.heads) for x in (q, k, v))
        # what the forward saves: out [B, Nq, H, D] in the input dtype, lse [B, H, Nq] fp32 (base 2),
        # from a float64 reference
        scores = q4.double() @ k4.double().transpose(-1, -2) * s.scale
        lse = torch.logsumexp(scores, -1)
        out = (torch.softmax(scores, -1) @ v4.double()).transpose(1, 2).to(s.dtype).contiguous()
        with torch.enable_grad():  # the baseline's forward graph, built once: eager() runs its backward only
            leaves = tuple(x.detach().clone().requires_grad_() for x in (q, k, v))
            y = _diffusers_sdpa(*leaves, s.heads)
        return {
            "dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": (lse / math.log(2)).float(),
            "heads": s.heads, "shape": s, "graph": (y, leaves),
        }

    return make


def _fused_bwd(inputs):
    s = inputs["shape"]
    q4, k4, v4, do4 = (_heads(inputs[n], s.heads) for n in ("q", "k", "v", "dout"))
    return torch.ops.ldm_fast.attention_backward(do4, q4, k4, v4, inputs["out"], inputs["lse"], s.scale)


def _eager_bwd(inputs):
    y, leaves = inputs["graph"]
    return torch.autograd.grad(y, leaves, inputs["dout"], retain_graph=True)


def _min_bytes_bwd(inputs):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    # read q, k, v, out, dout, lse; write dq, dk, dv
    return nbytes(q, k, v, inputs["out"], inputs["dout"], inputs["lse"]) + nbytes(q, k, v)


def _flops_bwd(inputs):
    return 5 * _flops(inputs) // 2


# ---------------------------------------------------------------------------------------------
# the design's traffic (what the kernels load and store), for the targets


def min_bytes(s: Shape, backward: bool) -> int:
    """The minimum traffic of ``s`` from its shape alone (as ``_min_bytes``/``_min_bytes_bwd``)."""
    item = torch.empty((), dtype=s.dtype).element_size()
    q = s.batch * s.heads * s.nq * s.head_dim * item
    kv = s.batch * s.heads * s.nk * s.head_dim * item
    if not backward:
        return 2 * q + 2 * kv
    lse = s.batch * s.heads * s.nq * 4
    return 4 * q + lse + 4 * kv  # q, out, dout, dq; lse; k, v, dk, dv


def design_bytes(s: Shape, backward: bool) -> int:
    """Bytes the kernels move for ``s`` by their design and plan (module docstring), every load and
    store instruction counted as global traffic, as the interpreter counts it."""
    item = torch.empty((), dtype=s.dtype).element_size()
    bh = s.batch * s.heads
    q = s.nq * s.head_dim * item  # per (batch, head); out, dout, dq the same
    kv = s.nk * s.head_dim * item  # K, V, dK, dV
    row = s.nq * 4  # lse, delta (fp32)
    if not backward:
        p = fwd_plan(s.head_dim, item)
        n_m, n_n, n_d = cdiv(s.nq, p.block_m), cdiv(s.nk, p.block_n), cdiv(s.head_dim, p.block_dout)
        if p.d_chunks == 1:
            per = q + n_m * 2 * kv + q
        else:
            per = n_d * n_n * q + n_d * n_m * kv + n_m * kv + q
        return bh * per
    p = bwd_plan(s.head_dim, item)
    n_m, n_n, n_d = cdiv(s.nq, p.block_m), cdiv(s.nk, p.block_n), cdiv(s.head_dim, p.block_dout)
    if p.d_chunks == 1:
        dq = (q + q) + row + row + (q + q) + n_m * 2 * kv + q  # delta: dout, out; write delta; lse; q, dout; K, V; dq
        dkdv = 2 * kv + n_n * (2 * q + 2 * row) + 2 * kv  # K, V; per key block q, dout, lse, delta; dK, dV
    else:
        dq = (n_d * 2 * q + row + n_d * row  # delta (dout, out per program), written once; lse per program
              + n_d * n_n * 2 * q + n_d * n_m * 2 * kv + n_m * kv + q)  # q, dout, K, V per block; K columns; dq
        dkdv = (n_d * n_m * 2 * kv  # K, V chunks per query block
                + n_d * n_n * 2 * q + n_n * 2 * q  # q, dout chunks per key block; their output columns
                + n_d * n_n * 2 * row + 2 * kv)  # lse, delta; dK, dV
    return bh * (dq + dkdv)


def design_target(s: Shape, backward: bool) -> float:
    """``design_bytes / min_bytes``, rounded up to 0.001."""
    return math.ceil(design_bytes(s, backward) / min_bytes(s, backward) * 1000) / 1000


# ---------------------------------------------------------------------------------------------
# the cases

#: (shape, quick) per case. ``cpu``: the (batch, heads, Nq, Nk) run on the CPU (module docstring):
#: the real token counts where the interpreter takes seconds, fewer tokens with the same tiles
#: where it would take minutes (--ratios prints both shapes' design ratios).
FORWARD = [
    # SD VAE mid-block, fused qkv slices
    (Shape("vae", 1, 1, 4096, 4096, 512, "fp16", packed=True, cpu=(1, 1, 1024, 1024)), False),
    (Shape("vae", 1, 1, 16384, 16384, 512, "fp16", packed=True, cpu=(1, 1, 512, 512)), False),
    (Shape("vae", 1, 1, 4096, 4096, 512, "bf16", packed=True, cpu=(1, 1, 128, 128)), True),
    (Shape("vae", 1, 1, 4096, 4096, 512, "fp32", packed=True, cpu=(1, 1, 256, 256)), False),
    # SD 1.5 U-Net, 8 heads, batch 2
    (Shape("unet-self", 2, 8, 4096, 4096, 40, "fp16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("unet-self", 2, 8, 1024, 1024, 80, "fp16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("unet-self", 2, 8, 256, 256, 160, "fp16", cpu=(1, 2, 256, 256)), True),
    (Shape("unet-cross", 2, 8, 4096, 77, 40, "fp16", cpu=(1, 2, 4096, 77)), True),
    # SDXL at 1024 px, and a 128 head dim
    (Shape("sdxl-self", 2, 10, 4096, 4096, 64, "fp16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("sdxl-self", 2, 20, 1024, 1024, 64, "fp16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("d128-self", 2, 10, 1024, 1024, 128, "bf16", cpu=(1, 2, 1024, 1024)), False),
]

BACKWARD = [
    (Shape("unet-self", 2, 8, 4096, 4096, 40, "bf16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("unet-self", 2, 8, 1024, 1024, 80, "bf16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("unet-self", 2, 8, 256, 256, 160, "fp16", cpu=(1, 2, 256, 256)), True),
    (Shape("unet-cross", 2, 8, 4096, 77, 40, "bf16", cpu=(1, 2, 1024, 77)), True),
    (Shape("sdxl-self", 2, 10, 4096, 4096, 64, "bf16", cpu=(1, 2, 1024, 1024)), False),
    (Shape("vae", 1, 1, 4096, 4096, 512, "fp16", cpu=(1, 1, 64, 64)), True),  # separate to_q/to_k/to_v
]


#: Why attention's two byte ratios (and a model built on them) do not compare (README, benchmarks/README.md).
BYTES_CAVEAT = ("SDPA is one op to the eager dispatch counter (its internal re-reads are invisible) while the kernel's "
                "every load is counted, K/V re-read per query block by design: eager/min and fused/min do not compare "
                "like for like, so no bytes-based GPU model; only GPU timings compare them")


def _case(shape: Shape, quick: bool, backward: bool) -> Case:
    cpu = shape.on(torch.device("cpu"))  # the traffic targets are for what the interpreter runs
    if backward:
        return Case("attention", "bwd-" + shape.name, _make_bwd(shape), _fused_bwd, _eager_bwd, _min_bytes_bwd,
                    traffic_target=design_target(cpu, True), flops=_flops_bwd, quick=quick, bytes_caveat=BYTES_CAVEAT)
    return Case("attention", shape.name, _make(shape), _fused, _eager, _min_bytes,
                traffic_target=design_target(cpu, False), flops=_flops, quick=quick, bytes_caveat=BYTES_CAVEAT)


def cases() -> list[Case]:
    return [_case(s, q, False) for s, q in FORWARD] + [_case(s, q, True) for s, q in BACKWARD]


test_eager, test_fused = benchmark_tests(cases)


# ---------------------------------------------------------------------------------------------
# the CPU shapes compile like the real ones: python -m benchmarks.bench_attention --check-specs


def _empty_inputs(s: Shape, backward: bool) -> dict:
    """Inputs of ``s`` at its real shape, uninitialized (for recording launches, never run)."""
    c = s.heads * s.head_dim
    if s.packed:
        qkv = torch.empty(s.batch, s.nq, 3 * c, dtype=s.dtype)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    else:
        q = torch.empty(s.batch, s.nq, c, dtype=s.dtype)
        k, v = (torch.empty(s.batch, s.nk, c, dtype=s.dtype) for _ in range(2))
    inputs = {"q": q, "k": k, "v": v, "heads": s.heads, "shape": s}
    if backward:
        inputs.update(dout=torch.empty_like(q), out=torch.empty(s.batch, s.nq, s.heads, s.head_dim, dtype=s.dtype),
                      lse=torch.empty(s.batch, s.heads, s.nq))
    return inputs


def recorded_launches(fn, inputs) -> list[dict]:
    """The kernel launches ``fn(inputs)`` makes (as :mod:`benchmarks.traffic` records them), the
    kernels not run (interpreter only)."""
    from triton.runtime.interpreter import InterpretedFunction

    from . import traffic

    launches = []

    def record(fn_self, *args, grid, warmup, **kwargs):
        launches.append(traffic._describe_launch(fn_self, args, kwargs, grid).as_dict())

    original = InterpretedFunction.run
    InterpretedFunction.run = record
    try:
        with torch.no_grad():
            run_fused(Case("attention", "", None, fn, None, None), inputs)
    finally:
        InterpretedFunction.run = original
    return launches


def check_specs() -> list[str]:
    """Every case whose CPU shape differs from its real one: the launches at both shapes must have
    the same compile key (:func:`benchmarks.audit.compile_key`: kernel, argument classes,
    constexprs, options), so the audit of the CPU shape's launches is the audit of the real shape's
    binaries. Returns the mismatches (empty when all agree)."""
    from . import audit

    problems = []
    for backward, table in ((False, FORWARD), (True, BACKWARD)):
        fn = _fused_bwd if backward else _fused
        for shape, _ in table:
            cpu = shape.on(torch.device("cpu"))
            if cpu == shape:
                continue
            real = recorded_launches(fn, _empty_inputs(shape, backward))
            small = recorded_launches(fn, _empty_inputs(cpu, backward))
            keys = [[audit.compile_key(launch, 90) for launch in ls] for ls in (real, small)]
            name = ("bwd-" if backward else "") + shape.name
            if not real or keys[0] != keys[1]:
                problems.append(f"{name}: the CPU shape {shape.cpu} compiles differently from the real shape "
                                f"({len(real)} vs {len(small)} launches)")
    return problems


# ---------------------------------------------------------------------------------------------
# impl="auto" routes: python -m benchmarks.bench_attention --write-routes (CUDA)


def choose_routes(device: str, timings: list[dict]) -> list[dict]:
    """Route entries from timings ``{dtype, head_dim, nq, nk, fused_ms, sdpa_ms}``: per (dtype, head
    dim), the (min_q, min_k) of a case where the kernel won such that it also won every measured
    case at least as long in both (the region the entry sends to the kernel holds no loss), the
    candidate covering the most wins; none when no such case exists."""
    out = []
    groups: dict = {}
    for t in timings:
        groups.setdefault((t["dtype"], t["head_dim"]), []).append(t)
    for (dtype, head_dim), ts in sorted(groups.items()):
        best = None
        for c in ts:
            region = [t for t in ts if t["nq"] >= c["nq"] and t["nk"] >= c["nk"]]
            if all(t["fused_ms"] < t["sdpa_ms"] for t in region):
                rank = (len(region), -c["nq"] * c["nk"])
                if best is None or rank > best[0]:
                    best = (rank, c)
        if best is not None:
            c = best[1]
            out.append({"device": device, "dtype": dtype, "head_dim": head_dim, "min_q": c["nq"], "min_k": c["nk"],
                        "measured": [{k: t[k] for k in ("case", "nq", "nk", "fused_ms", "sdpa_ms")} for t in ts]})
    return out


def time_forward(names: Optional[list[str]] = None, device: Optional[torch.device] = None) -> list[dict]:
    """Kernel vs SDPA per forward case (those whose ``Shape.name`` is in ``names``; default all),
    each printed as it is measured: on a CUDA GPU at its real shape, ``do_bench`` medians; on the CPU
    (the GPU session's dry run) at one head of at most 64 x 64 tokens, the kernel run once
    interpreted, no timing."""
    device = device or torch.device("cuda")
    timings = []
    for shape, _ in FORWARD:
        if names is not None and shape.name not in names:
            continue
        if device.type == "cpu":  # the dry run: a rehearsal of the code path on a tiny shape, same tiles
            shape = dataclasses.replace(shape, cpu=(1, 1, min(shape.nq, 64), min(shape.nk, 64)))
        case = _case(shape, False, False)
        real = shape.on(device)
        inputs = case.make(device)
        run_fused(case, inputs)
        rec = {"case": case.id, "dtype": str(shape.dtype).removeprefix("torch."), "head_dim": shape.head_dim,
               "nq": real.nq, "nk": real.nk, "batch": real.batch, "heads": real.heads}
        if device.type == "cuda":
            rec.update(fused_ms=gpu_time_ms(lambda: run_fused(case, inputs)), sdpa_ms=gpu_time_ms(lambda: case.eager(inputs)))
            print(f"{case.id}: kernel {rec['fused_ms'] * 1e3:.1f} us, SDPA {rec['sdpa_ms'] * 1e3:.1f} us", file=sys.stderr,
                  flush=True)
        else:
            rec["skipped"] = "no GPU: the kernel ran once interpreted at a tiny shape (no timing)"
            print(f"{case.id}: ran interpreted at {real.batch}x{real.heads}x{real.nq}x{real.nk} (no timing)",
                  file=sys.stderr, flush=True)
        timings.append(rec)
        del inputs
    return timings


def write_routes(timings: Optional[list[dict]] = None) -> list[dict]:
    """Time every forward case at its real shape on this GPU (:func:`time_forward`, or take those
    ``timings``) and replace this GPU's entries in ``ldm_fast/attention_routes.json``."""
    name = torch.cuda.get_device_name(torch.device("cuda"))
    timings = time_forward() if timings is None else timings
    table = json.loads(F.ATTENTION_ROUTES_FILE.read_text())
    table["routes"] = [r for r in table["routes"] if r["device"] != name] + choose_routes(name, timings)
    F.ATTENTION_ROUTES_FILE.write_text(json.dumps(table, indent=2) + "\n")
    return table["routes"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-specs", action="store_true",
                        help="check that the CPU shapes compile like the real ones (interpreter, no GPU needed)")
    parser.add_argument("--ratios", action="store_true",
                        help="print every case's design traffic ratio at its real and at its CPU shape")
    parser.add_argument("--write-routes", action="store_true",
                        help="time kernel vs SDPA per forward case on this GPU, write ldm_fast/attention_routes.json")
    args = parser.parse_args(argv)
    status = 0
    if args.ratios:
        for backward, table in ((False, FORWARD), (True, BACKWARD)):
            for shape, _ in table:
                cpu = shape.on(torch.device("cpu"))
                print(f"{'bwd-' if backward else ''}{shape.name}: real {design_target(shape, backward)}x, "
                      f"CPU shape {cpu.batch}x{cpu.heads}x{cpu.nq}x{cpu.nk} {design_target(cpu, backward)}x")
    if args.check_specs:
        problems = check_specs()
        print("\n".join(problems) or "every CPU shape compiles like its real shape")
        status |= int(bool(problems))
    if args.write_routes:
        if not torch.cuda.is_available():
            print("--write-routes times the kernel on a CUDA GPU; none here", file=sys.stderr)
            return 2
        print(json.dumps(write_routes(), indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
