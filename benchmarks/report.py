"""The outputs of ``python -m benchmarks``: one text table, a JSON report and a PNG chart.

Each row is one case (see README.md for how to read the columns); the JSON holds everything the
table summarizes (per-op byte breakdowns, every kernel launch and its load/store sites, the full
audit of every compiled kernel, the model and any timings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


def _mb(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}"


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}x"


def _audit_cell(arch_entry: Optional[dict]) -> str:
    if not arch_entry:
        return "-"
    if arch_entry.get("error"):
        return "NO COMPILE"
    verdict = "FAIL" if arch_entry["problems"] else "ok"
    return f"{arch_entry['regs']}r {arch_entry['spill']}sp {arch_entry['ld128']}/{arch_entry['st128']}v {verdict}"


def _us(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")


def table(rows: list[dict], timing_kind: str, measured_gpu: Optional[str]) -> str:
    """The one text table; ``timing_kind`` is ``"gpu"`` (timed here on CUDA), ``"cpu"`` or ``"none"``."""
    headers = ["case", "min MB", "fused/min", "eager/min", "target", "launch f/e",
               "audit sm_80", "audit sm_90", "H100 MODEL us f/e (x)"]
    if timing_kind == "gpu":
        headers += ["GPU fused us", "GPU eager us", "fused GB/s (% copy)"]
    elif timing_kind == "cpu":
        headers += ["CPU eager ms (CPU timing)"]
    if measured_gpu:
        headers += [f"measured us f/e ({measured_gpu})"]
    headers += ["status"]
    lines = []
    for r in rows:
        m = r.get("model") or {}
        cells = [
            r["case"], _mb(r.get("min_bytes")), _ratio(r.get("fused_ratio")), _ratio(r.get("eager_ratio")),
            f"<={r['traffic_target']:.2f}x" if r.get("traffic_target") is not None else "-",
            f"{r['launches']['fused']}/{r['launches']['eager']}" if r.get("launches") else "-",
            _audit_cell(r.get("audit", {}).get("sm_80")), _audit_cell(r.get("audit", {}).get("sm_90")),
            f"{_us(m.get('fused_us'))}/{_us(m.get('eager_us'))} ({m['speedup']:.1f}x)" if m else "-",
        ]
        t = r.get("timing") or {}
        if timing_kind == "gpu":
            gbps = t.get("fused_gbps")
            pct = f" ({100 * gbps / t['copy_gbps']:.0f}%)" if gbps and t.get("copy_gbps") else ""
            cells += [_us(t.get("fused_ms", 0) * 1e3) if t.get("fused_ms") else "-",
                      _us(t.get("eager_ms", 0) * 1e3) if t.get("eager_ms") else "-",
                      f"{gbps:.0f}{pct}" if gbps else "-"]
        elif timing_kind == "cpu":
            cells += [f"{t['eager_cpu_ms']:.3f}" if t.get("eager_cpu_ms") is not None else "-"]
        if measured_gpu:
            g = r.get("measured_gpu")
            cells += [f"{_us(g['fused_ms'] * 1e3)}/{_us(g['eager_ms'] * 1e3) if g.get('eager_ms') else '-'}" if g else "-"]
        cells += ["FAIL" if r["problems"] else "skip" if r.get("skipped") else "ok"]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(headers)]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(c) for c in lines]
    return "\n".join(out)


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1, default=str))


def write_chart(path: Path, rows: list[dict]) -> None:
    """Bytes moved per case (eager vs fused, in multiples of the minimum) and, with GPU timings, GB/s vs peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("fused_ratio") is not None]
    if not rows:
        return
    timed = [r for r in rows if (r.get("timing") or {}).get("fused_gbps")]
    n_panels = 2 if timed else 1
    width = max(8.0, 0.55 * len(rows) + 2)
    fig, axes = plt.subplots(n_panels, 1, figsize=(width, 4.8 * n_panels), squeeze=False)
    labels = [r["case"].replace("[", "\n[") for r in rows]
    x = list(range(len(rows)))

    ax = axes[0][0]
    ax.bar([i - 0.2 for i in x], [r["eager_ratio"] for r in rows], width=0.4, label="eager (aten dispatch count)",
           color="#c44e52")
    ax.bar([i + 0.2 for i in x], [r["fused_ratio"] for r in rows], width=0.4, label="fused (interpreter count)",
           color="#4c72b0")
    ax.scatter([i + 0.2 for i in x], [r["traffic_target"] for r in rows], marker="_", s=300, color="black",
               label="fused target", zorder=3)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="minimum (each input read once, output written once)")
    ax.set_ylim(0, 1.45 * max([r["eager_ratio"] for r in rows] + [r["fused_ratio"] for r in rows] + [1.0]))
    ax.set_ylabel("global-memory bytes / minimum")
    ax.set_title("Measured bytes moved per case (CPU instruments: Triton interpreter, aten dispatch)")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=7, rotation=90)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    for i, r in enumerate(rows):
        ax.annotate(f"{r['eager_ratio']:.1f}x", (i - 0.2, r["eager_ratio"]), ha="center", va="bottom", fontsize=6)

    if timed:
        ax = axes[1][0]
        names = [r["case"].replace("[", "\n[") for r in timed]
        xs = list(range(len(timed)))
        ax.bar([i - 0.2 for i in xs], [r["timing"].get("eager_gbps") or 0 for r in timed], width=0.4,
               label="eager", color="#c44e52")
        ax.bar([i + 0.2 for i in xs], [r["timing"]["fused_gbps"] for r in timed], width=0.4, label="fused",
               color="#4c72b0")
        copy = timed[0]["timing"].get("copy_gbps")
        if copy:
            ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"measured copy bandwidth {copy:.0f} GB/s")
        spec = timed[0]["timing"].get("spec_gbps")
        if spec:
            ax.axhline(spec, color="gray", linestyle=":", linewidth=1, label=f"spec peak {spec:.0f} GB/s")
        top = max([r["timing"].get("eager_gbps") or 0 for r in timed] + [r["timing"]["fused_gbps"] for r in timed]
                  + [timed[0]["timing"].get("copy_gbps") or 0, timed[0]["timing"].get("spec_gbps") or 0])
        ax.set_ylim(0, 1.35 * top)
        ax.set_ylabel("achieved GB/s (minimum bytes / GPU time)")
        ax.set_title(f"GPU timings on {timed[0]['timing'].get('gpu', 'GPU')} (triton.testing.do_bench, median)")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=7, rotation=90)
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
