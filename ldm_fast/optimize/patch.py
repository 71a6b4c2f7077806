"""The one concept of :func:`ldm_fast.optimize`: a :class:`Patch`.

A patch is one optimization a user can switch on or off. Its ``name`` is the option of
``optimize(model, <name>=True/False)`` and the ``what`` of every report item it makes. It says
which modules it considers (:meth:`Patch.candidates`), why it leaves one as it is
(:meth:`Patch.refused`: the reason goes in the report), how it changes one (:meth:`Patch.apply`,
returning the plain data its :meth:`Patch.undo` needs) and how :func:`ldm_fast.restore` puts it
back exactly (:meth:`Patch.undo`, refusing with :meth:`Patch.conflict` when the change was itself
replaced since). Most patches install an instance attribute (a block's ``forward``, an attention
``processor``): :class:`InstallPatch`.

:class:`Context` is what a patch sees while it runs: the model, the options, where each module sits
and the report it adds to. The run loop is :meth:`Patch.run` (per module) called by
:func:`ldm_fast.optimize` for each enabled patch in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from torch import nn

from .report import OptimizeReport, ReportItem


class _Missing:
    """The "attribute was absent" marker; pickles and deep-copies as the one module-level instance."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "MISSING"


MISSING = _Missing()


class UnknownSource(str):
    """A refusal because the module's code is not code ldm_fast knows (another diffusers release, a
    subclass that overrides it): reported like any reason, and named in the one warning
    :func:`ldm_fast.optimize` gives for them."""


@dataclass
class Record:
    """One change, for :func:`ldm_fast.restore`: the patch (stateless), the object it changed (a
    module) and what :meth:`Patch.apply` returned. Plain data holding module references, so
    ``copy.deepcopy`` and pickle map it to the copy."""

    patch: "Patch"
    target: Any
    state: Any
    path: str = "<root>"


@dataclass
class Context:
    """What a patch sees while it runs (one :func:`ldm_fast.optimize` call on one model)."""

    model: nn.Module
    options: Dict[str, bool]
    report: OptimizeReport
    records: List[Record] = field(default_factory=list)
    paths: Dict[int, str] = field(default_factory=dict)  # id(module) -> its first path
    uses: Counter = field(default_factory=Counter)  # id(module) -> how many places in the tree hold it
    unknown: Counter = field(default_factory=Counter)  # (patch, class name) -> modules left for unknown code
    _param_uses: Optional[Counter] = None
    _holders: Optional[dict] = None

    @classmethod
    def of(cls, model: nn.Module, options: Dict[str, bool]) -> "Context":
        ctx = cls(model, options, OptimizeReport(type(model).__name__, dict(options)))
        for name, module in model.named_modules(remove_duplicate=False):
            ctx.uses[id(module)] += 1
            ctx.paths.setdefault(id(module), name)
        return ctx

    def modules(self) -> Iterator[nn.Module]:
        """Every distinct module, in ``named_modules`` order."""
        seen = set()
        for _, module in self.model.named_modules(remove_duplicate=False):
            if id(module) not in seen:
                seen.add(id(module))
                yield module

    def path(self, module: nn.Module) -> str:
        return self.paths.get(id(module)) or "<root>"

    def holders(self, module: nn.Module) -> List[tuple]:
        """``(parent, name)`` for every place in the model that holds ``module`` as a child."""
        if self._holders is None:
            self._holders = {}
            for parent in self.modules():
                for name, child in parent._modules.items():
                    if child is not None:
                        self._holders.setdefault(id(child), []).append((parent, name))
        return self._holders.get(id(module), [])

    def shared(self, module: nn.Module) -> bool:
        """Whether ``module`` is held at several places in the model."""
        return self.uses[id(module)] > 1

    def shares_parameters(self, module: nn.Module) -> bool:
        """Whether ``module`` is held at several places in the model, or one of its parameters is
        (tied weights): re-storing its weights would untie them."""
        if self._param_uses is None:
            self._param_uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        return self.shared(module) or any(self._param_uses[id(p)] > 1 for p in module.parameters())

    def changed(self, patch: "Patch", target: Any, state: Any, path: Optional[str] = None) -> None:
        """Record a change ``patch`` made to ``target`` (undone with ``state``) and report it."""
        path = self.path(target) if path is None else path
        self.records.append(Record(patch, target, state, path))
        self.report.changed.append(ReportItem(path, patch.name))

    def left(self, patch: "Patch", module: nn.Module, reason: str, path: Optional[str] = None) -> None:
        """Report ``module`` as left as is by ``patch``, with the reason."""
        self.report.left.append(ReportItem(self.path(module) if path is None else path, patch.name, str(reason)))
        if isinstance(reason, UnknownSource):
            self.unknown[patch.name, type(module).__name__] += 1

    def note(self, patch: "Patch", text: str) -> None:
        self.report.notes.append(f"{patch.name}: {text}")


class Patch:
    """One optimization of :func:`ldm_fast.optimize`; see the module docstring.

    Subclasses set ``name`` (the option and the report's ``what``), ``default`` (on or off when the
    option is not given), ``needs`` (options that must be on too, else this one is off) and
    ``doc`` (one line for the documentation), and override :meth:`candidates`, :meth:`refused`,
    :meth:`apply` and :meth:`undo` (or :meth:`run`, for a patch that is not one change per module).
    """

    name: str = ""
    default: bool = True
    needs: tuple = ()
    doc: str = ""

    def __repr__(self) -> str:
        return f"<ldm_fast patch {self.name!r}>"

    def candidates(self, ctx: Context) -> Iterator[nn.Module]:
        """The modules this patch considers (each gets a change or a reason)."""
        return iter(())

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        """None when :meth:`apply` may change ``module``, else why not (for the report)."""
        return None

    def apply(self, module: nn.Module, ctx: Context) -> Any:
        """Change ``module``; return the plain data :meth:`undo` needs."""
        raise NotImplementedError

    def undo(self, target: Any, state: Any) -> None:
        """Put back what :meth:`apply` changed on ``target``."""
        raise NotImplementedError

    def conflict(self, target: Any, state: Any) -> Optional[str]:
        """Why :meth:`undo` cannot put ``target`` back exactly (it was changed since), else None."""
        return None

    def summary(self, count: int) -> str:
        """The report's note for ``count`` changes."""
        return f"{count} changed"

    def run(self, ctx: Context) -> None:
        """Consider each candidate: report it left with the reason, or apply and record the change."""
        count = 0
        for module in self.candidates(ctx):
            reason = self.refused(module, ctx)
            if reason is not None:
                ctx.left(self, module, reason)
                continue
            ctx.changed(self, module, self.apply(module, ctx))
            count += 1
        ctx.note(self, self.summary(count))


class InstallPatch(Patch):
    """A patch that installs an instance attribute ``attr`` (a fused ``forward``, an attention
    ``processor``) made by :meth:`make`; undo puts the previous value back (or deletes it), and
    restore refuses when the attribute no longer holds what was installed."""

    attr: str = "forward"

    def make(self, module: nn.Module, ctx: Context) -> Any:
        raise NotImplementedError

    def apply(self, module: nn.Module, ctx: Context) -> Any:
        old = module.__dict__.get(self.attr, MISSING)
        new = self.make(module, ctx)
        module.__dict__[self.attr] = new
        return old, new

    def undo(self, module: nn.Module, state: Any) -> None:
        old, _ = state
        if old is MISSING:
            module.__dict__.pop(self.attr, None)
        else:
            module.__dict__[self.attr] = old

    def conflict(self, module: nn.Module, state: Any) -> Optional[str]:
        if module.__dict__.get(self.attr, MISSING) is not state[1]:
            return f"its {self.attr} was replaced after optimize"
        return None
