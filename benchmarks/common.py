"""What every benchmark file declares: its cases, each a shape real LDMs use.

A ``benchmarks/bench_<op>.py`` file defines ``cases() -> list[Case]`` and its pytest-benchmark
tests with :func:`benchmark_tests`. The instruments (measured traffic, static audit, GPU timing,
time model) all read the same cases, so a new op lands with its numbers by writing one file.
"""

from __future__ import annotations

import dataclasses
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
    most fused bytes / minimum bytes this op may move (the traffic test fails a case above it).
    """

    op: str
    name: str
    make: Callable[[torch.device], dict]
    fused: Callable[[dict], Any]
    eager: Callable[[dict], Any]
    min_bytes: Callable[[dict], int]
    traffic_target: float = 1.0
    flops: Optional[Callable[[dict], int]] = None

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (each counted once)."""
    return sum(t.numel() * t.element_size() for t in tensors)


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
            fn(inputs)
            torch.cuda.synchronize()

            def call():
                fn(inputs)
                torch.cuda.synchronize()

            benchmark.pedantic(call, rounds=50, warmup_rounds=5)
        else:
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
