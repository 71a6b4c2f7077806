"""The patches of :func:`ldm_fast.optimize` that know no library's blocks: ``group_norm`` (class
swap), ``group_norm_silu`` (a Sequential's GroupNorm, SiLU pair in one kernel), ``channels_last``
and ``pack_weights``. The diffusers blocks' patches live in :mod:`ldm_fast.integrations.diffusers`;
``cuda_graph`` in :mod:`ldm_fast.optimize.cuda_graph`."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import weakref
from typing import Any, Iterator, Optional, Tuple

import torch
from torch import nn

from .. import backend, functional
from .. import nn as ldm_nn
from .._fusion import class_method, global_module_hooks, plain_group_norm, plain_silu
from .._packing import PackedTimeProjections, linear_unpackable
from ..integrations.diffusers import ChannelsLastOutputPatch, PackedProjections, ResnetForward
from ..integrations.source import canonical
from ..integrations.diffusers.attention import PACK_ATTR, packs_query, projections_unpackable
from .patch import MISSING, Context, Patch, Record
from .report import ReportItem

# --- group_norm ------------------------------------------------------------------------------


_GROUP_NORM32_ALLOWED = {"forward", "__init__", "extra_repr"}
_COMPVIS_GROUP_NORM32: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # class -> answer (no leak)


def _is_compvis_group_norm32(cls: type) -> bool:
    """``cls`` is the CompVis ``GroupNorm32``: a direct nn.GroupNorm subclass named GroupNorm32 that
    overrides only forward (and __init__/extra_repr), forward being exactly
    ``def forward(self, x): return super().forward(x.float()).type(x.dtype)`` (cached per class)."""
    if cls not in _COMPVIS_GROUP_NORM32:
        _COMPVIS_GROUP_NORM32[cls] = _compvis_group_norm32(cls)
    return _COMPVIS_GROUP_NORM32[cls]


def _compvis_group_norm32(cls: type) -> bool:
    if cls.__name__ != "GroupNorm32" or cls.__mro__[1] is not nn.GroupNorm:
        return False
    for name, value in vars(cls).items():
        if name not in _GROUP_NORM32_ALLOWED and (inspect.isfunction(value)
                                                  or isinstance(value, (property, staticmethod, classmethod))):
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
            or args.defaults or args.posonlyargs):
        return False
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    x = args.args[1].arg
    expected = ast.parse(f"return super().forward({x}.float()).type({x}.dtype)").body
    return canonical(body) == canonical(expected)


@functools.lru_cache(maxsize=None)
def _unknown_state(new: type) -> Tuple[str, ...]:
    """What an instance of ``new`` (an ldm_fast GroupNorm class) holds beyond a torch GroupNorm and
    its ``activation``: a class swap cannot set it up, so a non-empty answer stops the patch."""
    with torch.device("meta"):
        ours, torchs = new(2, 2), nn.GroupNorm(2, 2)
    extra = set(ours.__dict__) - set(torchs.__dict__) - {"activation"}
    for name in ("_parameters", "_buffers", "_modules"):
        extra |= {f"{name}[{k!r}]" for k in set(getattr(ours, name)) ^ set(getattr(torchs, name))}
    return tuple(sorted(extra))


class GroupNormPatch(Patch):
    """Every ``torch.nn.GroupNorm`` (exactly that class) gets its ``__class__`` set to
    :class:`ldm_fast.nn.GroupNorm` (``activation=None``): the same object and Parameters, its forward
    :func:`ldm_fast.functional.group_norm`. The CompVis ``GroupNorm32`` becomes
    :class:`ldm_fast.nn.GroupNorm32`. Any other subclass, and a norm with an instance-level
    ``forward``, is left with the reason. Hooks keep working: the module computes what it did."""

    name = "group_norm"
    doc = "nn.GroupNorm (and CompVis GroupNorm32) modules run the fused GroupNorm kernel (a class swap)"

    def candidates(self, ctx: Context) -> Iterator[nn.Module]:
        return (m for m in ctx.modules() if isinstance(m, nn.GroupNorm))

    def refused(self, module: nn.Module, ctx: Context) -> Optional[str]:
        cls = type(module)
        if cls in (ldm_nn.GroupNorm, ldm_nn.GroupNorm32):
            return "already an ldm_fast GroupNorm"
        if cls is not nn.GroupNorm and not _is_compvis_group_norm32(cls):
            return f"a GroupNorm subclass ({cls.__module__}.{cls.__qualname__}) whose forward is not known"
        if "forward" in module.__dict__:
            return "has an instance-level forward (e.g. an accelerate hook)"
        unknown = _unknown_state(self._new(cls))
        if unknown:
            return f"ldm_fast's GroupNorm holds state a class swap cannot set up: {', '.join(unknown)}"
        return None

    @staticmethod
    def _new(cls: type) -> type:
        return ldm_nn.GroupNorm if cls is nn.GroupNorm else ldm_nn.GroupNorm32

    def apply(self, module: nn.Module, ctx: Context) -> Any:
        old_cls, old_activation = type(module), module.__dict__.get("activation", MISSING)
        module.__dict__["activation"] = None
        module.__class__ = self._new(old_cls)
        return old_cls, type(module), old_activation

    def conflict(self, module: nn.Module, state: Any) -> Optional[str]:
        if type(module) is not state[1]:
            return f"its class is {type(module).__name__}, not {state[1].__name__} as optimize left it"
        return None

    def undo(self, module: nn.Module, state: Any) -> None:
        old_cls, new_cls, old_activation = state
        module.__class__ = old_cls
        # an instance forward bound to our class's (accelerate's remove_hook_from_module leaves the forward it
        # wrapped): bound to the original class's instead, as it would be without ldm_fast
        forward = module.__dict__.get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is new_cls.forward:
            module.__dict__["forward"] = old_cls.forward.__get__(module)
        if old_activation is MISSING:
            module.__dict__.pop("activation", None)
        else:
            module.__dict__["activation"] = old_activation

    def summary(self, count: int) -> str:
        return f"{count} GroupNorm modules run the ldm_fast kernel"


# --- group_norm_silu -------------------------------------------------------------------------


_SEQUENTIAL_FORWARD = nn.Sequential.forward


class SequentialForward:
    """``nn.Sequential.forward`` of ``seq`` with each (GroupNorm, SiLU) pair found by optimize run as
    one :func:`ldm_fast.functional.group_norm` with ``activation="silu"`` (the CompVis U-Net's
    ``nn.Sequential(normalization(ch), nn.SiLU(), conv)``). Per call: while ``seq`` holds the same
    entries, the pair's modules are plain (:func:`plain_group_norm`, an ``nn.SiLU`` not
    intercepted) and no global module hook is registered; otherwise the entries one by one, as
    ``nn.Sequential`` calls them. Code that indexes or slices the Sequential calls its entries
    directly and never meets this forward. Installed as the Sequential's instance ``forward``."""

    def __init__(self, seq: nn.Sequential, pairs: frozenset) -> None:
        self.seq = seq
        self.entries = tuple(seq._modules.values())
        self.pairs = pairs  # i: entries[i] the norm, entries[i + 1] the SiLU

    def __repr__(self) -> str:
        return f"<ldm_fast Sequential forward: GroupNorm+SiLU in one kernel at {sorted(self.pairs)}>"

    def __call__(self, input):
        seq = self.seq
        forward = class_method(seq, nn.Sequential, "forward", _SEQUENTIAL_FORWARD)
        if (forward is not _SEQUENTIAL_FORWARD or not isinstance(input, torch.Tensor) or torch.compiler.is_compiling()
                or not backend.kernel_ok(input)):
            return forward(seq, input)
        entries = self.entries
        if tuple(self.seq._modules.values()) != entries or global_module_hooks():
            entries, pairs = tuple(self.seq._modules.values()), ()
        else:
            pairs = self.pairs
        i, n = 0, len(entries)
        while i < n:
            m = entries[i]
            if i in pairs and plain_group_norm(m) and plain_silu(entries[i + 1]):
                p = m._parameters
                input = functional.group_norm(input, m.num_groups, p["weight"], p["bias"], m.eps, activation="silu",
                                              upcast=m._upcast)
                i += 2
            else:
                input = m(input)
                i += 1
        return input


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CALLED_WHOLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # class -> {name: answer}


def _called_whole(parent: nn.Module, name: str) -> bool:
    """Whether ``parent`` only ever calls its child ``name`` whole: a container does (a Sequential
    calls its entries, lists and dicts only hold them); another module when every use of
    ``self.<name>`` in its class's source (its bases below nn.Module included) is a call
    ``self.<name>(...)`` (CompVis' ``ResBlock`` with ``use_scale_shift_norm`` calls ``out_layers[0]``
    and ``out_layers[1:]`` apart). Cached per class; False when a source cannot be read."""
    if isinstance(parent, _CONTAINERS):
        return True
    answers = _CALLED_WHOLE.setdefault(type(parent), {})
    if name not in answers:
        answers[name] = _class_calls_whole(type(parent), name)
    return answers[name]


def _class_calls_whole(cls: type, name: str) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or (klass.__module__ or "").startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return False
        calls = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and isinstance(node.ctx, ast.Load) and id(node) not in calls):
                return False
    return True


class GroupNormSiLUPatch(Patch):
    """``nn.Sequential(..., GroupNorm, nn.SiLU(), ...)`` (exactly ``nn.Sequential``) that the code
    holding it only calls whole: the pair runs as one GroupNorm+SiLU kernel
    (:class:`SequentialForward`). The modules stay as they are (hooks added later see what they
    would see: the pair then runs as two calls)."""

    name = "group_norm_silu"
    needs = ("group_norm",)
    doc = "a Sequential's GroupNorm, SiLU pair (CompVis U-Nets) runs as one GroupNorm+SiLU kernel"

    def candidates(self, ctx: Context) -> Iterator[nn.Module]:
        return (m for m in ctx.modules() if type(m) is nn.Sequential and self._pairs(m))

    @staticmethod
    def _pairs(seq: nn.Sequential) -> frozenset:
        entries = list(seq._modules.values())
        return frozenset(i for i in range(len(entries) - 1)
                         if isinstance(entries[i], nn.GroupNorm) and type(entries[i + 1]) is nn.SiLU)

    def refused(self, seq: nn.Module, ctx: Context) -> Optional[str]:
        if "forward" in seq.__dict__:
            return "the Sequential has an instance-level forward"
        for parent, name in ctx.holders(seq):
            if not _called_whole(parent, name):
                return (f"{type(parent).__qualname__}'s code uses self.{name} other than by calling it whole (it "
                        "indexes, slices or iterates it, e.g. CompVis ResBlock's out_layers[0]): the pair is "
                        "called apart there")
        entries = list(seq._modules.values())
        for i in self._pairs(seq):
            if not plain_group_norm(entries[i]):
                return (f"its GroupNorm (entry {i}) is not a plain ldm_fast GroupNorm (another class, hooks, "
                        "an instance-level forward or an activation of its own)")
            if not plain_silu(entries[i + 1]):
                return f"its SiLU (entry {i + 1}) has hooks or an instance-level forward"
        return None

    def apply(self, seq: nn.Module, ctx: Context) -> Any:
        new = SequentialForward(seq, self._pairs(seq))
        seq.__dict__["forward"] = new
        return new

    def undo(self, seq: nn.Module, state: Any) -> None:
        seq.__dict__.pop("forward", None)

    def conflict(self, seq: nn.Module, state: Any) -> Optional[str]:
        if seq.__dict__.get("forward") is not state:
            return "its forward was replaced after optimize"
        return None

    def summary(self, count: int) -> str:
        return f"{count} Sequentials run their GroupNorm+SiLU pairs as one kernel"


# --- channels_last ---------------------------------------------------------------------------


def _with_strides(t: torch.Tensor, shape, stride) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or tuple(t.stride()) == tuple(stride):
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


class ChannelsLastPatch(Patch):
    """Every 4-d parameter and buffer (conv weights) is stored ``torch.channels_last`` (5-d:
    ``channels_last_3d``) by re-assigning ``.data`` (and ``.grad``), so the Parameter objects stay the
    same; convolutions with channels-last weights produce channels-last activations, which the
    GroupNorm kernel reads and writes directly. diffusers ``Transformer2DModel``s return their output
    in their input's layout (:class:`ldm_fast.integrations.diffusers.ChannelsLastOutputPatch`), so the
    activations stay channels-last from block to block."""

    name = "channels_last"
    default = False
    doc = "4-d weights stored channels-last; diffusers Transformer2DModels keep their input's layout"

    def run(self, ctx: Context) -> None:
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
                        ctx.records.append(Record(self, module, (name, tuple(tensor.shape), tuple(tensor.stride()))))
                        tensor.data = new
                        if tensor.grad is not None:
                            tensor.grad = tensor.grad.contiguous(memory_format=fmt)
                        converted += 1
        if converted:
            ctx.report.changed.append(ReportItem("<root>", self.name))
        ctx.note(self, f"{converted} 4-d/5-d parameters and buffers stored channels-last (same Parameter objects)")
        ChannelsLastOutputPatch().run(ctx)

    def undo(self, module: nn.Module, state: Any) -> None:
        name, shape, stride = state
        tensor = module._parameters.get(name)
        if tensor is None:
            tensor = module._buffers.get(name)
        if tensor is None:
            return
        tensor.data = _with_strides(tensor.data, shape, stride)
        if tensor.grad is not None:
            tensor.grad = _with_strides(tensor.grad, shape, stride)


# --- pack_weights ----------------------------------------------------------------------------


class PackWeightsPatch(Patch):
    """Linear weights one GEMM can serve together stored as row blocks of one buffer (the same
    Parameter objects, state dict keys and values; each ``.data`` a view): the time projection of
    every fused diffusers ``ResnetBlock2D`` and of ldm_fast's own ``ResBlock`` (one GEMM a step,
    :class:`ldm_fast._packing.PackedTimeProjections`), and each swapped attention's q/k/v (one GEMM,
    :class:`~ldm_fast.integrations.diffusers.PackedProjections`). Used in inference on the Triton
    backend while the views are intact (checked per call); ``restore`` unpacks."""

    name = "pack_weights"
    doc = "time projections of all ResNet blocks, and an attention's q/k/v, as one GEMM (packed weights)"

    def run(self, ctx: Context) -> None:
        blocks = self._pack_time_projections(ctx)
        attentions = self._pack_attention_projections(ctx)
        ctx.note(self, f"{blocks} ResNet blocks project the time embedding with one GEMM a step; {attentions} "
                       "attentions compute their projections with one GEMM (inference on the Triton backend)")

    def _time_projection_holders(self, ctx: Context) -> list:
        """(block, its time projection Linear, its name, the object whose ``time_pack`` it reads)."""
        from ..models.unet import ResBlock  # (lazily: the models import ldm_fast.nn, as this package does)

        holders = []
        for module in ctx.modules():
            forward = module.__dict__.get("forward")
            if isinstance(forward, ResnetForward) and module.time_emb_proj is not None:
                holders.append((module, module.time_emb_proj, "time_emb_proj", forward))
            elif type(module) is ResBlock and module.time_pack is None:
                holders.append((module, module.emb_layers[1], "emb_layers.1", module))
        return holders

    def _pack_time_projections(self, ctx: Context) -> int:
        groups: dict = {}
        for block, proj, name, owner in self._time_projection_holders(ctx):
            reason = linear_unpackable(proj, name)
            if reason is None and ctx.shares_parameters(proj):
                reason = f"its {name} (or its weight) is shared with another module: packing would untie it"
            if reason is not None:
                ctx.left(self, block, reason)
                continue
            key = (proj.in_features, proj.weight.dtype, proj.weight.device, proj.bias is None)
            groups.setdefault(key, []).append((block, proj, owner))
        packed = 0
        for group in groups.values():
            if len(group) < 2:
                ctx.left(self, group[0][0], "the only ResNet block with its time embedding width, dtype and device")
                continue
            pack = PackedTimeProjections(tuple(proj for _, proj, _ in group))
            for block, _, owner in group:
                owner.time_pack = pack
                ctx.changed(self, block, ("time", pack, owner))
            packed += len(group)
        return packed

    def _pack_attention_projections(self, ctx: Context) -> int:
        from ..integrations.diffusers.attention import AttnProcessor

        packed = 0
        for attn in ctx.modules():
            if not isinstance(attn.__dict__.get("processor"), AttnProcessor) or PACK_ATTR in attn.__dict__:
                continue
            reason = projections_unpackable(attn)
            with_q = reason is None and packs_query(attn)
            names = ("to_q", "to_k", "to_v") if with_q else ("to_k", "to_v")
            if reason is None:
                shared = [name for name in names if ctx.shares_parameters(getattr(attn, name))]
                if shared:
                    reason = f"its {shared[0]} (or its weight) is shared with another module: packing would untie it"
            if reason is not None:
                ctx.left(self, attn, reason)
                continue
            pack = PackedProjections(tuple(getattr(attn, name) for name in names), with_q)
            attn.__dict__[PACK_ATTR] = pack
            ctx.changed(self, attn, ("qkv", pack, attn))
            packed += 1
        return packed

    def undo(self, module: nn.Module, state: Any) -> None:
        kind, pack, owner = state
        pack.unpack()
        if kind == "time":
            owner.time_pack = None
        else:
            owner.__dict__.pop(PACK_ATTR, None)
