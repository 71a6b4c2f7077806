"""``python -m benchmarks``: every instrument that can run on this machine, over every bench file's cases.

1. **Traffic** (:mod:`benchmarks.traffic`), in worker processes with ``TRITON_INTERPRET=1``: the
   fused path's bytes counted in Triton's interpreter, the eager baseline's at aten dispatch.
2. **Audit** (:mod:`benchmarks.audit`), in compile processes with ``TRITON_INTERPRET=0``: every
   kernel launch compiled for sm_80 and sm_90, registers, spills, 128-bit access, tensor cores.
3. **Timing**: on a CUDA GPU, ``triton.testing.do_bench`` of fused and eager, written to
   ``benchmarks/results/<gpu-name>.json``; without one the GPU timings are skipped (the reason is
   printed) and the eager baseline is timed on the CPU, labelled as a CPU timing.
4. **Model** (:mod:`benchmarks.gpu_model`): predicted H100 time of fused and eager from the
   measured bytes and launches, beside measured GPU timings where ``benchmarks/results/*.json``
   has them.

Prints one table (columns explained in ``benchmarks/README.md``) and writes ``table.txt``,
``report.json`` and ``report.png`` to ``benchmarks/results/latest/``. Exits 1 when any case fails
its traffic target or the audit. Options: ``--quick`` (the quick subset of each bench file),
``--ops a,b`` (only these bench files), ``--jobs N`` (worker processes), ``--out DIR``.
``--host`` and ``--e2e`` run only the host-cost instrument (:mod:`benchmarks.host`) and/or the
end-to-end one (:mod:`benchmarks.e2e`) instead (``--e2e-compile``, ``--e2e-scenarios a,b``);
``--model`` the whole-model counts (:mod:`benchmarks.model`); ``--host-model`` the host cost per
U-Net step and per op with launches stubbed (:mod:`benchmarks.host_model`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from . import audit, gpu_model, report
from .common import BENCH_DIR, Case, bench_ops, discover, gpu_time_ms, run_fused

REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# 1. traffic, in interpreter worker processes fed one case at a time


def run_traffic(cases: list[Case], jobs: int, max_mb: Optional[float]) -> dict[str, dict]:
    env = _env(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    todo: queue.Queue = queue.Queue()
    for case in cases:
        todo.put(case.id)
    results: dict[str, dict] = {}
    lock = threading.Lock()
    start = time.perf_counter()

    def spawn(errfile):
        cap = ["--max-mb", str(max_mb)] if max_mb is not None else []
        return subprocess.Popen([sys.executable, "-m", "benchmarks.traffic", "--serve", *cap], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errfile, text=True)

    def worker():
        with tempfile.TemporaryFile(mode="w+") as errfile:
            proc = spawn(errfile)
            while True:
                try:
                    case_id = todo.get_nowait()
                except queue.Empty:
                    break
                proc.stdin.write(case_id + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if line:
                    record = json.loads(line)
                else:  # the worker died (out of memory?): report it and start another
                    proc.wait()
                    errfile.seek(0)
                    record = {"case": case_id, "error": f"traffic worker exited {proc.returncode}: {errfile.read()[-1500:]}"}
                    errfile.seek(0)
                    errfile.truncate()
                    proc = spawn(errfile)
                with lock:
                    results[case_id] = record
                    done = len(results)
                if "error" in record:
                    log(f"[traffic {done}/{len(cases)}] {case_id}: ERROR {record['error'][:300]}")
                elif "skipped" in record:
                    log(f"[traffic {done}/{len(cases)}] {case_id}: skipped ({record['skipped']})")
                else:
                    log(f"[traffic {done}/{len(cases)}] {case_id}: fused {record['fused_ratio']:.3f}x, "
                        f"eager {record['eager_ratio']:.3f}x of min ({record['seconds']:.1f}s, "
                        f"{time.perf_counter() - start:.0f}s total)")
            proc.stdin.close()
            proc.wait()

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(jobs, len(cases))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------------
# 2. audit


def run_audit(records: dict[str, dict], jobs: int) -> tuple[list[dict], Optional[str]]:
    measured = [r for r in records.values() if "fused" in r]
    n_keys = len({audit.compile_key(k, a) for r in measured for k in r["fused"]["kernels"] for a in audit.ARCHS})
    done = [0]

    def progress(message):
        done[0] += 1
        log(f"[audit {done[0]}/{n_keys}] compiled {message}")

    try:
        return audit.audit_records(measured, jobs=jobs, progress=progress), None
    except Exception as e:  # the compile process itself failed: every case's audit fails with the reason
        return [], f"{type(e).__name__}: {e}"


def audit_by_case(entries: list[dict]) -> dict[str, dict]:
    """``{case: {"sm_80": cell, "sm_90": cell}}``: regs (max), spill bytes (sum), 128-bit ld/st found, problems."""
    out: dict[str, dict] = {}
    for e in entries:
        r = e["result"]
        cell = out.setdefault(e["case"], {}).setdefault(
            f"sm_{e['arch']}", {"regs": 0, "spill": 0, "ld128": 0, "st128": 0, "problems": [], "error": None})
        if r.get("error"):
            cell["error"] = r["error"][:500]
        else:
            cell["regs"] = max(cell["regs"], r.get("regs") or r.get("REG") or 0)
            cell["spill"] += r.get("spill_stores", 0) + r.get("spill_loads", 0)
            cell["ld128"] += r["global_loads"].get(128, 0)
            cell["st128"] += r["global_stores"].get(128, 0)
        cell["problems"] += e["problems"]
    return out


# ---------------------------------------------------------------------------------------------
# 3. timing


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0)


def _copy_gbps() -> tuple[float, Optional[float]]:
    """(measured device-to-device copy bandwidth, spec peak from the device properties where torch exposes it), GB/s."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    spec = 2 * clock * 1e3 * bus / 8 / 1e9 if clock and bus else None
    return 2 * n / (ms * 1e-3) / 1e9, spec


def gpu_timings(cases: list[Case]) -> dict[str, dict]:
    device = torch.device("cuda")
    copy, spec = _copy_gbps()
    out = {}
    for i, case in enumerate(cases, 1):
        try:
            inputs = case.make(device)
            min_bytes = case.min_bytes(inputs)
            flops = case.flops(inputs) if case.flops else 0
            run_fused(case, inputs)  # compile outside the timing
            fused = gpu_time_ms(lambda: run_fused(case, inputs))
            eager = gpu_time_ms(lambda: case.eager(inputs))
        except Exception as e:  # out of memory, say: this case has no timing, the others still run
            log(f"[gpu {i}/{len(cases)}] {case.id}: ERROR {type(e).__name__}: {e}")
            inputs = None
            torch.cuda.empty_cache()
            continue
        t = {"gpu": _gpu_name(), "fused_ms": fused, "eager_ms": eager, "min_bytes": min_bytes,
             "fused_gbps": min_bytes / (fused * 1e-3) / 1e9, "eager_gbps": min_bytes / (eager * 1e-3) / 1e9,
             "copy_gbps": copy, "spec_gbps": spec}
        if flops:
            t["fused_tflops"] = flops / (fused * 1e-3) / 1e12
            t["eager_tflops"] = flops / (eager * 1e-3) / 1e12
        out[case.id] = t
        log(f"[gpu {i}/{len(cases)}] {case.id}: fused {fused * 1e3:.1f} us, eager {eager * 1e3:.1f} us")
        del inputs
    return out


def write_gpu_results(timings: dict[str, dict]) -> Path:
    """Merge this run's timings into ``benchmarks/results/<gpu-name>.json`` with the versions."""
    import triton

    name = _gpu_name()
    path = RESULTS / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".json")
    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    first = next(iter(timings.values()), {})
    data.update({
        "gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "method": "triton.testing.do_bench median",
        "copy_gbps": first.get("copy_gbps"), "spec_gbps": first.get("spec_gbps"),
    })
    data["cases"].update({k: {kk: vv for kk, vv in v.items() if kk not in ("gpu", "copy_gbps", "spec_gbps")}
                          for k, v in timings.items()})
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True))
    return path


def cpu_eager_timings(cases: list[Case], repeats: int) -> dict[str, dict]:
    """Median wall time of the eager baseline on the CPU (a CPU timing: not a GPU number)."""
    out = {}
    for i, case in enumerate(cases, 1):
        inputs = case.make(torch.device("cpu"))
        with torch.no_grad():
            case.eager(inputs)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                case.eager(inputs)
                times.append(time.perf_counter() - t0)
        out[case.id] = {"eager_cpu_ms": statistics.median(times) * 1e3, "kind": "CPU timing"}
        log(f"[cpu {i}/{len(cases)}] {case.id}: eager {out[case.id]['eager_cpu_ms']:.3f} ms (CPU timing)")
    return out


# ---------------------------------------------------------------------------------------------


def case_model(case: Case, rec: dict) -> dict:
    """The row's bytes-based GPU model, or, for a case whose byte counts do not compare
    (``Case.bytes_caveat``), no model and the caveat (shown beside the ratios)."""
    if case.bytes_caveat:
        return {"model": {}, "bytes_caveat": case.bytes_caveat}
    return {"model": gpu_model.predict(rec)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick subset of each bench file (CI, tests)")
    parser.add_argument("--ops", default="", help="comma-separated ops, e.g. reparameterize,q_sample")
    parser.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="worker processes")
    parser.add_argument("--out", default=str(RESULTS / "latest"), help="directory for table.txt, report.json, report.png")
    parser.add_argument("--traffic-max-mb", type=float, default=None,
                        help="measure traffic (and audit) only cases whose minimum traffic is at most this many MB; "
                             "the interpreter takes minutes on the largest shapes (default: every case)")
    parser.add_argument("--host", action="store_true",
                        help="only the host-cost instrument (benchmarks/host.py): host us per call of ldm_fast and "
                             "eager beside the launch floors; writes host.json")
    parser.add_argument("--e2e", action="store_true",
                        help="only the end-to-end instrument (benchmarks/e2e.py): diffusers U-Net / VAE with random "
                             "weights, eager vs ldm_fast.optimize vs torch.compile; writes e2e.json")
    parser.add_argument("--e2e-compile", action="store_true",
                        help="with --e2e on a CPU: run the torch.compile variants too (minutes on 2 cores)")
    parser.add_argument("--e2e-scenarios", default="",
                        help="with --e2e: comma-separated scenario names (default: all)")
    parser.add_argument("--model", action="store_true",
                        help="only the whole-model instrument (benchmarks/model.py): SD 1.5 U-Net / VAE on fake "
                             "tensors, launches and bytes by kind, eager vs optimize, H100 estimate; writes model.json")
    parser.add_argument("--host-model", action="store_true",
                        help="only the host cost per U-Net step and per op (benchmarks/host_model.py): CPU thread "
                             "time with ldm_fast's Triton launches stubbed, eager vs optimize variants, inference and "
                             "training, and a MODEL of GPU host time; writes host_model.json")
    args = parser.parse_args(argv)
    if args.host_model:
        from . import host_model

        return host_model.main(quick=args.quick, out_dir=Path(args.out))
    if args.model:
        from . import model

        return model.main(quick=args.quick, out_dir=Path(args.out))
    if args.host or args.e2e:
        return _host_e2e(args, argv)
    started = time.perf_counter()

    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    unknown = sorted(set(ops or ()) - set(bench_ops()))
    if unknown:
        parser.error(f"no benchmarks/bench_<op>.py for {unknown}; known ops: {bench_ops()}")
    cases, broken = [], []
    for op in ops or bench_ops():
        try:
            cases += discover([op], quick=args.quick)
        except Exception as e:  # a bench file that does not import: reported as a failure, the rest still runs
            broken.append(f"benchmarks/bench_{op}.py: {type(e).__name__}: {e}")
            log(f"ERROR {broken[-1]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_ops = len({c.op for c in cases})
    log(f"ldm_fast benchmarks: {len(cases)} cases of {n_ops} ops{' (quick subset)' if args.quick else ''}, "
        f"{args.jobs} workers")

    records = run_traffic(cases, args.jobs, args.traffic_max_mb)
    entries, audit_error = run_audit(records, args.jobs)
    audits = audit_by_case(entries)

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on", "yes")
    if cuda:
        timing_kind, skipped = "gpu", None
        timings = gpu_timings(cases)
        log(f"GPU timings written to {write_gpu_results(timings)}")
    else:
        skipped = ("no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 is set")
        log(f"GPU timings skipped: {skipped}; the eager baseline is timed on the CPU instead (a CPU timing)")
        timing_kind = "cpu"
        timings = cpu_eager_timings(cases, repeats=3 if args.quick else 7)
    gpu_results = gpu_model.load_gpu_results() if not cuda else []

    rows = []
    for case in cases:
        rec = records.get(case.id, {"case": case.id, "error": "not measured"})
        row = {"case": case.id, "op": case.op, "name": case.name, "traffic_target": case.traffic_target,
               "problems": []}
        if "error" in rec:
            row["problems"].append(f"traffic: {rec['error']}")
        elif "skipped" in rec:
            row.update({"min_bytes": rec["min_bytes"], "skipped": rec["skipped"]})
        else:
            row.update({
                "dtype": rec["dtype"], "min_bytes": rec["min_bytes"], "flops": rec["flops"],
                "fused_ratio": rec["fused_ratio"], "eager_ratio": rec["eager_ratio"],
                "fused_bytes": rec["fused"]["bytes"], "eager_bytes": rec["eager"]["bytes"],
                "launches": {"fused": rec["fused"]["launches"], "eager": rec["eager"]["launches"]},
                **case_model(case, rec),
            })
            row["problems"] += [f"traffic: {p}" for p in rec["problems"]]
            row["audit"] = audits.get(case.id, {})
            for arch_cell in row["audit"].values():
                row["problems"] += [f"audit: {p}" for p in arch_cell["problems"]]
            if audit_error:
                row["problems"].append(f"audit: {audit_error[:500]}")
            elif not row["audit"]:
                row["problems"].append("audit: no kernel launch to audit")
        row["timing"] = timings.get(case.id)
        row["measured_gpu"] = gpu_model.measured_for(case.id, gpu_results) if gpu_results else None
        row["traffic"] = rec
        rows.append(row)

    measured_names = sorted({r["measured_gpu"]["gpu"] for r in rows if r.get("measured_gpu")})
    text = report.table(rows, timing_kind, ", ".join(measured_names) or None)
    notes = [
        "fused/min, eager/min: measured global-memory bytes / Case.min_bytes (Triton interpreter; aten dispatch).",
        f"H100 MODEL: predicted, not measured ({gpu_model.H100.copy_bandwidth / 1e12:.1f} TB/s, "
        f"{gpu_model.H100.launch_us:g} us/launch); see benchmarks/gpu_model.py.",
        ("GPU timings: triton.testing.do_bench median on " + _gpu_name()) if cuda else
        f"GPU timings skipped ({skipped}); 'CPU eager ms' is a CPU timing of the eager baseline, not a GPU number.",
    ]
    caveats = sorted({r["bytes_caveat"] for r in rows if r.get("bytes_caveat")})
    notes += [f"{report.CAVEAT_MARK} {c}." for c in caveats]
    n_skipped = sum(1 for r in rows if r.get("skipped"))
    if n_skipped:
        notes.append(f"{n_skipped} cases above --traffic-max-mb {args.traffic_max_mb:g} were not measured, "
                     "audited or modelled (status 'skip').")
    print(text)
    print("\n".join(notes))
    failures = [(r["case"], p) for r in rows for p in r["problems"]] + [("bench file", b) for b in broken]
    for case_id, p in failures:
        print(f"FAIL {case_id}: {p}")

    import triton

    report_data = {
        "generated": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                        "platform": platform.platform(), "cuda": torch.version.cuda,
                        "gpu": _gpu_name() if cuda else None},
        "quick": args.quick, "ops": sorted({c.op for c in cases}),
        "timing": {"kind": timing_kind, "gpu_skipped": skipped},
        "model": {"name": gpu_model.H100.name, "copy_bandwidth": gpu_model.H100.copy_bandwidth,
                  "peak_flops": gpu_model.H100.peak_flops, "launch_us": gpu_model.H100.launch_us},
        "cases": rows,
        "audit": entries,
        "audit_error": audit_error,
        "failures": [f"{c}: {p}" for c, p in failures],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "table.txt").write_text(text + "\n" + "\n".join(notes) + "\n")
    report.write_json(out / "report.json", report_data)
    report.write_chart(out / "report.png", rows)
    log(f"wrote {out / 'table.txt'}, {out / 'report.json'}, {out / 'report.png'} "
        f"({time.perf_counter() - started:.0f}s)")
    return 1 if failures else 0


def _host_e2e(args, argv) -> int:
    """``--host`` and/or ``--e2e``: those instruments only (exit 1 when a case or variant errored)."""
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] or None
    status = 0
    if args.host:
        from . import host

        rep = host.run(ops, args.quick, Path(args.out), max_mb=args.traffic_max_mb)
        status |= int(any("error" in r for r in rep["cases"]))
    if args.e2e:
        from . import e2e

        scenarios = [s.strip() for s in args.e2e_scenarios.split(",") if s.strip()] or None
        rep = e2e.run(scenarios=scenarios, compile_on_cpu=args.e2e_compile, out_dir=Path(args.out))
        status |= int(bool(rep["unavailable"]) or any(r["status"] == "error" for r in rep["cases"]))
    return status


if __name__ == "__main__":
    sys.exit(main())
