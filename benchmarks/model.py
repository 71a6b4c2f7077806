"""The whole-model instrument: ``python -m benchmarks --model``: launches, bytes by kind and a GPU time estimate.

Per scenario (diffusers SD 1.5 models with random weights: the configs of :mod:`benchmarks.e2e`)
and variant, one call is run on **fake tensors** (``FakeTensorMode``: shapes, dtypes and strides
only, no compute, no memory; the model is built on the meta device and materialized as fake CPU
tensors) and counted at aten dispatch. The SD sizes are therefore free: a U-Net step takes
seconds on 2 CPU cores.

==================  ==========================================================================
``unet-step-b1``    U-Net forward, fp16 weights, 64x64 latents, 77x768 context (no autograd)
``unet-step-b2``    the same at batch 2 (one classifier-free-guidance step)
``unet-train-b8``   fp32 weights under bf16 autocast (as the H100 baseline's training row),
                    batch 8: forward + MSE + backward
``vae-decode-512``  ``AutoencoderKL.decode`` of 64x64 latents, fp16, batch 1
``vae-decode-1024`` of 128x128 latents
==================  ==========================================================================

Variants: ``eager`` (the model as is); ``optimize`` (``ldm_fast.optimize(model)``);
``optimize+cl`` (``optimize(model, channels_last=True)``, the input channels_last too);
``optimize-all`` (every option optimize has today: ``channels_last=True, attention=True``; the
fusions of issue #16, GEGLU, add + LayerNorm and the rest, are on by default in all three). Optimized variants run under
``ldm_fast.use_backend("triton")`` so the fused paths are taken on the (fake) CPU tensors, with
every Triton launch stubbed (recorded, not run).

Counting rule.

* **aten ops** (a ``TorchDispatchMode``, :class:`benchmarks.traffic.DispatchCounter`): each op
  is charged the bytes of its input and output tensors (each tensor's footprint once: elements
  over its non-broadcast dimensions); views and metadata ops (``view``, ``t``, ``expand``,
  ``chunk``, ``permute``, ... and the fake tensors' ``prim::device``) and ``empty*`` allocations
  are free; in-place ops read and write their mutated argument; one charged op on a tensor of at
  least one dimension is one kernel launch. So a fused aten kernel (cuDNN's conv, SDPA) counts
  once, while an aten op that launches several CUDA kernels (``native_group_norm``: statistics
  and apply; the NCHW<->NHWC transposes cuDNN runs inside ``convolution``) is still one launch,
  and those transposes are not seen at all.
* **ldm_fast launches** (stubbed Triton ``run``): one launch each, charged the footprint of each
  of its distinct tensor arguments once (a tensor passed again as an unused placeholder counts once): the kernel's design minimum (each tensor it reads read once,
  each it writes written once; a split GroupNorm's statistics and apply launches both read x).
* **Kinds**: ``gemm_conv`` (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution`` and their
  backward), ``attention`` (every ``*scaled_dot_product*`` / ``*attention*`` op, and ldm_fast's
  attention kernels), ``norm`` (group/layer norm and their backward, ldm_fast's GroupNorm
  kernels, whose fused SiLU counts here), ``elementwise`` (ops tagged ``pointwise``, activation
  backward ops, ldm_fast's other kernels), ``copy`` (``copy_``, ``_to_copy``, ``clone``, ``cat``,
  ``stack``, padding: copies, casts and layout changes), ``other`` (the rest: reductions,
  upsample, embedding, ...).
* **FLOPs** (matrix work only): ``2 M N K`` for the GEMMs, ``2 x output x Cin/groups x kh x kw``
  for a convolution (twice per gradient its backward computes), ``4 B H Nq Nk D`` for attention
  (x 2.5 for its backward).

**GPU time estimate** (a model, not a measurement): per op ``max(bytes / (bandwidth x
bandwidth_efficiency[kind]), FLOPs / (peak x efficiency[kind]))`` plus ``launch_us`` per launch,
summed by kind; the H100 constants of :data:`benchmarks.gpu_model.H100` (3.0 TB/s copy bandwidth,
790 TFLOP/s fp16/bf16) and the efficiencies and per-launch cost of :data:`CALIBRATION`, fitted by
hand to the U-Net b2 per-kind profile of ``benchmarks/results/h100-2026-11-22-baseline-797cde7.md``
(that row's error is in-sample; the VAE and training rows test it out of sample). :data:`MEASURED`
holds those rows; the table prints each estimate beside its measured number with the relative
error.

Writes ``benchmarks/results/latest/model.json``. ``--quick``: tiny configs (the test's mode).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .e2e import unet_config, vae_config
from .gpu_model import H100
from .traffic import DispatchCounter, footprint

KINDS = ("gemm_conv", "attention", "norm", "elementwise", "copy", "other")
GEMM_OPS = frozenset({"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "convolution", "convolution_backward",
                      "_convolution"})
NORM_OPS = frozenset({"native_group_norm", "native_layer_norm", "native_group_norm_backward",
                      "native_layer_norm_backward", "native_batch_norm", "_native_batch_norm_legit_no_training"})
COPY_OPS = frozenset({"copy_", "_to_copy", "clone", "cat", "stack", "constant_pad_nd", "contiguous"})
VARIANTS = ("eager", "optimize", "optimize+cl", "optimize-all")

#: Calibration of the estimate (see the module docstring): the achieved fraction of tensor-core
#: peak per kind (GEMM/conv fitted to the U-Net b2 profile; attention from the baseline's SDPA rows,
#: 245 of 790 TFLOP/s at SD self-attention), of copy bandwidth per memory-bound kind (fitted to the
#: U-Net b2 profile: its elementwise and copy kernels, including layout copies inside aten ops that
#: dispatch cannot see, ran at about a third of copy bandwidth; the norm kernels' 0.6 is a compromise
#: between the U-Net's small ones, slower, and the VAE decoder's large ones, faster), and the GPU
#: time of one launch beyond its bytes (a kernel's ramp-up and tail).
CALIBRATION = {"efficiency": {"gemm_conv": 0.55, "attention": 0.31},
               "bandwidth_efficiency": {"norm": 0.6, "elementwise": 0.35, "copy": 0.35, "other": 0.35},
               "launch_us": 2.0}

#: GPU kernel time in ms (torch.profiler sums) from benchmarks/results/h100-2026-11-22-baseline-797cde7.md,
#: by this module's kinds where the profile splits them (its "elementwise and copies" and
#: "layout transposes" under "elementwise+copy").
MEASURED = {
    ("unet-step-b2", "optimize+cl"): {
        "total": 8.49, "gemm_conv": 1.88 + 1.85, "attention": 1.05, "norm": 0.59 + 0.39, "elementwise+copy": 2.64,
        "source": "U-Net step b2 fp16, channels_last, GN+SiLU fused: GPU kernel time by kind"},
    ("unet-step-b2", "eager"): {"total": 12.3, "source": "eager U-Net step b2 fp16 NCHW: GPU kernel time"},
    ("vae-decode-1024", "eager"): {
        "total": 90.8, "gemm_conv": 13.1, "attention": 4.5, "norm": 46 + 4.8, "elementwise+copy": 7.2 + 8.9,
        "source": "VAE decode 1024 px b1 fp16, eager NCHW: GPU time by kind"},
    ("vae-decode-1024", "optimize"): {
        "total": 42.8, "gemm_conv": 13.1, "attention": 4.5, "norm": 5.1, "elementwise+copy": 11.6 + 6.3,
        "source": "VAE decode 1024 px b1 fp16, ldm_fast GN+SiLU NCHW: GPU time by kind"},
    ("unet-train-b8", "eager"): {
        "total": 111.0, "gemm_conv": 15.7 + 12.8, "attention": 13.3, "elementwise+copy": 53 + 13.0,
        "source": "U-Net training step b8 bf16 autocast, eager: GPU kernel time by kind"},
    ("unet-train-b8", "optimize+cl"): {
        "total": 91.2, "source": "U-Net training step b8, GN+SiLU fused, channels_last: GPU kernel time"},
}


# ---------------------------------------------------------------------------------------------
# counting


def aten_kind(name: str, func) -> str:
    """The kind of an aten op (see the module docstring)."""
    if name in GEMM_OPS:
        return "gemm_conv"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name in NORM_OPS:
        return "norm"
    if name in COPY_OPS:
        return "copy"
    if torch.Tag.pointwise in func.tags or name.endswith("_backward") and name.split("_backward")[0] in (
            "silu", "gelu", "sigmoid", "tanh", "threshold", "mse_loss"):
        return "elementwise"
    return "other"


def kernel_kind(name: str) -> str:
    """The kind of an ldm_fast Triton kernel, from its name."""
    if "group_norm" in name or "layer_norm" in name:
        return "norm"
    if "attention" in name or "attn" in name:
        return "attention"
    return "elementwise"


def aten_flops(name: str, args: tuple, out) -> int:
    """Matrix FLOPs of one aten op (0 for everything else)."""
    if name in ("mm", "bmm"):
        return 2 * out.numel() * args[0].shape[-1]
    if name in ("addmm", "baddbmm", "addmm_", "baddbmm_"):  # (the in-place forms: a GEMM accumulating onto its input)
        return 2 * out.numel() * args[1].shape[-1]
    if name in ("convolution", "_convolution"):
        w = args[1]
        return 2 * out.numel() * w[0].numel() if not args[6] else 2 * args[0].numel() * w[0].numel()
    if name == "convolution_backward":
        grad, w, mask = args[0], args[2], args[10]
        per_gradient = 2 * grad.numel() * w[0].numel()
        return per_gradient * sum(bool(m) for m in mask[:2])
    if "scaled_dot_product" in name and len(args) >= 3 and all(isinstance(a, torch.Tensor) for a in args[:3]):
        q, k = args[0], args[1]
        if q.dim() == 4 and k.dim() == 4:
            flops = 4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
            return int(flops * 2.5) if "backward" in name else flops
    return 0


class ModelCounter(DispatchCounter):
    """The aten counter of :mod:`benchmarks.traffic`, with each charged op's kind and FLOPs, plus the
    fake tensors' metadata ops made free. ``rows``: ``(name, kind, bytes, launch, flops)`` per op."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[str, str, int, bool, int]] = []

    def _charge(self, func, args, kwargs, out) -> None:
        if func.namespace == "prim":  # prim::device, prim::layout: metadata of a fake tensor
            return
        n = len(self.ops)
        super()._charge(func, args, kwargs, out)
        if len(self.ops) > n:
            name, read, write, launch = self.ops[-1]
            out0 = out[0] if isinstance(out, (tuple, list)) and out else out
            flops = aten_flops(name, args, out0) if isinstance(out0, torch.Tensor) else 0
            self.rows.append((name, aten_kind(name, func), read + write, launch, flops))


@contextlib.contextmanager
def stubbed_launches(counter: ModelCounter):
    """Every Triton launch is recorded into ``counter.rows`` (its tensor arguments' footprints) and not run."""
    from .host import _patched_run

    def make_run(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            fn = getattr(self, "fn", self)
            name = getattr(fn, "__name__", type(self).__name__)
            tensors = {id(a): a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)}
            nbytes = sum(footprint(t) for t in tensors.values())  # a tensor passed twice (a placeholder) once
            counter.rows.append((f"ldm_fast:{name}", kernel_kind(name), nbytes, True, 0))
            return None

        return run

    with _patched_run(make_run):
        yield


def summarize(rows: list[tuple]) -> dict:
    """Launches, bytes and FLOPs by kind, and the estimate; ``launches``/``bytes`` totals."""
    by_kind = {k: {"launches": 0, "bytes": 0, "flops": 0, "est_ms": 0.0} for k in KINDS}
    ldm_fast_launches = 0
    by_op: dict[str, list] = {}
    for name, kind, nbytes, launch, flops in rows:
        cell = by_kind[kind]
        cell["launches"] += int(launch)
        cell["bytes"] += nbytes
        cell["flops"] += flops
        cell["est_ms"] += estimate_ms(kind, nbytes, flops, launch)
        ldm_fast_launches += int(name.startswith("ldm_fast:"))
        entry = by_op.setdefault(name, [kind, 0, 0, 0])
        entry[1] += int(launch)
        entry[2] += nbytes
        entry[3] += flops
    total = {key: sum(c[key] for c in by_kind.values()) for key in ("launches", "bytes", "flops", "est_ms")}
    top = sorted(by_op.items(), key=lambda kv: -kv[1][2])
    return {
        **total, "ldm_fast_launches": ldm_fast_launches, "aten_launches": total["launches"] - ldm_fast_launches,
        "elementwise_copy_bytes": by_kind["elementwise"]["bytes"] + by_kind["copy"]["bytes"],
        "outside_gemm_conv_attention_bytes": total["bytes"] - by_kind["gemm_conv"]["bytes"] - by_kind["attention"]["bytes"],
        "aten_outside_gemm_conv_attention_bytes": sum(
            nbytes for name, kind, nbytes, _, _ in rows
            if kind not in ("gemm_conv", "attention") and not name.startswith("ldm_fast:")),
        "by_kind": by_kind,
        "top_ops": [{"op": k, "kind": v[0], "launches": v[1], "bytes": v[2], "flops": v[3]} for k, v in top[:25]],
    }


def estimate_ms(kind: str, nbytes: int, flops: int, launch: bool) -> float:
    """Modelled H100 time of one op in ms (see the module docstring)."""
    peak = H100.peak_flops["float16"] * CALIBRATION["efficiency"].get(kind, 1.0)
    bandwidth = H100.copy_bandwidth * CALIBRATION["bandwidth_efficiency"].get(kind, 1.0)
    work = max(nbytes / bandwidth, flops / peak if flops else 0.0)
    return (work * 1e6 + (CALIBRATION["launch_us"] if launch else 0.0)) / 1e3


# ---------------------------------------------------------------------------------------------
# scenarios


def _build(cls_name: str, config: dict, dtype: torch.dtype, fake_mode) -> torch.nn.Module:
    """The diffusers model with uninitialized fake weights (built on meta: no init compute)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # not its "cast with to()" advice: there is no checkpoint
    try:
        model = model.to(dtype=dtype)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    with fake_mode:
        return model.to_empty(device="cpu")


def scenarios(tiny: bool) -> dict[str, dict]:
    """name -> {model class, config, weight dtype, inputs(batch-free spec), call, train}."""
    side = 8 if tiny else 64
    ctx = 32 if tiny else 768
    vae_side = (8, 16) if tiny else (64, 128)
    out = {
        "unet-step-b1": dict(cls="UNet2DConditionModel", config=unet_config(tiny), dtype=torch.float16,
                             batch=1, side=side, ctx=ctx, train=False),
        "unet-step-b2": dict(cls="UNet2DConditionModel", config=unet_config(tiny), dtype=torch.float16,
                             batch=2, side=side, ctx=ctx, train=False),
        "unet-train-b8": dict(cls="UNet2DConditionModel", config=unet_config(tiny), dtype=torch.float32,
                              batch=8, side=side, ctx=ctx, train=True),
        "vae-decode-512": dict(cls="AutoencoderKL", config=vae_config(tiny), dtype=torch.float16,
                               batch=1, side=vae_side[0], train=False),
        "vae-decode-1024": dict(cls="AutoencoderKL", config=vae_config(tiny), dtype=torch.float16,
                                batch=1, side=vae_side[1], train=False),
    }
    return out


def _call(spec: dict, model, channels_last: bool) -> Callable[[], Any]:
    b, side, dtype = spec["batch"], spec["side"], spec["dtype"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if spec["cls"] == "AutoencoderKL":
        latents = torch.randn(b, 4, side, side, dtype=dtype).to(memory_format=fmt)
        return lambda: model.decode(latents).sample
    sample = torch.randn(b, 4, side, side, dtype=dtype).to(memory_format=fmt)
    context = torch.randn(b, 77, spec["ctx"], dtype=dtype)
    t = torch.full((b,), 500, dtype=torch.int64)
    if not spec["train"]:
        return lambda: model(sample, t, encoder_hidden_states=context).sample
    target = torch.randn(b, 4, side, side, dtype=dtype)

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(sample, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        return loss

    return train_step


def _variant_options(variant: str) -> Optional[dict]:
    return {"eager": None, "optimize": {}, "optimize+cl": {"channels_last": True},
            "optimize-all": {"channels_last": True, "attention": True}}[variant]


def measure(name: str, spec: dict, variants: tuple[str, ...]) -> dict:
    """Count one scenario in each variant, each on a fresh fake model (building one on meta is cheap),
    the second of two calls (a sampler calls the model ~50 times: the first call's one-time work, such
    as the ResnetBlock2D bias sums optimize caches, is not a step's cost)."""
    import ldm_fast
    from torch._subclasses.fake_tensor import FakeTensorMode

    out = {}
    for variant in variants:
        options = _variant_options(variant)
        start = time.perf_counter()
        try:
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            model = _build(spec["cls"], spec["config"], spec["dtype"], fake_mode).train(spec["train"])
            if options is not None:
                ldm_fast.optimize(model, **options)
            with fake_mode:
                call = _call(spec, model, channels_last=bool(options and options.get("channels_last")))
                counter = ModelCounter()
                name = "triton" if options is not None else "eager"
                with torch.set_grad_enabled(spec["train"]), ldm_fast.use_backend(name), stubbed_launches(ModelCounter()):
                    call()  # uncounted warm-up: the steady state of a sampling loop (per-model caches filled)
                model.zero_grad(set_to_none=True)  # a training step starts without gradients (optimizer.zero_grad)
                with torch.set_grad_enabled(spec["train"]), ldm_fast.use_backend(name), stubbed_launches(counter), counter:
                    call()
            out[variant] = summarize(counter.rows)
        except Exception as e:  # reported in the table, the other variants still run
            out[variant] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        out[variant]["seconds"] = round(time.perf_counter() - start, 2)
    return out


# ---------------------------------------------------------------------------------------------
# report


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def _err(est: float, meas: float) -> str:
    return f"{(est - meas) / meas:+.0%}"


def table(results: dict) -> str:
    lines = []
    head = (f"{'scenario':16} {'variant':13} {'launches':>8} {'(ldm_fast)':>10} {'GB':>7} "
            + " ".join(f"{k[:9] + ' GB':>12}" for k in KINDS) + f" {'elt+copy GB':>11} {'TFLOP':>6} {'est ms':>7}")
    lines.append(head)
    for scen, variants in results.items():
        for variant, s in variants.items():
            if "error" in s:
                lines.append(f"{scen:16} {variant:13} ERROR {s['error'][:200]}")
                continue
            lines.append(
                f"{scen:16} {variant:13} {s['launches']:8d} {s['ldm_fast_launches']:10d} {_gb(s['bytes']):>7} "
                + " ".join(f"{_gb(s['by_kind'][k]['bytes']):>12}" for k in KINDS)
                + f" {_gb(s['elementwise_copy_bytes']):>11} {s['flops'] / 1e12:6.2f} {s['est_ms']:7.2f}")
    lines.append("")
    lines.append("launches by kind (" + ", ".join(KINDS) + "):")
    for scen, variants in results.items():
        for variant, s in variants.items():
            if "error" not in s:
                lines.append(f"  {scen:16} {variant:13} " + " ".join(f"{s['by_kind'][k]['launches']:5d}" for k in KINDS))
    return "\n".join(lines)


def calibration_table(results: dict) -> tuple[str, list[dict]]:
    """The estimate beside each measured row of :data:`MEASURED` (H100), with the relative error."""
    lines = [f"{'scenario':16} {'variant':13} {'kind':17} {'est ms':>8} {'measured ms':>12} {'error':>7}"]
    rows = []
    for (scen, variant), meas in MEASURED.items():
        s = results.get(scen, {}).get(variant)
        if not s or "error" in s:
            continue
        bk = s["by_kind"]
        est = {"total": s["est_ms"], "gemm_conv": bk["gemm_conv"]["est_ms"], "attention": bk["attention"]["est_ms"],
               "norm": bk["norm"]["est_ms"],
               "elementwise+copy": sum(bk[k]["est_ms"] for k in ("elementwise", "copy", "other"))}
        for kind in ("total", "gemm_conv", "attention", "norm", "elementwise+copy"):
            if kind in meas:
                rows.append({"scenario": scen, "variant": variant, "kind": kind, "estimate_ms": est[kind],
                             "measured_ms": meas[kind], "relative_error": (est[kind] - meas[kind]) / meas[kind],
                             "source": meas["source"]})
                lines.append(f"{scen:16} {variant:13} {kind:17} {est[kind]:8.2f} {meas[kind]:12.2f} "
                             f"{_err(est[kind], meas[kind]):>7}")
    return "\n".join(lines), rows


def run(quick: bool = False, out_dir: Optional[Path] = None, scenario_names: Optional[list[str]] = None) -> dict:
    """Measure every scenario and variant, print the tables, write ``model.json``; return the report."""
    started = time.perf_counter()
    specs = scenarios(tiny=quick)
    names = scenario_names or (["unet-step-b2", "vae-decode-512"] if quick else list(specs))
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise ValueError(f"scenarios: unknown {unknown}; known: {sorted(specs)}")
    variants = ("eager", "optimize") if quick else VARIANTS
    results = {}
    for name in names:
        results[name] = measure(name, specs[name], variants)
        print(f"[model] {name}: " + ", ".join(
            f"{v} {r.get('launches', 'ERROR')} launches ({r['seconds']}s)" for v, r in results[name].items()),
            file=sys.stderr, flush=True)
    text = table(results)
    cal_text, cal_rows = calibration_table(results) if not quick else ("", [])  # tiny configs: nothing measured
    notes = [
        "Counted on fake tensors at aten dispatch (one aten op = one launch; cuDNN's internal NCHW<->NHWC transposes "
        "and multi-kernel aten ops are not seen) plus stubbed ldm_fast Triton launches; see benchmarks/model.py.",
        f"est ms: a MODEL of H100 GPU time ({H100.copy_bandwidth / 1e12:.1f} TB/s, "
        f"{H100.peak_flops['float16'] / 1e12:.0f} TFLOP/s x efficiency {CALIBRATION['efficiency']}, bandwidth x "
        f"{CALIBRATION['bandwidth_efficiency']}, {CALIBRATION['launch_us']} us/launch), not a measurement." + (" Tiny configs (--quick)." if quick else ""),
    ]
    print(text)
    if cal_rows:
        print("\nEstimate vs measured H100 GPU kernel time (benchmarks/results/h100-2026-11-22-baseline-797cde7.md; "
              "the constants were fitted to the unet-step-b2 optimize+cl row: in-sample):")
        print(cal_text)
    print("\n".join(notes))
    report = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": quick, "torch": torch.__version__,
        "model": {"name": H100.name, "copy_bandwidth": H100.copy_bandwidth, "peak_flops": H100.peak_flops,
                  **CALIBRATION},
        "kinds": list(KINDS), "variants": list(variants), "scenarios": results, "calibration": cal_rows,
        "notes": notes, "seconds": round(time.perf_counter() - started, 1),
    }
    out_dir = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent / "results" / "latest"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'model.json'} ({report['seconds']:.0f}s)", file=sys.stderr)
    return report


def main(argv=None, quick: bool = False, out_dir: Optional[Path] = None) -> int:
    """Entry point of ``python -m benchmarks --model``. The ldm_fast paths are taken on the fake CPU
    tensors only under Triton's interpreter, so without ``TRITON_INTERPRET=1`` (a CUDA machine) it
    runs itself in a subprocess that sets it."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", default=quick, help="tiny configs")
    parser.add_argument("--out", default=str(out_dir) if out_dir else None, help="directory for model.json")
    parser.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args(argv if argv is not None else [])
    from ldm_fast import backend

    if not backend.interpreting():
        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "benchmarks.model"] + (["--quick"] if args.quick else [])
        cmd += (["--out", args.out] if args.out else []) + (["--scenarios", args.scenarios] if args.scenarios else [])
        return subprocess.call(cmd, cwd=repo, env=env)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()] or None
    report = run(quick=args.quick, out_dir=Path(args.out) if args.out else None, scenario_names=names)
    return int(any("error" in v for s in report["scenarios"].values() for v in s.values()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
