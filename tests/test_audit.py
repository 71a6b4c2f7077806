"""Static sm_80/sm_90 audit (benchmarks/audit.py): parsers on saved tool output, the rules on hand-made
results, every benchmarked kernel compiled for both targets, and a smoke run of ``python -m benchmarks --quick``."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ldm_fast
from benchmarks import audit, gpu_model, report, traffic
from benchmarks.common import bench_ops, discover, op_cases, quick_subset

pytestmark = pytest.mark.slow  # compiles every kernel for sm_80/sm_90 (benchmark tooling)

REPO = Path(__file__).resolve().parent.parent

# nvdisasm -c output, abridged from real sm_80/sm_90 kernels (a predicated load, the constant-table
# load of libdevice's sin/cos, cp.async, tensor cores, TMA, a reduction, a spill store and reload).
SASS = """
        /*03c0*/              @!P0 LDG.E.128 R12, desc[UR6][R6.64] ;
        /*0400*/                   LDG.E.CONSTANT R7, desc[UR6][R2.64] ;
        /*0410*/                   LDG.E.64 R8, desc[UR6][R4.64] ;
        /*0420*/                   LDG.E.U16 R9, desc[UR6][R4.64] ;
        /*0430*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR8][R4.64] ;
        /*0440*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0450*/                   STL [R1+0x18], R0 ;
        /*0460*/                   LDL.LU R2, [R1+0x20] ;
.L_x_21:
        /*0470*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        /*0480*/               @P1 STG.E.U16 desc[UR6][R2.64], R4 ;
        /*0490*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*04a0*/                   UTMALDG.2D [UR8], [UR4] ;
        /*04b0*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R5 ;
        /*04c0*/                   EXIT ;
"""

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:52 CONSTANT[4]:24
 Function _q_sample_kernel:
  REG:32 STACK:40 SHARED:0 LOCAL:0 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

PTXAS_LOG = """
ptxas info    : 52 bytes gmem, 24 bytes cmem[4]
ptxas info    : Compiling entry function '_q_sample_kernel' for 'sm_80'
ptxas info    : Function properties for _q_sample_kernel
    40 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 40 bytes cumulative stack size, 456 bytes cmem[0], 8 bytes cmem[2]
"""


def test_parse_sass():
    s = audit.parse_sass(SASS)
    assert s["global_loads"] == {128: 2, 32: 1, 64: 1, 16: 1}
    assert s["global_stores"] == {128: 1, 16: 1}
    assert (s["local_loads"], s["local_stores"]) == (1, 1)
    assert s["mma"] == {"HMMA": 1, "HGMMA": 1}
    assert (s["tma_loads"], s["atomics"], s["instructions"]) == (1, 1, 14)


def test_parse_res_usage_and_ptxas_log():
    assert audit.parse_res_usage(RES_USAGE) == {"REG": 32, "STACK": 40, "SHARED": 0, "LOCAL": 0}
    assert audit.parse_ptxas_log(PTXAS_LOG) == {"regs": 32, "stack": 40, "spill_stores": 4, "spill_loads": 4}


def _site(kind, lanes, itemsize, line, contiguous=None, aligned=True, uniform=True):
    return {"kind": kind, "lanes": lanes, "max_active": lanes, "itemsize": itemsize, "line": line, "descriptor": False,
            "contiguous_bytes": lanes * itemsize if contiguous is None else contiguous, "aligned16": aligned,
            "mask_uniform16": uniform}


LAUNCH = {  # fp32 [1024] blocks, 4 warps: 32 B per thread = two 128-bit accesses per site
    "options": {"num_warps": 4},
    "sites": [
        _site("load", 1, 8, 10),  # a scalar: exempt
        _site("load", 1024, 4, 11),
        _site("load", 1024, 4, 12, contiguous=4),  # a gather: exempt
        _site("load", 1024, 2, 13, uniform=False),  # a mask splitting 16-byte groups: exempt
        _site("store", 1024, 4, 14),
        _site("store", 64, 4, 15),  # 2 B per thread: exempt
        dict(_site("store", 1024, 4, 16), max_active=512),  # half the block always masked: one 128-bit store
    ],
}


def _result(**kw):
    base = {"arch": 80, "regs": 40, "spill_stores": 0, "spill_loads": 0, "LOCAL": 0, "local_stores": 0,
            "global_loads": {128: 2, 32: 3}, "global_stores": {128: 3}, "tma_loads": 0, "tma_stores": 0, "mma": {}}
    base.update(kw)
    return base


def test_expected_128_counts_only_vectorizable_sites():
    want = audit.expected_128(LAUNCH)
    assert want["load"]["count"] == 2 and want["load"]["sites"] == ["line 11 x2"]
    assert want["store"]["count"] == 3 and want["store"]["sites"] == ["line 14 x2", "line 16 x1"]


def test_check_rules():
    assert audit.check(_result(), LAUNCH, has_flops=False) == []
    spill = audit.check(_result(spill_stores=4, spill_loads=4), LAUNCH, has_flops=False)
    assert len(spill) == 1 and "spills 4 B" in spill[0]
    narrow = audit.check(_result(global_loads={128: 1, 32: 4}), LAUNCH, has_flops=False)
    assert len(narrow) == 1 and "full vectorization needs 2" in narrow[0]
    no_mma = audit.check(_result(arch=90, mma={"HMMA": 0}), LAUNCH, has_flops=True)
    assert len(no_mma) == 1 and "tensor-core" in no_mma[0]
    assert audit.check(_result(arch=90, mma={"HGMMA": 8}), LAUNCH, has_flops=True) == []
    assert audit.check(_result(error="PTXASError: boom"), LAUNCH, has_flops=False)[0].startswith("sm_80: does not compile")
    smem = audit.check(_result(shared=170 * 1024), LAUNCH, has_flops=False)  # fits an H100 block, not an A100's
    assert len(smem) == 1 and "shared memory" in smem[0]
    assert audit.check(_result(arch=90, shared=170 * 1024), LAUNCH, has_flops=False) == []


def test_interpreter_only_constexprs_compile_with_their_gpu_value():
    launch = {"kernel": "m:k", "constexprs": ["BF16_AS_F32", "BLOCK"], "options": {"num_warps": 4},
              "args": {"BF16_AS_F32": {"kind": "bool", "value": True}, "BLOCK": {"kind": "int", "value": 64}}}
    gpu = audit.gpu_launch(launch)
    assert gpu["args"]["BF16_AS_F32"]["value"] is False and gpu["args"]["BLOCK"]["value"] == 64
    assert launch["args"]["BF16_AS_F32"]["value"] is True  # the record itself is left as measured
    assert audit.compile_key(launch, 80) == audit.compile_key(gpu, 80)


def _backward_kernels(op: str) -> set[str]:
    """``module:name`` of every backward kernel (a triton ``*_kernel`` with ``_bwd_`` in its name, defined
    there) of ``ldm_fast.kernels.<op>``."""
    name = f"ldm_fast.kernels.{op}"
    if importlib.util.find_spec(name) is None:
        return set()
    module = importlib.import_module(name)
    return {f"{name}:{k}" for k, obj in vars(module).items()
            if "_bwd_" in k and k.endswith("_kernel") and getattr(getattr(obj, "fn", None), "__module__", None) == name}


@pytest.mark.parametrize("op", bench_ops())
def test_kernels_compile_for_sm80_sm90_without_spills_with_128bit_access(op):
    records = [traffic.measure_case(c) for c in quick_subset(op_cases(op))]
    launches = [k for r in records for k in r["fused"]["kernels"]]
    assert launches, f"{op}: its quick cases launched no kernel to audit"
    # the backward kernels too: a quick bwd-* case launches each, so training's kernels are audited here
    unaudited = _backward_kernels(op) - {k["kernel"] for k in launches}
    assert not unaudited, f"{op}: no quick case launches {sorted(unaudited)}; add or mark quick a bwd-* case that does"
    entries = audit.audit_records(records, archs=audit.ARCHS, jobs=2)
    assert {(e["case"], e["launch"], e["arch"]) for e in entries} == {
        (r["case"], i, a) for r in records for i in range(len(r["fused"]["kernels"])) for a in audit.ARCHS
    }
    compiled = [e for e in entries if not e["result"].get("error")]
    assert all(e["result"]["regs"] > 0 and e["result"]["instructions"] > 0 for e in compiled)
    problems = [f"{e['case']}: {p}\n    {audit.format_entry(e)}" for e in entries for p in e["problems"]]
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(not ldm_fast.backend.interpreting(), reason="records launches under the Triton interpreter")
def test_attention_cpu_shapes_compile_like_the_real_shapes():
    """bench_attention runs smaller shapes on the CPU: their launches must compile exactly as the real
    shapes' (same compile keys), so the audit of the recorded launches is the real shapes' audit."""
    from benchmarks import bench_attention

    assert bench_attention.check_specs() == []


def test_main_quick_writes_table_json_png(tmp_path):
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert (tmp_path / "report.json").exists(), proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert proc.returncode == (1 if report["failures"] else 0), proc.stderr[-4000:]
    ids = [c.id for c in discover(quick=True)]
    assert [c["case"] for c in report["cases"]] == ids
    table = (tmp_path / "table.txt").read_text()
    assert table.splitlines()[0].split()[0] == "case" and proc.stdout.startswith(table.splitlines()[0])
    for case_id in ids:
        assert case_id in table
    for row in report["cases"]:
        assert row["fused_bytes"] > 0 and row["eager_bytes"] > 0
        if row.get("bytes_caveat"):  # attention: byte counts that do not compare, so no model
            assert row["model"] == {}
        else:
            assert row["model"]["fused_us"] > 0
        assert set(row["audit"]) == {"sm_80", "sm_90"}
    assert "H100 MODEL" in table and "predicted, not measured" in table
    if not torch.cuda.is_available():
        assert report["timing"] == {"kind": "cpu", "gpu_skipped": "no CUDA device"}
        assert "CPU eager ms (CPU timing)" in table and "GPU timings skipped" in table
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "[traffic" in proc.stderr and "[audit" in proc.stderr  # progress


def test_model_and_gpu_columns(tmp_path):
    """The model's arithmetic, and the table and chart paths that only a GPU run or GPU results reach."""
    record = {"fused": {"bytes": 3_000_000, "launches": 1}, "eager": {"bytes": 9_000_000, "launches": 4},
              "flops": 0, "dtype": "float16"}
    model = gpu_model.predict(record)
    assert model["fused_us"] == pytest.approx(3.0 + 1.0) and model["eager_us"] == pytest.approx(12.0 + 3.0)
    attention = dict(record, flops=790_000_000, dtype="bfloat16")  # 1 us of tensor-core work < 1 us of bytes
    assert gpu_model.predict(attention)["fused_us"] == pytest.approx(4.0)
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps(
        {"gpu": "NVIDIA H100 80GB HBM3", "cases": {"op[x]": {"fused_ms": 0.005, "eager_ms": 0.02}}}))
    measured = gpu_model.measured_for("op[x]", gpu_model.load_gpu_results(tmp_path))
    assert measured == {"gpu": "NVIDIA H100 80GB HBM3", "fused_ms": 0.005, "eager_ms": 0.02}
    cell = {"regs": 32, "spill": 0, "ld128": 2, "st128": 1, "problems": [], "error": None}
    row = {"case": "op[x]", "min_bytes": 3_000_000, "fused_ratio": 1.0, "eager_ratio": 3.0, "traffic_target": 1.0,
           "launches": {"fused": 1, "eager": 4}, "audit": {"sm_80": cell, "sm_90": cell}, "model": model,
           "timing": {"gpu": "NVIDIA H100 80GB HBM3", "fused_ms": 0.004, "eager_ms": 0.016, "fused_gbps": 750.0,
                      "eager_gbps": 187.5, "copy_gbps": 3000.0, "spec_gbps": 3350.0},
           "measured_gpu": measured, "problems": []}
    text = report.table([row], "gpu", measured["gpu"])
    header, _, line = text.splitlines()
    assert "GPU fused us" in header and "fused GB/s (% copy)" in header and "CPU" not in header
    assert "32r 0sp 2/1v ok" in line and "4.0/15.0 (3.8x)" in line and "750 (25%)" in line and "5.0/20.0" in line
    report.write_chart(tmp_path / "chart.png", [row])
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
