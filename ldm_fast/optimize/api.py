"""``ldm_fast.optimize(model)`` and ``ldm_fast.restore(model)``: the pass list, the context the
passes share, and the bookkeeping that makes restore exact."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from torch import nn

from .. import backend
from .cuda_graph import _cuda_graph_pass
from .passes import (_add_layer_norm_pass, _attention_pass, _channels_last_pass, _geglu_pass, _group_norm_pass,
                     _silu_fusion_pass, _timestep_embedding_pass)
from .report import OptimizeReport, ReportItem
from .undo import _STATE_ATTR, _State


@dataclass
class Context:
    model: nn.Module
    options: Dict[str, bool]
    report: OptimizeReport
    records: list
    paths: Dict[int, str]  # id(module) -> its first path
    uses: Counter  # id(module) -> how many places in the module tree hold it
    _param_uses: Optional[Counter] = field(default=None, init=False, repr=False)  # id(parameter) -> holders

    def shares_parameters(self, module: nn.Module) -> bool:
        """Whether ``module`` is held at several places in the model, or one of its parameters is
        (tied weights): re-storing its weights would untie them."""
        if self._param_uses is None:
            self._param_uses = Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        return self.uses[id(module)] > 1 or any(self._param_uses[id(p)] > 1 for p in module.parameters())

    def path(self, module: nn.Module) -> str:
        return self.paths.get(id(module)) or "<root>"

    def record(self, rec) -> None:
        self.records.append(rec)

    def changed(self, module: nn.Module, what: str) -> None:
        self.report.changed.append(ReportItem(self.path(module), what))

    def left(self, module: nn.Module, what: str, reason: str) -> None:
        """Report ``module`` as left as is; only the first reason per module (the root cause: a
        GroupNorm a pass could not convert is not reported again by the fusion it blocks)."""
        path = self.path(module)
        if all(item.path != path for item in self.report.left):
            self.report.left.append(ReportItem(path, what, reason))

    def modules(self):
        """Every distinct module, in ``named_modules`` order."""
        seen = set()
        for _, module in self.model.named_modules(remove_duplicate=False):
            if id(module) not in seen:
                seen.add(id(module))
                yield module


@dataclass
class Pass:
    """One optimization: ``run(ctx)`` changes the model, appends undo records with ``ctx.record``
    and reports with ``ctx.changed``/``ctx.left``/``ctx.report.notes``; it runs when
    ``enabled(options)`` is true. Append a Pass to :data:`PASSES` (and an option to :func:`optimize`)
    to add an optimization."""

    name: str
    enabled: Callable[[Dict[str, bool]], bool]
    run: Callable[[Context], None]


#: The passes :func:`optimize` runs, in order.
PASSES: List[Pass] = [
    Pass("group_norm", lambda o: o["group_norm"], _group_norm_pass),
    Pass("silu_fusion", lambda o: o["group_norm"], _silu_fusion_pass),
    Pass("geglu", lambda o: o["geglu"], _geglu_pass),
    Pass("add_layer_norm", lambda o: o["add_layer_norm"], _add_layer_norm_pass),
    Pass("timestep_embedding", lambda o: o["timestep_embedding"], _timestep_embedding_pass),
    Pass("channels_last", lambda o: o["channels_last"], _channels_last_pass),
    Pass("attention", lambda o: o["attention"], _attention_pass),
    Pass("cuda_graph", lambda o: o["cuda_graph"], _cuda_graph_pass),
]


def optimize(model: nn.Module, *, group_norm: bool = True, channels_last: bool = False,
             cuda_graph: bool = False, attention: bool = False, geglu: bool = True,
             add_layer_norm: bool = True, pack_weights: bool = True,
             timestep_embedding: bool = True) -> OptimizeReport:
    """Optimize ``model`` in place for the ldm_fast kernels; return an :class:`OptimizeReport`.

    Works on any ``nn.Module`` (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, CompVis
    U-Nets, your own): module objects, Parameter objects, state dict keys, forward hooks,
    optimizers and adapters stay valid. A diffusers pipeline (an object with ``.unet`` and/or
    ``.vae``) has its U-Net optimized with the options given and its VAE decoder with GroupNorm
    (+SiLU) fusion only (NCHW, no graph: ``decode`` is not ``forward``), in one report;
    ``restore(pipe)`` undoes both. The report's last note says which backend will run: on a CPU
    the fused modules run the eager reference (the same results, no speed-up).

    - ``group_norm``: plain ``nn.GroupNorm`` (and CompVis ``GroupNorm32``) modules run the ldm_fast
      kernels, and GroupNorm followed by SiLU is fused where exact (diffusers ``ResnetBlock2D``,
      ``nn.Sequential(GroupNorm, SiLU, ...)``). With the default backend a CPU model computes
      exactly what it did (the eager reference); on CUDA the kernels' fp32-statistics results.
    - ``geglu``: diffusers ``GEGLU`` gates (the transformer blocks' feed-forward) run
      :func:`ldm_fast.functional.geglu`, one kernel reading the projection in place (the eager
      statements on a CPU and under torch.compile, which fuses them itself).
    - ``add_layer_norm``: diffusers ``BasicTransformerBlock``s (``norm_type="layer_norm"``) add each
      residual that feeds a LayerNorm and apply that norm in one
      :func:`ldm_fast.functional.add_layer_norm` kernel (two per SD block; CUDA autocast too, the
      norm's output fp32 as autocast gives it; diffusers' statements on a CPU and under
      torch.compile).
    - ``timestep_embedding``: diffusers ``Timesteps`` modules (the U-Net's sinusoidal time
      embedding) run :func:`ldm_fast.functional.timestep_embedding`, one kernel instead of ~10
      launches (diffusers' statements on a CPU and under torch.compile).
    - ``pack_weights``: Linear weights that one GEMM can serve together are stored as row blocks of
      one buffer (the same Parameter objects and state dict; each ``.data`` a view): the
      ``time_emb_proj`` of a U-Net's ResnetBlock2Ds (22 GEMMs a SD 1.5 step -> 1) and, with
      ``attention``, each Attention's q/k/v (96 -> 48). Used in inference on the Triton backend while
      the views are intact (checked per call; ``model.to(dtype)`` after optimize re-allocates them and
      the separate GEMMs run); ``restore`` unpacks. ``pack_weights=False`` leaves every weight's
      storage alone.
    - ``channels_last``: 4-d parameters and buffers stored ``torch.channels_last``.
    - ``attention``: diffusers ``Attention`` modules with the default processor get
      :class:`ldm_fast.integrations.diffusers.AttnProcessor` (:func:`ldm_fast.functional.attention`
      on the ``[B, N, heads * D]`` projections; exact ``AttnProcessor2_0`` otherwise). Off by
      default: ``impl="auto"`` routes to SDPA until a GPU measurement says the Triton kernel is
      faster, so the swap saves only the transposes and copies around SDPA for now.
    - ``cuda_graph``: ``model.forward`` served by a per-signature CUDA graph cache
      (:class:`CUDAGraphForward`), for inference.

    Raises ``TypeError`` for a non-module or non-bool option, and ``RuntimeError`` if ``model`` (or
    one of its submodules) is already optimized: optimize is not idempotent; call
    :func:`restore` first to change the options. If a pass fails, what was done is undone and the
    error propagates. See the module docstring for each pass's rules.
    """
    options = {"group_norm": group_norm, "channels_last": channels_last, "attention": attention,
               "cuda_graph": cuda_graph, "geglu": geglu, "add_layer_norm": add_layer_norm, "pack_weights": pack_weights,
               "timestep_embedding": timestep_embedding}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if not isinstance(model, nn.Module):
        if _pipeline_parts(model):
            return _optimize_pipeline(model, options)
        raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline (with .unet/.vae), "
                        f"got {type(model).__name__}")
    paths: Dict[int, str] = {}
    uses: Counter = Counter()
    for name, module in model.named_modules(remove_duplicate=False):
        uses[id(module)] += 1
        paths.setdefault(id(module), name)
        if _STATE_ATTR in module.__dict__:
            where = "model" if module is model else f"its submodule {name!r}"
            raise RuntimeError(
                f"ldm_fast.optimize: the {where} is already optimized (optimize is not idempotent); "
                "call ldm_fast.restore() on it first to optimize again with other options"
            )
    report = OptimizeReport(type(model).__name__, dict(options))
    ctx = Context(model, options, report, [], paths, uses)
    try:
        for p in PASSES:
            if p.enabled(options):
                p.run(ctx)
            elif p.name != "silu_fusion":
                report.notes.append(f"{p.name}: off")
    except BaseException:
        for rec in reversed(ctx.records):
            rec.undo()
        raise
    report.notes.append(_backend_note(model))
    model.__dict__[_STATE_ATTR] = _State(report, ctx.records)
    return report


def _backend_note(model: nn.Module) -> str:
    """Which implementation the fused modules will run, for the report: no speed-up without a GPU."""
    devices = {t.device.type for t in itertools.chain(model.parameters(), model.buffers())}
    asked = backend.requested()
    if asked == "eager" or not backend.triton_available():
        why = "LDM_FAST_BACKEND=eager" if asked == "eager" else "triton is not installed"
        return f"backend: the eager reference runs ({why}): the model computes as before, no speed-up"
    if devices and devices <= {"cuda"}:
        return "backend: the Triton kernels run (the model is on CUDA)"
    where = ", ".join(sorted(devices)) or "no parameters"
    return (f"backend: the model is on {where}: its fused modules run the eager reference there (the same "
            "results, no speed-up); the Triton kernels run once the model and its inputs are on a CUDA GPU")


#: The components of a diffusers pipeline optimize() takes, with the options each gets: the U-Net
#: with the caller's options; the VAE's decoder with GroupNorm (+SiLU) fusion only (NCHW is faster
#: there, and decode() is not forward(), so no CUDA graph).
_PIPELINE_PARTS = ("unet", "vae.decoder")


def _pipeline_parts(pipe) -> List[str]:
    parts = []
    for name in _PIPELINE_PARTS:
        obj = pipe
        for attr in name.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.Module):
            parts.append(name)
    return parts


def _get(pipe, name: str) -> nn.Module:
    for attr in name.split("."):
        pipe = getattr(pipe, attr)
    return pipe


def _optimize_pipeline(pipe, options: Dict[str, bool]) -> OptimizeReport:
    """optimize() on a diffusers pipeline: its U-Net (the options given) and its VAE decoder
    (group_norm only); one report whose paths start with the component's name."""
    report = OptimizeReport(type(pipe).__name__, dict(options))
    done: List[nn.Module] = []
    try:
        for name in _pipeline_parts(pipe):
            part_options = options if name == "unet" else {"group_norm": options["group_norm"], "geglu": False,
                                                                  "add_layer_norm": False, "timestep_embedding": False}
            part = _get(pipe, name)
            sub = optimize(part, **part_options)
            done.append(part)
            report.changed += [item._replace(path=_prefixed(name, item.path)) for item in sub.changed]
            report.left += [item._replace(path=_prefixed(name, item.path)) for item in sub.left]
            report.notes += [f"{name}: {note}" for note in sub.notes]
    except BaseException:
        for part in reversed(done):
            restore(part)
        raise
    return report


def _prefixed(name: str, path: str) -> str:
    return name if path in ("", "<root>") else f"{name}.{path}"


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize` on ``model`` exactly: the original module classes, forwards, Sequential
    entries (the original SiLU objects), attention processor objects and memory formats; returns ``model``.

    Raises ``ValueError`` if ``model`` was never optimized (or was already restored), or if a change
    optimize made was itself replaced afterwards (then nothing is undone; the message says what).
    """
    if not isinstance(model, nn.Module):
        parts = [_get(model, name) for name in _pipeline_parts(model)]
        optimized = [part for part in parts if _STATE_ATTR in part.__dict__]
        if not optimized:
            raise (ValueError if parts else TypeError)(
                f"ldm_fast.restore: {type(model).__name__} is not an optimized torch.nn.Module or diffusers pipeline")
        for part in optimized:
            restore(part)
        return model
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(
            f"ldm_fast.restore: this {type(model).__name__} was not optimized by ldm_fast.optimize "
            "(or was already restored)"
        )
    conflicts = [msg for msg in (rec.conflict() for rec in state.records) if msg]
    if conflicts:
        raise ValueError("ldm_fast.restore: cannot undo exactly, nothing was changed: " + "; ".join(conflicts))
    for rec in reversed(state.records):
        rec.undo()
    del model.__dict__[_STATE_ATTR]
    return model


def report_of(model: nn.Module) -> Optional[OptimizeReport]:
    """The report of the :func:`optimize` call in effect on ``model``, or None."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.report
