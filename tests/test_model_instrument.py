"""The whole-model instrument (benchmarks/model.py) on tiny configs: counts, kinds, the optimize() effect, model.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks import model

pytestmark = pytest.mark.slow  # the whole-model instrument in a subprocess


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """``python -m benchmarks --model --quick`` in its own process, as users run it (a test process
    that ran other kernels under the interpreter first is not the instrument's environment)."""
    out = tmp_path_factory.mktemp("model")
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-m", "benchmarks", "--model", "--quick", "--out", str(out)], cwd=repo,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rep = json.loads((out / "model.json").read_text())
    rep["_dir"] = out
    return rep


def test_counts_are_positive_and_kinds_sum_to_the_total(report):
    assert set(report["scenarios"]) == {"unet-step-b2", "vae-decode-512"}
    for scenario, variants in report["scenarios"].items():
        assert set(variants) == {"eager", "optimize"}
        for variant, s in variants.items():
            assert "error" not in s, (scenario, variant, s.get("error"))
            assert s["launches"] > 0 and s["bytes"] > 0 and s["flops"] > 0
            for key in ("launches", "bytes", "flops"):
                assert sum(s["by_kind"][k][key] for k in model.KINDS) == s[key], (scenario, variant, key)
            assert s["aten_launches"] + s["ldm_fast_launches"] == s["launches"]
            assert s["by_kind"]["gemm_conv"]["launches"] > 0 and s["by_kind"]["norm"]["launches"] > 0
            assert s["est_ms"] > 0


def test_optimize_runs_the_kernels_and_fuses_the_silu(report):
    """optimize() swaps every GroupNorm for ldm_fast's (launches stubbed and counted): at the tiny
    sizes one launch per norm, as eager's one aten op; the SiLUs after the ResnetBlock norms fold into
    them, so norm + elementwise launches drop and norm launches do not rise."""
    for scenario, variants in report["scenarios"].items():
        eager, opt = variants["eager"], variants["optimize"]
        assert eager["ldm_fast_launches"] == 0 and opt["ldm_fast_launches"] > 0
        kinds_e, kinds_o = eager["by_kind"], opt["by_kind"]
        assert kinds_o["norm"]["launches"] <= kinds_e["norm"]["launches"]
        assert (kinds_o["norm"]["launches"] + kinds_o["elementwise"]["launches"]
                < kinds_e["norm"]["launches"] + kinds_e["elementwise"]["launches"])
        assert kinds_o["elementwise"]["bytes"] < kinds_e["elementwise"]["bytes"]
        assert opt["launches"] < eager["launches"]
        # the matrix work is the same FLOPs (up to the residual adds the GEMM epilogues absorb), in as many
        # launches or fewer (the packed time_emb_proj GEMM serves every ResnetBlock2D)
        assert kinds_o["gemm_conv"]["launches"] <= kinds_e["gemm_conv"]["launches"]
        assert kinds_e["gemm_conv"]["flops"] <= kinds_o["gemm_conv"]["flops"] <= 1.01 * kinds_e["gemm_conv"]["flops"]


def test_json_is_written(report):
    data = json.loads((report["_dir"] / "model.json").read_text())
    assert data["quick"] is True and data["kinds"] == list(model.KINDS)
    assert data["scenarios"]["unet-step-b2"]["eager"]["launches"] == report["scenarios"]["unet-step-b2"]["eager"]["launches"]
    assert data["model"]["launch_us"] == model.CALIBRATION["launch_us"]


def test_counting_rule_on_known_ops():
    """A linear layer, a conv and a GELU on fake tensors: bytes, launches, FLOPs and kinds by the stated rule."""
    with FakeTensorMode():
        x = torch.randn(8, 16)
        w = torch.randn(32, 16)
        b = torch.randn(32)
        img = torch.randn(2, 3, 10, 10)
        k = torch.randn(4, 3, 3, 3)
        counter = model.ModelCounter()
        with counter:
            y = torch.nn.functional.linear(x, w, b)  # t (a view, free) + addmm
            torch.nn.functional.gelu(y)
            torch.nn.functional.conv2d(img, k, padding=1)
            y.view(-1).t()  # views: free
    rows = {name: (kind, nbytes, launch, flops) for name, kind, nbytes, launch, flops in counter.rows}
    assert set(rows) == {"addmm", "gelu", "convolution"}
    assert rows["addmm"] == ("gemm_conv", 4 * (32 + 8 * 16 + 16 * 32 + 8 * 32), True, 2 * 8 * 32 * 16)
    assert rows["gelu"] == ("elementwise", 4 * 2 * 8 * 32, True, 0)
    assert rows["convolution"][0] == "gemm_conv" and rows["convolution"][3] == 2 * (2 * 4 * 10 * 10) * (3 * 3 * 3)
