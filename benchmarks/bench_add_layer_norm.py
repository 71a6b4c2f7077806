"""Add + LayerNorm at SD 1.5 shapes: the transformer blocks' residual stream, ``x, residual [B, N, C]``.

U-Net at 256x256, batch 2 (classifier-free guidance), one shape per transformer level: 1024 tokens
(32x32 latents) with C = 320, 256 (16x16) with C = 640, 64 (8x8) with C = 1280. At 512 px each
level has 4x the tokens and the same rows: the per-row work, the plan and the traffic ratio are
the same, and these sizes keep Triton's interpreter (which measures the traffic) to seconds a
case. fp16 and bf16 as a ``.half()`` model runs, fp32 once. The quick subset is the small levels.

Baseline: diffusers' ``BasicTransformerBlock``, eager: ``h = attn_output + h; n = norm2(h)``: the add
reads 2C and writes C, the layer norm reads C and writes C per row: 5C elements, 1.25x the
minimum, in two launches. Fused: ``ldm_fast.functional.add_layer_norm(x, residual, weight, bias)``,
one launch. Minimum traffic: read x and residual once, write s and out once (4C a row).

Two more calls of the op (issue #16): ``s_bias-*``, the feed-forward epilogue's call (the first
output ``s + ff.net[2].bias``, one more [C] read a program), against the same eager add + norm;
``out-fp32-*``, CUDA autocast's dtypes (the sum in bf16, the norm's output fp32), against autocast's
statements (the add, the fp32 cast, the fp32 layer_norm).

Target: 1.0 plus what the kernel moves beyond the minimum by design (:func:`_target`): each program
reads weight and bias once (2C elements, ``R / ROWS`` programs: 6.3% of the minimum at C = 320,
12.5% at 640, 25% at 1280, where a program holds only 8, 4, 2 rows) and the 8-byte-a-row mean and
rstd saved for the backward. The interpreter charges every program's weight read; on a GPU those
are L2 hits of a few KB, so the HBM traffic is the minimum's (1.0x + the statistics, 0.3-0.6%).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

import ldm_fast.functional as lf

from ldm_fast.kernels.add_layer_norm import _plan

from .common import DTYPES, Case, benchmark_tests, nbytes

SHAPES = [(1024, 320), (256, 640), (64, 1280)]  # (tokens, C)


def _make(batch: int, tokens: int, C: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, tokens, C, generator=g).to(device=device, dtype=dtype)
        residual = torch.randn(batch, tokens, C, generator=g).to(device=device, dtype=dtype)
        weight = (1 + 0.1 * torch.randn(C, generator=g)).to(device=device, dtype=dtype)
        bias = (0.1 * torch.randn(C, generator=g)).to(device=device, dtype=dtype)
        return {"x": x, "residual": residual, "weight": weight, "bias": bias}

    return make


def _fused(inputs):
    return lf.add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"])


def _eager(inputs):
    h = inputs["x"] + inputs["residual"]
    return h, TF.layer_norm(h, (h.shape[-1],), inputs["weight"], inputs["bias"], 1e-5)


def _min_bytes(inputs):
    return 2 * nbytes(inputs["x"], inputs["residual"])  # read x, residual; write s, out


def _target(batch: int, tokens: int, C: int, dtype: torch.dtype, params: int = 2, out_itemsize: int = 0) -> float:
    """Fused bytes / minimum by design: the minimum, the ``params`` [C] vectors (weight, bias, and
    s_bias when given) once per program, mean and rstd; ``out`` in x's dtype unless
    ``out_itemsize``."""
    R, itemsize = batch * tokens, torch.finfo(dtype).bits // 8
    programs = _plan(R, C)[3]
    minimum = (3 * itemsize + (out_itemsize or itemsize)) * R * C
    return round(1 + (programs * params * C * itemsize + 8 * R) / minimum, 4)


def _with_s_bias(make):  # the feed-forward epilogue's call: s + ff.net[2].bias written beside norm3(s)
    def make_sb(device):
        inputs = make(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        inputs["s_bias"] = (0.1 * torch.randn(inputs["x"].shape[-1], generator=g)).to(inputs["x"])
        return inputs

    return make_sb


def _nchw_residual(make):  # an NCHW U-Net's residual stream: the permuted view of proj_in's [B, C, H, W] output
    def make_nchw(device):
        inputs = make(device)
        r = inputs["residual"]  # [B, HW, C] -> the same values as a view of an NCHW tensor, column stride HW
        inputs["residual"] = r.transpose(1, 2).contiguous().transpose(1, 2)
        return inputs

    return make_nchw


def _fused_s_bias(inputs):
    return lf.add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], s_bias=inputs["s_bias"])


def _fused_fp32_out(inputs):  # CUDA autocast's dtypes: the sum in x's dtype, the norm's output fp32
    return lf.add_layer_norm(inputs["x"], inputs["residual"], inputs["weight"], inputs["bias"], out_dtype=torch.float32)


def _eager_fp32_out(inputs):  # CUDA autocast's statements: the add, then layer_norm on the fp32 cast
    h = inputs["x"] + inputs["residual"]
    return h, TF.layer_norm(h.float(), (h.shape[-1],), inputs["weight"].float(), inputs["bias"].float(), 1e-5)


def _min_bytes_fp32_out(inputs):
    return 3 * nbytes(inputs["x"]) + 4 * inputs["x"].numel()  # read x, residual; write s; write out in fp32


def cases() -> list[Case]:
    out = []
    for tokens, C in SHAPES:
        for name in ("fp16", "bf16"):
            quick = (tokens, C, name) in ((64, 1280, "fp16"), (256, 640, "bf16"))
            out.append(Case("add_layer_norm", f"b2-{tokens}x{C}-{name}", _make(2, tokens, C, DTYPES[name]), _fused,
                            _eager, _min_bytes, traffic_target=_target(2, tokens, C, DTYPES[name]), quick=quick))
    out.append(Case("add_layer_norm", "b2-1024x320-fp32", _make(2, 1024, 320, torch.float32), _fused, _eager,
                    _min_bytes, traffic_target=_target(2, 1024, 320, torch.float32)))
    bf16 = DTYPES["bf16"]
    out.append(Case("add_layer_norm", "s_bias-b2-256x640-bf16", _with_s_bias(_make(2, 256, 640, bf16)), _fused_s_bias,
                    _eager, _min_bytes, traffic_target=_target(2, 256, 640, bf16, params=3)))
    out.append(Case("add_layer_norm", "out-fp32-b2-256x640-bf16", _make(2, 256, 640, bf16), _fused_fp32_out,
                    _eager_fp32_out, _min_bytes_fp32_out, traffic_target=_target(2, 256, 640, bf16, out_itemsize=4),
                    quick=True))
    out.append(Case("add_layer_norm", "nchw-residual-b2-1024x320-fp16", _nchw_residual(_make(2, 1024, 320, DTYPES["fp16"])),
                    _fused, _eager, _min_bytes, traffic_target=_target(2, 1024, 320, DTYPES["fp16"])))
    return out


test_eager, test_fused = benchmark_tests(cases)
