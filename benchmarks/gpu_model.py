"""A model of GPU time from measured bytes, FLOPs and launches: a prediction, not a measurement.

    t = launches x launch_us + max(bytes / copy_bandwidth, flops / peak_flops[dtype])

``bytes`` and ``launches`` are what :mod:`benchmarks.traffic` measured (interpreter and aten
dispatch), ``flops`` is ``Case.flops``. The fused path is charged its Triton launches plus any aten
op its launcher ran; the eager path one launch per charged aten op. The model assumes every byte
goes to DRAM (no L2 reuse between kernels: for tensors that fit in the 50 MB L2, a real eager
chain runs faster than modelled), that compute and memory overlap fully within a kernel, and
that launches do not overlap with work (true for chains of small kernels, pessimistic for large
ones). Host work such as a ``.item()`` device sync is not modelled.

Constants for an H100 SXM (:data:`H100`): 3.0 TB/s achievable copy bandwidth (3.35 TB/s HBM3
nominal), 790 TFLOP/s dense bf16/fp16 on tensor cores (fp32 matrix work assumed on TF32, half
that), 3 us per kernel launch (back-to-back launches of small kernels from PyTorch).

``python -m benchmarks.gpu_model`` prints the model beside any measured GPU timings found in
``benchmarks/results/*.json`` (written by ``python -m benchmarks`` on a CUDA machine).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class GPUModel:
    name: str
    copy_bandwidth: float  # bytes/s
    peak_flops: dict  # dtype name -> FLOP/s on tensor cores
    launch_us: float

    def time_us(self, nbytes: int, flops: int, launches: int, dtype: str) -> float:
        """Predicted time in microseconds."""
        peak = self.peak_flops.get(dtype, self.peak_flops["float32"])
        work = max(nbytes / self.copy_bandwidth, (flops / peak) if flops else 0.0)
        return launches * self.launch_us + work * 1e6


H100 = GPUModel(
    name="H100 SXM (model)",
    copy_bandwidth=3.0e12,
    peak_flops={"bfloat16": 790e12, "float16": 790e12, "float32": 395e12},
    launch_us=3.0,
)


def predict(record: dict, model: GPUModel = H100) -> dict:
    """``{"fused_us", "eager_us", "speedup"}`` for one traffic record (see :func:`benchmarks.traffic.measure_case`)."""
    if "fused" not in record:
        return {}
    fused = model.time_us(record["fused"]["bytes"], record.get("flops", 0), record["fused"]["launches"], record["dtype"])
    eager = model.time_us(record["eager"]["bytes"], record.get("flops", 0), record["eager"]["launches"], record["dtype"])
    return {"model": model.name, "fused_us": fused, "eager_us": eager, "speedup": eager / fused if fused else float("nan")}


def load_gpu_results(directory: Path = RESULTS_DIR) -> list[dict]:
    """Every GPU result file ``benchmarks/results/<gpu>.json`` (the newest first)."""
    found = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "gpu" in data and "cases" in data:
            data["_path"] = str(path)
            found.append(data)
    return found


def measured_for(case_id: str, results: list[dict]) -> Optional[dict]:
    """The first GPU result with a timing of ``case_id`` (prefer an H100), with its GPU name."""
    ordered = sorted(results, key=lambda r: "H100" not in r["gpu"])
    for data in ordered:
        timing = data["cases"].get(case_id)
        if timing and timing.get("fused_ms") is not None:
            return {"gpu": data["gpu"], **timing}
    return None


def main(argv=None) -> int:
    """Print the model for the last report's cases beside measured GPU timings, where any exist."""
    report = RESULTS_DIR / "latest" / "report.json"
    if not report.exists():
        print(f"no {report}: run python -m benchmarks first", file=sys.stderr)
        return 2
    cases = json.loads(report.read_text())["cases"]
    results = load_gpu_results()
    print(f"MODEL ({H100.name}: {H100.copy_bandwidth / 1e12:.1f} TB/s, {H100.launch_us:g} us/launch) vs measured GPU times")
    print(f"{'case':44} {'model fused us':>15} {'model eager us':>15} {'measured fused us':>18} {'measured eager us':>18}  gpu")
    for c in cases:
        m = c.get("model") or {}
        meas = measured_for(c["case"], results)
        mf = f"{meas['fused_ms'] * 1e3:.1f}" if meas else "-"
        me = f"{meas['eager_ms'] * 1e3:.1f}" if meas and meas.get("eager_ms") is not None else "-"
        print(f"{c['case']:44} {m.get('fused_us', float('nan')):15.1f} {m.get('eager_us', float('nan')):15.1f} "
              f"{mf:>18} {me:>18}  {meas['gpu'] if meas else 'no GPU results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
