"""What :func:`ldm_fast.optimize` reports: one item per change and per module left as it was, each
named by its patch (the option that asked for it)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple


class ReportItem(NamedTuple):
    """One module: its path in the model (``"<root>"`` for the model itself), the patch (``what``:
    the option's name, e.g. ``"resnet"``) and, for a left item, why the patch was not applied."""

    path: str
    what: str
    reason: str = ""


@dataclass
class OptimizeReport:
    """What :func:`optimize` did to a model.

    ``changed``: one :class:`ReportItem` per change (e.g. ``("down_blocks.0.resnets.0", "resnet")``).
    ``left``: modules a patch considered and left as they were, with the reason (every one of them
    is printed by ``str(report)``). ``notes``: one line per patch (what it did, or that it was
    off), and which backend will run. ``counts``: changes per patch, plus ``"left"``.
    """

    model: str
    options: Dict[str, bool]
    changed: List[ReportItem] = field(default_factory=list)
    left: List[ReportItem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def counts(self) -> Dict[str, int]:
        """Number of changed items per patch name, plus ``"left"``: the number of left items."""
        counts = dict(Counter(item.what for item in self.changed))
        counts["left"] = len(self.left)
        return counts

    def paths(self, what: str) -> List[str]:
        """The paths of the changed items of patch ``what`` (e.g. ``"resnet"``)."""
        return [item.path for item in self.changed if item.what == what]

    def __str__(self) -> str:
        counts = Counter(item.what for item in self.changed)
        done = ", ".join(f"{name} {n}" for name, n in counts.items()) or "nothing changed"
        lines = [f"ldm_fast.optimize({self.model}): {done}; {len(self.left)} left as is"]
        lines += [f"  {note}" for note in self.notes]
        groups: Dict[tuple, List[str]] = {}
        for item in self.left:
            groups.setdefault((item.what, item.reason), []).append(item.path)
        for (what, reason), paths in groups.items():
            lines.append(f"  left by {what} ({len(paths)}): {reason}")
            lines.append(f"    {', '.join(paths)}")
        return "\n".join(lines)
