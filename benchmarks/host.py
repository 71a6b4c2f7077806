"""Host µs per call of every op, beside the floors a call cannot go below: ``python -m benchmarks --host``.

At diffusion shapes a fused kernel runs in 2-20 µs on an H100, so what a user sees is often the
host's time per call: the Python, the dispatch and the Triton launch machinery between the call and
the GPU (benchmarks/results/h100-2026-11-22-baseline-797cde7.md). This instrument measures, in ONE run on one machine,
for each case of the bench files (the forward cases; the ``bwd-*`` cases call the torch.library
backward op directly, which is the torch.compile path, so they are replaced here by GroupNorm
forward+backward cases that run the user's path, autograd through ``functional.group_norm``):

* **ldm_fast host µs per call**: wall time of N back-to-back calls of ``case.fused(inputs)`` under
  ``use_backend("triton")`` / N, after warm-up (CUDA: synchronized before and after the loop; the
  loop is host-bound when the per-call host time exceeds the GPU time, which is what it measures;
  the GPU time of the same call, ``gpu_time_ms``, is reported beside it so a reader sees which bound
  applies). ``issue µs``, the loop's time before the final synchronize, is recorded too.
* **ldm_fast with launches stubbed**: the same loop with ``JITFunction.run`` replaced by a no-op:
  the Python around the launches (what remains when the launch itself costs nothing).
* **eager host µs per call** of ``case.eager(inputs)``, the same way.
* **floors**: ``torch.empty_like`` of the output, an aten ``add_`` on a 16-element tensor, and the
  BARE launch of the very Triton launches the op made: ``JITFunction.run`` is wrapped during one
  call of the op to record each launch (kernel, grid, arguments, keyword arguments), then those
  launches are re-issued back-to-back as ``kernel[grid](*args, **kwargs)``. ``ldm_fast / bare`` is
  the ratio the targets are stated in.
* **launches per call**: Triton launches captured (plus aten ops the fused path runs around them,
  counted at dispatch) and the eager baseline's aten ops (:class:`benchmarks.traffic.DispatchCounter`,
  ops on non-scalar tensors), beside the launch-count targets.

Without a GPU the kernels would run in Triton's interpreter, whose speed means nothing for host
time: one real interpreted call captures the launches (and their count), then the timing loop runs
with the launches stubbed ("CPU, launches stubbed: the Python around the launches"); eager is
timed doing its math on the CPU (labelled CPU; not comparable to a GPU's host time); the
bare-launch floor and the GPU columns are skipped with the reason printed.

Writes ``benchmarks/results/latest/host.json`` (and on CUDA merges the cases into
``benchmarks/results/<gpu-name>-host.json``) with the machine, versions and date.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import ldm_fast

from .common import BENCH_DIR, DTYPES, Case, discover, gpu_time_ms

REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
STUBBED_LABEL = "CPU, launches stubbed: the Python around the launches"
#: The direct launcher's host µs per launch against the compiled kernel's launcher called alone.
DIRECT_MAX_RATIO = 1.5
#: The targets (stated in host µs against the bare launch, and in launches per call).
ONE_LAUNCH_MAX_RATIO = 1.5
GN_BWD_MAX_LAUNCHES = 3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    """HEAD of the repository, with ``+uncommitted`` when the tracked files differ from it (read-only:
    no index refresh, so a concurrent commit is never blocked)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "diff", "--quiet", "HEAD"],
                               capture_output=True, timeout=30).returncode
        return head.stdout.strip() + ("+uncommitted" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def use_cuda() -> bool:
    """Real GPU measurements: a CUDA device, and kernels compiled (not interpreted)."""
    return torch.cuda.is_available() and not ldm_fast.backend.interpreting()


def no_gpu_reason() -> str:
    return "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 is set (kernels interpreted)"


def gpu_name() -> Optional[str]:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_file_stem() -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", gpu_name() or "cpu").strip("_")


def environment() -> dict:
    """Machine, versions and date, recorded with every result."""
    import triton

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": "cuda" if use_cuda() else "cpu",
        "gpu": gpu_name() if use_cuda() else None,
        "gpu_skipped": None if use_cuda() else no_gpu_reason(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers_version,
        "cuda": torch.version.cuda, "ldm_fast": ldm_fast.__version__,
        # a copy without .git (a device machine's): the commit its runner passes as LDM_FAST_COMMIT
        "ldm_fast_commit": _git_commit() or os.environ.get("LDM_FAST_COMMIT"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def per_call_us(fn: Callable[[], Any], device: torch.device, *, target_s: float, repeats: int,
                min_n: int = 5, max_n: int = 2000) -> dict:
    """Host µs per call of ``fn``: N back-to-back calls (N sized so one loop takes about
    ``target_s``), synchronized before and after the loop on CUDA, after warm-up; the median of
    ``repeats`` loops. ``issue_us``: the same loops timed before the final synchronize."""
    sync = _sync(device)
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    n = int(min(max_n, max(min_n, target_s / max(one, 1e-7))))
    for _ in range(min(n, 20)):  # warm-up (caches, allocator)
        fn()
    sync()
    totals, issues = [], []
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            totals.append((t2 - t0) / n * 1e6)
            issues.append((t1 - t0) / n * 1e6)
    finally:
        if was_enabled:
            gc.enable()
    return {"us": statistics.median(totals), "issue_us": statistics.median(issues), "n": n, "repeats": repeats,
            "samples_us": [round(s, 3) for s in totals]}


# ---------------------------------------------------------------------------------------------
# launches: captured, stubbed, re-issued


def _run_classes() -> list:
    """The classes whose ``run`` is the innermost launch: ``JITFunction`` (compiled) and
    ``InterpretedFunction`` (TRITON_INTERPRET=1). Autotune/heuristics wrappers call into them."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported triton has it
        pass
    return classes


@contextlib.contextmanager
def _patched_run(make_run: Callable[[Callable], Callable]):
    """Every launch through ``run`` made by ``make_run(original run)`` while active; ldm_fast's direct
    launches (kernels/_launch.py) are off meanwhile, so every launch reaches ``run``."""
    from ldm_fast.kernels._launch import Switch

    saved = [(cls, cls.__dict__["run"]) for cls in _run_classes() if "run" in cls.__dict__]
    direct, Switch.enabled = Switch.enabled, False
    for cls, original in saved:
        cls.run = make_run(original)
    try:
        yield
    finally:
        Switch.enabled = direct
        for cls, original in saved:
            cls.run = original


def _noop_run(original):
    def run(self, *args, grid, warmup, **kwargs):
        return None

    return run


def stub_launches():
    """Every Triton launch becomes a no-op while active (the Python around the launches remains)."""
    return _patched_run(_noop_run)


def capture_launches(fn: Callable[[], Any], dispatch=None) -> tuple[Any, list[dict]]:
    """Run ``fn()`` once with every Triton launch recorded (``fn_self``, grid, args, kwargs); warm-up
    (compile-only) calls are not launches. ``dispatch`` (a DispatchCounter) is paused while a launch
    runs, so the interpreter's own host copies are not charged to the fused path."""
    launches: list[dict] = []

    def make_run(original):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            launches.append({"fn": self, "grid": grid, "args": args, "kwargs": dict(kwargs)})
            if dispatch is not None:
                dispatch.paused += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                if dispatch is not None:
                    dispatch.paused -= 1

        return run

    with _patched_run(make_run):
        result = fn()
    return result, launches


def relaunch(launches: list[dict]) -> Callable[[], None]:
    """A function that re-issues the captured launches back-to-back, each as ``kernel[grid](*args, **kwargs)``."""
    plan = [(l["fn"], l["grid"], l["args"], l["kwargs"]) for l in launches]

    def bare():
        for fn, grid, args, kwargs in plan:
            fn[grid](*args, **kwargs)

    return bare


def relaunch_direct(launches: list[dict]) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two functions re-issuing the captured launches back-to-back: through ldm_fast's direct launcher
    (``kernels/_launch.Kernel``: the facts, the cache lookup, then the compiled kernel's launcher) and
    through the compiled kernel's launcher alone with the arguments prepared once (the floor a direct
    launch cannot go below). CUDA only; each launch is made once first to fill the cache."""
    from ldm_fast.kernels._launch import Kernel, Switch

    kernels = [(Kernel(l["fn"]), l["grid"], l["args"], l["kwargs"]) for l in launches]

    def direct():
        saved, Switch.enabled = Switch.enabled, True
        try:
            for k, grid, args, kwargs in kernels:
                k[grid](*args, **kwargs)
        finally:
            Switch.enabled = saved

    direct()  # each launch once through kernel[grid]: the compiled kernels are kept
    stream = torch.cuda.current_stream().cuda_stream
    prepared = []
    for k, grid, args, kwargs in kernels:
        (run, function, metadata, tail, _), = k._cache.values()
        g = tuple(grid) + (1, 1)
        prepared.append((run, (g[0], g[1], g[2], stream, function, metadata, None, None, None, *args, *tail)))

    def compiled():
        for run, call in prepared:
            run(*call)

    return direct, compiled


def _kernel_name(launch: dict) -> str:
    fn = getattr(launch["fn"], "fn", None)
    return getattr(fn, "__qualname__", None) or getattr(launch["fn"], "__name__", repr(launch["fn"]))


def _grid_repr(grid) -> Any:
    if callable(grid):
        return repr(grid)
    return [int(g) for g in grid]


def _first_tensor(value) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


# ---------------------------------------------------------------------------------------------
# GroupNorm forward+backward through autograd (the user's training path)

#: (kind, batch, channels, side, dtype): the quick ones match the quick backward cases of
#: bench_group_norm.py (one-pass backward; split backward); the full run adds the two fwd+bwd rows of
#: h100-baseline.md (b8 320x64x64 and b8 1280x16x16 bf16).
FWD_BWD_QUICK = [("unet", 1, 1280, 8, "fp16"), ("unet", 1, 640, 32, "bf16")]
FWD_BWD_FULL = FWD_BWD_QUICK + [("unet", 8, 320, 64, "bf16"), ("unet", 8, 1280, 16, "bf16")]


def fwd_bwd_case(kind: str, batch: int, channels: int, side: int, dtype_name: str) -> Case:
    """``y = group_norm(x, 32, w, b, eps, activation="silu")`` then ``autograd.grad(y, (x, w, b), dy)``:
    the fused path through ``ldm_fast.functional.group_norm`` (its autograd.Function and both
    launchers), the eager path ``F.silu(F.group_norm(...))`` and its autograd backward."""
    import torch.nn.functional as TF

    from ldm_fast import functional as F

    from . import bench_group_norm as gn

    eps = 1e-5 if kind == "unet" else 1e-6

    def make(device):
        inputs = gn._make(batch, channels, side, DTYPES[dtype_name])(device)
        g = torch.Generator(device="cpu").manual_seed(1)
        dy = torch.randn(inputs["x"].shape, generator=g).to(device=device, dtype=inputs["x"].dtype)
        x, w, b = (inputs[k].clone().requires_grad_() for k in ("x", "weight", "bias"))
        return {"x": x, "weight": w, "bias": b, "dy": dy}

    def fused(i):
        y = F.group_norm(i["x"], gn.GROUPS, i["weight"], i["bias"], eps, activation="silu")
        return torch.autograd.grad(y, (i["x"], i["weight"], i["bias"]), i["dy"])

    def eager(i):
        y = TF.silu(TF.group_norm(i["x"], gn.GROUPS, i["weight"], i["bias"], eps))
        return torch.autograd.grad(y, (i["x"], i["weight"], i["bias"]), i["dy"])

    def min_bytes(i):
        x = i["x"]
        return 4 * x.numel() * x.element_size()  # x, dy read; y (forward), dx written; parameters ignored

    return Case("group_norm", f"fwdbwd-{kind}-{channels}x{side}x{side}-b{batch}-{dtype_name}", make, fused, eager,
                min_bytes, quick=(kind, batch, channels, side, dtype_name) in FWD_BWD_QUICK)


def host_cases(ops: Optional[list[str]] = None, quick: bool = False) -> tuple[list[tuple[Case, str]], list[str]]:
    """``[(case, "forward" | "forward+backward")]`` and the notes on what was left out and why."""
    found, notes = [], []
    dropped = []
    for case in discover(ops, quick=quick):
        if case.name.startswith("bwd-"):
            dropped.append(case.id)
            continue
        found.append((case, "forward"))
    if dropped:
        notes.append(f"left out {len(dropped)} bwd-* cases ({', '.join(dropped)}): they call the torch.library "
                     "backward op directly (the torch.compile path); the fwdbwd-* rows time the user's path instead "
                     "(autograd through functional.group_norm)")
    if ops is None or "group_norm" in ops:
        for spec in (FWD_BWD_QUICK if quick else FWD_BWD_FULL):
            found.append((fwd_bwd_case(*spec), "forward+backward"))
    return found, notes


# ---------------------------------------------------------------------------------------------
# one case


def _launch_target(case: Case, kind: str, inputs: dict) -> Optional[dict]:
    """The launch-count target of a GroupNorm row: forward 1 on the one-pass path, at most 2 split;
    backward at most 3 more."""
    if case.op != "group_norm":
        return None
    from ldm_fast.kernels.group_norm import one_pass_fits

    x = inputs["x"]
    one_pass = one_pass_fits(tuple(x.shape), 32, dtype=x.dtype)
    fwd = 1 if one_pass else 2
    if kind == "forward":
        return {"max": fwd, "exact": one_pass, "why": "forward: 1 launch (one pass)" if one_pass
                else "forward: at most 2 launches (split)"}
    return {"max": fwd + GN_BWD_MAX_LAUNCHES, "exact": False,
            "why": f"forward {'1 (one pass)' if one_pass else '<= 2 (split)'} + backward <= {GN_BWD_MAX_LAUNCHES}"}


def _count_eager(case: Case, inputs: dict, kind: str) -> dict:
    from .traffic import DispatchCounter

    counter = DispatchCounter()
    grad = torch.enable_grad() if kind == "forward+backward" else torch.no_grad()
    with grad, counter:
        case.eager(inputs)
    s = counter.summary()
    return {"aten_launches": s["launches"], "aten_ops": {o["op"]: o["launches"] for o in s["ops"] if o["launches"]}}


def measure_case(case: Case, kind: str, device: torch.device, *, quick: bool, add_floor: Optional[dict] = None) -> dict:
    """Every host number of one case (see the module docstring), as a JSON-able dict."""
    from .traffic import DispatchCounter

    cuda = device.type == "cuda"
    target_s, repeats = (0.25, 5) if cuda else ((0.03, 3) if quick else (0.1, 5))
    timing = dict(target_s=target_s, repeats=repeats, max_n=2000 if cuda else 500)
    started = time.perf_counter()
    inputs = case.make(device)
    grad_ctx = torch.enable_grad if kind == "forward+backward" else torch.no_grad
    before = ldm_fast.ops.kernel_launches.copy()
    dispatch = DispatchCounter()

    def fused():
        return case.fused(inputs)

    def eager():
        return case.eager(inputs)

    rec: dict = {"case": case.id, "op": case.op, "name": case.name, "kind": kind, "device": device.type}
    with grad_ctx(), ldm_fast.use_backend("triton"):
        if cuda:
            fused()  # compile outside the capture
            torch.cuda.synchronize()
        with dispatch:
            out, launches = capture_launches(fused, dispatch)
    op_launches = ldm_fast.ops.kernel_launches[case.op] - before[case.op]
    if cuda:
        torch.cuda.synchronize()
    rec["fused"] = {
        "triton_launches": len(launches),
        "aten_launches": dispatch.launches,
        "aten_ops": {o["op"]: o["launches"] for o in dispatch.summary()["ops"] if o["launches"]},
        "kernels": [{"kernel": _kernel_name(l), "grid": _grid_repr(l["grid"])} for l in launches],
        "ldm_fast_kernel_launches": op_launches,
    }
    rec["fused"]["launches"] = rec["fused"]["triton_launches"] + rec["fused"]["aten_launches"]
    rec["eager"] = _count_eager(case, inputs, kind)
    problems = []
    if not launches:
        problems.append("no Triton launch captured during the fused call: an eager fallback, or a launch path "
                        "other than JITFunction.run (the bare-launch floor then has nothing to re-issue)")
    target = _launch_target(case, kind, inputs)
    if target:
        ok = len(launches) == target["max"] if target["exact"] else len(launches) <= target["max"]
        rec["launch_target"] = {**target, "met": ok}

    # timings
    with grad_ctx():
        with ldm_fast.use_backend("triton"):
            if cuda:
                rec["fused"]["host"] = {**per_call_us(fused, device, **timing), "label": "CUDA wall time per call"}
            else:
                rec["fused"]["host"] = {"skipped": f"{no_gpu_reason()}: the kernels would run in Triton's "
                                                  "interpreter, whose time means nothing for host cost"}
            with stub_launches():
                rec["fused"]["stubbed"] = {**per_call_us(fused, device, **timing),
                                           "label": STUBBED_LABEL if not cuda else
                                           "CUDA host, launches stubbed: the Python around the launches"}
        rec["eager"]["host"] = {**per_call_us(eager, device, **timing),
                                "label": "CUDA wall time per call" if cuda else
                                "CPU (eager PyTorch doing the math on the CPU)"}
        y = _first_tensor(out)
        floors: dict = {}
        if y is not None:
            floors["empty_like"] = {**per_call_us(lambda: torch.empty_like(y), device, **timing),
                                    "label": "CUDA" if cuda else "CPU", "of": list(y.shape)}
        if add_floor is not None:
            floors["add_"] = add_floor
        if cuda and launches:
            bare = relaunch(launches)
            floors["bare_launch"] = {**per_call_us(bare, device, **timing), "launches": len(launches),
                                     "label": "CUDA: the captured launches re-issued as kernel[grid](*args, **kwargs)"}
            direct, compiled = relaunch_direct(launches)
            floors["direct_launch"] = {**per_call_us(direct, device, **timing), "launches": len(launches),
                                       "label": "CUDA: the same launches through ldm_fast's direct launcher"}
            floors["compiled_launch"] = {**per_call_us(compiled, device, **timing), "launches": len(launches),
                                         "label": "CUDA: the compiled kernels' launchers, arguments prepared once"}
        elif cuda:
            floors["bare_launch"] = {"skipped": "no launch captured to re-issue"}
        else:
            floors["bare_launch"] = {"skipped": f"{no_gpu_reason()}: a Triton launch on the CPU runs the "
                                                "interpreter, so its host cost means nothing; measure on a GPU"}
        rec["floors"] = floors
        if cuda:
            with ldm_fast.use_backend("triton"):
                rec["fused"]["gpu_us"] = gpu_time_ms(fused) * 1e3
            rec["eager"]["gpu_us"] = gpu_time_ms(eager) * 1e3
            torch.cuda.synchronize()

    # ratios and the host targets (real numbers only on CUDA)
    bare_us = floors.get("bare_launch", {}).get("us")
    fused_us = rec["fused"]["host"].get("us")
    rec["fused_over_bare"] = fused_us / bare_us if fused_us and bare_us else None
    direct_us = floors.get("direct_launch", {}).get("us")
    compiled_us = floors.get("compiled_launch", {}).get("us")
    rec["direct_over_compiled"] = direct_us / compiled_us if direct_us and compiled_us else None
    rec["fused_over_eager"] = fused_us / rec["eager"]["host"]["us"] if fused_us else None
    host_targets = []
    if len(launches) == 1 and kind == "forward":
        host_targets.append({"what": f"one-launch op: ldm_fast host <= {ONE_LAUNCH_MAX_RATIO}x the bare launch",
                             "value": rec["fused_over_bare"],
                             "met": None if rec["fused_over_bare"] is None
                             else rec["fused_over_bare"] <= ONE_LAUNCH_MAX_RATIO})
    if rec["direct_over_compiled"] is not None:
        host_targets.append({"what": f"direct launch <= {DIRECT_MAX_RATIO}x the compiled kernel's launcher",
                             "value": rec["direct_over_compiled"],
                             "met": rec["direct_over_compiled"] <= DIRECT_MAX_RATIO})
    if case.op == "group_norm":
        host_targets.append({"what": "GroupNorm: ldm_fast host below eager PyTorch's", "value": rec["fused_over_eager"],
                             "met": None if rec["fused_over_eager"] is None else rec["fused_over_eager"] < 1.0})
    for t in host_targets:
        if t["met"] is None:
            t["not_judged"] = f"{no_gpu_reason()}: host targets are judged on a GPU only"
    rec["host_targets"] = host_targets
    rec["problems"] = problems
    rec["seconds"] = round(time.perf_counter() - started, 2)
    del inputs, out, launches
    return rec


# ---------------------------------------------------------------------------------------------
# the run


def _fmt(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.1f}" if x < 10000 else f"{x:.0f}"


def table(records: list[dict], cuda: bool) -> str:
    unit = "" if cuda else " (CPU)"
    headers = ["case", "launch f/e (target)", "ldm_fast us", f"stubbed us{unit}", f"eager us{unit}",
               f"empty_like us{unit}", f"add_ us{unit}", "bare launch us", "f/bare", "direct / compiled us",
               "GPU us f/e", "targets"]
    rows = []
    for r in records:
        if "error" in r or "skipped" in r:
            rows.append([r["case"], "ERROR" if "error" in r else "skip", *["-"] * (len(headers) - 3),
                         (r.get("error") or r["skipped"])[:60]])
            continue
        f, e, fl = r["fused"], r["eager"], r["floors"]
        lt = r.get("launch_target")
        launches = f"{f['triton_launches']}" + (f"+{f['aten_launches']}a" if f["aten_launches"] else "")
        launches += f"/{e['aten_launches']}"
        if lt:
            launches += f" ({'=' if lt['exact'] else '<='}{lt['max']} {'ok' if lt['met'] else 'MISS'})"
        verdicts = []
        for t in r["host_targets"]:
            verdicts.append("n/a" if t["met"] is None else ("ok" if t["met"] else "MISS"))
        bare = fl.get("bare_launch", {})
        rows.append([
            r["case"] + ("" if r["kind"] == "forward" else " [fwd+bwd]"),
            launches,
            _fmt(f["host"].get("us")) if "us" in f["host"] else "skip",
            _fmt(f["stubbed"]["us"]),
            _fmt(e["host"]["us"]),
            _fmt(fl.get("empty_like", {}).get("us")),
            _fmt(fl.get("add_", {}).get("us")),
            _fmt(bare.get("us")) if "us" in bare else "skip",
            f"{r['fused_over_bare']:.2f}x" if r.get("fused_over_bare") else "-",
            (f"{_fmt(fl['direct_launch']['us'])}/{_fmt(fl['compiled_launch']['us'])}"
             if "us" in fl.get("direct_launch", {}) else "skip"),
            f"{_fmt(f.get('gpu_us'))}/{_fmt(e.get('gpu_us'))}" if cuda else "skip",
            ",".join(verdicts) or "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def run(ops: Optional[list[str]] = None, quick: bool = False, out_dir: Optional[Path] = None,
        cases: Optional[list[tuple[Case, str]]] = None, write: bool = True, max_mb: Optional[float] = None) -> dict:
    """Measure the cases (``cases`` or those of :func:`host_cases`), print the table and notes, write
    ``host.json`` to ``out_dir`` (default ``benchmarks/results/latest``) and, on CUDA,
    ``benchmarks/results/<gpu-name>-host.json``. ``max_mb``: skip (with the reason) cases whose
    minimum traffic exceeds this many MB (on a CPU the one interpreted call takes minutes on the
    largest shapes). Returns the report."""
    started = time.perf_counter()
    cuda = use_cuda()
    device = torch.device("cuda" if cuda else "cpu")
    notes = []
    if cases is None:
        cases, notes = host_cases(ops, quick)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # a shared 2-core machine: one thread stalls less on busy cores
    try:
        return _run(cases, notes, cuda, device, quick, out_dir, write, started, max_mb)
    finally:
        torch.set_num_threads(threads)


def _run(cases, notes, cuda, device, quick, out_dir, write, started, max_mb) -> dict:
    env = environment()
    log(f"host cost per call: {len(cases)} cases on {env['gpu'] if cuda else 'the CPU (' + env['cpu'] + ')'}"
        f"{' (quick subset)' if quick else ''}")
    if not cuda:
        log(f"GPU measurements skipped: {no_gpu_reason()}. ldm_fast is timed with its launches stubbed "
            f"({STUBBED_LABEL}); eager and the floors are CPU timings; the bare-launch floor needs a GPU.")
    small = torch.zeros(16, device=device)
    add_floor = {**per_call_us(lambda: small.add_(1.0), device, target_s=0.1 if cuda else 0.03,
                               repeats=5 if cuda else 3, max_n=5000),
                 "label": "CUDA" if cuda else "CPU", "of": [16]}
    records = []
    for i, (case, kind) in enumerate(cases, 1):
        if max_mb is not None:
            try:  # the size without allocating it
                min_bytes = case.min_bytes(case.make(torch.device("meta")))
            except Exception:
                min_bytes = case.min_bytes(case.make(torch.device("cpu")))
            if min_bytes > max_mb * 1e6:
                rec = {"case": case.id, "op": case.op, "name": case.name, "kind": kind,
                       "skipped": f"min {min_bytes / 1e6:.0f} MB > --traffic-max-mb {max_mb:g}"}
                log(f"[host {i}/{len(cases)}] {case.id} ({kind}): skipped ({rec['skipped']})")
                records.append(rec)
                continue
        try:
            rec = measure_case(case, kind, device, quick=quick, add_floor=add_floor)
        except Exception as e:  # reported in the table and the JSON, the other cases still run
            rec = {"case": case.id, "op": case.op, "name": case.name, "kind": kind,
                   "error": f"{type(e).__name__}: {e}"}
            log(f"[host {i}/{len(cases)}] {case.id} ({kind}): ERROR {rec['error'][:300]}")
            if cuda:
                torch.cuda.empty_cache()
        else:
            f = rec["fused"]
            real = f"ldm_fast {f['host']['us']:.1f} us, " if "us" in f["host"] else ""
            log(f"[host {i}/{len(cases)}] {case.id} ({kind}): {f['triton_launches']} launches, {real}"
                f"stubbed {f['stubbed']['us']:.1f} us, eager {rec['eager']['host']['us']:.1f} us"
                f"{'' if cuda else ' (CPU)'} ({rec['seconds']:.1f}s)")
        records.append(rec)

    text = table(records, cuda)
    if cuda:
        notes += [
            f"GPU: {env['gpu']}. Host us = wall time of N back-to-back calls / N, synchronized before and after the "
            "loop, median of 5 loops; host-bound where it exceeds the GPU us (triton.testing.do_bench median).",
            "stubbed: the same loop with JITFunction.run a no-op (the Python around the launches); bare launch: "
            "the captured launches re-issued as kernel[grid](*args, **kwargs).",
        ]
    else:
        notes += [
            f"CPU timings only ({no_gpu_reason()}; {env['cpu']}, {env['cpu_count']} cores, torch threads "
            f"{env['torch_threads']}, load average {env['load_average']}): 'stubbed' = "
            f"{STUBBED_LABEL}; 'eager' = eager PyTorch computing on the CPU, not comparable to a GPU's host time; "
            "empty_like and add_ floors on the CPU.",
            "ldm_fast us (real launches), the bare-launch floor, f/bare, GPU us and the host targets "
            "need a GPU: skipped. Launch counts are real (captured from one interpreted call).",
        ]
    notes.append(f"launch f/e: Triton launches (+ aten ops around them, 'a') of ldm_fast / aten ops of eager; "
                 f"targets: GroupNorm forward 1 launch one-pass, <= 2 split; backward <= {GN_BWD_MAX_LAUNCHES}; "
                 f"a one-launch op <= {ONE_LAUNCH_MAX_RATIO}x the bare launch; GroupNorm host < eager host.")
    print(text)
    print("\n".join(notes))
    misses = [f"{r['case']} ({r['kind']}): launches {r['fused']['triton_launches']} vs target "
              f"{r['launch_target']['why']}" for r in records
              if r.get("launch_target") and not r["launch_target"]["met"]]
    misses += [f"{r['case']} ({r['kind']}): {t['what']}: {t['value']:.2f}x" for r in records
               for t in r.get("host_targets", []) if t["met"] is False]
    for m in misses:
        print(f"TARGET MISSED {m}")
    for r in records:
        if "skipped" in r:
            print(f"SKIPPED {r['case']} ({r['kind']}): {r['skipped']}")
        for p in r.get("problems", []):
            print(f"PROBLEM {r['case']}: {p}")
        if "error" in r:
            print(f"ERROR {r['case']}: {r['error']}")

    report = {
        "kind": "host",
        "command": "python -m benchmarks --host" + (" --quick" if quick else ""),
        "environment": env,
        "method": {
            "host_us": "wall time of N back-to-back calls / N after warm-up, median of several loops"
                       + ("; torch.cuda.synchronize() before and after each loop" if cuda else ""),
            "fused": "case.fused(inputs) under ldm_fast.use_backend('triton')",
            "stubbed": "the same with triton JITFunction.run / InterpretedFunction.run replaced by a no-op",
            "bare_launch": "the launches captured from one call, re-issued as kernel[grid](*args, **kwargs)",
            "direct_launch": "the same launches through ldm_fast's direct launcher (kernels/_launch.py)",
            "compiled_launch": "the same launches through the compiled kernels' launchers, arguments prepared once",
            "launches": "fused: Triton launches captured + aten ops on non-scalar tensors around them; "
                        "eager: aten ops on non-scalar tensors (TorchDispatchMode)",
            "gpu_us": "triton.testing.do_bench median (CUDA only)",
        },
        "timing_label": "CUDA" if cuda else f"CPU ({STUBBED_LABEL} for ldm_fast)",
        "quick": quick,
        "cases": records,
        "notes": notes,
        "targets_missed": misses,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if write:
        write_report(report, "host", out_dir, cuda, started)
    return report


def write_report(report: dict, suffix: str, out_dir, cuda: bool, started: float,
                 key: Callable[[dict], str] = lambda rec: rec["case"]) -> list[Path]:
    """Write ``report`` to ``<out_dir or results/latest>/<suffix>.json`` and, on CUDA, merge its
    ``cases`` into ``results/<gpu-name>-<suffix>.json`` (:func:`merge_gpu_file`); log the paths."""
    out_dir = Path(out_dir) if out_dir else RESULTS / "latest"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suffix}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    written = [path]
    if cuda:
        written.append(merge_gpu_file(report, suffix, key))
    log(f"wrote {', '.join(map(str, written))} ({time.perf_counter() - started:.0f}s)")
    return written


def merge_gpu_file(report: dict, suffix: str, key: Callable[[dict], str] = lambda rec: rec["case"]) -> Path:
    """Merge a CUDA run's records into ``benchmarks/results/<gpu-name>-<suffix>.json``: the run's
    metadata replaces the file's, its records replace those with the same ``key`` and each record
    keeps the date and versions of the run that measured it."""
    path = RESULTS / f"{gpu_file_stem()}-{suffix}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    cases = data.get("cases") if isinstance(data.get("cases"), dict) else {}
    data.update({k: v for k, v in report.items() if k != "cases"})
    env = report["environment"]
    stamp = {k: env.get(k) for k in ("date", "gpu", "torch", "triton", "diffusers", "cuda", "ldm_fast_commit")}
    for rec in report["cases"]:
        cases[key(rec)] = {**rec, "measured": stamp}
    data["cases"] = cases
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ops", default="")
    parser.add_argument("--out", default=str(RESULTS / "latest"))
    args = parser.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    report = run(ops, args.quick, Path(args.out))
    return 1 if any("error" in r for r in report["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
