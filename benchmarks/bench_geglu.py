"""GEGLU at SD 1.5 shapes: the transformer blocks' feed-forward gate, ``proj [B, N, 2F] -> [B, N, F]``.

U-Net at 512x512, batch 2 (classifier-free guidance), one shape per transformer level: 4096 tokens
(64x64) with F = 4 x 320 = 1280, 1024 (32x32) with F = 4 x 640 = 2560, 256 (16x16) and the mid block's
64 (8x8) with F = 4 x 1280 = 5120; and 4096 tokens with F = 2560 (as large as the 64x64 level at
twice the width). fp16 and bf16 as a ``.half()`` model runs, fp32 once. The quick subset is the
small levels (the interpreter runs about 50 programs a second).

Forward. Baseline: diffusers' ``GEGLU.forward`` after its projection,
``hidden, gate = proj.chunk(2, -1); hidden * F.gelu(gate)``, eager: the chunk is a view (free), the
gelu reads F and writes F, the multiply reads 2F and writes F per row: 5F elements, 1.67x the
minimum. Fused: ``geglu_fwd(proj)``, one launch. Minimum traffic: read proj (2F) once, write out (F)
once per row; target 1.0.

Backward (``bwd-*``, what training runs). Fused: ``geglu_bwd(grad, proj)`` alone. Baseline: the
backward only of the expression above (its graph built once in ``make``, each call
``torch.autograd.grad(out, proj, grad, retain_graph=True)``: two multiplies, gelu_backward and the
chunk's cat). Minimum traffic: read grad (F) and proj (2F), write dproj (2F); target 1.0.

The launchers are not wired into ``ldm_fast.functional`` yet (the op lands there after the ops
restructure), so ``fused`` records its launch in ``ldm_fast.backend.kernel_launches`` itself, as
the functional ops do, for the traffic check that a kernel ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ldm_fast import backend
from ldm_fast.kernels.geglu import geglu_bwd, geglu_fwd

from .common import DTYPES, Case, benchmark_tests, nbytes

SHAPES = [(4096, 1280), (1024, 2560), (256, 5120), (64, 5120), (4096, 2560)]  # (tokens, F)


def _make(batch: int, tokens: int, F: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        return {"proj": torch.randn(batch, tokens, 2 * F, generator=g).to(device=device, dtype=dtype)}

    return make


def _fused(inputs):
    out = geglu_fwd(inputs["proj"])
    backend.kernel_launches["geglu"] += 1
    return out


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
    backend.kernel_launches["geglu"] += 1
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
            quick = (tokens, F, name) in ((64, 5120, "fp16"), (256, 5120, "bf16"))
            out.append(Case("geglu", f"b2-{tokens}x{F}-{name}", _make(2, tokens, F, DTYPES[name]), _fused, _eager,
                            _min_bytes, quick=quick))
    out.append(Case("geglu", "b2-4096x1280-fp32", _make(2, 4096, 1280, torch.float32), _fused, _eager, _min_bytes))
    for tokens, F in ((64, 5120), (4096, 1280)):
        for name in ("fp16", "bf16"):
            out.append(Case("geglu", f"bwd-b2-{tokens}x{F}-{name}", _make_bwd(2, tokens, F, DTYPES[name]), _fused_bwd,
                            _eager_bwd, _min_bytes_bwd, quick=(tokens, F, name) == (64, 5120, "fp16")))
    return out


test_eager, test_fused = benchmark_tests(cases)
