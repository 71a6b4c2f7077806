"""The GPU proof in one run: ``python -m benchmarks.gpu_session`` (``bash benchmarks/gpu_session.sh``).

A lent GPU gives a session about 15 minutes of device time in all and 10 minutes a command, so
this runs as ONE device call (timeout 600 s) under its own wall-clock budget (``--budget``, default
540 s), in tiers, most valuable first:

1. ``correctness`` (~3 min): ``tests/test_cuda_graphs.py`` (CUDA-graph capture + replay of every
   op, fresh noise per replay, q_sample's device-side t check, the attention kernels compiled
   against SDPA; ``optimize(cuda_graph=True)`` on a diffusers U-Net: graph replays counted and
   judged against eager and float64 for fp16/bf16, NCHW/channels_last, no_grad/inference_mode/CUDA
   autocast, after an in-place weight update and a LoRA fuse; CUDA autocast dtypes of group_norm
   and add_layer_norm; launches on a non-current device (two GPUs); attention past 65,535 batch x
   heads) and :mod:`benchmarks.gpu_checks` (every op compiled on the device against eager and
   float64: fp16/bf16, GroupNorm+SiLU NCHW and channels_last, forward and backward). On a GPU the
   tier fails on any test failure, on any skip but the two-GPU test's, and when diffusers cannot be
   imported (its model tests are part of the proof: a missing wheel fails loudly).
2. ``host`` (~2 min): host µs per call of every op (the quick cases of each bench file) against
   the bare ``kernel[grid]`` launch, and GPU µs per op against eager (:mod:`benchmarks.host`,
   ``--host --quick``).
3. ``e2e`` (~4 min): SD 1.5 configs with random weights (:mod:`benchmarks.e2e`): U-Net step b2 fp16
   (eager, optimize(), optimize(channels_last, cuda_graph), eager CUDA graph), VAE decode 1024 px
   (eager, optimize()), training step b8 bf16 (eager, optimize()); attention kernel vs SDPA at the
   VAE's D=512 (4096 and 16384 tokens) and SD's D=40/80.
4. ``extra`` (only with time left, item by item): the remaining attention cases and
   ``ldm_fast/attention_routes.json`` (``--write-routes``), torch.compile of the U-Net step
   (reduce-overhead and default, with and without optimize()), the 20-step DDIM loops.

Each tier runs in its own process (a crash, a device-side assert or a hang costs that tier only),
is skipped, with the reason written, when the time left is below its estimate
(:data:`ESTIMATE_S`: the issue's sizing on the GPU; :data:`DRY_ESTIMATE_S`: its measured CPU
rehearsal time), is killed :data:`KILL_GRACE_S` after the budget's end, and writes ``<out>/tier<N>-<name>.json`` the moment
it finishes (tiers 3 and 4 also after each step, so a tier cut off keeps what it measured). After
every tier the session file ``<out>/<gpu>-<date>-<commit>.json`` and its markdown summary are
rewritten (on a GPU also under ``benchmarks/results/``). ``<out>`` is ``$OUT`` when set (what the
device tool brings back), else ``benchmarks/results/latest/gpu-session``.

``--dry-run`` (or ``LDM_FAST_GPU_SESSION_DRY=1``): the same tiers on the CPU with tiny shapes, the
kernels interpreted (``TRITON_INTERPRET=1``), GPU-only steps skipped with their reason, in under 2
minutes on 2 cores, so an import error, a typo or a JSON bug fails CI (tests/test_gpu_session.py),
not the lent GPU.

diffusers is not on the GPU image: wheels found under ``.whl/`` are installed with ``pip install
--no-index --no-deps --target <tmp>`` and put on the tiers' ``PYTHONPATH``; without diffusers
tier 3's models report "unavailable" and the rest still runs. The one command that fetches them
(Python 3.12, manylinux x86_64; the image has diffusers' other dependencies)::

    python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --no-deps -d .whl diffusers==0.42.1 importlib_metadata

``--readme SESSION.json`` writes README.md's first-screen GPU paragraph (between
``<!-- gpu-summary:begin -->`` and ``<!-- gpu-summary:end -->``) from a session file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .common import BENCH_DIR

REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
TIERS = ("correctness", "host", "e2e", "extra")
#: Seconds a tier is expected to take on the lent GPU (the issue's sizing; tier 4 runs item by item,
#: so its entry is its smallest item) and in the CPU dry run (measured on 2 cores, rounded up).
ESTIMATE_S = {"correctness": 180, "host": 120, "e2e": 240, "extra": 60}
DRY_ESTIMATE_S = {"correctness": 45, "host": 25, "e2e": 30, "extra": 5}
#: Tier 4's items, most valuable first: (name, estimated GPU seconds, estimated dry-run seconds).
EXTRA_ITEMS = (("attention-routes", 60, 5), ("compile-reduce-overhead", 100, 1), ("compile", 100, 1),
               ("ddim20", 60, 20), ("compile-reduce-overhead+optimize", 100, 1), ("compile+optimize", 100, 1))
#: Tier 3: the scenarios and variants that decide the README's first screen.
E2E_PLAN = (("unet-step-b2", ("eager", "optimize", "optimize+cuda_graph", "eager+cuda_graph")),
            ("vae-decode-1024", ("eager", "optimize")), ("unet-train-b8", ("eager", "optimize")))
#: Tier 3's attention cases (``bench_attention`` shape names): the VAE's D=512, SD's D=40 and 80.
ATTENTION_TIER3 = ("vae-4096x4096-h1d512-b1-fp16", "vae-16384x16384-h1d512-b1-fp16",
                   "unet-self-4096x4096-h8d40-b2-fp16", "unet-self-1024x1024-h8d80-b2-fp16")
#: The skip reasons tier 1 accepts on a GPU (tests/test_cuda_graphs.py's TWO_GPUS): any other skip
#: there means a check did not run, and the tier fails.
ALLOWED_GPU_SKIPS = ("needs two CUDA devices",)
#: A tier running past the budget is killed this many seconds after it (the device call's 600 s
#: limit minus the default 540 s budget leaves 60 s: half for a tier that overruns its estimate).
KILL_GRACE_S = 30
README_BEGIN, README_END = "<!-- gpu-summary:begin -->", "<!-- gpu-summary:end -->"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tier_file(out: Path, name: str) -> Path:
    return out / f"tier{TIERS.index(name) + 1}-{name}.json"


def _write_json(path: Path, data: dict) -> None:
    """Write atomically (a kill mid-write never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the tiers (each runs in its own process: python -m benchmarks.gpu_session --run-tier NAME)


class TierContext:
    """What a tier needs: the device, whether this is the dry run, the deadline, and ``save`` to
    write what it has so far (a tier killed at the deadline keeps it)."""

    def __init__(self, name: str, out: Path, dry: bool, deadline: float) -> None:
        import torch

        from .host import environment, use_cuda

        self.name, self.out, self.dry, self.deadline = name, out, dry, deadline
        self.cuda = use_cuda()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.result: dict = {"tier": name, "status": "running", "dry_run": dry, "environment": environment()}

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self, **fields) -> None:
        self.result.update(fields)
        _write_json(tier_file(self.out, self.name), self.result)


class _Outcomes:
    """A pytest plugin that keeps each test's outcome, skip reason and recorded properties
    (``record_property``: the graph replay counts), the tier's record of the CUDA tests."""

    def __init__(self) -> None:
        self.outcomes: dict = {}
        self.skips: dict = {}
        self.properties: dict = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome
        if report.outcome == "skipped":
            longrepr = report.longrepr
            self.skips[report.nodeid] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
        if report.when == "call" and report.user_properties:
            self.properties[report.nodeid] = {k: v for k, v in report.user_properties}


def gate_pytest(rec: dict, dry: bool, diffusers_importable: bool) -> list[str]:
    """Why tier 1's pytest record fails on a GPU (empty: it passes): a failed test, a skip other than
    :data:`ALLOWED_GPU_SKIPS` (a check that did not run proves nothing), diffusers not importable.
    The dry run (no GPU: every test skips) only needs pytest's return code 0."""
    problems = [] if rec["rc"] == 0 else [f"pytest exited {rec['rc']}: failed {rec['failed']}"]
    if not dry:
        problems += [f"skipped on the GPU: {node}: {reason}" for node, reason in rec["skips"].items()
                     if not any(allowed in reason for allowed in ALLOWED_GPU_SKIPS)]
        if not diffusers_importable:
            problems.append("diffusers is NOT importable: the U-Net graph tests cannot run (put its wheel under .whl/: "
                            "the pip download command is in this module's docstring)")
    return problems


def tier_correctness(ctx: TierContext) -> None:
    import pytest

    from . import gpu_checks

    diffusers_importable = importlib.util.find_spec("diffusers") is not None
    if not diffusers_importable:
        log("[tier 1] " + ("diffusers is not importable (dry run: not required)" if ctx.dry else
                           "FAIL: diffusers is NOT importable: the U-Net CUDA-graph tests fail"))
    args = ["-q", "-p", "no:cacheprovider", "-rs", str(REPO / "tests" / "test_cuda_graphs.py")]
    plugin = _Outcomes()
    rc = int(pytest.main(args, plugins=[plugin]))  # in this process: no second torch import
    counts = {k: list(plugin.outcomes.values()).count(k) for k in ("passed", "failed", "skipped")}
    pytest_rec = {"command": "pytest " + " ".join(args), "rc": rc, "counts": counts,
                  "failed": [n for n, o in plugin.outcomes.items() if o == "failed"],
                  "skips": plugin.skips, "properties": plugin.properties, "diffusers_importable": diffusers_importable,
                  "summary": ", ".join(f"{v} {k}" for k, v in counts.items() if v)}
    problems = gate_pytest(pytest_rec, ctx.dry, diffusers_importable)
    pytest_rec["problems"] = problems
    log(f"[tier 1] pytest tests/test_cuda_graphs.py: rc {rc}, {pytest_rec['summary']}")
    for node, reason in plugin.skips.items():
        if not ctx.dry:
            log(f"[tier 1] skipped: {node}: {reason}")
    for problem in problems:
        log(f"[tier 1] FAIL: {problem}")
    ctx.save(pytest=pytest_rec)
    checks = gpu_checks.run_all(ctx.device, small=ctx.dry, log=log)
    failed = [c for c in checks if c["status"] != "ok"]
    lines = [f"{c['check']} {c['dtype']}: {c['status']}" + (f" ({c['error'][:200]})" if c.get("error") else "")
             for c in checks]
    graphs = [f"{node.split('::')[-1]}: {props}" for node, props in plugin.properties.items()]
    skipped = [] if ctx.dry else [f"skipped {node.split('::')[-1]}: {reason}" for node, reason in plugin.skips.items()]
    ctx.save(checks=checks, failed=len(failed),
             text="\n".join([f"pytest tests/test_cuda_graphs.py: {pytest_rec['summary']}"] + problems + skipped + graphs
                            + lines),
             status="ok" if not failed and not problems else "FAIL")


def tier_host(ctx: TierContext) -> None:
    from . import host

    cases, _ = host.host_cases(None, quick=True)  # every op, its quick cases: the tier fits its 2 minutes
    if ctx.dry:  # one case per op: the same code path, a fraction of the time
        first: dict = {}
        for case, kind in cases:
            first.setdefault(case.op, (case, kind))
        cases = list(first.values())
    report = host.run(cases=cases, quick=True, out_dir=ctx.out / "host", write=True)
    errors = [r["case"] for r in report["cases"] if "error" in r]
    ctx.save(report=report, text=host.table(report["cases"], ctx.cuda), status="FAIL" if errors else "ok",
             errors=errors)


def _attention(ctx: TierContext, names: Optional[list[str]]) -> list[dict]:
    from . import bench_attention

    try:
        return bench_attention.time_forward(names, ctx.device)
    except Exception as e:  # recorded; the tier goes on
        log(f"attention timing: ERROR {type(e).__name__}: {e}")
        return [{"error": f"{type(e).__name__}: {e}"[:2000]}]


def _attention_text(timings: list[dict]) -> str:
    lines = []
    for t in timings:
        if "error" in t:
            lines.append(f"ERROR {t['error'][:200]}")
        elif "fused_ms" in t:
            lines.append(f"{t['case']}: kernel {t['fused_ms'] * 1e3:.1f} us, SDPA {t['sdpa_ms'] * 1e3:.1f} us "
                         f"({t['sdpa_ms'] / t['fused_ms']:.2f}x)")
        else:
            lines.append(f"{t['case']}: {t['skipped']}")
    return "\n".join(lines)


def _e2e_calls(ctx: TierContext) -> dict:
    """The dry run times one call per variant (a rehearsal; the scenarios' own counts on the GPU)."""
    return {"iters": 1, "warmup": 0, "rounds": 1} if ctx.dry else {}


def tier_e2e(ctx: TierContext) -> None:
    from . import e2e

    cases, texts = [], []
    for scenario, variants in E2E_PLAN:
        report = e2e.run(scenarios=[scenario], variants=list(variants), write=False, **_e2e_calls(ctx))
        cases += report["cases"]
        texts.append(e2e.table(report["cases"], ctx.cuda))
        ctx.save(e2e=cases, unavailable=report["unavailable"], notes=report["notes"])
    attention = _attention(ctx, list(ATTENTION_TIER3))
    bad = [c for c in cases if c["status"] == "error"] + [t for t in attention if "error" in t]
    ctx.save(attention=attention, text="\n\n".join(texts + [_attention_text(attention)]),
             status="FAIL" if bad else "ok")


def tier_extra(ctx: TierContext) -> None:
    from . import bench_attention, e2e

    if ctx.dry:  # a rehearsal of the loops' code: 2 steps, not 20
        e2e.STEPS = 2

    items, texts = [], []
    for name, gpu_s, dry_s in EXTRA_ITEMS:
        est = dry_s if ctx.dry else gpu_s
        if ctx.left() < est:
            items.append({"item": name, "status": "skipped",
                          "reason": f"budget: {ctx.left():.0f}s left < its estimate {est}s"})
            log(f"[tier 4] {name}: skipped ({items[-1]['reason']})")
            ctx.save(items=items)
            continue
        t0 = time.perf_counter()
        rec: dict = {"item": name}
        try:
            if name == "attention-routes":
                timings = _attention(ctx, [s.name for s, _ in bench_attention.FORWARD if s.name not in ATTENTION_TIER3])
                rec["attention"] = timings
                texts.append(_attention_text(timings))
                if ctx.cuda and not any("error" in t for t in timings):
                    path = tier_file(ctx.out, "e2e")
                    tier3 = json.loads(path.read_text()).get("attention", []) if path.exists() else []
                    rec["routes"] = bench_attention.write_routes([t for t in tier3 + timings if "fused_ms" in t])
                    shutil.copy(REPO / "ldm_fast" / "attention_routes.json", ctx.out / "attention_routes.json")
                else:
                    rec["routes"] = "not written: " + ("an attention case failed" if ctx.cuda else "no GPU")
            else:
                scenarios = ["ddim20-diffusers", "ddim20-ldm_fast"] if name == "ddim20" else ["unet-step-b2"]
                variants = ["eager", "optimize"] if name == "ddim20" else [name]
                report = e2e.run(scenarios=scenarios, variants=variants, write=False, **_e2e_calls(ctx))
                rec["e2e"] = report["cases"]
                texts.append(e2e.table(report["cases"], ctx.cuda))
            rec["status"] = "ok"
        except Exception as e:  # recorded; the next item still runs
            rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000])
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        items.append(rec)
        log(f"[tier 4] {name}: {rec['status']} ({rec['seconds']}s)")
        ctx.save(items=items)
    ctx.save(items=items, text="\n\n".join(texts), status="ok" if all(i["status"] != "error" for i in items) else "FAIL")


TIER_FUNCS: dict[str, Callable[[TierContext], None]] = {
    "correctness": tier_correctness, "host": tier_host, "e2e": tier_e2e, "extra": tier_extra}


def run_tier(name: str, out: Path, dry: bool, deadline: float) -> int:
    """The child process: run one tier, write its file (an exception is recorded in it)."""
    ctx = TierContext(name, out, dry, deadline)
    started = time.perf_counter()
    ctx.save()
    try:
        TIER_FUNCS[name](ctx)
    except Exception as e:
        import traceback

        ctx.result.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:])
    ctx.save(seconds=round(time.perf_counter() - started, 1))
    return 0


# ---------------------------------------------------------------------------------------------
# the driver


def install_wheels(whl_dir: Path, target: Path) -> dict:
    """Install the wheels under ``whl_dir`` into ``target`` (offline, no dependency resolution, no
    bytecode compilation: pip takes a minute on diffusers' files otherwise)."""
    wheels = sorted(str(p) for p in whl_dir.glob("*.whl")) if whl_dir.is_dir() else []
    if not wheels:
        return {"installed": None, "reason": f"no wheels under {whl_dir}: diffusers only if already installed"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
           str(target), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"installed": None, "wheels": [Path(w).name for w in wheels],
                "reason": f"pip install failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}"}
    return {"installed": str(target), "wheels": [Path(w).name for w in wheels]}


def session_stem(env: dict, dry: bool) -> str:
    """``<gpu>-<date>-<commit>``, e.g. ``nvidia-h200-2026-12-02-cf44dab`` (``cpu-dry-run-...`` in the dry run)."""
    gpu = "cpu-dry-run" if dry else re.sub(r"[^a-z0-9]+", "-", (env.get("gpu") or "gpu").lower()).strip("-")
    date = (env.get("date") or datetime.date.today().isoformat())[:10]
    commit = re.sub(r"[^A-Za-z0-9]+", "-", env.get("ldm_fast_commit") or "unknown").strip("-")
    return f"{gpu}-{date}-{commit}"


def collect(out: Path, budget: float, dry: bool, tiers: dict, diffusers: dict) -> dict:
    """The session: every tier's file, its status and timing, the machine and versions."""
    results = {}
    for name in TIERS:
        path = tier_file(out, name)
        if path.exists():
            try:
                results[name] = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                results[name] = {"status": "error", "error": f"unreadable {path.name}: {e}"}
    env = next((r["environment"] for r in results.values() if r.get("environment")), None)
    if env is None:  # no tier got as far as recording the machine: the commit and date at least
        from .host import _git_commit

        env = {"ldm_fast_commit": _git_commit(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    return {"kind": "gpu-session", "dry_run": dry, "budget_s": budget, "environment": env, "diffusers": diffusers,
            "tiers": tiers, "results": results}


def markdown(session: dict) -> str:
    env = session["environment"]
    head = "CPU dry run (tiny shapes, kernels interpreted: no GPU number here)" if session["dry_run"] else env.get("gpu")
    lines = [f"# GPU session: {head}", "",
             f"{env.get('date')}; torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
             f"diffusers {env.get('diffusers')}; ldm_fast commit {env.get('ldm_fast_commit')}; budget "
             f"{session['budget_s']:g} s. Written by `python -m benchmarks.gpu_session`.", ""]
    for i, name in enumerate(TIERS, 1):
        t = session["tiers"].get(name, {"status": "not run"})
        lines.append(f"## Tier {i}: {name}: {t['status']}"
                     + (f" ({t['seconds']:.0f} s)" if t.get("seconds") is not None else "")
                     + (f": {t['reason']}" if t.get("reason") else ""))
        text = session["results"].get(name, {}).get("text")
        if text:
            lines += ["", "```", text, "```"]
        lines.append("")
    return "\n".join(lines)


def write_session(out: Path, session: dict) -> list[Path]:
    stem = session_stem(session["environment"], session["dry_run"])
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    _write_json(paths[0], session)
    paths[1].write_text(markdown(session))
    if not session["dry_run"]:
        RESULTS.mkdir(exist_ok=True)
        for p in paths:
            shutil.copy(p, RESULTS / p.name)
    return paths


def run_session(out: Path, budget: float, dry: bool, tiers: tuple = TIERS, whl_dir: Path = REPO / ".whl",
                kill_grace: float = KILL_GRACE_S) -> dict:
    """Run ``tiers`` in order, each in its own process, within ``budget`` seconds (a tier still
    running ``kill_grace`` seconds after it is killed); returns the session."""
    start = time.time()
    deadline = start + budget
    out.mkdir(parents=True, exist_ok=True)
    estimates = DRY_ESTIMATE_S if dry else ESTIMATE_S
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        env["TRITON_INTERPRET"] = "0"
    if importlib.util.find_spec("diffusers") is None:
        diffusers = install_wheels(whl_dir, Path(tempfile.mkdtemp(prefix="ldm_fast_site_")))
    else:
        diffusers = {"installed": None, "reason": "diffusers is installed already: the wheels are not needed"}
    if diffusers["installed"]:
        env["PYTHONPATH"] = diffusers["installed"] + os.pathsep + env["PYTHONPATH"]
    elif not dry and importlib.util.find_spec("diffusers") is None:
        log(f"WARNING: diffusers is MISSING ({diffusers.get('reason')}): tier 1 FAILS (its U-Net CUDA-graph tests "
            "need it) and tier 3's models are unavailable")
    log(f"gpu session{' (DRY RUN on the CPU)' if dry else ''}: budget {budget:g}s, tiers {', '.join(tiers)}; "
        f"wheels: {diffusers.get('wheels') or diffusers.get('reason')}")
    status: dict = {}
    session = collect(out, budget, dry, status, diffusers)
    for name in TIERS:
        left = deadline - time.time()
        if name not in tiers:
            status[name] = {"status": "skipped", "reason": "not asked for (--tiers)"}
        elif left < estimates[name]:
            status[name] = {"status": "skipped",
                            "reason": f"budget: {left:.0f}s left < the tier's estimate {estimates[name]}s "
                                      f"({'CPU dry-run' if dry else 'GPU'} estimate, benchmarks/gpu_session.py)"}
        else:
            t0 = time.time()
            cmd = [sys.executable, "-m", "benchmarks.gpu_session", "--run-tier", name, "--out", str(out),
                   "--deadline", f"{deadline:.3f}"] + (["--dry-run"] if dry else [])
            log(f"=== tier {TIERS.index(name) + 1}: {name} ({left:.0f}s left) ===")
            try:
                rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=left + kill_grace).returncode
                reason = None if rc == 0 else f"the tier's process exited {rc}"
            except subprocess.TimeoutExpired:
                reason = f"killed {kill_grace:g}s after the budget's end ({budget:g}s): what it saved before is kept"
            path = tier_file(out, name)
            rec = json.loads(path.read_text()) if path.exists() else {"tier": name}
            if reason:
                rec.update(status="error" if "exited" in reason else "timeout", reason=reason)
                _write_json(path, rec)
            status[name] = {"status": rec.get("status", "error"), "seconds": round(time.time() - t0, 1),
                            **({"reason": rec["reason"]} if rec.get("reason") else {}),
                            **({"error": rec["error"][:500]} if rec.get("error") else {})}
        if status[name]["status"] == "skipped":
            _write_json(tier_file(out, name), {"tier": name, **status[name]})
        log(f"tier {name}: {status[name]}")
        session = collect(out, budget, dry, status, diffusers)
        paths = write_session(out, session)
    log(f"gpu session done in {time.time() - start:.0f}s: {', '.join(map(str, paths))}")
    return session


# ---------------------------------------------------------------------------------------------
# README's first screen


def _ms(cases: list[dict], scenario: str, variant: str) -> Optional[float]:
    for c in cases:
        if c.get("scenario") == scenario and c.get("variant") == variant and c.get("status") == "ok":
            return c["ms"]
    return None


def readme_block(session: dict, source: str) -> str:
    """The README's first-screen GPU paragraph from a session file (deterministic: only its values)."""
    env = session["environment"]
    e2e = session["results"].get("e2e", {})
    cases = e2e.get("e2e", [])

    def row(label, scenario, variants):
        cells = []
        for v in variants:
            ms = _ms(cases, scenario, v)
            cells.append(f"{v} {'**%.2f ms**' % ms if ms is not None else 'not measured'}")
        return f"{label}: " + ", ".join(cells)

    parts = [row("U-Net step b2 fp16", "unet-step-b2", ("eager", "optimize", "optimize+cuda_graph", "eager+cuda_graph")),
             row("VAE decode to 1024 px, b1 fp16", "vae-decode-1024", ("eager", "optimize")),
             row("U-Net training step b8, bf16 autocast", "unet-train-b8", ("eager", "optimize"))]
    attn = [f"{t['case'].removeprefix('attention[').rstrip(']')} kernel {t['fused_ms'] * 1e3:.0f} us vs SDPA "
            f"{t['sdpa_ms'] * 1e3:.0f} us" for t in e2e.get("attention", []) if "fused_ms" in t]
    if attn:
        parts.append("attention: " + "; ".join(attn))
    return (f"Measured on {env.get('gpu')} ({str(env.get('date'))[:10]}; torch {env.get('torch')}, triton "
            f"{env.get('triton')}, diffusers {env.get('diffusers')}; ldm_fast commit {env.get('ldm_fast_commit')}; SD 1.5 "
            f"configs with random weights; written by `python -m benchmarks.gpu_session --readme` from "
            f"[{source}]({source})): " + ". ".join(parts) + ".")


def update_readme(session_path: Path, readme: Path = REPO / "README.md") -> str:
    """Replace README.md's block between the gpu-summary markers with :func:`readme_block`."""
    session = json.loads(Path(session_path).read_text())
    if session.get("dry_run"):
        raise ValueError(f"{session_path} is a CPU dry run: the README quotes GPU measurements only")
    try:
        source = Path(session_path).resolve().relative_to(readme.resolve().parent).as_posix()
    except ValueError:
        source = Path(session_path).name
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} block")
    block = f"{README_BEGIN}\n{readme_block(session, source)}\n{README_END}"
    readme.write_text(pattern.sub(lambda _: block, text, count=1))
    return block


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("LDM_FAST_GPU_SESSION_DRY") == "1",
                        help="rehearse every tier on the CPU (tiny shapes, kernels interpreted); also "
                             "LDM_FAST_GPU_SESSION_DRY=1")
    parser.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for the whole run (default 540)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(RESULTS / "latest" / "gpu-session"))
    parser.add_argument("--tiers", default=",".join(TIERS), help=f"comma-separated subset of {','.join(TIERS)}")
    parser.add_argument("--kill-grace", type=float, default=KILL_GRACE_S,
                        help=f"seconds past the budget before a running tier is killed (default {KILL_GRACE_S})")
    parser.add_argument("--readme", metavar="SESSION_JSON", help="write README.md's GPU paragraph from a session file")
    parser.add_argument("--run-tier", choices=TIERS, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.readme:
        print(update_readme(Path(args.readme)))
        return 0
    if args.run_tier:
        return run_tier(args.run_tier, Path(args.out), args.dry_run, args.deadline)
    tiers = tuple(t.strip() for t in args.tiers.split(",") if t.strip())
    unknown = sorted(set(tiers) - set(TIERS))
    if unknown:
        parser.error(f"--tiers: unknown {unknown}; known: {TIERS}")
    if args.budget <= 0:
        parser.error(f"--budget must be positive seconds, got {args.budget}")
    session = run_session(Path(args.out), args.budget, args.dry_run, tiers, kill_grace=args.kill_grace)
    return 0 if all(t["status"] in ("ok", "skipped") for t in session["tiers"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
