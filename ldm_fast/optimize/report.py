"""What :func:`ldm_fast.optimize` reports: one item per change and per module left as it was."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple

GROUP_NORM = "GroupNorm -> ldm_fast GroupNorm"
GROUP_NORM32 = "GroupNorm32 -> ldm_fast GroupNorm32"
FUSED = "GroupNorm+SiLU fused"
RESNET_FORWARD = "ResnetBlock2D forward -> fused"
SEQUENTIAL_SILU = "SiLU -> Identity (fused into the GroupNorm before it)"
CHANNELS_LAST = "channels_last"
ATTENTION = "attention processor -> ldm_fast AttnProcessor"
PACKED_PROJECTIONS = "Attention q/k/v projections -> one GEMM (packed weights)"
TIME_PROJECTIONS = "ResNet block time projection -> one GEMM for all blocks (packed weights)"
TIMESTEPS = "Timesteps forward -> timestep_embedding kernel"
CUDA_GRAPH = "forward -> CUDA graph cache"
GEGLU = "GEGLU forward -> fused kernel"
TRANSFORMER_LAYOUT = "Transformer2DModel output -> input's memory format"
TRANSFORMER_FORWARD = "BasicTransformerBlock forward -> fused (residual add + LayerNorm)"


class ReportItem(NamedTuple):
    """One module: its path in the model (``"<root>"`` for the model itself), what was done (or, for
    a left item, what was considered) and, for a left item, why it was not done."""

    path: str
    what: str
    reason: str = ""


@dataclass
class OptimizeReport:
    """What :func:`optimize` did to a model.

    ``changed``: one :class:`ReportItem` per change (e.g. ``("down_blocks.0.resnets.0.norm1",
    "GroupNorm+SiLU fused")``). ``left``: modules considered and left as they were, with the reason.
    ``notes``: one line per pass (``"cuda_graph: ..."``, ``"channels_last: ..."``). ``counts``:
    changes per kind. ``str(report)`` is a short summary.
    """

    model: str
    options: Dict[str, bool]
    changed: List[ReportItem] = field(default_factory=list)
    left: List[ReportItem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def counts(self) -> Dict[str, int]:
        """Number of changed items per ``what``, plus ``"left"``: the number of left items."""
        counts = dict(Counter(item.what for item in self.changed))
        counts["left"] = len(self.left)
        return counts

    def paths(self, what: str) -> List[str]:
        """The paths of the changed items of kind ``what`` (e.g. ``FUSED``)."""
        return [item.path for item in self.changed if item.what == what]

    def __str__(self) -> str:
        counts = self.counts
        lines = [
            f"ldm_fast.optimize({self.model}): "
            f"{counts.get(GROUP_NORM, 0) + counts.get(GROUP_NORM32, 0)} GroupNorm -> ldm_fast, "
            f"{counts.get(FUSED, 0)} GroupNorm+SiLU fused "
            f"({counts.get(RESNET_FORWARD, 0)} ResnetBlock2D, {counts.get(SEQUENTIAL_SILU, 0)} Sequential), "
            f"{len(self.left)} left as is"
        ]
        if self.options.get("attention"):
            lines[0] += f", {counts.get(ATTENTION, 0)} attention processors -> ldm_fast"
        lines += [f"  {note}" for note in self.notes]
        shown = 8
        for item in self.left[:shown]:
            lines.append(f"  left: {item.path} ({item.what}): {item.reason}")
        if len(self.left) > shown:
            lines.append(f"  ... and {len(self.left) - shown} more left (report.left)")
        return "\n".join(lines)
