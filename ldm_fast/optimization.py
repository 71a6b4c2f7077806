"""One-line adoption: ``report = ldm_fast.optimize(model)`` and ``ldm_fast.restore(model)``.

:func:`optimize` changes a model IN PLACE, keeping every module object, every Parameter object,
the state dict keys, hooks, optimizers and adapters that refer to them; :func:`restore` undoes
exactly what it changed. What it does is a list of small passes (:data:`PASSES`), run in order:

``group_norm``
    Every module whose type is exactly ``torch.nn.GroupNorm`` gets its ``__class__`` set to
    :class:`ldm_fast.nn.GroupNorm` (``activation=None``): the same object and Parameters, its
    forward now :func:`ldm_fast.functional.group_norm` (the fused Triton kernel on CUDA, the exact
    eager ``F.group_norm`` elsewhere). The CompVis/SD ``GroupNorm32`` (a direct subclass whose
    forward is ``super().forward(x.float()).type(x.dtype)``) becomes :class:`ldm_fast.nn.GroupNorm32`
    (``isinstance`` with the original ``GroupNorm32`` class no longer holds until :func:`restore`).
    Any other subclass, and a norm with an instance-level ``forward`` (an accelerate hook), is left
    alone and listed in the report with the reason.
``silu_fusion`` (part of ``group_norm=True``)
    GroupNorm followed by SiLU becomes one fused GroupNorm+SiLU kernel where that is exact:

    * diffusers ``ResnetBlock2D``: the block gets an instance-level forward that reproduces the
      diffusers 0.42 ``ResnetBlock2D.forward`` statement for statement, with ``norm1`` and ``norm2``
      computing the SiLU themselves (under ``time_embedding_norm="scale_shift"`` the time modulation
      sits between norm2 and the SiLU, so only norm1; ``"default"`` and the VAE decoder's
      ``"group"``, which take the forward's last branch, fuse both). The block's
      ``nonlinearity`` module stays (it is applied to the time embedding too). Done only when the
      class's ``forward`` source is the one implemented (checked by its AST hash, so another
      diffusers version is never silently run with a different forward), the nonlinearity is an
      ``nn.SiLU``, the norms are plain GroupNorms used nowhere else, and nothing hooks them.
    * ``nn.Sequential(..., GroupNorm, nn.SiLU(), ...)`` (the CompVis U-Net's
      ``nn.Sequential(normalization(ch), nn.SiLU(), conv)``): the norm gets ``activation="silu"``
      and that SiLU entry becomes ``nn.Identity()`` (no state; the state dict is unchanged).

    Every other SiLU is left alone. A norm or SiLU with forward hooks is not fused (the hooks would
    see a different tensor, or not fire): it is listed as left, with the reason. Note that a forward
    hook added to a fused norm AFTER optimize sees the norm's output after the SiLU.
``channels_last`` (``channels_last=True``)
    Every 4-d parameter and buffer (conv weights) is stored ``torch.channels_last`` (5-d:
    ``channels_last_3d``) by re-assigning ``.data`` (and ``.grad``), so the Parameter objects stay
    the same. Inputs are not touched: convolutions with channels-last weights produce
    channels-last activations, and the GroupNorm kernel reads and writes that layout directly.
``attention`` (``attention=True``)
    Every diffusers ``Attention`` module (the U-Net's self- and cross-attention, the VAE's mid-block
    attention) whose processor is diffusers' default, ``AttnProcessor2_0`` (or ``AttnProcessor``
    with the default scale ``D**-0.5``), gets :class:`ldm_fast.integrations.diffusers.AttnProcessor`
    (``AttnProcessor2_0`` statement for statement, the attention computed by
    :func:`ldm_fast.functional.attention` on the ``[B, N, heads * D]`` projections, no transposes);
    :func:`restore` puts the original processor object back. Any other processor (IP-Adapter, LoRA,
    added-KV, a processor that is an ``nn.Module``, an ``AttnProcessor`` with another scale) is left
    and listed with the reason. Off by default: ``functional.attention``'s ``impl="auto"`` runs
    SDPA until a GPU measurement says the Triton kernel is faster (``LDM_FAST_ATTENTION=triton``
    forces it), so today the swap saves the transposes and copies around SDPA, not the attention.
``cuda_graph`` (``cuda_graph=True``)
    ``model.forward`` becomes a :class:`CUDAGraphForward` (an instance attribute): one CUDA graph per
    static call signature, captured on the first CUDA call with it, replayed afterwards, outputs
    cloned. Plain forward for CPU inputs, when autograd is needed, inside another capture or
    torch.compile, and for calls that cannot be captured (warned once). See its docstring for the
    contract (what is keyed, what the graphs cannot see).

Calling :func:`optimize` on a model that is already optimized raises ``RuntimeError`` (it is not
idempotent on purpose: to change the options, :func:`restore` first). The bookkeeping lives on the
model (the private attribute ``_ldm_fast_optimized``), so :func:`restore` is exact, and a
``copy.deepcopy`` of an optimized model can be restored on its own.

diffusers is optional: it is never imported here; diffusers blocks (and attention processors)
are recognized by class name and module.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import hashlib
import inspect
import itertools
import math
import sys
import textwrap
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import backend
from . import nn as ldm_nn
from .integrations.diffusers import AttnProcessor as _LdmAttnProcessor

__all__ = ["optimize", "restore", "report_of", "OptimizeReport", "ReportItem", "CUDAGraphForward", "CUDAGraphAPI", "Pass", "PASSES"]

_STATE_ATTR = "_ldm_fast_optimized"

GROUP_NORM = "GroupNorm -> ldm_fast GroupNorm"
GROUP_NORM32 = "GroupNorm32 -> ldm_fast GroupNorm32"
FUSED = "GroupNorm+SiLU fused"
RESNET_FORWARD = "ResnetBlock2D forward -> fused"
SEQUENTIAL_SILU = "SiLU -> Identity (fused into the GroupNorm before it)"
CHANNELS_LAST = "channels_last"
ATTENTION = "attention processor -> ldm_fast AttnProcessor"
CUDA_GRAPH = "forward -> CUDA graph cache"


# ---------------------------------------------------------------------------------------------
# report


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


# ---------------------------------------------------------------------------------------------
# undo records: plain data holding module references (so copy.deepcopy maps them to the copy)


@dataclass
class _SetClass:
    module: nn.Module
    old: type
    new: type

    def conflict(self) -> Optional[str]:
        if type(self.module) is not self.new:
            return f"the class of a module is {type(self.module).__name__}, not {self.new.__name__} as optimize left it"
        return None

    def undo(self) -> None:
        self.module.__class__ = self.old


class _Missing:
    """The "attribute was absent" marker; pickles and deep-copies as the one module-level instance."""

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()


@dataclass
class _SetAttr:
    """A plain (non-module) instance attribute set, e.g. ``activation`` or an instance-level
    ``forward``; undo puts back the old value or deletes it. With ``new`` given, restore refuses
    when the attribute no longer holds that object (it was replaced after optimize)."""

    module: nn.Module
    name: str
    old: Any = _MISSING
    new: Any = _MISSING

    def conflict(self) -> Optional[str]:
        if self.new is not _MISSING and self.module.__dict__.get(self.name, _MISSING) is not self.new:
            return f"the {self.name} of a {type(self.module).__name__} was replaced after optimize"
        return None

    def undo(self) -> None:
        if self.old is _MISSING:
            self.module.__dict__.pop(self.name, None)
        else:
            self.module.__dict__[self.name] = self.old


@dataclass
class _SetChild:
    """A child module replaced (a Sequential entry); undo puts the original module object back."""

    parent: nn.Module
    key: str
    old: nn.Module
    new: nn.Module

    def conflict(self) -> Optional[str]:
        if self.parent._modules.get(self.key) is not self.new:
            return f"entry {self.key!r} of a {type(self.parent).__name__} was replaced after optimize"
        return None

    def undo(self) -> None:
        self.parent._modules[self.key] = self.old


@dataclass
class _Restride:
    """A parameter/buffer (and its grad) stored in another memory format; undo restores the strides."""

    module: nn.Module
    name: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    def conflict(self) -> Optional[str]:
        return None

    def undo(self) -> None:
        tensor = self.module._parameters.get(self.name)
        if tensor is None:
            tensor = self.module._buffers.get(self.name)
        if tensor is None:
            return
        tensor.data = _with_strides(tensor.data, self.shape, self.stride)
        if tensor.grad is not None:
            tensor.grad = _with_strides(tensor.grad, self.shape, self.stride)


def _with_strides(t: torch.Tensor, shape, stride) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or tuple(t.stride()) == tuple(stride):
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


@dataclass
class _State:
    """The bookkeeping :func:`optimize` leaves on the model (``model._ldm_fast_optimized``)."""

    report: OptimizeReport
    records: list


# ---------------------------------------------------------------------------------------------
# passes


@dataclass
class _Context:
    model: nn.Module
    options: Dict[str, bool]
    report: OptimizeReport
    records: list
    paths: Dict[int, str]  # id(module) -> its first path
    uses: Counter  # id(module) -> how many places in the module tree hold it

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
    run: Callable[[_Context], None]


# --- group_norm ------------------------------------------------------------------------------


def _has_instance_forward(module: nn.Module) -> bool:
    return "forward" in module.__dict__


def _forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks)


def _any_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


_GROUP_NORM32_ALLOWED = {"forward", "__init__", "extra_repr"}


@functools.lru_cache(maxsize=None)
def _is_compvis_group_norm32(cls: type) -> bool:
    """``cls`` is the CompVis ``GroupNorm32``: a direct nn.GroupNorm subclass named GroupNorm32 that
    overrides only forward (and __init__/extra_repr), forward being exactly
    ``def forward(self, x): return super().forward(x.float()).type(x.dtype)``."""
    if cls.__name__ != "GroupNorm32" or cls.__mro__[1] is not nn.GroupNorm:
        return False
    for name, value in vars(cls).items():
        if name in _GROUP_NORM32_ALLOWED:
            continue
        if inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod)):
            return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return False
    fn = tree.body[0]
    args = fn.args
    if (fn.decorator_list or len(args.args) != 2 or args.vararg or args.kwarg or args.kwonlyargs
            or args.defaults or getattr(args, "posonlyargs", [])):
        return False
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    if len(body) != 1:
        return False
    x = args.args[1].arg
    expected = ast.parse(f"return super().forward({x}.float()).type({x}.dtype)").body[0]
    return ast.dump(body[0]) == ast.dump(expected)


@functools.lru_cache(maxsize=None)
def _unknown_state(new: type) -> Tuple[str, ...]:
    """What an instance of ``new`` (an ldm_fast GroupNorm class) holds beyond a torch GroupNorm and
    its ``activation``: a class swap cannot set it up, so a non-empty answer stops the pass."""
    with torch.device("meta"):
        ours, torchs = new(2, 2), nn.GroupNorm(2, 2)
    extra = set(ours.__dict__) - set(torchs.__dict__) - {"activation"}
    for name in ("_parameters", "_buffers", "_modules"):
        extra |= {f"{name}[{k!r}]" for k in set(getattr(ours, name)) ^ set(getattr(torchs, name))}
    return tuple(sorted(extra))


def _group_norm_pass(ctx: _Context) -> None:
    for module in ctx.modules():
        if not isinstance(module, nn.GroupNorm):
            continue
        cls = type(module)
        if cls in (ldm_nn.GroupNorm, ldm_nn.GroupNorm32):
            ctx.left(module, cls.__name__, "already an ldm_fast GroupNorm")
            continue
        if cls is nn.GroupNorm:
            new, what = ldm_nn.GroupNorm, GROUP_NORM
        elif _is_compvis_group_norm32(cls):
            new, what = ldm_nn.GroupNorm32, GROUP_NORM32
        else:
            ctx.left(module, cls.__name__,
                     f"a GroupNorm subclass ({cls.__module__}.{cls.__qualname__}) whose forward is not known")
            continue
        if _has_instance_forward(module):
            ctx.left(module, cls.__name__, "has an instance-level forward (e.g. an accelerate hook)")
            continue
        unknown = _unknown_state(new)
        if unknown:
            ctx.left(module, cls.__name__, f"ldm_fast.nn.{new.__name__} holds state a class swap cannot set up: "
                                           f"{', '.join(unknown)}")
            continue
        ctx.record(_SetAttr(module, "activation", module.__dict__.get("activation", _MISSING)))
        module.__dict__["activation"] = None
        ctx.record(_SetClass(module, cls, new))
        module.__class__ = new
        ctx.changed(module, what)


# --- silu fusion -----------------------------------------------------------------------------


def _fusable_norm(ctx: _Context, norm: Any) -> Optional[str]:
    """None when ``norm`` can take ``activation="silu"``, else why not."""
    if type(norm) not in (ldm_nn.GroupNorm, ldm_nn.GroupNorm32):
        return f"the norm is a {type(norm).__name__}, not a GroupNorm converted by the group_norm pass"
    if norm.__dict__.get("activation") is not None:
        return f"the norm already has activation={norm.activation!r}"
    if _has_instance_forward(norm):
        return "the norm has an instance-level forward"
    if _forward_hooks(norm):
        return "the norm has forward hooks (fused, they would see the output after the SiLU)"
    if ctx.uses[id(norm)] > 1:
        return "the norm module is shared (held at several places in the model)"
    return None


def _set_silu(ctx: _Context, norm: nn.Module) -> None:
    ctx.record(_SetAttr(norm, "activation", norm.__dict__.get("activation", _MISSING)))
    norm.__dict__["activation"] = "silu"
    ctx.changed(norm, FUSED)


def _global_hooks() -> bool:
    """Whether global module hooks (``register_module_forward_hook`` & co.) are registered: fusion
    would change what they see, so it is skipped then."""
    module = torch.nn.modules.module
    return any(bool(getattr(module, name, None)) for name in
               ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


def _silu_fusion_pass(ctx: _Context) -> None:
    if _global_hooks():
        ctx.report.notes.append("silu_fusion: skipped: global module forward hooks are registered")
        return
    for module in list(ctx.modules()):
        if _is_diffusers_class(module, "ResnetBlock2D"):
            _fuse_resnet_block(ctx, module)
        elif isinstance(module, nn.Sequential):
            _fuse_sequential(ctx, module)


def _is_diffusers_class(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and (cls.__module__ or "").startswith("diffusers.")


# The ResnetBlock2D.forward sources (sha256 of the AST dump, so formatting and comments do not
# matter) that _FusedResnetForward reproduces: diffusers 0.42.
_RESNET_FORWARD_AST_SHA256 = {
    "c33728fbb237b59e99dd24791db1920b1269b7ec3b67122f8feefa028cf56ecb",  # diffusers 0.42.1
}


@functools.lru_cache(maxsize=None)
def _function_ast_sha256(fn) -> Optional[str]:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        return hashlib.sha256(ast.dump(ast.parse(source)).encode()).hexdigest()
    except (OSError, TypeError, SyntaxError):
        return None


_SCALE_DEPRECATION = (
    "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error "
    "in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via "
    "`cross_attention_kwargs`."
)


class _FusedResnetForward:
    """diffusers 0.42 ``ResnetBlock2D.forward``, statement for statement, except that a fused norm
    (``norm1``; ``norm2`` when ``fuse_norm2``) applies the SiLU itself (``activation="silu"``), so
    ``nonlinearity`` is not called after it. Installed as the block's instance-level ``forward``."""

    def __init__(self, block: nn.Module, fuse_norm1: bool, fuse_norm2: bool) -> None:
        self.block = block
        self.fuse_norm1 = fuse_norm1
        self.fuse_norm2 = fuse_norm2

    def __repr__(self) -> str:
        return (f"<ldm_fast fused ResnetBlock2D.forward: norm1 fused={self.fuse_norm1}, "
                f"norm2 fused={self.fuse_norm2}>")

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self_ = self.block
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate = sys.modules[type(self_).__module__].deprecate
            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)

        hidden_states = input_tensor

        hidden_states = self_.norm1(hidden_states)
        if not self.fuse_norm1:
            hidden_states = self_.nonlinearity(hidden_states)

        if self_.upsample is not None:
            # upsample_nearest_nhwc fails with large batch sizes. see https://github.com/huggingface/diffusers/issues/984
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self_.upsample(input_tensor)
            hidden_states = self_.upsample(hidden_states)
        elif self_.downsample is not None:
            input_tensor = self_.downsample(input_tensor)
            hidden_states = self_.downsample(hidden_states)

        hidden_states = self_.conv1(hidden_states)

        if self_.time_emb_proj is not None:
            if not self_.skip_time_act:
                temb = self_.nonlinearity(temb)
            temb = self_.time_emb_proj(temb)[:, :, None, None]

        fused2 = False
        if self_.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self_.norm2(hidden_states)
            fused2 = self.fuse_norm2
        elif self_.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    f" `temb` should not be None when `time_embedding_norm` is {self_.time_embedding_norm}"
                )
            if self.fuse_norm2:  # fused for another time_embedding_norm: never apply the SiLU before the modulation
                raise RuntimeError("ldm_fast.optimize fused this ResnetBlock2D's norm2 when its time_embedding_norm "
                                   "was not 'scale_shift'; it was changed since: call ldm_fast.restore first")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self_.norm2(hidden_states)
            hidden_states = hidden_states * (1 + time_scale) + time_shift
        else:
            hidden_states = self_.norm2(hidden_states)
            fused2 = self.fuse_norm2

        if not fused2:
            hidden_states = self_.nonlinearity(hidden_states)

        hidden_states = self_.dropout(hidden_states)
        hidden_states = self_.conv2(hidden_states)

        if self_.conv_shortcut is not None:
            # Only use contiguous() during training to avoid DDP gradient stride mismatch warning.
            if self_.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self_.conv_shortcut(input_tensor)

        output_tensor = (input_tensor + hidden_states) / self_.output_scale_factor

        return output_tensor


def _resnet_block_unfusable(block: nn.Module) -> Optional[str]:
    """None when _FusedResnetForward expresses ``block`` exactly, else why not."""
    cls = type(block)
    digest = _function_ast_sha256(cls.forward)
    if digest is None:
        return f"the source of {cls.__qualname__}.forward is not available to check"
    if digest not in _RESNET_FORWARD_AST_SHA256:
        return (f"{cls.__module__}.{cls.__qualname__}.forward differs from the diffusers 0.42 forward "
                f"ldm_fast reproduces (AST sha256 {digest[:12]}...)")
    if _has_instance_forward(block):
        return "the block has an instance-level forward (e.g. an accelerate hook)"
    act = getattr(block, "nonlinearity", None)
    if type(act) is not nn.SiLU:
        return f"its nonlinearity is {type(act).__name__}, not nn.SiLU"
    if _any_hooks(act) or _has_instance_forward(act):
        return "its nonlinearity module has hooks or an instance-level forward (it would be called less often)"
    if not isinstance(getattr(block, "time_embedding_norm", None), str):
        return f"time_embedding_norm={getattr(block, 'time_embedding_norm', None)!r} is not a string"
    return None


def _fuse_resnet_block(ctx: _Context, block: nn.Module) -> None:
    reason = _resnet_block_unfusable(block)
    if reason is not None:
        ctx.left(block, "ResnetBlock2D (GroupNorm+SiLU fusion)", reason)
        return
    fuse1_reason = _fusable_norm(ctx, block.norm1)
    if block.time_embedding_norm == "scale_shift":
        fuse2_reason = "time_embedding_norm='scale_shift' modulates between norm2 and the SiLU"
    else:
        fuse2_reason = _fusable_norm(ctx, block.norm2)
    for name, why in (("norm1", fuse1_reason), ("norm2", fuse2_reason)):
        if why is not None:
            ctx.left(getattr(block, name), "GroupNorm+SiLU fusion", why)
    if fuse1_reason is not None and fuse2_reason is not None:
        return
    if fuse1_reason is None:
        _set_silu(ctx, block.norm1)
    if fuse2_reason is None:
        _set_silu(ctx, block.norm2)
    forward = _FusedResnetForward(block, fuse1_reason is None, fuse2_reason is None)
    ctx.record(_SetAttr(block, "forward", block.__dict__.get("forward", _MISSING), forward))
    block.__dict__["forward"] = forward
    ctx.changed(block, RESNET_FORWARD)


def _fuse_sequential(ctx: _Context, seq: nn.Sequential) -> None:
    if type(seq).forward is not nn.Sequential.forward or _has_instance_forward(seq):
        return
    keys = list(seq._modules.keys())
    i = 0
    while i + 1 < len(keys):
        norm, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
        if isinstance(norm, nn.GroupNorm) and type(act) is nn.SiLU:
            why = _fusable_norm(ctx, norm)
            if why is None and (_any_hooks(act) or _has_instance_forward(act)):
                why = "the SiLU module has hooks or an instance-level forward (it would not be called)"
            if why is not None:
                ctx.left(norm, "GroupNorm+SiLU fusion", why)
            else:
                _set_silu(ctx, norm)
                identity = nn.Identity()
                ctx.record(_SetChild(seq, keys[i + 1], act, identity))
                seq._modules[keys[i + 1]] = identity
                ctx.report.changed.append(ReportItem(_join(ctx.path(seq), keys[i + 1]), SEQUENTIAL_SILU))
                i += 2
                continue
        i += 1


def _join(prefix: str, name: str) -> str:
    return name if prefix in ("", "<root>") else f"{prefix}.{name}"


# --- channels_last ---------------------------------------------------------------------------


def _channels_last_pass(ctx: _Context) -> None:
    converted = 0
    seen = set()
    with torch.no_grad():
        for module in ctx.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None or tensor.dim() not in (4, 5) or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    fmt = torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d
                    new = tensor.data.contiguous(memory_format=fmt)
                    if new.stride() == tensor.stride():
                        continue
                    ctx.record(_Restride(module, name, tuple(tensor.shape), tuple(tensor.stride())))
                    tensor.data = new
                    if tensor.grad is not None:
                        tensor.grad = tensor.grad.contiguous(memory_format=fmt)
                    converted += 1
    if converted:
        ctx.report.changed.append(ReportItem("<root>", CHANNELS_LAST))
        ctx.report.notes.append(
            f"channels_last: {converted} 4-d/5-d parameters and buffers stored channels-last (same Parameter objects)"
        )
    else:
        ctx.report.notes.append("channels_last: nothing to convert (no 4-d/5-d parameters or buffers not yet channels-last)")


# --- attention -------------------------------------------------------------------------------

#: diffusers' default processors (``diffusers.models.attention_processor``) that the ldm_fast
#: AttnProcessor replaces: it is AttnProcessor2_0 statement for statement; AttnProcessor computes
#: the same math with baddbmm/softmax/bmm (and honours attn.scale, checked before the swap).
_DIFFUSERS_DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
_DIFFUSERS_PROCESSOR_MODULE = "diffusers.models.attention_processor"


def _attention_swap_refused(attn: nn.Module, processor: Any) -> Optional[str]:
    """None when ``attn``'s processor may become the ldm_fast AttnProcessor, else why not."""
    if processor is _MISSING:
        held = attn._modules.get("processor")
        if held is not None:
            return (f"its processor {type(held).__module__}.{type(held).__qualname__} is an nn.Module "
                    "(trained weights of its own, e.g. IP-Adapter): it computes its own attention")
        return "it has no processor attribute"
    cls = type(processor)
    if cls is _LdmAttnProcessor:
        return "its processor already is ldm_fast's AttnProcessor"
    if cls.__name__ not in _DIFFUSERS_DEFAULT_PROCESSORS or cls.__module__ != _DIFFUSERS_PROCESSOR_MODULE:
        return (f"a custom processor {cls.__module__}.{cls.__qualname__} (not diffusers' default "
                f"{' or '.join(_DIFFUSERS_DEFAULT_PROCESSORS)}): it computes its own attention")
    if cls.__name__ == "AttnProcessor":
        heads, inner = getattr(attn, "heads", None), getattr(attn, "inner_dim", None)
        scale = getattr(attn, "scale", None)
        if not (isinstance(heads, int) and isinstance(inner, int) and heads > 0 and inner % heads == 0
                and isinstance(scale, float) and math.isclose(scale, (inner // heads) ** -0.5, rel_tol=1e-12)):
            return (f"AttnProcessor with attn.scale={scale!r} (e.g. scale_qk=False), not D**-0.5 as "
                    "ldm_fast's processor (like AttnProcessor2_0) computes")
    return None


def _attention_pass(ctx: _Context) -> None:
    processor = _LdmAttnProcessor()  # stateless: one instance serves every Attention
    swapped = 0
    for module in ctx.modules():
        if not _is_diffusers_class(module, "Attention"):
            cls = type(module)
            if ((cls.__module__ or "").startswith("diffusers.") and cls.__name__.endswith("Attention")
                    and ("processor" in module.__dict__ or "processor" in module._modules)):
                ctx.left(module, cls.__name__, f"{cls.__module__}.{cls.__qualname__} is not diffusers' Attention "
                                               "(its processors are not the ones ldm_fast reproduces)")
            continue
        old = module.__dict__.get("processor", _MISSING)
        reason = _attention_swap_refused(module, old)
        if reason is not None:
            ctx.left(module, "Attention processor", reason)
            continue
        ctx.record(_SetAttr(module, "processor", old, processor))
        module.__dict__["processor"] = processor
        ctx.changed(module, ATTENTION)
        swapped += 1
    ctx.report.notes.append(
        f"attention: {swapped} diffusers Attention modules run ldm_fast.functional.attention (impl 'auto': SDPA "
        "unless a GPU measurement says the Triton kernel is faster; LDM_FAST_ATTENTION overrides)"
    )


# --- cuda_graph ------------------------------------------------------------------------------

#: At most this many CUDA graphs (call signatures) per model; later signatures run the plain forward.
CUDA_GRAPH_MAX_SIGNATURES = 16
_WARMUP_ITERS = 3


class _NotGraphable(Exception):
    """The call cannot be served by a CUDA graph; the message says why."""


_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
               torch.layout)


def _tensor_key(t: torch.Tensor) -> tuple:
    if t.layout != torch.strided:
        raise _NotGraphable(f"a {t.layout} tensor argument")
    return ("T", tuple(t.shape), t.dtype, t.device, tuple(t.stride()), t.requires_grad)


def _signature(obj, tensors: list) -> Any:
    """The hashable description of an argument; tensors are appended to ``tensors`` in order."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _tensor_key(obj)
    if isinstance(obj, _LEAF_TYPES) or isinstance(obj, enum.Enum):
        return (type(obj), obj)
    if type(obj) in (tuple, list):
        return (type(obj), tuple(_signature(o, tensors) for o in obj))
    if type(obj) in (dict, OrderedDict):
        if any(isinstance(k, torch.Tensor) for k in obj):
            raise _NotGraphable("a dict argument with tensor keys")
        return (type(obj), tuple((_signature(k, []), _signature(v, tensors)) for k, v in obj.items()))
    raise _NotGraphable(f"an argument of type {type(obj).__qualname__} (only tensors, numbers, strings, None, "
                        "tuples, lists and dicts can be keyed)")


def graph_key(args: tuple, kwargs: dict) -> Tuple[Any, List[torch.Tensor]]:
    """``(key, tensors)`` for a call: the key holds every tensor's shape, dtype, device, strides and
    requires_grad, every other argument by value (and its type), and the structure; ``tensors``
    are the tensor arguments in the order :func:`_replace_tensors` visits them (kwargs sorted by
    name). Raises :class:`_NotGraphable` for arguments it cannot key."""
    tensors: List[torch.Tensor] = []
    key = (_signature(tuple(args), tensors),
           tuple((name, _signature(kwargs[name], tensors)) for name in sorted(kwargs)))
    return key, tensors


def _replace_tensors(args: tuple, kwargs: dict, new: List[torch.Tensor]) -> Tuple[tuple, dict]:
    """args/kwargs with their tensors replaced, in :func:`graph_key` order, by ``new``."""
    it = iter(new)

    def sub(obj):
        if isinstance(obj, torch.Tensor):
            return next(it)
        if type(obj) in (tuple, list):
            return type(obj)(sub(o) for o in obj)
        if type(obj) in (dict, OrderedDict):
            return type(obj)((k, sub(v)) for k, v in obj.items())
        return obj

    new_args = tuple(sub(a) for a in args)
    new_kwargs = {name: sub(kwargs[name]) for name in sorted(kwargs)}
    return new_args, {name: new_kwargs[name] for name in kwargs}


def map_output(fn: Callable[[torch.Tensor], torch.Tensor], obj):
    """``obj`` with ``fn`` applied to every tensor, rebuilt as the same type: tensors, None and
    scalars, tuples and namedtuples, lists, dicts/OrderedDicts, and dataclasses (diffusers
    ``BaseOutput`` such as ``UNet2DConditionOutput``, an OrderedDict subclass and a dataclass, is
    rebuilt through its constructor). Raises :class:`_NotGraphable` for anything else."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, _LEAF_TYPES) or isinstance(obj, enum.Enum):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        if any(not f.init for f in fields):
            raise _NotGraphable(f"an output dataclass {type(obj).__qualname__} with fields outside __init__")
        return type(obj)(**{f.name: map_output(fn, getattr(obj, f.name)) for f in fields})
    if isinstance(obj, tuple):
        items = [map_output(fn, o) for o in obj]
        if hasattr(type(obj), "_fields"):  # namedtuple
            return type(obj)(*items)
        if type(obj) is tuple:
            return tuple(items)
    elif type(obj) is list:
        return [map_output(fn, o) for o in obj]
    elif type(obj) in (dict, OrderedDict):
        return type(obj)((k, map_output(fn, v)) for k, v in obj.items())
    raise _NotGraphable(f"an output of type {type(obj).__qualname__}")


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


class _Graph:
    __slots__ = ("graph", "inputs", "output", "tensors", "pointers")

    def __init__(self, graph, inputs, output, tensors, pointers):
        self.graph = graph
        self.inputs = inputs  # the static input tensors the graph reads
        self.output = output  # the static output the graph writes
        self.tensors = tensors  # the model's parameters and buffers at capture
        self.pointers = pointers  # their data_ptr at capture


class CUDAGraphAPI:
    """The CUDA calls :class:`CUDAGraphForward` makes, in one place (a test replaces it by a CPU
    emulation to check the cache logic without a GPU)."""

    device_type = "cuda"

    def is_capturing(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

    def warmup(self, device: torch.device, fn: Callable[[], Any], iters: int) -> Any:
        """Run ``fn`` ``iters`` times on a side stream (the torch.cuda.graph recipe); the last output."""
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(current)
            try:
                with torch.cuda.stream(stream):
                    for _ in range(iters):
                        out = fn()
            finally:
                current.wait_stream(stream)
        return out

    def capture(self, device: torch.device, fn: Callable[[], Any]) -> Tuple[Any, Any]:
        """``(graph, output)``: ``fn`` captured into a new CUDA graph (its own memory pool)."""
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = fn()
        return graph, output


class CUDAGraphForward:
    """A model's forward served by CUDA graphs, installed as ``model.forward`` by
    ``optimize(model, cuda_graph=True)``.

    A call takes the graph path when every tensor argument is on CUDA, autograd is not needed
    (``torch.is_grad_enabled()`` is false, or no parameter and no input requires grad), no other
    capture is under way and torch.compile is not tracing. It then looks up the call's key:
    every tensor argument's shape, dtype, device, strides and requires_grad, every other argument
    by value (numbers, strings, None, dtypes, devices, enums; nested in tuples, lists and dicts),
    plus ``model.training``, grad/inference mode, CUDA autocast state and the ldm_fast backend
    asked for. On the first call with a key it copies the inputs into static tensors, runs the
    forward 3 times on a side stream (warm-up), captures it with ``torch.cuda.graph`` and replays;
    later calls copy the inputs into the static tensors and replay. Outputs (tensors, tuples,
    namedtuples, lists, dicts, dataclasses such as diffusers ``UNet2DConditionOutput`` /
    ``DecoderOutput``) are rebuilt with every tensor cloned, so the next replay cannot overwrite
    what the caller holds.

    Plain forward (no graph) otherwise, and for a call that cannot be captured (an argument or
    output of another type, a forward that modifies its inputs in place, a capture error such as
    a host sync in the forward): its key is remembered as un-graphable and a warning says why,
    once. At most ``CUDA_GRAPH_MAX_SIGNATURES`` keys per model (a warning, then plain forwards for
    new keys). An error of the forward itself (during the warm-up) propagates.

    A graph replays the memory the model had at capture: if a parameter or buffer was re-assigned
    since (``model.to(...)``, ``.half()``, ``load_state_dict(assign=True)``), every graph is dropped
    and captured again; in-place updates (an optimizer step, ``load_state_dict``) are seen. Changes
    a graph cannot see: replaced submodules, attention processors, LoRA adapters loaded, fused or
    re-scaled, other Python attributes the forward reads. After such a change call :meth:`reset`.
    Each graph keeps its own memory pool (about the forward's peak activation memory per captured
    signature). Model CPU offload (accelerate hooks) moves the weights between calls: each move
    drops the graphs, which are captured again. Not thread-safe. ``stats`` counts graph replays,
    captures and plain calls per reason.
    """

    api = CUDAGraphAPI()

    def __init__(self, model: nn.Module, inner: Any = None, max_signatures: int = CUDA_GRAPH_MAX_SIGNATURES):
        self.model = model
        self.inner = inner  # a previous instance-level forward, else None (the class's forward)
        self.max_signatures = max_signatures
        self.graphs: Dict[Any, Any] = {}  # key -> _Graph, or a str: why it cannot be graphed
        self.stats: Counter = Counter()
        self._warned: set = set()
        wrapped = inner if inner is not None else type(model).forward.__get__(model)
        try:
            self.__signature__ = inspect.signature(wrapped)
        except (TypeError, ValueError):
            pass
        self.__doc__ = getattr(wrapped, "__doc__", None)
        self.__wrapped__ = wrapped

    # copies get an empty cache (a CUDA graph cannot be copied or pickled)
    def __reduce__(self):
        return (CUDAGraphForward, (self.model, self.inner, self.max_signatures))

    def __deepcopy__(self, memo):
        import copy

        return CUDAGraphForward(copy.deepcopy(self.model, memo), copy.deepcopy(self.inner, memo), self.max_signatures)

    def __repr__(self) -> str:
        graphs = sum(isinstance(v, _Graph) for v in self.graphs.values())
        return f"<ldm_fast CUDAGraphForward of {type(self.model).__name__}: {graphs} graphs>"

    def reset(self) -> None:
        """Drop every captured graph (and the un-graphable keys); the next calls capture again."""
        self.graphs.clear()

    def _plain(self, *args, **kwargs):
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def _fallback(self, reason: str, args, kwargs, warn: bool = False):
        self.stats[f"plain: {reason}"] += 1
        if warn:
            self._warn_once(reason)
        return self._plain(*args, **kwargs)

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"ldm_fast cuda_graph: {type(self.model).__name__} runs its plain forward: {reason}",
                          RuntimeWarning, stacklevel=4)

    def _context_key(self) -> tuple:
        return (
            self.model.training,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
            backend.requested(),
        )

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by torch.compile: the plain forward, nothing else
            return self._plain(*args, **kwargs)
        device_type = self.api.device_type
        try:
            key, tensors = graph_key(args, kwargs)
        except _NotGraphable as exc:  # warned only for a model on the graph device
            on_device = any(p.device.type == device_type for p in itertools.islice(self.model.parameters(), 1))
            return self._fallback(str(exc), args, kwargs, warn=on_device)
        if not tensors or any(t.device.type != device_type for t in tensors):
            return self._fallback(f"inputs not on {device_type.upper()}", args, kwargs)
        if self.api.is_capturing():
            return self._fallback("inside another CUDA graph capture", args, kwargs)
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in self.model.parameters())):
            return self._fallback("autograd needed (grad enabled and something requires grad)", args, kwargs)
        key = (key, self._context_key())
        entry = self.graphs.get(key)
        if isinstance(entry, _Graph) and any(t.data_ptr() != p for t, p in zip(entry.tensors, entry.pointers)):
            self.stats["reset: parameters re-assigned"] += 1
            self.reset()
            entry = None
        if entry is None:
            if len(self.graphs) >= self.max_signatures:
                return self._fallback(f"more than {self.max_signatures} call signatures", args, kwargs, warn=True)
            entry = self._capture(key, tensors, args, kwargs)
        if isinstance(entry, str):
            return self._fallback(entry, args, kwargs)
        with torch.no_grad():
            for static, t in zip(entry.inputs, tensors):
                static.copy_(t)
        entry.graph.replay()
        self.stats["graph replay"] += 1
        return map_output(_clone, entry.output)

    def _capture(self, key, tensors, args, kwargs):
        """Warm up and capture a graph for ``key``: the new ``_Graph``, or the reason (a str, also
        remembered for the key and warned once) it cannot be captured."""
        device = tensors[0].device
        with torch.no_grad():
            static_inputs = [t.clone() for t in tensors]
        static_args, static_kwargs = _replace_tensors(args, kwargs, static_inputs)
        versions = [t._version for t in static_inputs]

        def run():
            return self._plain(*static_args, **static_kwargs)

        out = self.api.warmup(device, run, _WARMUP_ITERS)  # an error here is the forward's own: it propagates
        reason = None
        try:
            map_output(_identity, out)
        except _NotGraphable as exc:
            reason = str(exc)
        del out
        if reason is None and [t._version for t in static_inputs] != versions:
            reason = "the forward modifies its inputs in place"
        if reason is None:
            tracked = list(self.model.parameters()) + list(self.model.buffers())
            try:
                graph, output = self.api.capture(device, run)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run it plainly
                reason = f"capture failed: {type(exc).__name__}: {exc}"
            else:
                entry = _Graph(graph, static_inputs, output, tracked, [t.data_ptr() for t in tracked])
                self.graphs[key] = entry
                self.stats["graph capture"] += 1
                return entry
        self.graphs[key] = reason
        self._warn_once(f"this call cannot be captured: {reason}")
        return reason


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _model_device_types(model: nn.Module) -> set:
    return {t.device.type for t in list(model.parameters()) + list(model.buffers())}


def _cuda_graph_pass(ctx: _Context) -> None:
    model = ctx.model
    old = model.__dict__.get("forward", _MISSING)
    wrapper = CUDAGraphForward(model, None if old is _MISSING else old)
    ctx.record(_SetAttr(model, "forward", old, wrapper))
    model.__dict__["forward"] = wrapper
    ctx.report.changed.append(ReportItem("<root>", CUDA_GRAPH))
    devices = _model_device_types(model)
    if not torch.cuda.is_available():
        note = "cuda_graph: enabled, but CUDA is not available: every call runs the plain forward"
    elif devices and devices != {"cuda"}:
        note = (f"cuda_graph: enabled, but the model is not on CUDA ({', '.join(sorted(devices))}): calls run the "
                "plain forward until the model and its inputs are on CUDA")
    else:
        note = ("cuda_graph: enabled; graphs are captured on the first CUDA call per input shape "
                "(under torch.no_grad()/inference_mode or with frozen parameters)")
    if callable(getattr(type(model), "decode", None)):
        note += "; only forward() is graphed, not decode()/encode()"
    ctx.report.notes.append(note)


#: The passes :func:`optimize` runs, in order.
PASSES: List[Pass] = [
    Pass("group_norm", lambda o: o["group_norm"], _group_norm_pass),
    Pass("silu_fusion", lambda o: o["group_norm"], _silu_fusion_pass),
    Pass("channels_last", lambda o: o["channels_last"], _channels_last_pass),
    Pass("attention", lambda o: o["attention"], _attention_pass),
    Pass("cuda_graph", lambda o: o["cuda_graph"], _cuda_graph_pass),
]


# ---------------------------------------------------------------------------------------------
# public API


def optimize(model: nn.Module, *, group_norm: bool = True, channels_last: bool = False,
             cuda_graph: bool = False, attention: bool = False) -> OptimizeReport:
    """Optimize ``model`` in place for the ldm_fast kernels; return an :class:`OptimizeReport`.

    Works on any ``nn.Module`` (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, CompVis
    U-Nets, your own): module objects, Parameter objects, state dict keys, forward hooks,
    optimizers and adapters stay valid.

    - ``group_norm``: plain ``nn.GroupNorm`` (and CompVis ``GroupNorm32``) modules run the ldm_fast
      kernels, and GroupNorm followed by SiLU is fused where exact (diffusers ``ResnetBlock2D``,
      ``nn.Sequential(GroupNorm, SiLU, ...)``). With the default backend a CPU model computes
      exactly what it did (the eager reference); on CUDA the kernels' fp32-statistics results.
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
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    options = {"group_norm": group_norm, "channels_last": channels_last, "attention": attention,
               "cuda_graph": cuda_graph}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
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
    ctx = _Context(model, options, report, [], paths, uses)
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
    model.__dict__[_STATE_ATTR] = _State(report, ctx.records)
    return report


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize` on ``model`` exactly: the original module classes, forwards, Sequential
    entries (the original SiLU objects), attention processor objects and memory formats; returns ``model``.

    Raises ``ValueError`` if ``model`` was never optimized (or was already restored), or if a change
    optimize made was itself replaced afterwards (then nothing is undone; the message says what).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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
