"""``ldm_fast.optimize(model)`` and ``ldm_fast.restore(model)``: the patch list, the run loop and the
bookkeeping that makes restore exact."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from collections import Counter
from typing import Dict, List, Optional, Tuple

from torch import nn

from .. import backend
from ..integrations.diffusers import (RELEASES, AddLayerNormPatch, AttentionPatch, GEGLUPatch, ResnetPatch,
                                      TimestepsPatch, installed_version)
from .cuda_graph import CudaGraphPatch
from .patch import Context, Patch, Record
from .patches import ChannelsLastPatch, GroupNormPatch, GroupNormSiLUPatch, PackWeightsPatch
from .report import OptimizeReport

#: The patches :func:`optimize` applies, in order (a patch may build on an earlier one's change:
#: ``pack_weights`` packs what ``resnet`` and ``attention`` installed). Each name is an option.
PATCHES: List[Patch] = [
    GroupNormPatch(),
    GroupNormSiLUPatch(),
    ResnetPatch(),
    GEGLUPatch(),
    AddLayerNormPatch(),
    TimestepsPatch(),
    ChannelsLastPatch(),
    AttentionPatch(),
    PackWeightsPatch(),
    CudaGraphPatch(),
]

#: Each option of :func:`optimize` and its default.
OPTIONS: Dict[str, bool] = {p.name: p.default for p in PATCHES}

_STATE_ATTR = "_ldm_fast_optimized"


@dataclass
class _State:
    """The bookkeeping :func:`optimize` leaves on the model (``model._ldm_fast_optimized``)."""

    report: OptimizeReport
    records: List[Record]


def _options(given: Dict[str, object]) -> Dict[str, bool]:
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise TypeError(f"ldm_fast.optimize: unknown option {unknown[0]!r}; the options are "
                        f"{', '.join(OPTIONS)}")
    for name, value in given.items():
        if not isinstance(value, bool):
            raise TypeError(f"ldm_fast.optimize: {name} must be a bool, got {type(value).__name__}")
    return {**OPTIONS, **given}


def optimize(model, **options: bool) -> OptimizeReport:
    """Optimize ``model`` in place for the ldm_fast kernels; return an :class:`OptimizeReport`.

    ``model``: any ``nn.Module`` (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, CompVis
    U-Nets, your own) or a diffusers pipeline (its ``unet`` with the options given and its
    ``vae.decoder`` with the GroupNorm patches only, in one report). Module objects, Parameter
    objects, state dict keys, hooks, optimizers and adapters stay valid; :func:`restore` undoes
    exactly what changed.

    ``options``: one bool per patch (:data:`PATCHES`; each defaults to its ``default``):
    ``group_norm``, ``group_norm_silu``, ``resnet``, ``geglu``, ``add_layer_norm``,
    ``timestep_embedding``, ``pack_weights`` (on by default), ``channels_last``, ``attention``,
    ``cuda_graph`` (off). See ``docs/optimize.md`` for what each does and when it steps aside.

    Every fused path checks on each call that the modules it reads instead of calling are still the
    plain modules it was written for (a LoRA layer, a hook added later, a replaced module: that
    module is called as before), caches nothing derived from weights, and off the Triton backend
    (a CPU) runs the model's own code, so the model computes what it computed before (``channels_last``
    aside: convolutions in another memory layout sum in another order).

    diffusers code that ldm_fast does not know (a release outside 0.30.0-0.42.1, a subclass with its
    own forward) is left as it is, listed in the report, and named in ONE warning.

    Raises ``TypeError`` for an unknown option, a non-bool value or a non-module, and
    ``RuntimeError`` if ``model`` (or a submodule) is already optimized (call :func:`restore` first
    to change options). If a patch fails, what was done is undone and the error propagates.
    """
    options = _options(options)
    if not isinstance(model, nn.Module):
        if _pipeline_parts(model):
            report, unknown = _optimize_pipeline(model, options)
        else:
            raise TypeError(f"model must be a torch.nn.Module or a diffusers pipeline (with .unet/.vae), "
                            f"got {type(model).__name__}")
    else:
        ctx = _optimize_module(model, options)
        report, unknown = ctx.report, ctx.unknown
    _warn_unknown(report.model, unknown)
    return report


def _optimize_module(model: nn.Module, options: Dict[str, bool]) -> Context:
    """optimize() on one module: the patches in order; what was done is undone if one fails."""
    for name, module in model.named_modules():
        if _STATE_ATTR in module.__dict__:
            where = "model" if module is model else f"its submodule {name!r}"
            raise RuntimeError(
                f"ldm_fast.optimize: the {where} is already optimized (optimize is not idempotent); "
                "call ldm_fast.restore() on it first to optimize again with other options"
            )
    ctx = Context.of(model, options)
    try:
        for patch in PATCHES:
            off = [need for need in (patch.name, *patch.needs) if not options[need]]
            if off:
                ctx.note(patch, "off" if off[0] == patch.name else f"off (needs {off[0]})")
            else:
                patch.run(ctx)
    except BaseException:
        for rec in reversed(ctx.records):
            rec.patch.undo(rec.target, rec.state)
        raise
    ctx.report.notes.append(_backend_note(model))
    model.__dict__[_STATE_ATTR] = _State(ctx.report, ctx.records)
    return ctx


def _warn_unknown(model: str, unknown: Counter) -> None:
    """One warning for every module left because its code is not code ldm_fast knows."""
    if not unknown:
        return
    skipped = ", ".join(f"{patch} on {n} {cls}" for (patch, cls), n in unknown.items())
    warnings.warn(f"ldm_fast.optimize({model}): diffusers {installed_version()} runs code ldm_fast "
                  f"does not know (it knows diffusers {RELEASES}); these are left to diffusers (unfused, "
                  f"computing as before): {skipped}. The report lists each module with the reason.",
                  RuntimeWarning, stacklevel=3)


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
    return (f"backend: the model is on {where}: it runs its own code there (the same results, no speed-up); "
            "the Triton kernels run once the model and its inputs are on a CUDA GPU")


#: The components of a diffusers pipeline optimize() takes, with the options each gets: the U-Net
#: with the caller's options; the VAE's decoder with the GroupNorm patches only (NCHW is faster
#: there, and decode() is not forward(), so no CUDA graph).
_PIPELINE_PARTS = ("unet", "vae.decoder")
_DECODER_PATCHES = ("group_norm", "group_norm_silu", "resnet")


def _get(pipe, name: str) -> Optional[nn.Module]:
    for attr in name.split("."):
        pipe = getattr(pipe, attr, None)
    return pipe if isinstance(pipe, nn.Module) else None


def _pipeline_parts(pipe) -> List[str]:
    return [name for name in _PIPELINE_PARTS if _get(pipe, name) is not None]


def _optimize_pipeline(pipe, options: Dict[str, bool]) -> Tuple[OptimizeReport, Counter]:
    """optimize() on a diffusers pipeline: its U-Net (the options given) and its VAE decoder (the
    GroupNorm patches only); one report whose paths start with the component's name."""
    report, unknown = OptimizeReport(type(pipe).__name__, dict(options)), Counter()
    done: List[nn.Module] = []
    try:
        for name in _pipeline_parts(pipe):
            part_options = options if name == "unet" else {k: v and k in _DECODER_PATCHES for k, v in options.items()}
            part = _get(pipe, name)
            ctx = _optimize_module(part, part_options)
            sub = ctx.report
            unknown.update(ctx.unknown)
            done.append(part)
            report.changed += [item._replace(path=_prefixed(name, item.path)) for item in sub.changed]
            report.left += [item._replace(path=_prefixed(name, item.path)) for item in sub.left]
            report.notes += [f"{name}: {note}" for note in sub.notes]
    except BaseException:
        for part in reversed(done):
            restore(part)
        raise
    return report, unknown


def _prefixed(name: str, path: str) -> str:
    return name if path in ("", "<root>") else f"{name}.{path}"


def restore(model) -> nn.Module:
    """Undo :func:`optimize` on ``model`` exactly (a module or a pipeline): the original module
    classes, forwards, attention processor objects, weight storages and memory formats; returns
    ``model``.

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
    conflicts = [f"{rec.path} ({type(rec.target).__name__}): {msg}" for rec in state.records
                 for msg in (rec.patch.conflict(rec.target, rec.state),) if msg]
    if conflicts:
        more = f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise ValueError("ldm_fast.restore: cannot undo exactly, nothing was changed: " + "; ".join(conflicts[:3]) + more)
    for rec in reversed(state.records):
        rec.patch.undo(rec.target, rec.state)
    del model.__dict__[_STATE_ATTR]
    return model


def report_of(model: nn.Module) -> Optional[OptimizeReport]:
    """The report of the :func:`optimize` call in effect on ``model``, or None."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.report
