"""What every benchmark file declares: its cases, each a shape real LDMs use.

A ``benchmarks/bench_<op>.py`` file defines ``cases() -> list[Case]`` and its pytest-benchmark
tests with :func:`benchmark_tests`. The instruments (measured traffic, static audit, GPU timing,
time model) all read the same cases, so a new op lands with its numbers by writing one file:
``python -m benchmarks`` finds it by globbing ``benchmarks/bench_*.py`` (:func:`discover`).

The quick subset (``python -m benchmarks --quick``, and the traffic and audit tests) is the cases a
file marks ``quick=True``; a file that marks none contributes its first case of each dtype, in
``cases()`` order (list the smallest batch first).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import ldm_fast

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Case:
    """One benchmark case of one op.

    ``make(device)`` builds the inputs (a dict); ``fused(inputs)`` runs ldm_fast's kernel and
    ``eager(inputs)`` the baseline a user runs today (diffusers-style eager PyTorch, or SDPA);
    ``min_bytes(inputs)`` is the minimum global traffic: each input read once, each output written
    once; ``flops(inputs)`` the useful FLOPs (matrix work only, else 0); ``traffic_target`` the
    most fused bytes / minimum bytes this op may move (the traffic test fails a case above it);
    ``quick`` puts the case in the quick subset (see the module docstring); ``bytes_caveat``, when
    set, says why the eager byte count does not compare with the fused one (SDPA is one op to the
    dispatch counter): the bytes-based GPU model is then left out and the caveat is shown next to
    the ratios in the table, the JSON and the chart.
    """

    op: str
    name: str
    make: Callable[[torch.device], dict]
    fused: Callable[[dict], Any]
    eager: Callable[[dict], Any]
    min_bytes: Callable[[dict], int]
    traffic_target: float = 1.0
    flops: Optional[Callable[[dict], int]] = None
    quick: bool = False
    bytes_caveat: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (each counted once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


BENCH_DIR = Path(__file__).resolve().parent


def bench_ops() -> list[str]:
    """The ops with a ``benchmarks/bench_<op>.py`` file, sorted."""
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def op_cases(op: str) -> list[Case]:
    """``cases()`` of ``benchmarks/bench_<op>.py``."""
    return list(importlib.import_module(f"{__package__}.bench_{op}").cases())


def quick_subset(all_cases: list[Case]) -> list[Case]:
    """The cases marked ``quick``; where none is, the first case of each dtype named in the case names
    (``fp32``, ``fp16``, ``bf16``), or the first case when the names name none."""
    marked = [c for c in all_cases if c.quick]
    if marked:
        return marked
    chosen, seen = [], set()
    for c in all_cases:
        dtype = next((d for d in DTYPES if d in c.name), None)
        if dtype not in seen:
            seen.add(dtype)
            chosen.append(c)
    return chosen


def discover(ops: Optional[list[str]] = None, quick: bool = False) -> list[Case]:
    """Every case of every bench file (or of ``ops``), the quick subset of each file when ``quick``."""
    known = bench_ops()
    unknown = sorted(set(ops or ()) - set(known))
    if unknown:
        raise ValueError(f"no benchmarks/bench_<op>.py for {unknown}; known ops: {known}")
    found = []
    for op in ops or known:
        cs = op_cases(op)
        found.extend(quick_subset(cs) if quick else cs)
    return found


def find_case(case_id: str) -> Case:
    """The case with id ``op[name]``."""
    op = case_id.split("[", 1)[0]
    for c in op_cases(op):
        if c.id == case_id:
            return c
    raise KeyError(f"no case {case_id!r} in benchmarks/bench_{op}.py")


def gpu_time_ms(fn: Callable[[], Any]) -> float:
    """Median time of ``fn()`` on the GPU in ms: ``triton.testing.do_bench`` (CUDA events, warm-up
    excluded, L2 flushed between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run_fused(case: Case, inputs: dict):
    """The fused path, forced (a CUDA device, or the interpreter on CPU)."""
    with ldm_fast.use_backend("triton"):
        return case.fused(inputs)


def benchmark_tests(cases: Callable[[], list[Case]]):
    """pytest-benchmark tests ``test_eager`` and ``test_fused`` over ``cases()``, for a bench file.

    The eager baseline runs on any device. The fused kernel is timed only on CUDA (timing the
    interpreter would be meaningless): without one it is skipped with the reason.
    """
    all_cases = cases()
    ids = [c.name for c in all_cases]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _time(benchmark, fn, inputs):
        if device.type == "cuda":
            benchmark.extra_info["do_bench_median_ms"] = gpu_time_ms(lambda: fn(inputs))
            fn(inputs)
            torch.cuda.synchronize()

            def call():
                fn(inputs)
                torch.cuda.synchronize()

            benchmark.pedantic(call, rounds=50, warmup_rounds=5)
        else:
            benchmark.extra_info["timing"] = "CPU timing (eager PyTorch on the CPU), not a GPU number"
            benchmark.pedantic(fn, args=(inputs,), rounds=5, warmup_rounds=1)

    @pytest.mark.parametrize("case", all_cases, ids=ids)
    def test_eager(benchmark, case):
        benchmark.group = case.id
        _time(benchmark, case.eager, case.make(device))

    @pytest.mark.parametrize("case", all_cases, ids=ids)
    def test_fused(benchmark, case):
        if device.type != "cuda":
            pytest.skip("fused kernels are timed only on a CUDA GPU; here see the traffic and audit columns")
        benchmark.group = case.id
        inputs = case.make(device)
        _time(benchmark, lambda i: run_fused(case, i), inputs)

    return test_eager, test_fused
