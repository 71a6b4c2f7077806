"""The host-cost and end-to-end benchmark instruments (benchmarks/host.py, benchmarks/e2e.py), on the CPU.

These check what the instruments record and how they label it, not how fast anything is: without a
GPU every time is a CPU time (labelled so), the kernels' launches are stubbed for the host timing,
and the GPU-only measurements are reported as skipped with their reason.
"""

from __future__ import annotations

import json

import pytest
import torch

import ldm_fast
from benchmarks import e2e, host
from benchmarks.__main__ import main as bench_main
from benchmarks.common import find_case

pytestmark = pytest.mark.slow  # benchmark instruments

GN_ONE_PASS = "group_norm[unet-1280x8x8-b1-fp16]"
REPARAM = "reparameterize[sd-latent-b1-fp16]"


@pytest.fixture(scope="module")
def host_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    cases = [(find_case(GN_ONE_PASS), "forward"), (find_case(REPARAM), "forward")]
    report = host.run(cases=cases, quick=True, out_dir=out)
    return report, json.loads((out / "host.json").read_text())


def test_host_json_fields_and_labels(host_report):
    report, data = host_report
    env = data["environment"]
    for key in ("date", "device", "torch", "triton", "diffusers", "cpu", "cpu_count", "platform", "python",
                "ldm_fast", "torch_threads"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert data["kind"] == "host" and data["method"]["host_us"]
    cases = {r["case"]: r for r in data["cases"]}
    assert set(cases) == {GN_ONE_PASS, REPARAM}
    for rec in cases.values():
        assert "error" not in rec, rec.get("error")
        assert rec["problems"] == []
        f, e, floors = rec["fused"], rec["eager"], rec["floors"]
        assert f["triton_launches"] > 0 and len(f["kernels"]) == f["triton_launches"]
        assert f["ldm_fast_kernel_launches"] > 0  # the Triton path ran, not an eager fallback
        assert e["aten_launches"] > 0
        for timing in (f["stubbed"], e["host"], floors["empty_like"], floors["add_"]):
            assert timing["us"] > 0 and timing["n"] > 0 and len(timing["samples_us"]) == timing["repeats"]
        if env["device"] == "cpu":
            assert data["timing_label"].startswith("CPU")
            assert f["stubbed"]["label"] == host.STUBBED_LABEL
            assert e["host"]["label"].startswith("CPU")
            assert floors["empty_like"]["label"] == floors["add_"]["label"] == "CPU"
            # GPU-only numbers are reported skipped, with the reason, never silently absent
            reason = floors["bare_launch"]["skipped"]
            assert "no CUDA device" in reason or "TRITON_INTERPRET" in reason
            assert "interpreter" in f["host"]["skipped"]
            assert "gpu_us" not in f and rec["fused_over_bare"] is None
            assert all(t["met"] is None and t["not_judged"] for t in rec["host_targets"])
        else:
            assert floors["bare_launch"]["us"] > 0 and f["host"]["us"] > 0 and f["gpu_us"] > 0
    gn = cases[GN_ONE_PASS]
    assert gn["fused"]["triton_launches"] == 1  # GroupNorm forward, one-pass shape: one launch
    assert gn["launch_target"] == {**gn["launch_target"], "max": 1, "exact": True, "met": True}
    assert cases[REPARAM]["fused"]["triton_launches"] == 1


def test_host_table_printed(host_report, capsys):
    report, _ = host_report
    text = host.table(report["cases"], cuda=report["environment"]["device"] == "cuda")
    assert GN_ONE_PASS in text and REPARAM in text
    if report["environment"]["device"] == "cpu":
        assert "stubbed us (CPU)" in text and "skip" in text
        assert any("need a GPU" in n for n in report["notes"])


def test_relaunch_reissues_the_captured_launches():
    """The bare-launch floor re-issues exactly the op's launches: replayed, they rewrite its output."""
    moments = torch.randn(1, 8, 8, 8)
    with ldm_fast.use_backend("triton"):
        z, launches = host.capture_launches(lambda: ldm_fast.functional.reparameterize_moments(moments, seed=7))
    assert len(launches) == 1 and not callable(launches[0]["grid"])
    expected = z.clone()
    z.zero_()
    host.relaunch(launches)()
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_stub_launches_runs_no_kernel(poison):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = (InterpretedFunction.run, JITFunction.run)
    moments = torch.randn(1, 8, 8, 8)
    with ldm_fast.use_backend("triton"):
        with host.stub_launches():
            stubbed = ldm_fast.functional.reparameterize_moments(moments, seed=7)
        real = ldm_fast.functional.reparameterize_moments(moments, seed=7)
    assert torch.isnan(stubbed).all()  # the NaN-poisoned output was never written
    assert not torch.isnan(real).any()
    assert (InterpretedFunction.run, JITFunction.run) == originals


def test_host_cli_flag(tmp_path):
    assert bench_main(["--host", "--quick", "--ops", "reparameterize", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "host.json").read_text())
    assert {r["case"] for r in data["cases"]} == {f"reparameterize[sd-latent-b1-{d}]" for d in ("fp32", "fp16", "bf16")}
    assert any("bwd-" in n for n in data["notes"])  # the left-out backward case is named, with the reason


# ---------------------------------------------------------------------------------------------
# end to end


def test_e2e_unet_step_cpu(tmp_path):
    pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers (a bench/test extra)")
    report = e2e.run(scenarios=["unet-step-b1"], variants=["eager", "optimize"], out_dir=tmp_path)
    data = json.loads((tmp_path / "e2e.json").read_text())
    env = data["environment"]
    for key in ("date", "device", "torch", "triton", "diffusers", "cpu", "platform"):
        assert env[key], key
    results = {r["variant"]: r for r in data["cases"]}
    assert set(results) == {"eager", "optimize"} and all(r["scenario"] == "unet-step-b1" for r in data["cases"])
    eager = results["eager"]
    assert eager["status"] == "ok", eager.get("error")
    assert eager["ms"] > 0 and eager["host_ms"] > 0 and eager["first_call_s"] > 0
    assert len(eager["ms_samples"]) == eager["iters"]
    assert eager["parameters"] > 0 and eager["description"]
    if env["device"] == "cpu":
        assert eager["label"] == "CPU" and data["timing_label"].startswith("CPU")
        assert "TINY" in eager["description"] and "gpu_ms" not in eager
        assert any("need a GPU" in n for n in data["notes"])
    opt = results["optimize"]
    reason = e2e._optimize_api()[1]
    if reason is not None:
        assert opt["status"] == "skipped" and opt["reason"] == reason  # reported, not silently absent
        pytest.skip(f"optimize variant: {reason}")
    assert opt["status"] == "ok", opt.get("error")
    assert opt["ms"] > 0 and opt["host_ms"] > 0 and "optimize_report" in opt and opt["optimize_s"] >= 0
    assert opt["diff_vs_eager"]["max_abs"] <= 1e-4 * max(1.0, opt["diff_vs_eager"]["ref_max_abs"])
    if env["device"] == "cpu":
        assert opt["label"] == "CPU"
        check = opt["interpreted_check"]  # the optimized model with the kernels forced (interpreted)
        assert check["kernel_launches"].get("group_norm", 0) > 0
        assert check["diff_vs_eager"]["max_abs"] <= 1e-4 * max(1.0, check["diff_vs_eager"]["ref_max_abs"])


def test_e2e_attention_and_ldm_fast_model_variants(tmp_path):
    """optimize(attention=True) and ldm_fast's own models (from_diffusers, same weights) beside eager;
    on the CPU each runs once more with the kernels interpreted, the attention kernel included."""
    pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers (a bench/test extra)")
    e2e.run(scenarios=["vae-decode-512"], variants=["eager", "optimize+attention", "ldm_fast-model"], out_dir=tmp_path)
    results = {r["variant"]: r for r in json.loads((tmp_path / "e2e.json").read_text())["cases"]}
    for variant in ("optimize+attention", "ldm_fast-model"):
        rec = results[variant]
        assert rec["status"] == "ok", rec.get("error")
        assert rec["attention"].startswith("LDM_FAST_ATTENTION=triton")
        assert rec["diff_vs_eager"]["max_abs"] <= 1e-4 * max(1.0, rec["diff_vs_eager"]["ref_max_abs"])
        if rec["device"] == "cpu":
            check = rec["interpreted_check"]
            assert check["kernel_launches"].get("attention", 0) > 0 and check["kernel_launches"].get("group_norm", 0) > 0
            assert check["diff_vs_eager"]["max_abs"] <= 1e-4 * max(1.0, check["diff_vs_eager"]["ref_max_abs"])
    assert "from_diffusers" in results["ldm_fast-model"]["model"]
    assert "LDM_FAST_ATTENTION" not in __import__("os").environ  # restored after the variant


def test_e2e_gpu_variants_skipped_with_reason_on_cpu():
    if host.use_cuda():
        pytest.skip("a GPU is present: the variants run there")
    assert "GPU" in e2e.skip_reason("optimize+cuda_graph", cuda=False, compile_on_cpu=False)
    for variant in ("compile", "compile+optimize"):
        assert "--e2e-compile" in e2e.skip_reason(variant, cuda=False, compile_on_cpu=False)
    assert e2e.skip_reason("compile", cuda=False, compile_on_cpu=True) is None
    assert e2e.skip_reason("eager", cuda=False, compile_on_cpu=False) is None


def test_e2e_cli_flag(tmp_path):
    pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers (a bench/test extra)")
    assert bench_main(["--e2e", "--e2e-scenarios", "vae-decode-512", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e.json").read_text())
    by_variant = {r["variant"]: r for r in data["cases"]}
    assert set(by_variant) == set(e2e.VARIANTS)
    assert by_variant["eager"]["status"] == "ok"
    for r in data["cases"]:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["reason"]


def test_e2e_interleaves_rounds_and_reports_the_spread(monkeypatch):
    """On a busy CPU one pass per variant ranks noise: each variant is timed once per round, the
    order rotated, the samples pooled, and the spread and the rounds' agreement reported."""
    pytest.importorskip("diffusers", reason="the end-to-end benchmark needs diffusers (a bench/test extra)")
    assert e2e.CPU_ROUNDS >= 3
    calls = []
    fake_ms = {"eager": [5.0, 5.2, 5.1, 5.3, 4.9, 5.0], "optimize": [4.0, 4.1, 6.0, 6.2, 4.5, 4.4]}

    def fake_run_variant(variant, scenario, base, inputs, device, ref, iters=None, check=True):
        calls.append((variant, check))
        ms = [fake_ms[variant].pop(0) for _ in range(iters)]
        rec = {"scenario": scenario.name, "variant": variant, "status": "ok", "first_call_s": 0.1, "iters": iters,
               "rounds": 1, "ms_samples": ms, "host_samples": ms, "wall_samples": ms}
        return {**rec, **e2e.spread(rec)}, torch.zeros(1)

    monkeypatch.setattr(e2e, "run_variant", fake_run_variant)
    report = e2e.run(scenarios=["unet-step-b1"], variants=["eager", "optimize"], write=False, iters=6, rounds=3)
    assert calls == [("eager", True), ("optimize", True), ("optimize", False), ("eager", False), ("eager", False),
                     ("optimize", False)]  # interleaved, rotated; the interpreted check only in round 1
    recs = {r["variant"]: r for r in report["cases"]}
    for rec in recs.values():
        assert rec["rounds"] == 3 and rec["iters"] == 6 and len(rec["ms_samples"]) == 6 and len(rec["round_ms"]) == 3
        assert rec["ms_min"] <= rec["ms_iqr"][0] <= rec["ms"] <= rec["ms_iqr"][1] <= rec["ms_max"]
        assert rec["iqr_pct"] > 0
    assert recs["optimize"]["ms_max"] == 6.2 and recs["optimize"]["ms_min"] == 4.0
    rk = report["rankings"][0]
    assert rk["order"] == ["optimize", "eager"] and rk["rounds"] == 3 and rk["rounds_agreeing"] == 2
    assert "noise" in rk["note"]  # round 2 ranks them the other way: said so
    assert rk["note"] in report["notes"]
    assert "IQR" in e2e.table(report["cases"], cuda=False)


# ---------------------------------------------------------------------------------------------
# python -m benchmarks: the report


def _row(op, name, eager, fused, caveat=None):
    return {"case": f"{op}[{name}]", "op": op, "name": name, "eager_ratio": eager, "fused_ratio": fused,
            "traffic_target": 1.0, "min_bytes": 1e6, "launches": {"fused": 1, "eager": 2}, "problems": [],
            "model": {} if caveat else {"fused_us": 3.0, "eager_us": 6.0, "speedup": 2.0}, "bytes_caveat": caveat}


def test_attention_rows_have_no_model_and_carry_the_bytes_caveat():
    from benchmarks import report
    from benchmarks.__main__ import case_model

    rec = {"fused": {"bytes": 4e6, "launches": 1}, "eager": {"bytes": 1e6, "launches": 1}, "dtype": "float16",
           "flops": 1e9}
    attention = case_model(find_case("attention[unet-cross-4096x77-h8d40-b2-fp16]"), rec)
    assert attention["model"] == {} and "do not compare" in attention["bytes_caveat"]
    assert case_model(find_case(GN_ONE_PASS), rec)["model"]["fused_us"] > 0
    caveat = attention["bytes_caveat"]
    text = report.table([_row("group_norm", "a", 2.0, 1.0), _row("attention", "b", 1.0, 4.5, caveat)], "cpu", None)
    line = next(x for x in text.splitlines() if x.startswith("attention[b]"))
    assert line.count(report.CAVEAT_MARK) == 3 and "x)" not in line  # both ratios marked; no model value


def test_chart_has_one_panel_per_op_family_with_values_on_both_bars(tmp_path):
    import struct

    from benchmarks import report

    rows = ([_row("group_norm", f"g{i}", 2.0, 1.0 + i / 100) for i in range(30)]
            + [_row("q_sample", "q", 2.68, 1.002)]
            + [_row("attention", f"a{i}", 1.0, 4.5, "SDPA is one op: do not compare") for i in range(5)])
    fig = report.chart_figure(rows)
    assert len(fig.axes) == 3
    for ax, n in zip(fig.axes, (30, 1, 5)):
        assert len([t for t in ax.texts if t.get_text().endswith("x")]) == 2 * n  # a value on each bar
    assert report.CAVEAT_MARK in fig.axes[2].get_title(loc="left")  # the caveat next to attention's bars
    report.write_chart(tmp_path / "report.png", rows)
    width, height = struct.unpack(">II", (tmp_path / "report.png").read_bytes()[16:24])
    assert width <= 1600 and height >= width // 2  # panels stacked, not one 5000-px strip


def test_readme_states_the_measured_benchmark_run_times_and_the_quick_run():
    """The run time a user meets (17.5 minutes on 2 busy cores) is stated, with the quick run to start with."""
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    text = (root / "benchmarks" / "README.md").read_text()
    assert "5 to 8 minutes" not in text
    assert "17.5 minutes" in text and "python -m benchmarks --quick" in text
