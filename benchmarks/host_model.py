"""Host cost per U-Net step and per op, launches stubbed: ``python -m benchmarks --host-model``.

In eager mode an SD 1.5 U-Net step on an H100 is host-bound (reference/h100-baseline.md:
channels_last eager 30.2 ms, the same work replayed in a CUDA graph 10.6 ms), so what ldm_fast's
Python costs per call decides its eager speed. This instrument measures that host cost on the CPU,
with every ldm_fast Triton launch stubbed, in three parts.

**1. Per U-Net step.** diffusers ``UNet2DConditionModel`` with SD 1.5's block structure (4 levels,
2 layers per block, cross-attention on levels 0-2, 8 heads, 32 GroupNorm groups) at SD 1.5's
widths / 10 (``block_out_channels`` 32/64/128/128, so head dims 4/8/16 against SD's 40/80/160;
cross-attention dim 64 against 768), random weights, real CPU tensors: batch 2, 8x8 latents, 77
context tokens, t = 500. Small widths keep the aten side's CPU math small (see "CPU compute"
below; the cross-attention dim matters most: at 768 the K/V projections of 77 tokens are ~9 ms of
CPU GEMMs per step, a quarter of the step, which a GPU runs asynchronously). Variants: diffusers
eager; ``optimize()``; ``optimize(channels_last=True)`` (the input channels_last too);
``optimize(channels_last=True, attention=True)``; the optimized ones on the Triton backend
(``ldm_fast.use_backend("triton")`` with ``TRITON_INTERPRET=1``, so the library takes its kernel
paths on CPU tensors). Rows: inference (``torch.no_grad``) and a training step (fp32 weights, no
autocast: forward, MSE loss, backward; gradients set to None before each step, untimed).

**2. Per op**, against the aten sequence it replaces (forward, no grad): group_norm+SiLU vs
``F.group_norm`` + ``F.silu``; group_norm with shift (+SiLU) vs add + group_norm + silu;
add_layer_norm vs add + layer_norm; geglu vs chunk + gelu + mul; timestep_embedding vs diffusers'
``get_timestep_embedding``; attention(impl="triton") vs SDPA with the head split/merge transposes
diffusers' ``AttnProcessor2_0`` does. Each at the U-Net step's level-0 shape (batch 2, 32 channels,
8x8 = 64 tokens) and at the smallest shape the op takes: there the aten side's time is its
dispatch floor (no math to speak of), so the gap between the two shapes bounds its CPU compute.

**3. A MODEL of the GPU host time per step**, not a measurement::

    predicted = T - R + aten_launches x C_aten + triton_launches x C_triton

``T`` the measured CPU time per step; ``R`` the CPU time of the step's aten launches alone (every
aten op that would launch a GPU kernel, recorded in one step and replayed back to back: their
dispatch and CPU math), swapped for ``C_aten`` each, the H100 host's measured cost of an aten
launch; ``C_triton`` per Triton launch, for ``kernel[grid]`` and for a direct launcher
(:data:`CONSTANTS`, with their sources). ``T - R`` (the Python around the aten launches: diffusers'
modules, ldm_fast's host code up to the launch boundary, the non-launching aten ops such as views
and allocations) carries over as measured on this CPU; the H100 host's CPU may be faster or slower.

Launch boundary. Every Triton launch is stubbed at :func:`launch_boundary`, one function: the entry
of ldm_fast's launcher (``kernels/_launch.Kernel.launch``, what ``kernel[grid](...)`` calls), so
what the launch does is not timed and is charged ``C_triton`` by the model instead: through
``kernel[grid]`` Triton's binding, specialization key and cache lookup; through the direct launcher
ldm_fast's guard (the call's facts and the cache lookup, measured here on this CPU with a fake
compiled kernel: :func:`direct_guard_us`) plus the compiled launcher's constant. The kernels'
outputs stay the ``torch.empty`` allocations they were.

Timing. ``time.thread_time_ns`` (this thread's CPU time: time the scheduler gives other processes
on a shared machine is not counted) of one call, in interleaved rounds: each round runs every
entry once, in an order rotated each round; garbage collection off inside a round; one torch
thread; denormals flushed (a stubbed kernel's output is uninitialized memory, and denormal
garbage could slow the CPU math that reads it). Reported per entry: the median over rounds, the
interquartile range and min/max; ratios to diffusers eager are per round (same round, same load),
then summarized the same way.

CPU compute. ``T`` includes the aten ops' CPU math, which a GPU host does not do (it launches and
moves on). Small widths keep it small, and ``R`` measures it with their dispatch: the model swaps
it out. Eager's ``T`` also includes the math of the ops the optimized variants replace with
stubbed kernels (GroupNorm, SiLU, GELU, LayerNorm, adds), so ratios of ``T`` flatter the optimized
variants by that much; ``T - R`` and the model do not.

Counts per step (one extra, untimed step with a ``TorchDispatchMode``): aten ops dispatched (every
op, views included), aten launches (the rule of :class:`benchmarks.traffic.DispatchCounter`: ops on
non-scalar tensors that are not views, metadata or allocations) and Triton launches (the stub's
count).

Writes ``benchmarks/results/latest/host_model.json``. ``--quick``: a two-level tiny U-Net and a
few rounds (the test's mode). ``--profile VARIANT``: cProfile of that variant's step (launches
stubbed), top functions by self time. ``--blocks VARIANT``: host cost per block call (ResNet,
transformer, attention, ...) against diffusers eager. ``--readme JSON``: the README's tables from a written report.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import host
from .traffic import DispatchCounter

RESULTS = Path(__file__).resolve().parent / "results"
CPU_LABEL = "CPU thread time, ldm_fast's Triton launches stubbed"

#: The variants: name -> ``ldm_fast.optimize`` options (None: the model as diffusers builds it).
VARIANTS: dict[str, Optional[dict]] = {
    "diffusers eager": None,
    "optimize()": {},
    "optimize(channels_last=True)": {"channels_last": True},
    "optimize(channels_last=True, attention=True)": {"channels_last": True, "attention": True},
}
EAGER = "diffusers eager"
REPLAY_CALL_OP = "aten add as the replay calls it"

#: Per-launch host constants of the model (µs on the H100 host), with their sources.
CONSTANTS = {
    "aten": {
        "us": 10.8,
        "source": "reference/h100-baseline.md, floors: aten add_ 10.8 us host per call (a tiny op, back to back, "
                  "on the H100 machine: Python binding, dispatch, CUDA launch). The one aten per-call number "
                  "measured on that host; ops that C++ composites call (linear's addmm) skip the Python binding, "
                  "so it errs high for them."},
    "triton_kernel_grid": {
        "us": 17.2, "low_us": 11.9, "high_us": 20.0,
        "source": "reference/h100-baseline.md, floors: kernel[grid] of a 4-argument kernel 11.9 and 20.0 us "
                  "(two runs), of a 20-argument kernel 17.2 us (ldm_fast's kernels take 10-30 arguments: 17.2 "
                  "is the central value); reference/call-path.md: tritonbench #1002 measured JITFunction.run "
                  "~11-12.5 us."},
    "triton_direct": {
        "us": 3.4,
        "source": "reference/call-path.md: tritonbench #1002, the compiled kernel launched directly "
                  "(CompiledKernel.run with cached metadata) ~3.4 us, against ~11-12.5 us through kernel[grid] "
                  "on the same machine."},
}


#: The one host-bound eager step measured on an H100 host, to check the model's scale against:
#: wall ms per SD 1.5 U-Net step, b2 fp16 (GPU kernel time 12.3 ms NCHW, ~8.5 ms channels_last).
H100_EAGER_STEP_MS = {
    "NCHW": 48.5, "channels_last": 30.2,
    "source": "reference/h100-baseline.md, End to end: eager diffusers U-Net step b2 fp16 (wall time; the GPU "
              "kernel time of 12.3 ms makes it host-bound)"}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the launch boundary


@contextlib.contextmanager
def launch_boundary(counts: Optional[Counter] = None):
    """Every ldm_fast Triton launch becomes a no-op while active; each is counted into ``counts``
    by kernel name. THE one place the stub lives: the entry of ldm_fast's launcher,
    ``kernels/_launch.Kernel.launch`` (what ``kernel[grid](...)`` calls: on a GPU, ``kernel[grid]``
    for a specialization's first launch and the compiled kernel's launcher for the others), so the
    measured time stops where the launch starts and the MODEL adds one launch constant per launch."""
    from ldm_fast.kernels._launch import Kernel

    def launch(self, grid, *args, **kwargs):
        if counts is not None:
            counts[getattr(self.fn, "__name__", type(self.fn).__name__)] += 1
        return None

    original = Kernel.__dict__["launch"]
    Kernel.launch = launch
    try:
        yield
    finally:
        Kernel.launch = original


def direct_guard_us(rounds: int = 5, calls: int = 2000) -> float:
    """Host µs per launch of ldm_fast's direct launcher in front of the compiled kernel's launcher
    (``kernels/_launch.Kernel``: the partial, the call's facts, the cache lookup, the stream query),
    for a 20-argument launch (9 tensors, 10 ints, a float; ldm_fast's kernels take 10-30), on this
    CPU: a fake compiled kernel whose launcher does nothing stands in for the GPU's. Median of
    ``rounds`` loops of thread CPU time."""
    from ldm_fast.kernels._launch import Kernel, Switch

    names = [f"a{i}" for i in range(20)] + ["BLOCK"]

    class Param:
        def __init__(self, name):
            self.name, self.is_constexpr, self.has_default, self.default = name, name == "BLOCK", False, None

    class Compiled:
        function, packed_metadata = object(), object()

        def run(self, *call):
            return None

    compiled = Compiled()

    class FakeJIT:
        params = [Param(n) for n in names]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: compiled

    kernel = Kernel(FakeJIT())
    kernel._stream = lambda device: None
    args = tuple([torch.zeros(16) for _ in range(9)] + [1024, 320, 1024, 0, 320, 1, 0, 320, 1, 7] + [1e-5])
    saved, Switch.enabled = Switch.enabled, True
    try:
        kernel[(8,)](*args, BLOCK=512, num_warps=8)  # fills the cache
        samples = []
        for _ in range(rounds):
            start = time.thread_time_ns()
            for _ in range(calls):
                kernel[(8,)](*args, BLOCK=512, num_warps=8)
            samples.append((time.thread_time_ns() - start) / calls / 1e3)
    finally:
        Switch.enabled = saved
    assert kernel.direct == rounds * calls
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------
# timing


@contextlib.contextmanager
def quiet_cpu():
    """One torch thread (a shared 2-core machine: one thread stalls less on busy cores), denormals
    flushed (the stubbed kernels' outputs are uninitialized memory), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def interleaved_rounds(entries: dict[str, dict], rounds: int, warmup: int = 2,
                       wall: Optional[dict] = None) -> dict[str, list[float]]:
    """Thread CPU µs per call of each entry, one sample per round. An entry is ``{"call": fn,
    "prepare": fn or None, "n": calls per sample}``: ``prepare`` runs untimed before each sample,
    then ``n`` calls are timed together (their mean is the sample). Each round runs every entry once,
    the order rotated by one each round; gc is off inside a round and collected between rounds.
    ``wall``, if given, receives the wall-clock µs of the same samples (thread time well below wall
    time means the thread was preempted, or work ran on other threads)."""
    names = list(entries)
    for name in names:  # warm-up: caches filled, one-time work done
        e = entries[name]
        for _ in range(warmup):
            if e.get("prepare"):
                e["prepare"]()
            e["call"]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    walls: dict[str, list[float]] = wall if wall is not None else {}
    for name in names:
        walls[name] = []
    was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            gc.collect()
            gc.disable()
            for name in order:
                e = entries[name]
                call, n = e["call"], e.get("n", 1)
                if e.get("prepare"):
                    e["prepare"]()
                w0 = time.perf_counter_ns()
                t0 = time.thread_time_ns()
                for _ in range(n):
                    call()
                t1 = time.thread_time_ns()
                samples[name].append((t1 - t0) / n / 1e3)
                walls[name].append((time.perf_counter_ns() - w0) / n / 1e3)
            gc.enable()
    finally:
        if was_enabled:
            gc.enable()
    return samples


def summary(samples: list[float]) -> dict:
    """Median, interquartile range (p25, p75), min and max of a list of samples."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "p25": q[0], "p75": q[2], "min": s[0], "max": s[-1], "n": len(s)}


def per_round_ratio(a: list[float], b: list[float]) -> dict:
    """``a / b`` round by round (both measured in the same rounds), summarized."""
    return summary([x / y for x, y in zip(a, b)])


# ---------------------------------------------------------------------------------------------
# counting and the aten replay


class StepRecorder(DispatchCounter):
    """:class:`benchmarks.traffic.DispatchCounter` (aten launches by its rule) that also counts every
    aten op dispatched and keeps each launching op's ``(func, args, kwargs)`` to replay."""

    def __init__(self):
        super().__init__()
        self.dispatched = 0
        self.replay: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("aten", "prim", "prims"):
            self.dispatched += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _charge(self, func, args, kwargs, out) -> None:
        n = len(self.ops)
        super()._charge(func, args, kwargs, out)
        if len(self.ops) > n and self.ops[-1][3]:
            self.replay.append((func, args, kwargs))


def replayer(ops: list[tuple]) -> Callable[[], None]:
    """A function that re-issues the recorded aten ops back to back (``func(*args, **kwargs)``), under
    ``no_grad``: the op's own work only (autograd's bookkeeping in a training step stays in the part
    of the step's time that is not replayed, as it stays on a GPU's host)."""

    def replay():
        with torch.no_grad():
            for func, args, kwargs in ops:
                func(*args, **kwargs)

    return replay


# ---------------------------------------------------------------------------------------------
# 1. per U-Net step


def unet_config(quick: bool) -> dict:
    """SD 1.5's ``UNet2DConditionModel`` at widths / 10 (see the module docstring); ``quick``: a
    two-level one (the tests' tiny U-Net, ``benchmarks.e2e.unet_config(tiny=True)``)."""
    from .e2e import unet_config as e2e_config

    if quick:
        return e2e_config(tiny=True)
    return {**e2e_config(tiny=False), "sample_size": 8, "block_out_channels": (32, 64, 128, 128),
            "cross_attention_dim": 64}


def build_unet(config: dict, options: Optional[dict], train: bool):
    """The diffusers U-Net from ``config`` (seeded random weights, fp32), optimized with
    ``options`` unless None, in train or eval mode."""
    import diffusers

    import ldm_fast

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**config).train(train)
    if options is not None:
        ldm_fast.optimize(model, **options)
    return model


def step_entry(config: dict, options: Optional[dict], train: bool, batch: int = 2, side: int = 8,
               tokens: int = 77) -> dict:
    """A timing entry for one U-Net step of a fresh model: ``call`` (inference, or forward + MSE +
    backward) and ``prepare`` (gradients set to None before a training step, as an optimizer's
    ``zero_grad`` does)."""
    model = build_unet(config, options, train)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, side, side, generator=g)
    if options and options.get("channels_last"):
        sample = sample.contiguous(memory_format=torch.channels_last)
    context = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    t = torch.full((batch,), 500, dtype=torch.int64)
    if not train:
        def call():
            return model(sample, t, encoder_hidden_states=context).sample

        return {"call": call, "prepare": None, "model": model}
    target = torch.randn(batch, 4, side, side, generator=g)

    def train_step():
        pred = model(sample, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, target)
        loss.backward()
        return loss

    return {"call": train_step, "prepare": lambda: model.zero_grad(set_to_none=True), "model": model}


def count_step(entry: dict) -> dict:
    """One untimed step counted, after one uncounted (the steady state of a sampling or training
    loop: per-model caches filled): aten ops dispatched, aten launches, Triton launches by kernel;
    the launching aten ops recorded for the replay (``entry["replay"]``)."""
    kernels: Counter = Counter()
    recorder = StepRecorder()
    for counted in (False, True):
        if entry["prepare"]:
            entry["prepare"]()
        with launch_boundary(kernels if counted else None), (recorder if counted else contextlib.nullcontext()):
            entry["call"]()
    entry["replay"] = replayer(recorder.replay)
    return {"aten_dispatched": recorder.dispatched, "aten_launches": recorder.launches,
            "triton_launches": sum(kernels.values()), "triton_kernels": dict(sorted(kernels.items()))}


def measure_steps(config: dict, train: bool, rounds: int) -> dict:
    """Every variant's step and its aten replay, interleaved; counts; the model per round."""
    entries, counts = {}, {}
    for name, options in VARIANTS.items():
        entry = step_entry(config, options, train)
        counts[name] = count_step(entry)
        entries[name] = entry
    timed = {}
    for name, entry in entries.items():
        timed[f"step|{name}"] = {"call": entry["call"], "prepare": entry["prepare"]}
        timed[f"replay|{name}"] = {"call": entry["replay"]}
    wall: dict[str, list[float]] = {}
    with launch_boundary():
        samples = interleaved_rounds(timed, rounds, wall=wall)
    rows = {}
    eager_t = samples[f"step|{EAGER}"]
    eager_pred = model_samples(eager_t, samples[f"replay|{EAGER}"], counts[EAGER], "triton_kernel_grid")
    for name in VARIANTS:
        t_us, r_us, c = samples[f"step|{name}"], samples[f"replay|{name}"], counts[name]
        grid = model_samples(t_us, r_us, c, "triton_kernel_grid")
        direct = model_samples(t_us, r_us, c, "triton_direct")
        rows[name] = {
            **c,
            "cpu_ms": ms(summary(t_us)), "cpu_vs_eager": per_round_ratio(t_us, eager_t),
            "wall_ms": ms(summary(wall[f"step|{name}"])),
            "aten_replay_ms": ms(summary(r_us)),
            "cpu_minus_replay_ms": ms(summary([a - b for a, b in zip(t_us, r_us)])),
            "model_kernel_grid_ms": ms(summary(grid)),
            "model_kernel_grid_range_ms": [model_point(t_us, r_us, c, "triton_kernel_grid", "low_us") / 1e3,
                                           model_point(t_us, r_us, c, "triton_kernel_grid", "high_us") / 1e3],
            "model_kernel_grid_vs_eager": per_round_ratio(grid, eager_pred),
            "model_direct_ms": ms(summary(direct)),
            "model_direct_vs_eager": per_round_ratio(direct, eager_pred),
            "samples_us": [round(x, 1) for x in t_us], "replay_samples_us": [round(x, 1) for x in r_us],
        }
    return rows


# ---------------------------------------------------------------------------------------------
# optimize(cuda_graph=True): ldm_fast's own cost per graphed call


#: The graphed variants: name -> ``ldm_fast.optimize`` options.
GRAPH_VARIANTS: dict[str, dict] = {
    "optimize(cuda_graph=True)": {"cuda_graph": True},
    "optimize(channels_last=True, cuda_graph=True)": {"channels_last": True, "cuda_graph": True},
}
#: The issue's budget for what a graphed U-Net call costs the host besides the replay.
GRAPH_CALL_BUDGET_US = 100.0


def null_graph_api():
    """A ``CUDAGraphForward.api`` on the CPU whose graphs replay nothing: a graphed call then costs
    what ldm_fast's Python and its aten ops cost per call besides the replay (the key, the checks,
    the input copies, the output clones). Warm-up and capture run the forward once each."""
    from ldm_fast.optimize.cuda_graph import CUDAGraphAPI

    class NullGraph:
        def replay(self) -> None:
            return None

    class NullGraphAPI(CUDAGraphAPI):
        device_type = "cpu"

        def is_capturing(self) -> bool:
            return False

        def warmup(self, device, fn, iters):
            return fn()

        def new_pool(self):
            return None

        def capture(self, device, fn, pool=None):
            return NullGraph(), fn()

    return NullGraphAPI()


def measure_graph_calls(config: dict, rounds: int, calls: int = 20) -> dict:
    """Host µs per call of each :data:`GRAPH_VARIANTS` U-Net (inference, replay a no-op:
    :func:`null_graph_api`), the timestep as a tensor and as a Python int (lifted to the graph's 0-d
    input), interleaved rounds of ``calls`` calls; the aten ops a call dispatches and launches."""
    with launch_boundary():  # (the forward runs at capture only)
        return _measure_graph_calls(config, rounds, calls)


def _measure_graph_calls(config: dict, rounds: int, calls: int) -> dict:
    entries, rows, counts = {}, {}, {}
    for name, options in GRAPH_VARIANTS.items():
        entry = step_entry(config, options, False)
        model = entry["model"]
        model.forward.api = null_graph_api()
        sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        if options.get("channels_last"):
            sample = sample.contiguous(memory_format=torch.channels_last)
        context = torch.randn(2, 77, config["cross_attention_dim"], generator=torch.Generator().manual_seed(2))
        for timestep_kind, t in (("t tensor", torch.full((2,), 500, dtype=torch.int64)), ("t int", 500)):
            def call(model=model, sample=sample, t=t, context=context):
                return model(sample, t, encoder_hidden_states=context).sample

            call()  # captures (the forward runs; the graph stands by)
            assert model.forward.stats["graph capture"] >= 1, model.forward.stats
            recorder = StepRecorder()
            replays = model.forward.stats["graph replay"]
            with recorder:
                call()
            assert model.forward.stats["graph replay"] == replays + 1, model.forward.stats  # the graph path
            key = f"{name}|{timestep_kind}"
            counts[key] = {"aten_dispatched": recorder.dispatched, "aten_launches": recorder.launches}
            entries[key] = {"call": call, "n": calls}
    samples = interleaved_rounds(entries, rounds)
    for key, s in samples.items():
        name, timestep_kind = key.split("|")
        rows.setdefault(name, {})[timestep_kind] = {"us": summary(s), **counts[key]}
    return rows


def ms(s: dict) -> dict:
    """A summary in µs as ms (``n`` kept)."""
    return {k: (v / 1e3 if k != "n" else v) for k, v in s.items()}


_GUARD: dict = {}  # the measured direct-launch guard, once per process


def triton_constant(kind: str, key: str = "us") -> float:
    """The model's µs per Triton launch of ``kind``: the constant, plus, for the direct launcher,
    ldm_fast's guard in front of it as measured on this CPU (:func:`direct_guard_us`)."""
    if kind != "triton_direct":
        return CONSTANTS[kind][key]
    if "us" not in _GUARD:
        _GUARD["us"] = direct_guard_us()
    return CONSTANTS[kind].get(key, CONSTANTS[kind]["us"]) + _GUARD["us"]


def model_samples(t_us: list[float], r_us: list[float], counts: dict, triton_kind: str) -> list[float]:
    """The model per round (µs): ``T - R + aten_launches x C_aten + triton_launches x C_triton``."""
    fixed = counts["aten_launches"] * CONSTANTS["aten"]["us"] + counts["triton_launches"] * triton_constant(triton_kind)
    return [t - r + fixed for t, r in zip(t_us, r_us)]


def model_point(t_us, r_us, counts, triton_kind: str, key: str) -> float:
    """The model at the medians of T - R, with the Triton constant's ``key`` (``low_us``/``high_us``)."""
    diff = statistics.median([t - r for t, r in zip(t_us, r_us)])
    return (diff + counts["aten_launches"] * CONSTANTS["aten"]["us"]
            + counts["triton_launches"] * triton_constant(triton_kind, key))


# ---------------------------------------------------------------------------------------------
# 2. per op


def op_cases(quick: bool = False) -> list[dict]:
    """Each op at the step's level-0 shape (batch 2, 32 channels, 8x8 = 64 tokens: SD 1.5's level 0
    at widths / 10) and at its smallest shape (the aten side's dispatch floor). Each case:
    ``{"op", "shape", "what", "fused", "aten"}`` with zero-argument functions."""
    from diffusers.models.embeddings import get_timestep_embedding

    from ldm_fast import functional as lf

    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    cases = []
    # per shape label: the step's level 0; the smallest F.group_norm takes with 32 groups (one channel, 2x2 pixels each)
    for label, (b, c, s) in (("step", (2, 32, 8)), ("floor", (1, 32, 2))):
        x, w, bias, shift = rand(b, c, s, s), rand(c), rand(c), rand(b, c)
        cases.append({"op": "group_norm+SiLU", "shape": label, "what": f"x {b}x{c}x{s}x{s}, 32 groups",
                      "fused": lambda x=x, w=w, bias=bias: lf.group_norm(x, 32, w, bias, 1e-5, activation="silu"),
                      "aten": lambda x=x, w=w, bias=bias: F.silu(F.group_norm(x, 32, w, bias, 1e-5))})
        cases.append({"op": "group_norm+shift+SiLU", "shape": label, "what": f"x {b}x{c}x{s}x{s}, shift {b}x{c}",
                      "fused": lambda x=x, w=w, bias=bias, shift=shift: lf.group_norm(
                          x, 32, w, bias, 1e-5, activation="silu", shift=shift),
                      "aten": lambda x=x, w=w, bias=bias, shift=shift: F.silu(F.group_norm(
                          x + shift[:, :, None, None], 32, w, bias, 1e-5))})
    for label, (b, n, c) in (("step", (2, 64, 32)), ("floor", (1, 1, 32))):
        x, res, w, bias = rand(b, n, c), rand(b, n, c), rand(c), rand(c)

        def aten_aln(x=x, res=res, w=w, bias=bias, c=c):
            s = x + res
            return s, F.layer_norm(s, (c,), w, bias, 1e-5)

        cases.append({"op": "add_layer_norm", "shape": label, "what": f"x, residual {b}x{n}x{c}",
                      "fused": lambda x=x, res=res, w=w, bias=bias: lf.add_layer_norm(x, res, w, bias, 1e-5),
                      "aten": aten_aln})
    for label, (b, n, f) in (("step", (2, 64, 128)), ("floor", (1, 1, 1))):
        proj = rand(b, n, 2 * f)

        def aten_geglu(proj=proj):
            hidden, gate = proj.chunk(2, dim=-1)
            return hidden * F.gelu(gate)

        cases.append({"op": "geglu", "shape": label, "what": f"proj {b}x{n}x{2 * f}",
                      "fused": lambda proj=proj: lf.geglu(proj), "aten": aten_geglu})
    for label, (b, dim) in (("step", (2, 32)), ("floor", (1, 2))):
        t = torch.full((b,), 500, dtype=torch.int64)
        cases.append({"op": "timestep_embedding", "shape": label, "what": f"t [{b}], dim {dim}",
                      "fused": lambda t=t, dim=dim: lf.timestep_embedding(t, dim, flip_sin_to_cos=True,
                                                                          downscale_freq_shift=0.0),
                      "aten": lambda t=t, dim=dim: get_timestep_embedding(t, dim, flip_sin_to_cos=True,
                                                                          downscale_freq_shift=0)})
    for label, (b, n, c) in (("step", (2, 64, 32)), ("floor", (1, 1, 8))):
        q, k, v = rand(b, n, c), rand(b, n, c), rand(b, n, c)
        heads = 8

        def aten_attention(q=q, k=k, v=v, heads=heads):  # AttnProcessor2_0's split, SDPA, merge
            bsz, d = q.shape[0], q.shape[-1] // heads
            q4 = q.view(bsz, -1, heads, d).transpose(1, 2)
            k4 = k.view(bsz, -1, heads, d).transpose(1, 2)
            v4 = v.view(bsz, -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q4, k4, v4, dropout_p=0.0, is_causal=False)
            return o.transpose(1, 2).reshape(bsz, -1, heads * d)

        cases.append({"op": "attention", "shape": label, "what": f"q, k, v {b}x{n}x{c}, {heads} heads",
                      "fused": lambda q=q, k=k, v=v, heads=heads: lf.attention(q, k, v, heads=heads, impl="triton"),
                      "aten": aten_attention})
    # the CPU's aten dispatch floor for reference: one aten op on 16 elements
    small = rand(16)
    cases.append({"op": "aten add (16 elements)", "shape": "floor", "what": "x + 1 on 16 elements",
                  "fused": None, "aten": lambda small=small: small + 1.0})
    # the same op called as the replay calls ops (an OpOverload from Python): its extra cost per op
    add = torch.ops.aten.add.Tensor
    cases.append({"op": REPLAY_CALL_OP, "shape": "floor", "what": "torch.ops.aten.add.Tensor(x, 1) on 16 elements",
                  "fused": None, "aten": lambda small=small: add(small, 1.0)})
    return cases


def measure_ops(rounds: int, calls: int) -> list[dict]:
    """Every op case, fused (launches stubbed) and aten, interleaved; µs per call."""
    cases = op_cases()
    entries = {}
    counts: dict[str, Counter] = {}
    for i, case in enumerate(cases):
        for side in ("fused", "aten"):
            if case[side] is not None:
                entries[f"{i}|{side}"] = {"call": case[side], "n": calls}
    with torch.no_grad():
        for i, case in enumerate(cases):  # one counted call each: the fused side must launch, the aten side not
            if case["fused"] is not None:
                counts[i] = Counter()
                with launch_boundary(counts[i]):
                    case["fused"]()
        with launch_boundary():
            samples = interleaved_rounds(entries, rounds)
    rows = []
    for i, case in enumerate(cases):
        aten = samples[f"{i}|aten"]
        row = {"op": case["op"], "shape": case["shape"], "what": case["what"], "aten_us": summary(aten)}
        if case["fused"] is not None:
            fused = samples[f"{i}|fused"]
            row.update({"fused_us": summary(fused), "fused_vs_aten": per_round_ratio(fused, aten),
                        "triton_launches": sum(counts[i].values())})
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the report


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def step_table(steps: dict) -> str:
    head = ["step", "variant", "CPU ms median [IQR]", "vs eager [IQR]", "aten ops", "aten launches",
            "Triton launches", "aten replay ms", "CPU - replay ms", "MODEL kernel[grid] ms (range)", "vs eager",
            "MODEL direct ms", "vs eager"]
    rows = []
    for kind, variants in steps.items():
        for name, r in variants.items():
            c, g, d = r["cpu_ms"], r["model_kernel_grid_ms"], r["model_direct_ms"]
            lo, hi = r["model_kernel_grid_range_ms"]
            rows.append([kind, name, f"{_f(c['median'])} [{_f(c['p25'])}-{_f(c['p75'])}]",
                         f"{_f(r['cpu_vs_eager']['median'], 2)} [{_f(r['cpu_vs_eager']['p25'], 2)}-"
                         f"{_f(r['cpu_vs_eager']['p75'], 2)}]",
                         str(r["aten_dispatched"]), str(r["aten_launches"]), str(r["triton_launches"]),
                         _f(r["aten_replay_ms"]["median"]), _f(r["cpu_minus_replay_ms"]["median"]),
                         f"{_f(g['median'])} ({_f(lo)}-{_f(hi)})", _f(r["model_kernel_grid_vs_eager"]["median"], 2),
                         _f(d["median"]), _f(r["model_direct_vs_eager"]["median"], 2)])
    return _columns(head, rows)


def op_table(ops: list[dict]) -> str:
    head = ["op", "shape", "", "ldm_fast us [IQR]", "aten sequence us [IQR]", "ldm_fast / aten [IQR]", "launches"]
    rows = []
    for r in ops:
        a = r["aten_us"]
        aten = f"{_f(a['median'])} [{_f(a['p25'])}-{_f(a['p75'])}]"
        if "fused_us" in r:
            f, q = r["fused_us"], r["fused_vs_aten"]
            rows.append([r["op"], r["shape"], r["what"], f"{_f(f['median'])} [{_f(f['p25'])}-{_f(f['p75'])}]", aten,
                         f"{_f(q['median'], 2)} [{_f(q['p25'], 2)}-{_f(q['p75'], 2)}]", str(r["triton_launches"])])
        else:
            rows.append([r["op"], r["shape"], r["what"], "-", aten, "-", "-"])
    return _columns(head, rows)


def graph_table(graph_calls: dict) -> str:
    head = ["variant", "timestep", "host us per call [IQR] (replay stubbed)", "aten ops", "aten launches"]
    rows = []
    for name, kinds in graph_calls.items():
        for kind, r in kinds.items():
            u = r["us"]
            rows.append([name, kind, f"{_f(u['median'])} [{_f(u['p25'])}-{_f(u['p75'])}]", str(r["aten_dispatched"]),
                         str(r["aten_launches"])])
    return _columns(head, rows)


def _columns(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def replay_bias_note(steps: dict, ops: list[dict]) -> Optional[str]:
    """How much the replay's own call path (an OpOverload called from Python) adds per op, measured
    in the per-op rounds, and the bound it puts on ``CPU - replay`` per variant."""
    by_op = {r["op"]: r["aten_us"]["median"] for r in ops}
    if REPLAY_CALL_OP not in by_op or "aten add (16 elements)" not in by_op:
        return None
    extra = by_op[REPLAY_CALL_OP] - by_op["aten add (16 elements)"]
    rows = steps.get("inference", {})
    bounds = ", ".join(f"{name} {extra * r['aten_launches'] / 1e3:.1f} ms" for name, r in rows.items())
    return (f"Replay bias: an aten op called as the replay calls it costs {extra:+.1f} us against x + 1 "
            f"(both measured above), and ops a C++ composite calls (linear's mm) pay no Python call in the step: "
            f"so 'CPU - replay' and the model may be low by up to about that much per aten launch "
            f"(inference: {bounds}).")


def calibration_check(steps: dict) -> Optional[str]:
    """The model's diffusers eager inference step beside the H100's measured host-bound eager steps."""
    row = steps.get("inference", {}).get(EAGER)
    if not row:
        return None
    model = row["model_kernel_grid_ms"]["median"]
    h = H100_EAGER_STEP_MS
    return (f"Check of the MODEL's scale: diffusers eager inference {model:.1f} ms modelled against the H100's "
            f"measured eager step {h['NCHW']} ms NCHW / {h['channels_last']} ms channels_last ({h['source']}): "
            f"{h['channels_last'] / model:.1f}-{h['NCHW'] / model:.1f}x the model. The H100 host ran launch-stubbed "
            "ldm_fast calls in 111-221 us that took 46-63 us on a 2-core CPU like this one (h100-baseline; partly "
            "another path then: torch.library's custom-op dispatch), and cuDNN's per-convolution host work exceeds "
            "one add_: read the model's ratios, not its ms, and confirm on a GPU.")


def notes(env: dict, config: dict, rounds: dict, steps: Optional[dict] = None,
          ops: Optional[list] = None) -> list[str]:
    c = CONSTANTS
    checks = [n for n in (replay_bias_note(steps or {}, ops or []), calibration_check(steps or {})) if n]
    lines = [
        f"CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads 1, load average at start "
        f"{env['load_average']}; {CPU_LABEL}. Per step: {rounds['steps']} interleaved rounds; per op: "
        f"{rounds['ops']} rounds of {rounds['op_calls']} calls. Medians, [interquartile range]; "
        "ratios per round.",
        f"U-Net: block_out_channels {list(config['block_out_channels'])}, cross-attention dim "
        f"{config['cross_attention_dim']}, batch 2, 8x8 latents, 77 tokens, fp32; training = forward + MSE + backward.",
        "aten replay: the step's launching aten ops re-issued back to back (their dispatch and CPU math); "
        "CPU - replay: the Python around them (diffusers, ldm_fast up to the launch boundary, views, allocations).",
        f"MODEL (not a measurement) of GPU host time per step = CPU - replay + aten launches x {c['aten']['us']} us "
        f"+ Triton launches x C: kernel[grid] C = {c['triton_kernel_grid']['us']} us (range "
        f"{c['triton_kernel_grid']['low_us']}-{c['triton_kernel_grid']['high_us']}), direct launcher C = "
        f"{c['triton_direct']['us']} us + ldm_fast's guard in front of it, {_GUARD.get('us', float('nan')):.1f} us measured "
        "on this CPU (a 20-argument launch, a fake compiled kernel).",
        *[f"  {k}: {v['source']}" for k, v in c.items()],
        "Per op: 'step' = the U-Net step's level-0 shape, 'floor' = the smallest shape the op takes (aten's "
        "time there is its dispatch floor: the step-floor gap bounds its CPU math).",
    ]
    return lines + checks


def readme_table(report: dict) -> str:
    """The markdown tables for benchmarks/README.md (measured CPU numbers and the model)."""
    env = report["environment"]
    lines = [f"Measured {env['date'][:10]} on {env['cpu']} ({env['cpu_count']} cores shared with other jobs, "
             f"load average {env['load_average']}), torch {env['torch']}, triton {env['triton']}, diffusers "
             f"{env['diffusers']}, ldm_fast {env['ldm_fast_commit']}; {report['rounds']['steps']} interleaved rounds. "
             "CPU thread time per step with ldm_fast's Triton launches stubbed: median [interquartile range].", "",
             "| step | variant | CPU ms | vs eager | aten ops / aten launches / Triton launches | CPU - aten replay ms "
             "| MODEL GPU host ms, kernel[grid] (vs eager) | MODEL, direct launcher (vs eager) |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, variants in report["steps"].items():
        for name, r in variants.items():
            c, q = r["cpu_ms"], r["cpu_vs_eager"]
            lines.append(
                f"| {kind} | {name} | {_f(c['median'])} [{_f(c['p25'])}-{_f(c['p75'])}] | {_f(q['median'], 2)} "
                f"[{_f(q['p25'], 2)}-{_f(q['p75'], 2)}] | {r['aten_dispatched']} / {r['aten_launches']} / "
                f"{r['triton_launches']} | {_f(r['cpu_minus_replay_ms']['median'])} | "
                f"{_f(r['model_kernel_grid_ms']['median'])} ({_f(r['model_kernel_grid_vs_eager']['median'], 2)}) | "
                f"{_f(r['model_direct_ms']['median'])} ({_f(r['model_direct_vs_eager']['median'], 2)}) |")
    lines += ["", "| op | shape | ldm_fast us (launches stubbed) | aten sequence us | ldm_fast / aten |",
              "|---|---|---|---|---|"]
    for r in report["ops"]:
        a = r["aten_us"]
        if "fused_us" in r:
            f, q = r["fused_us"], r["fused_vs_aten"]
            lines.append(f"| {r['op']} | {r['shape']}: {r['what']} | {_f(f['median'])} [{_f(f['p25'])}-{_f(f['p75'])}] "
                         f"| {_f(a['median'])} [{_f(a['p25'])}-{_f(a['p75'])}] | {_f(q['median'], 2)} "
                         f"[{_f(q['p25'], 2)}-{_f(q['p75'], 2)}] |")
        else:
            lines.append(f"| {r['op']} | {r['what']} | - | {_f(a['median'])} [{_f(a['p25'])}-{_f(a['p75'])}] | - |")
    if report.get("graph_calls"):
        lines += ["", f"| graphed U-Net call | timestep | host us per call, the replay stubbed (budget "
                      f"{_f(report['graph_call_budget_us'], 0)}) | aten ops / aten launches |", "|---|---|---|---|"]
        for name, kinds in report["graph_calls"].items():
            for kind, r in kinds.items():
                u = r["us"]
                lines.append(f"| {name} | {kind} | {_f(u['median'])} [{_f(u['p25'])}-{_f(u['p75'])}] | "
                             f"{r['aten_dispatched']} / {r['aten_launches']} |")
    return "\n".join(lines)


def run(quick: bool = False, out_dir: Optional[Path] = None, rounds: Optional[int] = None,
        op_rounds: Optional[int] = None, train: bool = True) -> dict:
    """Measure the steps (inference and, with ``train``, training) and the ops; print the tables and
    notes; write ``host_model.json`` to ``out_dir`` (default ``benchmarks/results/latest``)."""
    import ldm_fast

    if not ldm_fast.backend.interpreting():
        raise RuntimeError("benchmarks.host_model needs TRITON_INTERPRET=1 (set before ldm_fast is imported) so the "
                           "library takes its kernel paths on CPU tensors; run it as python -m benchmarks --host-model")
    started = time.perf_counter()
    env = host.environment()
    config = unet_config(quick)
    n_rounds = {"steps": rounds or (3 if quick else 40), "ops": op_rounds or (3 if quick else 30),
                "op_calls": 20 if quick else 200}
    steps = {}
    with quiet_cpu(), ldm_fast.use_backend("triton"):
        with torch.no_grad():
            log(f"host-model: inference steps, {n_rounds['steps']} rounds")
            steps["inference"] = measure_steps(config, False, n_rounds["steps"])
        if train:
            log(f"host-model: training steps, {n_rounds['steps']} rounds")
            steps["training"] = measure_steps(config, True, n_rounds["steps"])
        log(f"host-model: ops, {n_rounds['ops']} rounds")
        ops = measure_ops(n_rounds["ops"], n_rounds["op_calls"])
        with torch.no_grad():
            log(f"host-model: graphed calls, {n_rounds['ops']} rounds")
            graph_calls = measure_graph_calls(config, n_rounds["ops"], 5 if quick else 20)
    report = {
        "kind": "host_model", "command": "python -m benchmarks --host-model" + (" --quick" if quick else ""),
        "environment": env, "label": CPU_LABEL, "quick": quick, "rounds": n_rounds,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "inputs": {"batch": 2, "latents": [4, 8, 8], "context_tokens": 77, "t": 500, "dtype": "float32"},
        "constants": CONSTANTS, "direct_guard_us": _GUARD.get("us"), "steps": steps, "ops": ops,
        "graph_calls": graph_calls, "graph_call_budget_us": GRAPH_CALL_BUDGET_US,
    }
    report["notes"] = notes(env, config, n_rounds, steps, ops)
    report["h100_eager_step_ms"] = H100_EAGER_STEP_MS
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(step_table(steps))
    print()
    print(op_table(ops))
    print()
    print(graph_table(graph_calls))
    print("\n".join(report["notes"]))
    out_dir = Path(out_dir) if out_dir else RESULTS / "latest"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "host_model.json").write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {out_dir / 'host_model.json'} ({report['seconds']:.0f}s)")
    return report


# ---------------------------------------------------------------------------------------------
# where the time goes


def profile(variant: str, train: bool = False, steps: int = 20, top: int = 25, quick: bool = False) -> str:
    """cProfile of ``steps`` steps of ``variant`` (launches stubbed): the top functions by self time,
    then the top ones in ldm_fast's own code (``ldm_fast/``, ``kernels/``), with calls per step and
    µs per call. cProfile inflates every Python call: rank with it, size with the timed rows."""
    import ldm_fast

    entry = step_entry(unet_config(quick), VARIANTS[variant], train)
    prof = cProfile.Profile()
    with quiet_cpu(), ldm_fast.use_backend("triton"), torch.set_grad_enabled(train), launch_boundary():
        for i in range(steps + 2):
            if entry["prepare"]:
                entry["prepare"]()
            if i >= 2:  # two warm-up steps
                prof.enable()
            entry["call"]()
            prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, tt, _, _) in stats.values())
    repo = str(Path(__file__).resolve().parent.parent)

    def name(file: str, line: int, fn: str) -> str:
        if not line:
            return fn
        return f"{os.path.relpath(file, repo) if file.startswith(repo) else Path(file).name}:{line} {fn}"

    def ours(file: str) -> bool:
        return file.startswith(os.path.join(repo, "ldm_fast")) or file.startswith(os.path.join(repo, "kernels"))

    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])
    lines = [f"cProfile, {variant}, {'training' if train else 'inference'}, {steps} steps, launches stubbed: "
             f"{total / steps * 1e3:.1f} ms/step under the profiler (self times sum)"]
    for title, rows in (("all functions", ranked[:top]),
                        ("ldm_fast's own functions", [kv for kv in ranked if ours(kv[0][0])][:top])):
        ours_total = sum(v[2] for k, v in ranked if ours(k[0]))
        lines += ["", f"top {top} by self time, {title}" + (
            f" (ldm_fast's self time in all: {ours_total / steps * 1e3:.2f} ms/step)" if "ldm_fast" in title else ""),
                  f"{'self ms/step':>12} {'cum ms/step':>11} {'calls/step':>10} {'self us/call':>12}  function"]
        for (file, line, fn), (_, nc, tt, ct, _) in rows:
            lines.append(f"{tt / steps * 1e3:12.3f} {ct / steps * 1e3:11.3f} {nc / steps:10.1f} "
                         f"{tt / nc * 1e6:12.2f}  {name(file, line, fn)}")
    return "\n".join(lines)


BLOCK_TYPES = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention", "FeedForward", "GEGLU",
               "Timesteps")


def blocks(variant: str, rounds: int = 40, quick: bool = False) -> str:
    """Host cost per block call, diffusers eager against ``variant``, inference, launches stubbed:
    each block type's calls of one step (inputs captured with a forward pre-hook on that type only,
    removed before timing) re-run in interleaved rounds with their aten replay, as the step rows:
    ``CPU - replay`` per call (the Python around the aten launches), and the difference per round.
    Block calls nest (a Transformer2DModel holds a BasicTransformerBlock, which holds Attentions)."""
    import ldm_fast

    config = unet_config(quick)
    names = (EAGER, variant)
    lines = [f"CPU - aten replay per block call (us, median [IQR] of {rounds} interleaved rounds), inference, "
             f"{variant} against diffusers eager, launches stubbed",
             f"{'block':22} {'calls/step':>10} {'eager':>7} {'optimized':>9} {'difference per call':>22} "
             f"{'ms/step':>8}"]
    with quiet_cpu(), ldm_fast.use_backend("triton"), torch.no_grad(), launch_boundary():
        models = {name: step_entry(config, VARIANTS[name], False) for name in names}
        for block_type in BLOCK_TYPES:
            entries, n = {}, {}
            for name, entry in models.items():
                calls: list = []
                hooks = [m.register_forward_pre_hook(lambda mod, a, k: calls.append((mod, a, k)), with_kwargs=True)
                         for m in entry["model"].modules() if type(m).__name__ == block_type]
                entry["call"]()
                for h in hooks:
                    h.remove()
                n[name] = len(calls)

                def run(calls=calls):
                    for mod, a, k in calls:
                        mod(*a, **k)

                run()
                recorder = StepRecorder()
                with recorder:
                    run()
                entries[f"T|{name}"] = {"call": run}
                entries[f"R|{name}"] = {"call": replayer(recorder.replay)}
            if not n[EAGER] or not n[variant]:
                continue
            s = interleaved_rounds(entries, rounds)
            per_call = {name: [(t - r) / n[name] for t, r in zip(s[f"T|{name}"], s[f"R|{name}"])] for name in names}
            d = summary([o - e for e, o in zip(per_call[EAGER], per_call[variant])])
            lines.append(f"{block_type:22} {n[variant]:10d} {statistics.median(per_call[EAGER]):7.1f} "
                         f"{statistics.median(per_call[variant]):9.1f} {d['median']:+9.1f} [{d['p25']:+.0f}, "
                         f"{d['p75']:+.0f}]   {d['median'] * n[variant] / 1e3:+7.2f}")
    return "\n".join(lines)


def main(argv=None, quick: bool = False, out_dir: Optional[Path] = None) -> int:
    """Entry point of ``python -m benchmarks --host-model``. The ldm_fast kernel paths are taken on
    CPU tensors only under Triton's interpreter, so without ``TRITON_INTERPRET=1`` (a CUDA machine)
    it runs itself in a subprocess that sets it (and hides the GPU: this is a CPU instrument)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_model", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", default=quick, help="tiny U-Net, few rounds")
    parser.add_argument("--out", default=str(out_dir) if out_dir else None, help="directory for host_model.json")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per step (default 40)")
    parser.add_argument("--op-rounds", type=int, default=None, help="interleaved rounds per op (default 30)")
    parser.add_argument("--no-train", action="store_true", help="inference steps only")
    parser.add_argument("--profile", default=None, choices=list(VARIANTS),
                        help="instead: cProfile one variant's step (launches stubbed), top functions by self time")
    parser.add_argument("--profile-train", action="store_true", help="with --profile: the training step")
    parser.add_argument("--blocks", default=None, choices=list(VARIANTS),
                        help="instead: host cost per block call (ResNet, transformer, attention, ...), diffusers "
                             "eager against this variant, inference, launches stubbed")
    parser.add_argument("--readme", default=None, metavar="JSON",
                        help="instead: print the markdown tables of benchmarks/README.md from a host_model.json")
    args = parser.parse_args(argv if argv is not None else [])
    if args.readme:
        print(readme_table(json.loads(Path(args.readme).read_text())))
        return 0
    from ldm_fast import backend

    if not backend.interpreting():
        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([str(repo)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        cmd = [sys.executable, "-m", "benchmarks.host_model"] + (["--quick"] if args.quick else [])
        cmd += ["--out", args.out] if args.out else []
        cmd += ["--rounds", str(args.rounds)] if args.rounds else []
        cmd += ["--op-rounds", str(args.op_rounds)] if args.op_rounds else []
        cmd += ["--no-train"] if args.no_train else []
        cmd += ["--profile", args.profile] if args.profile else []
        cmd += ["--profile-train"] if args.profile_train else []
        cmd += ["--blocks", args.blocks] if args.blocks else []
        return subprocess.call(cmd, cwd=repo, env=env)
    if args.profile:
        print(profile(args.profile, train=args.profile_train, quick=args.quick))
        return 0
    if args.blocks:
        print(blocks(args.blocks, rounds=args.rounds or (3 if args.quick else 40), quick=args.quick))
        return 0
    run(quick=args.quick, out_dir=Path(args.out) if args.out else None, rounds=args.rounds,
        op_rounds=args.op_rounds, train=not args.no_train)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
