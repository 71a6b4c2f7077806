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


#: Marks the byte ratios of a case with ``bytes_caveat`` (the caveat is printed under the table).
CAVEAT_MARK = "(*)"


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
        mark = CAVEAT_MARK if r.get("bytes_caveat") else ""
        cells = [
            r["case"], _mb(r.get("min_bytes")), _ratio(r.get("fused_ratio")) + mark, _ratio(r.get("eager_ratio")) + mark,
            f"<={r['traffic_target']:.2f}x" if r.get("traffic_target") is not None else "-",
            f"{r['launches']['fused']}/{r['launches']['eager']}" if r.get("launches") else "-",
            _audit_cell(r.get("audit", {}).get("sm_80")), _audit_cell(r.get("audit", {}).get("sm_90")),
            f"{_us(m.get('fused_us'))}/{_us(m.get('eager_us'))} ({m['speedup']:.1f}x)" if m else
            f"- {mark}" if mark else "-",
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


def _wrap(text: str, width: int = 150) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def chart_figure(rows: list[dict]):
    """The chart: one panel per op family (eager and fused bytes in multiples of the minimum, the
    value on every bar, each case's target, the minimum dashed at 1.0; a family whose byte counts do
    not compare carries its caveat in the panel), and with GPU timings one more panel of achieved
    GB/s against the measured copy bandwidth. Returns the matplotlib figure (None: nothing measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("fused_ratio") is not None]
    if not rows:
        return None
    def op_of(r):
        return r.get("op") or r["case"].split("[", 1)[0]

    families = list(dict.fromkeys(op_of(r) for r in rows))
    timed = [r for r in rows if (r.get("timing") or {}).get("fused_gbps")]
    n_panels = len(families) + (1 if timed else 0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(13.0, 4.2 * n_panels), squeeze=False)
    for ax, op in zip((a[0] for a in axes), families):
        fam = [r for r in rows if op_of(r) == op]
        x = list(range(len(fam)))
        eager, fused = [r["eager_ratio"] for r in fam], [r["fused_ratio"] for r in fam]
        ax.bar([i - 0.2 for i in x], eager, width=0.4, label="eager (aten dispatch count)", color="#c44e52")
        ax.bar([i + 0.2 for i in x], fused, width=0.4, label="fused (interpreter count)", color="#4c72b0")
        ax.scatter([i + 0.2 for i in x], [r["traffic_target"] for r in fam], marker="_", s=200, color="black",
                   label="fused target", zorder=3)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="minimum (inputs read once, outputs written once)")
        few = len(fam) <= 12  # room for level labels
        for i, (e, f) in enumerate(zip(eager, fused)):
            for xpos, value in ((i - 0.2, e), (i + 0.2, f)):
                ax.annotate(f"{value:.2f}x", (xpos, value), xytext=(0, 4), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7 if few else 5, rotation=0 if few else 90)
        ax.set_ylim(0, 1.5 * max(eager + fused + [1.0]))
        ax.set_ylabel("bytes / minimum")
        caveats = sorted({r["bytes_caveat"] for r in fam if r.get("bytes_caveat")})
        title = f"{op}: measured global-memory bytes per case (CPU instruments: Triton interpreter, aten dispatch)"
        ax.set_title(title + ("\n" + _wrap(f"{CAVEAT_MARK} " + "; ".join(caveats)) if caveats else ""), fontsize=9,
                     loc="left")
        ax.set_xticks(x)
        ax.set_xticklabels([r.get("name", r["case"]) + (f" {CAVEAT_MARK}" if r.get("bytes_caveat") else "") for r in fam],
                           fontsize=6, rotation=30, ha="right")
        ax.legend(fontsize=7, loc="upper left", ncol=4)
    if timed:
        ax = axes[-1][0]
        xs = list(range(len(timed)))
        eager = [r["timing"].get("eager_gbps") or 0 for r in timed]
        fused = [r["timing"]["fused_gbps"] for r in timed]
        ax.bar([i - 0.2 for i in xs], eager, width=0.4, label="eager", color="#c44e52")
        ax.bar([i + 0.2 for i in xs], fused, width=0.4, label="fused", color="#4c72b0")
        for i, (e, f) in enumerate(zip(eager, fused)):
            ax.annotate(f"{e:.0f}", (i - 0.2, e), ha="center", va="bottom", fontsize=5, rotation=90)
            ax.annotate(f"{f:.0f}", (i + 0.2, f), ha="center", va="bottom", fontsize=5, rotation=90)
        copy, spec = timed[0]["timing"].get("copy_gbps"), timed[0]["timing"].get("spec_gbps")
        if copy:
            ax.axhline(copy, color="black", linestyle="--", linewidth=1, label=f"measured copy bandwidth {copy:.0f} GB/s")
        if spec:
            ax.axhline(spec, color="gray", linestyle=":", linewidth=1, label=f"spec peak {spec:.0f} GB/s")
        ax.set_ylim(0, 1.35 * max(eager + fused + [copy or 0, spec or 0]))
        ax.set_ylabel("achieved GB/s (minimum bytes / GPU time)")
        ax.set_title(f"GPU timings on {timed[0]['timing'].get('gpu', 'GPU')} (triton.testing.do_bench, median)",
                     fontsize=9, loc="left")
        ax.set_xticks(xs)
        ax.set_xticklabels([r["case"] for r in timed], fontsize=6, rotation=30, ha="right")
        ax.legend(fontsize=7, loc="upper left", ncol=4)
    fig.tight_layout()
    return fig


def write_chart(path: Path, rows: list[dict]) -> None:
    """Write :func:`chart_figure` as a PNG (nothing when no case was measured)."""
    import matplotlib.pyplot as plt

    fig = chart_figure(rows)
    if fig is None:
        return
    fig.savefig(path, dpi=110)
    plt.close(fig)
