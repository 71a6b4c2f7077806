"""End to end on diffusers models with random weights (nothing downloaded): ``python -m benchmarks --e2e``.

The scenarios of benchmarks/results/h100-2026-11-22-baseline-797cde7.md, built from diffusers configs:

==================  ============================================================================
``unet-step-b1``    SD 1.5 ``UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
``unet-step-b2``    attention_head_dim=8)``, one denoising call: fp16, 64x64 latents, 77x768
                    context, t=500 (b2 = one classifier-free-guidance step)
``vae-decode-512``  SD ``AutoencoderKL`` (block_out_channels (128, 256, 512, 512), 4 down/up
``vae-decode-1024`` blocks, latent_channels 4, layers_per_block 2, 32 groups), ``decode`` of
                    64x64 -> 512 px and 128x128 -> 1024 px latents, b1 fp16
``unet-train-b8``   the U-Net, fp32 weights, bf16 autocast, batch 8: forward + MSE + backward
``ddim20-diffusers`` text-to-image latents to pixels at 512 px, b1 fp16: 20 DDIM steps with
``ddim20-ldm_fast``  classifier-free guidance 7.5 (U-Net on [uncond, cond]), then the VAE decode;
                    the loop of diffusers' StableDiffusionPipeline (``DDIMScheduler`` with SD's
                    settings) / of ``ldm_fast.samplers.DDIMSampler`` (one fused step kernel)
==================  ============================================================================

Each scenario runs in these variants, each on a fresh copy of one randomly initialized model:

* ``eager``: the diffusers model as is;
* ``optimize``: ``ldm_fast.optimize(model)``, then the same call;
* ``optimize+cuda_graph``: ``optimize(model, channels_last=True, cuda_graph=True)`` (CUDA only;
  of ``model.decoder`` for the VAE, since the graph serves ``forward`` and ``decode`` calls the
  decoder; with autograd, training, the graph is not used; ``cuda_graph_stats`` records its
  replays, captures and plain calls);
* ``eager+cuda_graph``: the eager model's call captured in one CUDA graph (static inputs) and
  replayed (CUDA only; inference only);
* ``compile``: ``torch.compile`` (default mode) of the model (of ``decode`` for the VAE, whose
  ``decode`` is not ``forward``);
* ``compile+optimize``: ``torch.compile`` over an optimized model;
* ``compile-reduce-overhead`` (``+optimize``): the same with ``mode="reduce-overhead"`` (Inductor's
  CUDA graphs);
* ``optimize+attention`` (``+cuda_graph``): ``optimize(model, attention=True)`` (diffusers' attention
  processors replaced by ldm_fast's), with the attention kernel forced (``LDM_FAST_ATTENTION=triton``:
  ``auto`` would route to SDPA until a GPU measurement says otherwise);
* ``ldm_fast-model`` (``+cuda_graph``): ldm_fast's own ``UNetModel``/``AutoencoderKL`` built from the
  diffusers model (``from_diffusers``: the same weights), its attention forced to the kernel as above.

Per variant: **ms per call** (median of the timed iterations after warm-up; on CUDA the CUDA-event
time of each call, synchronized before it), **host ms** (wall time of the call without
synchronizing: the CPU's time to issue the work), **GPU ms** (torch.profiler: the sum of the GPU
activity durations per call, CUDA only), the **first call** (compilation, CUDA-graph capture) and
for compile variants the **compile time** (the first call's wall time), and the output's largest
difference from the eager variant's on the same inputs and weights.

On a CPU each variant is timed in :data:`CPU_ROUNDS` interleaved rounds (the order rotated each
round, the samples pooled): the spread (min, quartiles, max, each round's median) is reported, and
whether every round ranks the variants alike; a shared machine's drift otherwise decides a ranking
taken from one pass per variant.

Without a GPU a TINY config of each scenario runs in fp32 on the CPU (every time labelled CPU:
nothing about a GPU follows from them); the CUDA-graph variant is skipped, the torch.compile
variants too unless ``--e2e-compile`` (compiling on 2 cores takes minutes); and the optimized tiny
U-Net and VAE run once with the kernels forced (Triton's interpreter) to check the swap against
eager. If ``ldm_fast.optimize`` does not import (a broken install), its variants
are skipped with the reason. diffusers is a benchmark/test extra, never a dependency of ldm_fast.

Writes ``benchmarks/results/latest/e2e.json`` and, on CUDA, merges into
``benchmarks/results/<gpu-name>-e2e.json``, with the machine, versions and date.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import ldm_fast

from .host import RESULTS, environment, log, no_gpu_reason, use_cuda, write_report

#: Rounds of interleaved timing on a CPU (a shared machine drifts: one pass per variant ranks noise).
CPU_ROUNDS = 3
VARIANTS = ("eager", "eager+cuda_graph", "optimize", "optimize+cuda_graph", "compile", "compile+optimize",
            "compile-reduce-overhead", "compile-reduce-overhead+optimize", "optimize+attention",
            "optimize+attention+cuda_graph", "ldm_fast-model", "ldm_fast-model+cuda_graph")
#: Variants that run ldm_fast's attention kernel (LDM_FAST_ATTENTION=triton while they are prepared and
#: timed): ``impl="auto"`` routes by ldm_fast/attention_routes.json, which this benchmark's GPU numbers
#: (with bench_attention's) are meant to fill; forcing the kernel measures what routing would gain.
ATTENTION_VARIANTS = ("optimize+attention", "optimize+attention+cuda_graph", "ldm_fast-model",
                      "ldm_fast-model+cuda_graph")
DIFFUSERS_MISSING = ("diffusers is not installed: the end-to-end benchmark needs it (a benchmark/test extra, never "
                     "an ldm_fast dependency): pip install diffusers")


@dataclasses.dataclass
class Scenario:
    """One end-to-end workload: ``build(device)`` the model (random weights), ``make(device)`` the
    inputs, ``call(model, inputs)`` one step (its output tensor, or the loss for training)."""

    name: str
    description: str
    build: Callable[[torch.device], torch.nn.Module]
    make: Callable[[torch.device], dict]
    call: Callable[[Any, dict], torch.Tensor]
    compile_target: str = "model"  # "model": torch.compile(model); "decode": model.decode = torch.compile(model.decode)
    train: bool = False
    warmup: int = 3
    iters: int = 20
    interpret_check: bool = False  # CPU: one call of the optimized model with the kernels interpreted
    #: what ``optimize(..., cuda_graph=True)`` is applied to: the module whose ``forward`` the call runs
    #: (the VAE's ``decode`` never calls ``AutoencoderKL.forward``, it calls ``decoder``), and why
    graph_target: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# configs


def unet_config(tiny: bool) -> dict:
    if tiny:
        return dict(sample_size=8, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                    layers_per_block=1, norm_num_groups=32)
    return dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5


def vae_config(tiny: bool) -> dict:
    if tiny:
        return dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=32)
    return dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32)


def _build(cls_name: str, config: dict, dtype: torch.dtype, train: bool):
    def build(device):
        import diffusers

        torch.manual_seed(0)
        with torch.device(device):
            model = getattr(diffusers, cls_name)(**config)
        if dtype != torch.float32:  # built in fp32; cast as a user's .half() would
            model = model.to(dtype=dtype)
        return model.train() if train else model.eval()

    return build


def _randn(shape, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _unet_inputs(batch: int, side: int, ctx_dim: int, dtype: torch.dtype, train: bool):
    def make(device):
        inputs = {"sample": _randn((batch, 4, side, side), device, dtype, 1),
                  "context": _randn((batch, 77, ctx_dim), device, dtype, 2),
                  "t": torch.full((batch,), 500, dtype=torch.int64, device=device)}
        if train:
            inputs["target"] = _randn((batch, 4, side, side), device, dtype, 3)
        return inputs

    return make


def _unet_step(model, i):
    return model(i["sample"], i["t"], encoder_hidden_states=i["context"]).sample


def _train_step(autocast_dtype: Optional[torch.dtype]):
    def step(model, i):
        for p in model.parameters():
            p.grad = None
        device_type = i["sample"].device.type
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = model(i["sample"], i["t"], encoder_hidden_states=i["context"]).sample
        loss = torch.nn.functional.mse_loss(pred.float(), i["target"].float())
        loss.backward()
        return loss.detach()

    return step


def _vae_inputs(side: int, dtype: torch.dtype):
    def make(device):
        return {"latents": _randn((1, 4, side, side), device, dtype, 4)}

    return make


def _vae_decode(model, i):
    return model.decode(i["latents"]).sample


class _SDLoop(torch.nn.Module):
    """A U-Net and a VAE: what a text-to-image sampling loop runs (the loop is the scenario's call)."""

    def __init__(self, unet: torch.nn.Module, vae: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.vae = vae


def _build_loop(tiny: bool, dtype: torch.dtype):
    def build(device):
        unet = _build("UNet2DConditionModel", unet_config(tiny), dtype, False)(device)
        vae = _build("AutoencoderKL", vae_config(tiny), dtype, False)(device)
        return _SDLoop(unet, vae).eval()

    return build


def _loop_inputs(side: int, ctx_dim: int, dtype: torch.dtype):
    def make(device):
        return {"latents": _randn((1, 4, side, side), device, dtype, 5),
                "cond": _randn((1, 77, ctx_dim), device, dtype, 6),
                "uncond": _randn((1, 77, ctx_dim), device, dtype, 7)}

    return make


STEPS, GUIDANCE, SCALE_FACTOR = 20, 7.5, 0.18215


def _diffusers_loop(model, i):
    """StableDiffusionPipeline's denoising loop (DDIMScheduler, SD settings), then the decode."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(STEPS, device=i["latents"].device)
    context = torch.cat([i["uncond"], i["cond"]])
    latents = i["latents"]
    for t in scheduler.timesteps:
        eps = model.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
        eps_u, eps_c = eps.chunk(2)
        latents = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, latents).prev_sample
    return model.vae.decode(latents / SCALE_FACTOR).sample


def _ldm_fast_loop(model, i):
    """The same with ldm_fast's DDIMSampler: one fused kernel per step (CFG combine + DDIM update)."""
    from ldm_fast.samplers import DDIMSampler

    sampler = DDIMSampler(ldm_fast.make_schedule("scaled_linear"), STEPS)
    latents = sampler.sample(lambda x, t, c: model.unet(x, t, encoder_hidden_states=c).sample, i["latents"],
                             cond=i["cond"], uncond=i["uncond"], guidance_scale=GUIDANCE, progress=False)
    return model.vae.decode(latents / SCALE_FACTOR).sample


def make_scenarios(tiny: bool) -> list[Scenario]:
    """The scenarios: SD sizes in fp16 (bf16 autocast for training) on a GPU; ``tiny`` configs in fp32 for a CPU."""
    half = torch.float32 if tiny else torch.float16
    ctx = 32 if tiny else 768
    side = 8 if tiny else 64
    tag = " (TINY config, fp32, CPU)" if tiny else ""
    unet_desc = ("UNet2DConditionModel(block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1), "
                 "8x8 latents, 77x32 context" if tiny else
                 "SD 1.5 UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8), "
                 "64x64 latents, 77x768 context")
    vae_desc = ("AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1)" if tiny else
                "SD AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)")
    out = []
    for b in (1, 2):
        out.append(Scenario(f"unet-step-b{b}", f"{unet_desc}, t=500, batch {b}, {'fp32' if tiny else 'fp16'}{tag}",
                            _build("UNet2DConditionModel", unet_config(tiny), half, False),
                            _unet_inputs(b, side, ctx, half, False), _unet_step, interpret_check=tiny and b == 1))
    for px, lat in ((512, 64), (1024, 128)):
        lat = lat // 8 if tiny else lat
        out.append(Scenario(f"vae-decode-{px}", f"{vae_desc} decode of {lat}x{lat} latents, b1, "
                            f"{'fp32' if tiny else 'fp16'}{tag}",
                            _build("AutoencoderKL", vae_config(tiny), half, False), _vae_inputs(lat, half), _vae_decode,
                            compile_target="decode", interpret_check=tiny and px == 512, graph_target="decoder",
                            iters=20 if px == 512 or tiny else 10))
    train_batch = 2 if tiny else 8
    out.append(Scenario("unet-train-b8", f"{unet_desc}, training step forward + MSE + backward, batch {train_batch}, "
                        f"{'fp32' if tiny else 'fp32 weights, bf16 autocast'}{tag}",
                        _build("UNet2DConditionModel", unet_config(tiny), torch.float32, True),
                        _unet_inputs(train_batch, side, ctx, torch.float32, True),
                        _train_step(None if tiny else torch.bfloat16), train=True, iters=10))
    loop_desc = (f"{STEPS} DDIM steps with CFG {GUIDANCE} + VAE decode, b1, {'fp32' if tiny else 'fp16'}, "
                 f"{'TINY U-Net and VAE' if tiny else 'SD 1.5 U-Net and VAE, 64x64 latents -> 512 px'}{tag}")
    for name, call, how in (("ddim20-diffusers", _diffusers_loop, "diffusers' DDIMScheduler loop"),
                            ("ddim20-ldm_fast", _ldm_fast_loop, "ldm_fast.samplers.DDIMSampler")):
        out.append(Scenario(name, f"{loop_desc}; {how}", _build_loop(tiny, half), _loop_inputs(side, ctx, half), call,
                            graph_target="unet", warmup=1, iters=5))
    return out


# ---------------------------------------------------------------------------------------------
# variants


def _optimize_api():
    """``(optimize, restore)`` from ldm_fast, or the reason they cannot be used."""
    try:
        from ldm_fast import optimize, restore
    except Exception as e:  # a broken install: its variants are skipped with this reason
        return None, f"ldm_fast.optimize is not importable ({type(e).__name__}: {e})"
    return (optimize, restore), None


def _jsonable(obj, depth: int = 0):
    if depth > 6:
        return repr(obj)[:300]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v, depth + 1) for v in obj]
    if hasattr(obj, "_asdict"):
        return _jsonable(obj._asdict(), depth + 1)
    return repr(obj)[:2000]


def _report_summary(report) -> Any:
    """optimize's report: its summary line, counts, notes and what it left (with the reasons)."""
    try:
        return {"summary": str(report), "counts": _jsonable(report.counts), "notes": _jsonable(report.notes),
                "left": _jsonable(report.left)}
    except AttributeError:
        return _jsonable(report)


def graph_stats(model) -> Optional[dict]:
    """``CUDAGraphForward.stats`` of every module whose forward optimize replaced by one (graph
    replays, captures, plain calls per reason): whether the graphs were really used."""
    try:
        from ldm_fast.optimize import CUDAGraphForward
    except ImportError:
        return None
    root = getattr(model, "_orig_mod", model)
    found = {}
    for name, module in root.named_modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, CUDAGraphForward):
            found[name or "(model)"] = {"stats": dict(fwd.stats), "repr": repr(fwd)}
    return found or None


class _OursUNet(torch.nn.Module):
    """ldm_fast's UNetModel behind the diffusers call signature the scenarios use."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, encoder_hidden_states):
        return _Output(self.unet(sample, t, encoder_hidden_states))


class _OursVAE(torch.nn.Module):
    """ldm_fast's AutoencoderKL behind ``decode(z).sample``; ``decoder`` is its decoder (the graph target)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.decoder = vae.decoder

    def decode(self, z):
        return _Output(self.vae.decode(z))


@dataclasses.dataclass
class _Output:
    sample: torch.Tensor


def _ldm_fast_model(model: torch.nn.Module) -> torch.nn.Module:
    """ldm_fast's model with ``model``'s config and weights, in its dtype, device and mode."""
    from ldm_fast.models import AutoencoderKL, UNetModel

    if isinstance(model, _SDLoop):
        return _SDLoop(_ldm_fast_model(model.unet), _ldm_fast_model(model.vae)).eval()
    if type(model).__name__ == "AutoencoderKL":
        ours = _OursVAE(AutoencoderKL.from_diffusers(model))
    else:
        ours = _OursUNet(UNetModel.from_diffusers(model))
    return ours.train(model.training)


def _compile(model, scenario: Scenario, mode: Optional[str] = None):
    if scenario.compile_target == "decode":
        model.decode = torch.compile(model.decode, mode=mode)
        return model
    return torch.compile(model, mode=mode)


def _graphed(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` (static inputs) captured in one CUDA graph: warm-up on a side stream, capture, then
    each call replays the graph and returns its (static) output."""
    from ldm_fast.optimize import CUDAGraphAPI  # the recipe CUDAGraphForward uses, in one place

    api, device = CUDAGraphAPI(), torch.device("cuda", torch.cuda.current_device())
    api.warmup(device, call, 2)
    graph, out = api.capture(device, call)

    def replay():
        graph.replay()
        return out

    return replay


def prepare(variant: str, base: torch.nn.Module, scenario: Scenario, device: torch.device) -> tuple[Any, dict]:
    """A fresh copy of ``base`` set up as ``variant``, and what setting it up did (optimize's report, seconds)."""
    info: dict = {}
    model = copy.deepcopy(base)
    if variant.startswith("ldm_fast-model"):
        model = _ldm_fast_model(model)
        info["model"] = "ldm_fast.models UNetModel/AutoencoderKL .from_diffusers (same weights)"
    if wants_optimize(variant):
        api, reason = _optimize_api()
        if api is None:
            raise _Skip(reason)
        optimize = api[0]
        kwargs = dict(channels_last=True, cuda_graph=True) if variant.endswith("cuda_graph") else {}
        if variant.startswith("optimize+attention"):
            kwargs["attention"] = True
        target = model
        if kwargs and scenario.graph_target:
            target = getattr(model, scenario.graph_target)
            info["optimize_target"] = (
                f"model.{scenario.graph_target}: cuda_graph serves the optimized module's forward, and "
                f"{type(model).__name__}.decode calls {scenario.graph_target}, never the model's forward")
        t0 = time.perf_counter()
        report = optimize(target, **kwargs)
        info["optimize_s"] = time.perf_counter() - t0
        info["optimize_kwargs"] = kwargs
        info["optimize_report"] = _report_summary(report)
    if variant.startswith("compile"):
        torch._dynamo.reset()
        model = _compile(model, scenario, "reduce-overhead" if variant.startswith("compile-reduce-overhead") else None)
        info["compile_mode"] = "reduce-overhead" if variant.startswith("compile-reduce-overhead") else "default"
    return model, info


def wants_optimize(variant: str) -> bool:
    """Whether ``variant`` runs ``ldm_fast.optimize`` on the model (``compile+optimize``: before compiling)."""
    if variant in ("eager", "eager+cuda_graph", "ldm_fast-model"):
        return False
    return not variant.startswith("compile") or variant.endswith("+optimize")


class _Skip(Exception):
    pass


def skip_reason(variant: str, cuda: bool, compile_on_cpu: bool) -> Optional[str]:
    if (variant.endswith("cuda_graph") or variant.startswith("compile-reduce-overhead")) and not cuda:
        return f"CUDA graphs need a GPU ({no_gpu_reason()})"
    if variant.startswith("compile") and not cuda and not compile_on_cpu:
        return ("torch.compile on the CPU takes minutes on 2 cores and says nothing about a GPU: "
                "pass --e2e-compile to run it")
    if variant not in ("eager", "compile"):
        return _optimize_api()[1]
    return None


# ---------------------------------------------------------------------------------------------
# measuring one variant


def _gpu_ms_per_call(fn: Callable[[], Any], calls: int) -> dict:
    """torch.profiler over ``calls`` calls: the summed durations of the GPU activity (kernels, memcpy,
    memset) per call, and the kernel count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_ns, n = 0, 0
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            total_ns += e.duration_ns()
            n += 1
    return {"gpu_ms": total_ns / 1e6 / calls, "gpu_activities_per_call": n / calls,
            "method": "torch.profiler: sum of GPU activity durations (kernels, memcpy, memset) / calls"}


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[dict, Any]:
    """First call (wall, synchronized), warm-up, then ``iters`` timed calls: per call the wall time to
    issue (host) and, synchronized, the total (CUDA events on a GPU); medians."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        out = fn()
    sync()
    host, total, wall = [], [], []
    for _ in range(iters):
        sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            out = fn()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            t2 = time.perf_counter()
            total.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            t1 = t2 = time.perf_counter()
            total.append((t2 - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    rec = {"first_call_s": first_s, "iters": iters, "warmup": warmup, "rounds": 1,
           "ms_samples": [round(x, 4) for x in total], "host_samples": [round(x, 4) for x in host],
           "wall_samples": [round(x, 4) for x in wall]}
    return {**rec, **spread(rec)}, out


def spread(rec: dict) -> dict:
    """The medians of a record's pooled samples and the spread of its times: min, quartiles, max,
    the interquartile range as a share of the median, and the median of each round."""
    ms = sorted(rec["ms_samples"])
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    per_round = len(ms) // rec["rounds"]
    return {"ms": statistics.median(ms), "host_ms": statistics.median(rec["host_samples"]),
            "wall_ms": statistics.median(rec["wall_samples"]), "ms_min": ms[0], "ms_max": ms[-1],
            "ms_iqr": [q[0], q[2]], "iqr_pct": 100 * (q[2] - q[0]) / q[1] if q[1] else None,
            "round_ms": [statistics.median(rec["ms_samples"][i * per_round:(i + 1) * per_round])
                         for i in range(rec["rounds"])]}


def merge_rounds(first: dict, later: dict) -> dict:
    """``first`` (round 1's record: first call, setup, diff) with ``later``'s samples pooled in."""
    rec = dict(first)
    for key in ("ms_samples", "host_samples", "wall_samples"):
        rec[key] = first[key] + later[key]
    rec["iters"] = first["iters"] + later["iters"]
    rec["rounds"] = first["rounds"] + 1
    return {**rec, **spread(rec)}


def ranking(scenario: str, recs: list[dict]) -> dict:
    """Whether every round orders the variants as the pooled medians do (else the ranking is noise)."""
    ok = [r for r in recs if r["status"] == "ok"]
    if len(ok) < 2 or ok[0]["rounds"] < 2:
        return {"scenario": scenario, "order": [r["variant"] for r in sorted(ok, key=lambda r: r["ms"])]}
    order = [r["variant"] for r in sorted(ok, key=lambda r: r["ms"])]
    rounds = ok[0]["rounds"]
    agree = sum(order == [r["variant"] for r in sorted(ok, key=lambda r: r["round_ms"][i])] for i in range(rounds))
    note = None if agree == rounds else (
        f"{scenario}: the rounds disagree on the ranking ({agree}/{rounds} agree with the pooled order "
        f"{' < '.join(order)}): differences within the spread are noise on this machine")
    return {"scenario": scenario, "order": order, "rounds_agreeing": agree, "rounds": rounds, "note": note}


def _diff(out: torch.Tensor, ref: Optional[torch.Tensor]) -> Optional[dict]:
    if ref is None or not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return None
    d = (out.float() - ref.float()).abs()
    scale = ref.float().abs().max().item()
    return {"max_abs": d.max().item(), "max_rel_to_max": d.max().item() / scale if scale else None,
            "ref_max_abs": scale}


def _interpret_check(model, scenario: Scenario, inputs: dict, ref: Optional[torch.Tensor]) -> dict:
    """CPU: one call of the optimized model with ldm_fast's kernels forced (Triton's interpreter):
    how many kernel launches it made and how far its output is from eager's."""
    before = ldm_fast.ops.kernel_launches.copy()
    t0 = time.perf_counter()
    with ldm_fast.use_backend("triton"):
        out = scenario.call(model, inputs)
    launches = {k: v - before[k] for k, v in ldm_fast.ops.kernel_launches.items() if v - before[k]}
    return {"kernel_launches": launches, "diff_vs_eager": _diff(out.detach(), ref),
            "seconds": round(time.perf_counter() - t0, 2),
            "label": "CPU, kernels interpreted: a correctness check, not a timing"}


def run_variant(variant: str, scenario: Scenario, base, inputs: dict, device: torch.device,
                ref: Optional[torch.Tensor], iters: Optional[int] = None,
                check: bool = True) -> tuple[dict, Optional[torch.Tensor]]:
    """Prepare ``variant`` on a fresh copy of ``base``, time ``iters`` calls; ``check``: also the
    CPU's interpreted check (the first round only)."""
    cuda = device.type == "cuda"
    rec: dict = {"scenario": scenario.name, "variant": variant, "device": device.type,
                 "label": "CUDA" if cuda else "CPU"}
    model = None
    forced = variant in ATTENTION_VARIANTS
    saved_impl = os.environ.get("LDM_FAST_ATTENTION")
    try:
        if forced:
            os.environ["LDM_FAST_ATTENTION"] = "triton"
            ldm_fast.backend.reload_env()
            rec["attention"] = "LDM_FAST_ATTENTION=triton (the kernel forced; auto would follow attention_routes.json)"
        model, info = prepare(variant, base, scenario, device)
        rec.update(info)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        grad = torch.enable_grad if scenario.train else torch.no_grad  # no_grad: as diffusers pipelines run
        with grad():
            iters = iters or (scenario.iters if cuda else min(scenario.iters, 10))
            call = lambda: scenario.call(model, inputs)  # noqa: E731
            if variant == "eager+cuda_graph":
                if scenario.train:
                    raise _Skip("an eager CUDA graph of a training step (autograd) is not measured: inference only")
                call = _graphed(call)
            m, out = measure(call, device, scenario.warmup, iters)
            rec.update(m)
            if variant.startswith("compile"):
                rec["compile_s"] = m["first_call_s"]
                rec["compile_note"] = "wall time of the first call (Dynamo + Inductor compilation, then the run)"
            if cuda:
                rec.update(_gpu_ms_per_call(call, calls=5 if scenario.train else 10))
                rec["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            out = out.detach().clone()
        if variant.endswith("cuda_graph"):
            rec["cuda_graph_stats"] = graph_stats(model)
            if scenario.train:
                rec["cuda_graph_note"] = ("CUDAGraphForward serves inference only: with autograd the forward runs "
                                          "plain, so this row is optimize + channels_last")
        rec["diff_vs_eager"] = _diff(out, ref)
        if check and not cuda and scenario.interpret_check and variant in ("optimize", "optimize+attention", "ldm_fast-model"):
            with grad():
                rec["interpreted_check"] = _interpret_check(model, scenario, inputs, ref)
        rec["status"] = "ok"
    except _Skip as e:
        rec.update(status="skipped", reason=str(e))
        out = None
    except Exception as e:  # an error is a result: recorded and printed, the other variants still run
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        out = None
    finally:
        if forced:
            if saved_impl is None:
                os.environ.pop("LDM_FAST_ATTENTION", None)
            else:
                os.environ["LDM_FAST_ATTENTION"] = saved_impl
            ldm_fast.backend.reload_env()
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec, out


# ---------------------------------------------------------------------------------------------
# the run


def _fmt(x, digits=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _graph_cell(r: dict) -> str:
    stats = r.get("cuda_graph_stats")
    if not stats:
        return "-"
    return "; ".join(", ".join(f"{k} {v}" for k, v in s["stats"].items()) or "no calls" for s in stats.values())[:60]


def table(results: list[dict], cuda: bool) -> str:
    unit = "" if cuda else " (CPU)"
    headers = ["scenario", "variant", f"ms/call{unit}", f"min-max ms (IQR %){unit}", f"host ms{unit}", "GPU ms",
               f"first call s{unit}",
               f"compile s{unit}", "max |diff| vs eager", "CUDA graph stats", "status"]
    rows = []
    for r in results:
        d = r.get("diff_vs_eager") or {}
        status = r["status"]
        if status != "ok":
            status += ": " + (r.get("reason") or r.get("error") or "")[:70]
        rng = (f"{_fmt(r['ms_min'])}-{_fmt(r['ms_max'])} ({r['iqr_pct']:.0f}%, n={r['iters']})"
               if r.get("ms_min") is not None and r.get("iqr_pct") is not None else "-")
        rows.append([r["scenario"], r["variant"], _fmt(r.get("ms")), rng, _fmt(r.get("host_ms")),
                     _fmt(r.get("gpu_ms")) if cuda else "skip", _fmt(r.get("first_call_s")),
                     _fmt(r.get("compile_s")), f"{d['max_abs']:.2e}" if d else "-", _graph_cell(r), status])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run(scenarios: Optional[list[str]] = None, variants: Optional[list[str]] = None, compile_on_cpu: bool = False,
        out_dir: Optional[Path] = None, write: bool = True, iters: Optional[int] = None,
        warmup: Optional[int] = None, rounds: Optional[int] = None) -> dict:
    """Run the scenarios (all, or those named) in the variants (all, or those named); print the table;
    write ``e2e.json`` to ``out_dir`` (default ``benchmarks/results/latest``) and on CUDA merge into
    ``benchmarks/results/<gpu-name>-e2e.json``. ``iters``/``warmup``: override every scenario's (the
    GPU session's dry run takes one call). ``rounds`` (default :data:`CPU_ROUNDS` on a CPU, 1 on a
    GPU): each variant is timed once per round, the variants interleaved in a rotated order, so a
    busy machine's drift spreads over all of them; the samples of all rounds are pooled and their
    spread reported (``ms_min``, ``ms_iqr``, ``ms_max``, ``round_ms``), with whether the rounds rank
    the variants alike (``rankings``). Returns the report."""
    started = time.perf_counter()
    cuda = use_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {VARIANTS}")
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # a shared 2-core machine: one thread stalls less on busy cores
    try:
        env = environment()
        results, notes, unavailable = [], [], None
        try:
            import diffusers  # noqa: F401
        except ImportError:
            log(DIFFUSERS_MISSING)
            notes.append(DIFFUSERS_MISSING)
            unavailable = DIFFUSERS_MISSING
            all_scenarios = []
        else:
            all_scenarios = make_scenarios(tiny=not cuda)
        if scenarios:
            names = {s.name for s in make_scenarios(tiny=True)}
            missing = sorted(set(scenarios) - names)
            if missing:
                raise ValueError(f"unknown scenarios {missing}; known: {sorted(names)}")
            all_scenarios = [s for s in all_scenarios if s.name in scenarios]
        all_scenarios = [dataclasses.replace(s, iters=iters if iters is not None else s.iters,
                                             warmup=warmup if warmup is not None else s.warmup) for s in all_scenarios]
        if not cuda:
            notes.append(f"CPU run ({no_gpu_reason()}; {env['cpu']}, {env['cpu_count']} cores, torch threads 1): TINY "
                         "configs in fp32, every time a CPU timing. GPU numbers (ms per call, host ms, GPU kernel ms, "
                         "CUDA graphs, the SD-size models) need a GPU: run python -m benchmarks --e2e there.")
            notes.append("On the CPU, optimize's GroupNorm runs ldm_fast's eager reference (backend 'auto' picks eager "
                         "for CPU tensors): the optimize rows time the swapped modules' overhead, not the kernels; "
                         "'interpreted_check' in the JSON runs the optimized tiny model once with the kernels "
                         "interpreted and compares it with eager.")
        rounds = rounds or (1 if cuda else CPU_ROUNDS)
        rankings: list[dict] = []
        log(f"end to end: {len(all_scenarios)} scenarios x {len(variants)} variants x {rounds} rounds on "
            f"{env['gpu'] if cuda else 'the CPU (TINY configs, fp32)'}")
        for scenario in all_scenarios:
            t0 = time.perf_counter()
            reasons = {v: skip_reason(v, cuda, compile_on_cpu) for v in variants}
            if all(reasons.values()):  # nothing to run: the model is not built
                results += [{"scenario": scenario.name, "variant": v, "status": "skipped", "reason": reasons[v],
                             "description": scenario.description} for v in variants]
                log(f"[e2e] {scenario.name}: every variant skipped ({'; '.join(sorted(set(reasons.values())))})")
                continue
            try:
                base = scenario.build(device)
                inputs = scenario.make(device)
            except Exception as e:
                for variant in variants:
                    results.append({"scenario": scenario.name, "variant": variant, "status": "error",
                                    "error": f"building the model: {type(e).__name__}: {e}"[:2000]})
                log(f"[e2e] {scenario.name}: ERROR building: {type(e).__name__}: {e}")
                continue
            params = sum(p.numel() for p in base.parameters())
            ref = None
            recs: dict = {}
            iters_per_round = scenario.iters if cuda else max(1, min(scenario.iters, 10) // rounds)
            for r in range(rounds):  # interleaved: every variant once per round, the order rotated
                order = variants if r == 0 else variants[r % len(variants):] + variants[:r % len(variants)]
                for variant in order:
                    if variant in recs and recs[variant]["status"] != "ok":
                        continue
                    reason = reasons[variant]
                    if reason:
                        recs[variant] = {"scenario": scenario.name, "variant": variant, "status": "skipped",
                                         "reason": reason}
                        continue
                    rec, out = run_variant(variant, scenario, base, inputs, device, ref, iters_per_round, check=r == 0)
                    if variant == "eager" and out is not None and ref is None:
                        ref = out
                    recs[variant] = rec if variant not in recs or rec["status"] != "ok" else merge_rounds(recs[variant], rec)
            for variant in variants:
                rec = recs[variant]
                rec["description"] = scenario.description
                rec["parameters"] = params
                results.append(rec)
                if rec["status"] == "ok":
                    log(f"[e2e] {scenario.name} / {variant}: {rec['ms']:.2f} ms per call (IQR {rec['ms_iqr'][0]:.2f}-"
                        f"{rec['ms_iqr'][1]:.2f} over {rec['iters']} calls in {rec['rounds']} rounds), host "
                        f"{rec['host_ms']:.2f} ms" + (f", GPU {rec['gpu_ms']:.2f} ms" if "gpu_ms" in rec else " (CPU)")
                        + f", first call {rec['first_call_s']:.1f} s")
                else:
                    log(f"[e2e] {scenario.name} / {variant}: {rec['status']}: {rec.get('reason') or rec.get('error')}")
            rankings.append(ranking(scenario.name, [recs[v] for v in variants]))
            del base, inputs, ref
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            log(f"[e2e] {scenario.name}: {time.perf_counter() - t0:.0f}s")
    finally:
        torch.set_num_threads(threads)

    text = table(results, cuda)
    if cuda:
        notes.insert(0, f"GPU: {env['gpu']}. ms/call: median CUDA-event time per call (synchronized before each); host "
                        "ms: wall time of the call without synchronizing; GPU ms: torch.profiler, summed GPU activity "
                        "per call; compile s: wall time of the first call.")
    skipped = sorted({f"{r['variant']}: {r['reason']}" for r in results if r["status"] == "skipped"})
    notes += [rk["note"] for rk in rankings if rk.get("note")]
    print(text)
    print("\n".join(notes))
    for s in skipped:
        print(f"SKIPPED {s}")
    for r in results:
        if r["status"] == "error":
            print(f"ERROR {r['scenario']} / {r['variant']}: {r['error']}")
    report = {
        "kind": "e2e",
        "command": "python -m benchmarks --e2e" + (" --e2e-compile" if compile_on_cpu else ""),
        "environment": env,
        "timing_label": "CUDA" if cuda else "CPU (TINY configs, fp32)",
        "variants": variants,
        "cases": results,
        "unavailable": unavailable,
        "rounds": rounds,
        "rankings": rankings,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if write:
        write_report(report, "e2e", out_dir, cuda, started, key=lambda r: f"{r['scenario']}/{r['variant']}")
    return report


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="")
    parser.add_argument("--variants", default="")
    parser.add_argument("--compile", action="store_true", help="on a CPU, run the torch.compile variants too")
    parser.add_argument("--out", default=str(RESULTS / "latest"))
    args = parser.parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] or None  # noqa: E731
    report = run(split(args.scenarios), split(args.variants), args.compile, Path(args.out))
    return 1 if report["unavailable"] or any(r["status"] == "error" for r in report["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
