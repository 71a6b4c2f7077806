"""GroupNorm + SiLU forward at SD shapes: the U-Net's ResBlock norms and the VAE decoder's, 32 groups, NCHW.

U-Net levels at 512x512 (latents 64x64): 320x64x64, 640x32x32, 1280x16x16, 1280x8x8, eps 1e-5, at
batch 1 and 8. VAE decoder levels at 512x512: 128x512x512, 256x256x256, 512x128x128, 512x64x64,
eps 1e-6, at batch 1 (the large levels are hundreds of MB per sample). Weights in x's dtype, as in
a ``.half()`` model.

Baseline: ``F.silu(F.group_norm(x, 32, w, b, eps))``, eager (diffusers' ResnetBlock2D:
``self.norm1`` then ``self.nonlinearity``). Minimum traffic: read x, weight and bias once, write y
once. The fused kernel holds a group on chip when ``next_pow2(H*W) * next_pow2(C/32)`` elements fit
(``ONE_PASS_MAX``): it then reads x once (target 1.0); larger groups are split across programs and
x is read twice, once for the statistics and once to normalize, in two launches: the apply kernel
first merges the chunk statistics of the groups it normalizes (8 bytes per chunk, re-read by every
program of the group; 0.1-0.9% of the minimum at these shapes, from L2), hence the target 1.51.
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from ldm_fast.ops import kernel_launches
from ldm_fast import functional as F
from ldm_fast.kernels.group_norm import group_norm_bwd, one_pass_fits

from .common import DTYPES, Case, benchmark_tests, nbytes

GROUPS = 32
SPLIT_TARGET = 1.51  # x read twice, plus each apply program's read of its groups' chunk statistics
UNET = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # (channels, side); eps 1e-5
VAE = [(128, 512), (256, 256), (512, 128), (512, 64)]  # eps 1e-6


def _make(batch: int, channels: int, side: int, dtype: torch.dtype):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, side, side, generator=g).to(device=device, dtype=dtype)
        weight = (1 + 0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype)
        bias = (0.1 * torch.randn(channels, generator=g)).to(device=device, dtype=dtype)
        return {"x": x, "weight": weight, "bias": bias}

    return make


def _fused(eps: float):
    def fused(inputs):
        return F.group_norm(inputs["x"], GROUPS, inputs["weight"], inputs["bias"], eps, activation="silu")

    return fused


def _eager(eps: float):
    def eager(inputs):
        return TF.silu(TF.group_norm(inputs["x"], GROUPS, inputs["weight"], inputs["bias"], eps))

    return eager


def _min_bytes(inputs):
    x = inputs["x"]
    return 2 * nbytes(x) + nbytes(inputs["weight"], inputs["bias"])  # read x, weight, bias; write y


def _case(kind: str, batch: int, channels: int, side: int, dtype_name: str, quick: bool = False) -> Case:
    eps = 1e-5 if kind == "unet" else 1e-6
    shape = (batch, channels, side, side)
    return Case(
        "group_norm",
        f"{kind}-{channels}x{side}x{side}-b{batch}-{dtype_name}",
        _make(batch, channels, side, DTYPES[dtype_name]),
        _fused(eps),
        _eager(eps),
        _min_bytes,
        traffic_target=1.0 if one_pass_fits(shape, GROUPS, dtype=DTYPES[dtype_name]) else SPLIT_TARGET,
        quick=quick,
    )


def cases() -> list[Case]:
    out = [
        # the quick subset (CI): small one-pass cases and one split case
        _case("unet", 1, 1280, 8, "fp16", quick=True),
        _case("unet", 1, 640, 32, "bf16", quick=True),
        _case("unet", 1, 1280, 16, "fp32", quick=True),
        _case("unet", 1, 320, 64, "fp32", quick=True),  # split forward: stats, apply (merging the chunks)
    ]
    for batch in (1, 8):
        for channels, side in UNET:
            for dtype_name in ("fp16", "bf16"):
                if (batch, channels, side, dtype_name) not in ((1, 1280, 8, "fp16"), (1, 640, 32, "bf16")):
                    out.append(_case("unet", batch, channels, side, dtype_name))
    out.append(_case("unet", 8, 320, 64, "fp32"))
    for channels, side in VAE:
        for dtype_name in ("fp16", "bf16"):
            out.append(_case("vae", 1, channels, side, dtype_name))
    out.append(_case("vae", 1, 512, 64, "fp32"))
    out += _shift_cases()
    out += _backward_cases()
    out += _backward_shift_cases()
    return out


# ---------------------------------------------------------------------------------------------
# shift (``shift-*``): diffusers' ResnetBlock2D ``h = conv1(h) + temb[:, :, None, None]; h = norm2(h);
# h = silu(h)``, the add folded into the norm (kernels/group_norm.py ``shift=``: added in fp32 as x is
# read, the sum never stored). Fused: ``ldm_fast.functional.group_norm(..., shift=temb)``. Baseline:
# ``F.silu(F.group_norm(x + temb[:, :, None, None], ...))``, eager: the add writes and re-reads a full
# tensor. Only the one-pass case is quick (the split one takes minutes in the interpreter).
# Minimum traffic: read x, weight, bias and the shift [B, C] once, write y once. Targets as the plain
# forward's: one pass 1.0 (the shift is read once per (batch, group)); split SPLIT_TARGET (x read
# twice; the statistics kernel gathers the shift per NCHW tile, a few bytes per 4096 elements).


def _make_shift(batch: int, channels: int, side: int, dtype: torch.dtype):
    def make(device):
        inputs = _make(batch, channels, side, dtype)(device)
        g = torch.Generator(device="cpu").manual_seed(2)
        inputs["shift"] = torch.randn(batch, channels, generator=g).to(device=device, dtype=dtype)
        return inputs

    return make


def _fused_shift(inputs):
    return F.group_norm(inputs["x"], GROUPS, inputs["weight"], inputs["bias"], 1e-5, activation="silu",
                        shift=inputs["shift"])


def _eager_shift(inputs):
    x = inputs["x"] + inputs["shift"][:, :, None, None]
    return TF.silu(TF.group_norm(x, GROUPS, inputs["weight"], inputs["bias"], 1e-5))


def _min_bytes_shift(inputs):
    return _min_bytes(inputs) + nbytes(inputs["shift"])


def _shift_cases() -> list[Case]:
    out = []
    for channels, side in ((1280, 16), (320, 64)):  # one pass; split (statistics, apply)
        shape = (2, channels, side, side)
        one_pass = one_pass_fits(shape, GROUPS, dtype=torch.float16)
        out.append(Case(
            "group_norm", f"shift-unet-{channels}x{side}x{side}-b2-fp16", _make_shift(2, channels, side, torch.float16),
            _fused_shift, _eager_shift, _min_bytes_shift, traffic_target=1.0 if one_pass else SPLIT_TARGET,
            quick=one_pass,
        ))
    return out


# ---------------------------------------------------------------------------------------------
# backward (``bwd-*``): GroupNorm + SiLU backward, what training runs
#
# Fused: ``torch.ops.ldm_fast.group_norm_backward(dy, x, w, b, mean, rstd, 32, "silu")`` alone, with
# mean/rstd [B, 32] fp32 computed once in ``make`` from a float64 reference (as the forward saves
# them). Baseline: the backward only of ``F.silu(F.group_norm(x, 32, w, b, eps))``: its graph is
# built once in ``make`` (x, w, b leaves that require grad) and each call runs
# ``torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)`` (silu_backward +
# native_group_norm_backward at dispatch; the forward is neither timed nor counted).
#
# Minimum traffic: read dy, x, weight, bias, mean, rstd once; write dx, dweight, dbias once.
# Targets, from the kernels' design (kernels/group_norm.py):
#   one pass (one_pass_fits(shape, 32, backward=True)): x and dy read once, dx written once, plus
#     the per-channel partials (sum dz, sum dz * xhat) [2, batch blocks <= B, C] fp32 written once
#     and read once by the column sum:  target = 1 + 16 * B * C / min;
#   split: statistics (x, dy) -> finalize (+ dweight, dbias) -> apply (x, dy again, dx): x and dy read twice,
#     target = (min + |x| + |dy|) / min (= (2 + 2 + 1) / 3 = 1.67 for one dtype) + 0.02 for the
#     fp32 partials [2, B, chunks, C] (written once, read twice) and the per-program reloads of
#     weight, bias, mean, rstd, c1, c2 (about 1% of min at these shapes).
# Shapes: a one-pass one (U-Net 1280x8x8) and the split path at U-Net 320x64x64 and 640x32x32 and
# VAE 512x64x64, batch 1 (not the larger VAE levels: minutes each under the interpreter).

SPLIT_BWD_ALLOWANCE = 0.02


def _make_bwd(batch: int, channels: int, side: int, dtype: torch.dtype, eps: float):
    def make(device):
        inputs = _make(batch, channels, side, dtype)(device)
        x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
        g = torch.Generator(device="cpu").manual_seed(1)
        dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        xg = x.double().view(batch, GROUPS, -1)
        mean = xg.mean(-1)
        rstd = torch.rsqrt(xg.var(-1, unbiased=False) + eps)
        with torch.enable_grad():  # the baseline's forward graph, built once: eager() runs its backward only
            leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
            y = TF.silu(TF.group_norm(leaves[0], GROUPS, leaves[1], leaves[2], eps))
        return {"dy": dy, "x": x, "weight": w, "bias": b, "mean": mean.float(), "rstd": rstd.float(),
                "graph": (y, leaves)}

    return make


def _fused_bwd(inputs):
    return torch.ops.ldm_fast.group_norm_backward(
        inputs["dy"], inputs["x"], inputs["weight"], inputs["bias"], inputs["mean"], inputs["rstd"], GROUPS, "silu")


def _eager_bwd(inputs):
    y, leaves = inputs["graph"]
    return torch.autograd.grad(y, leaves, inputs["dy"], retain_graph=True)


def _min_bytes_bwd(inputs):
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    # read dy, x, weight, bias, mean, rstd; write dx, dweight, dbias
    return nbytes(inputs["dy"], x, w, b, inputs["mean"], inputs["rstd"]) + nbytes(x, w, b)


def _bwd_target(batch: int, channels: int, side: int, dtype: torch.dtype) -> float:
    """The design's bytes over the minimum (the formulas above), from the shape alone."""
    item = torch.empty((), dtype=dtype).element_size()
    big = batch * channels * side * side * item  # |x| = |dy| = |dx|
    small = channels * item  # |w| = |b| = |dw| = |db|
    minimum = 3 * big + 4 * small + 2 * batch * GROUPS * 4
    if one_pass_fits((batch, channels, side, side), GROUPS, backward=True):
        return 1 + 16 * batch * channels / minimum
    return (minimum + 2 * big) / minimum + SPLIT_BWD_ALLOWANCE


def _backward_cases() -> list[Case]:
    out = []
    for kind, channels, side, dtype_name, quick in (
        ("unet", 1280, 8, "fp16", True),  # one pass
        ("unet", 640, 32, "bf16", True),  # split: statistics, finalize with the parameter gradients, apply
        ("unet", 320, 64, "fp16", False),
        ("vae", 512, 64, "fp16", False),
    ):
        eps = 1e-5 if kind == "unet" else 1e-6
        dtype = DTYPES[dtype_name]
        out.append(Case(
            "group_norm", f"bwd-{kind}-{channels}x{side}x{side}-b1-{dtype_name}",
            _make_bwd(1, channels, side, dtype, eps), _fused_bwd, _eager_bwd, _min_bytes_bwd,
            traffic_target=_bwd_target(1, channels, side, dtype), quick=quick,
        ))
    return out



# ``bwd-shift-*``: the backward of the shift forward above, ``group_norm_bwd(..., shift=temb)`` ->
# (dx, dweight, dbias, dshift), the launcher called directly; baseline: the backward only of
# ``F.silu(F.group_norm(x + temb[:, :, None, None], ...))`` (graph built once in ``make``). Minimum and
# targets as the plain backward's plus the shift read and dshift written ([B, C] each, in the minimum);
# the split path's third fp32 partial plane (sum xhat) is within SPLIT_BWD_ALLOWANCE at these shapes.
# Not quick (the plain bwd-* cases cover the same kernels there); in the full run for the audit.


def _make_bwd_shift(batch: int, channels: int, side: int, dtype: torch.dtype, eps: float):
    def make(device):
        inputs = _make_shift(batch, channels, side, dtype)(device)
        x, w, b, shift = inputs["x"], inputs["weight"], inputs["bias"], inputs["shift"]
        g = torch.Generator(device="cpu").manual_seed(1)
        dy = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        xg = (x.double() + shift.double()[:, :, None, None]).view(batch, GROUPS, -1)
        mean, rstd = xg.mean(-1), torch.rsqrt(xg.var(-1, unbiased=False) + eps)
        with torch.enable_grad():
            leaves = tuple(t.clone().requires_grad_() for t in (x, w, b, shift))
            y = TF.silu(TF.group_norm(leaves[0] + leaves[3][:, :, None, None], GROUPS, leaves[1], leaves[2], eps))
        return {"dy": dy, "x": x, "weight": w, "bias": b, "shift": shift, "mean": mean.float(), "rstd": rstd.float(),
                "graph": (y, leaves)}

    return make


def _fused_bwd_shift(inputs):
    kernel_launches["group_norm"] += 1  # the launcher alone: counted as the op's autograd counts it
    return group_norm_bwd(inputs["dy"], inputs["x"], inputs["weight"], inputs["bias"], inputs["mean"], inputs["rstd"],
                          GROUPS, "silu", shift=inputs["shift"])


def _min_bytes_bwd_shift(inputs):
    return _min_bytes_bwd(inputs) + 2 * nbytes(inputs["shift"])  # read shift, write dshift


def _backward_shift_cases() -> list[Case]:
    out = []
    for channels, side in ((1280, 8), (640, 32)):  # one pass; split
        # batch 1, as the plain bwd-* cases: their target formula has no term for the weight and bias
        # re-read per batch block (0.5% of the minimum at 1280x8x8 b2)
        dtype = torch.float16
        out.append(Case(
            "group_norm", f"bwd-shift-unet-{channels}x{side}x{side}-b1-fp16",
            _make_bwd_shift(1, channels, side, dtype, 1e-5), _fused_bwd_shift, _eager_bwd, _min_bytes_bwd_shift,
            traffic_target=_bwd_target(1, channels, side, dtype),
        ))
    return out


test_eager, test_fused = benchmark_tests(cases)
