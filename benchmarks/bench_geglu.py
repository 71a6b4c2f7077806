"""GEGLU at SD 1.5 shapes: the transformer blocks' feed-forward gate, ``proj [B, N, 2F] -> [B, N, F]``.

U-Net at 256x256, batch 2 (classifier-free guidance), one shape per transformer level: 1024 tokens
(32x32 latents) with F = 4 x 320 = 1280, 256 (16x16) with F = 4 x 640 = 2560, 64 (8x8) and the mid
block's 16 (4x4) with F = 4 x 1280 = 5120. At 512 px each level has 4x the tokens and the same rows:
the per-row work, the plan and the traffic ratio are the same, and these sizes keep Triton's
interpreter (which measures the traffic) to seconds a case. fp16 and bf16 as a ``.half()`` model
runs, fp32 once. The quick subset is the small levels.

Forward. Baseline: diffusers' ``GEGLU.forward`` after its projection,
``hidden, gate = proj.chunk(2, -1); hidden * F.gelu(gate)``, eager: the chunk is a view (free), the
gelu reads F and writes F, the multiply reads 2F and writes F per row: 5F elements, 1.67x the
minimum. Fused: ``ldm_fast.functional.geglu(proj)``, one launch. Minimum traffic: read proj (2F)
once, write out (F) once per row; target 1.0.

Backward (``bwd-*``, what training runs). Fused: ``geglu_bwd(grad, proj)`` alone (the launch the
op's autograd makes). Baseline: the backward only of the expression above (its graph built once in
``make``, each call ``torch.autograd.grad(out, proj, grad, retain_graph=True)``: two multiplies,
gelu_backward and the chunk's cat). Minimum traffic: read grad (F) and proj (2F), write dproj (2F);
target 1.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

import ldm_fast.functional as lf
from ldm_fast.ops import kernel_launches
from ldm_fast.kernels.geglu import geglu_bwd

from .common import DTYPES, Case, benchmark_tests, nbytes

SHAPES = [(1024, 1280), (256, 2560), (64, 5120), (16, 5120)]  # (tokens, F)


def _make(batch: int, tokens: int, F: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"proj": torch.randn(batch, tokens, 2 * F, generator=g).to(device=device, dtype=dtype)}

    return make


def _fused(inputs):
    return lf.geglu(inputs["proj"])


def _diffusers_geglu(proj):
    hidden, gate = proj.chunk(2, dim=-1)
    return hidden * TF.gelu(gate)


def _eager(inputs):
    return _diffusers_geglu(inputs["proj"])


def _min_bytes(inputs):
    proj = inputs["proj"]
    return nbytes(proj) + nbytes(proj) // 2  # read proj [.., 2F], write out [.., F]


def _make_bwd(batch: int, tokens: int, F: int, dtype: torch.dtype):
    def make(device):
        inputs = _make(batch, tokens, F, dtype)(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        grad = torch.randn(batch, tokens, F, generator=g).to(device=device, dtype=dtype)
        with torch.enable_grad():  # the baseline's forward graph, built once: eager() runs its backward only
            leaf = inputs["proj"].clone().requires_grad_()
            out = _diffusers_geglu(leaf)
        return {"grad": grad, "proj": inputs["proj"], "graph": (out, leaf)}

    return make


def _fused_bwd(inputs):
    dproj = geglu_bwd(inputs["grad"], inputs["proj"])
    kernel_launches["geglu"] += 1  # the launcher alone: counted as the op's autograd counts it
    return dproj


def _eager_bwd(inputs):
    out, leaf = inputs["graph"]
    return torch.autograd.grad(out, leaf, inputs["grad"], retain_graph=True)


def _min_bytes_bwd(inputs):
    return nbytes(inputs["grad"], inputs["proj"]) + nbytes(inputs["proj"])  # read grad, proj; write dproj


def cases() -> list[Case]:
    out = []
    for tokens, F in SHAPES:
        for name in ("fp16", "bf16"):
            quick = (tokens, F, name) in ((16, 5120, "fp16"), (64, 5120, "bf16"))
            out.append(Case("geglu", f"b2-{tokens}x{F}-{name}", _make(2, tokens, F, DTYPES[name]), _fused, _eager,
                            _min_bytes, quick=quick))
    out.append(Case("geglu", "b2-1024x1280-fp32", _make(2, 1024, 1280, torch.float32), _fused, _eager, _min_bytes))
    for tokens, F in ((16, 5120), (1024, 1280)):
        for name in ("fp16", "bf16"):
            out.append(Case("geglu", f"bwd-b2-{tokens}x{F}-{name}", _make_bwd(2, tokens, F, DTYPES[name]), _fused_bwd,
                            _eager_bwd, _min_bytes_bwd, quick=(tokens, F, name) == (16, 5120, "fp16")))
    return out


test_eager, test_fused = benchmark_tests(cases)
