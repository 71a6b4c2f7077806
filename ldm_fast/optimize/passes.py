"""The passes of :func:`ldm_fast.optimize` that change modules: ``group_norm`` (class swap),
``silu_fusion`` (GroupNorm+SiLU), ``geglu`` (the feed-forward gate), ``add_layer_norm`` (the
transformer blocks' residual add + LayerNorm), ``channels_last`` and
``attention`` (processor swap). Each is
``run(ctx)`` on an :class:`~ldm_fast.optimize.api.Context`: it changes the model, records undo
records and reports what it changed and what it left, with the reason. (``cuda_graph`` is in
:mod:`ldm_fast.optimize.cuda_graph`.)"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import weakref
from typing import TYPE_CHECKING, Any, Optional, Tuple

import torch
from torch import nn

from .. import nn as ldm_nn
from ..integrations.diffusers import AttnProcessor as _LdmAttnProcessor
from ..integrations.diffusers import (PACK_ATTR, ChannelsLastTransformerOutput, FusedGEGLUForward, FusedResnetForward,
                                      FusedTimestepsForward, FusedTransformerBlockForward, PackedProjections,
                                      attention_swap_refused, feed_forward_epilogue_refused, geglu_unfusable,
                                      is_diffusers_class, packs_query, projections_unpackable, resnet_block_unfusable,
                                      shortcut_gemm_refused, timesteps_unfusable, transformer_block_unfusable,
                                      transformer_output_unkept)
from ..nn import PackedTimeProjections, global_module_hooks, linear_unpackable
from .report import (ATTENTION, CHANNELS_LAST, FUSED, GEGLU, GROUP_NORM, GROUP_NORM32, PACKED_PROJECTIONS, RESNET_FORWARD,
                     SEQUENTIAL_SILU, TIME_PROJECTIONS, TIMESTEPS, TRANSFORMER_FORWARD, TRANSFORMER_LAYOUT, ReportItem)
from .undo import _MISSING, _Restride, _SetAttr, _SetChild, _SetClass, _Unpack

if TYPE_CHECKING:
    from .api import Context as _Context


# --- group_norm ------------------------------------------------------------------------------


def _has_instance_forward(module: nn.Module) -> bool:
    return "forward" in module.__dict__


def _forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks)


def _any_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


_GROUP_NORM32_ALLOWED = {"forward", "__init__", "extra_repr"}


_COMPVIS_GROUP_NORM32: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # class -> answer (no leak)


def _is_compvis_group_norm32(cls: type) -> bool:
    """Cached :func:`_compvis_group_norm32` (weakly: a class seen is not kept alive)."""
    if cls not in _COMPVIS_GROUP_NORM32:
        _COMPVIS_GROUP_NORM32[cls] = _compvis_group_norm32(cls)
    return _COMPVIS_GROUP_NORM32[cls]


def _compvis_group_norm32(cls: type) -> bool:
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


def _silu_fusion_pass(ctx: _Context) -> None:
    if global_module_hooks():
        ctx.report.notes.append("silu_fusion: skipped: global module forward hooks are registered")
        return
    modules = list(ctx.modules())
    holders: dict = {}  # id(child) -> [(parent, attribute name)]
    for module in modules:
        for name, child in module._modules.items():
            if child is not None:
                holders.setdefault(id(child), []).append((module, name))
    forwards = []
    for module in modules:
        if is_diffusers_class(module, "ResnetBlock2D"):
            forward = _fuse_resnet_block(ctx, module)
            if forward is not None:
                forwards.append(forward)
        elif isinstance(module, nn.Sequential):
            _fuse_sequential(ctx, module, holders.get(id(module), []))
        elif not isinstance(module, _CONTAINERS):
            _fuse_attribute_pairs(ctx, module)
    shortcuts = 0
    for forward in forwards:
        if forward.shortcut_gemm:
            shortcuts += 1
        elif forward.block.conv_shortcut is not None:
            ctx.left(forward.block.conv_shortcut, "1x1 shortcut as a GEMM onto conv2", shortcut_gemm_refused(forward.block))
    if shortcuts:
        ctx.report.notes.append(f"silu_fusion: {shortcuts} ResnetBlock2D 1x1 shortcuts run as a GEMM accumulating onto "
                                "conv2's output (inference on the Triton backend)")
    if ctx.options["pack_weights"]:
        _pack_time_projections(ctx, forwards)


def _time_projection_holders(ctx: _Context, forwards: list) -> list:
    """(block, its time projection Linear, its name, where the pack goes) for the fused diffusers
    ResnetBlock2Ds (``forwards``) and ldm_fast's own U-Net ResBlocks."""
    from ..models.unet import ResBlock  # (lazily: the models import ldm_fast.nn, as this package does)

    holders = [(f.block, f.block.time_emb_proj, "time_emb_proj", f) for f in forwards if f.block.time_emb_proj is not None]
    for module in ctx.modules():
        if type(module) is ResBlock and "_time_pack" in module.__dict__ and module._time_pack is None:
            holders.append((module, module.emb_layers[1], "emb_layers.1", module))
    return holders


def _pack_time_projections(ctx: _Context, forwards: list) -> None:
    """Pack the time-embedding projections of the U-Net's ResNet blocks (one group per input width,
    dtype, device and bias presence; two or more blocks) into PackedTimeProjections."""
    groups: dict = {}
    for block, proj, name, owner in _time_projection_holders(ctx, forwards):
        reason = linear_unpackable(proj, name)
        if reason is None and ctx.shares_parameters(proj):
            reason = f"its {name} (or its weight) is shared with another module: packing would untie it"
        if reason is not None:
            ctx.left(block, f"{type(block).__name__} {name} (one GEMM for all blocks)", reason)
            continue
        key = (proj.in_features, proj.weight.dtype, proj.weight.device, proj.bias is None)
        groups.setdefault(key, []).append((block, proj, owner))
    for group in groups.values():
        if len(group) < 2:
            continue
        pack = PackedTimeProjections(tuple(proj for _, proj, _ in group))
        ctx.record(_Unpack(pack))
        for block, _, owner in group:
            if owner is block:  # ldm_fast's ResBlock: an instance attribute, put back by restore
                ctx.record(_SetAttr(block, "_time_pack", None, pack))
                block.__dict__["_time_pack"] = pack
            else:  # the fused diffusers forward (removed by restore)
                owner.time_pack = pack
            ctx.changed(block, TIME_PROJECTIONS)
        ctx.report.notes.append(f"pack_weights: the time projections of {len(group)} ResNet blocks as one GEMM a step "
                                f"(packed weight {tuple(pack.weight.shape)}; inference on the Triton backend)")


def _fuse_resnet_block(ctx: _Context, block: nn.Module) -> Optional[FusedResnetForward]:
    reason = resnet_block_unfusable(block)
    if reason is not None:
        ctx.left(block, "ResnetBlock2D (GroupNorm+SiLU fusion)", reason)
        return None
    fuse1_reason = _fusable_norm(ctx, block.norm1)
    if block.time_embedding_norm == "scale_shift":
        fuse2_reason = "time_embedding_norm='scale_shift' modulates between norm2 and the SiLU"
    else:
        fuse2_reason = _fusable_norm(ctx, block.norm2)
    for name, why in (("norm1", fuse1_reason), ("norm2", fuse2_reason)):
        if why is not None:
            ctx.left(getattr(block, name), "GroupNorm+SiLU fusion", why)
    if fuse1_reason is not None and fuse2_reason is not None:
        return None
    if fuse1_reason is None:
        _set_silu(ctx, block.norm1)
    if fuse2_reason is None:
        _set_silu(ctx, block.norm2)
    fuse_shift = fuse2_reason is None and not _any_hooks(block.norm2)  # norm2(h, shift=temb): no pre-hook sees h + temb
    forward = FusedResnetForward(block, fuse1_reason is None, fuse2_reason is None, fuse_shift)
    ctx.record(_SetAttr(block, "forward", block.__dict__.get("forward", _MISSING), forward))
    block.__dict__["forward"] = forward
    ctx.changed(block, RESNET_FORWARD)
    return forward


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


_SPLIT_POSITIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # class -> {(name, length): answer}


def _split_positions(parent: nn.Module, name: str, length: int) -> Optional[set]:
    """Cached :func:`_class_split_positions` per holding class (a U-Net holds dozens of instances of one
    block class; its source is parsed once; weakly: a class seen is not kept alive)."""
    if isinstance(parent, _CONTAINERS):
        return set()  # a container calls its entries whole (Sequential) or holds them (lists, dicts)
    answers = _SPLIT_POSITIONS.setdefault(type(parent), {})
    if (name, length) not in answers:
        answers[name, length] = _class_split_positions(type(parent), name, length)
    return answers[name, length]


def _class_trees(cls: type) -> Optional[list]:
    """The parsed source of ``cls`` and of its bases below nn.Module (torch's own classes skipped);
    None when one of them has no source to read."""
    trees = []
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or (klass.__module__ or "").startswith("torch."):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError):
            return None
    return trees


def _class_split_positions(parent_cls: type, name: str, length: int) -> Optional[set]:
    """The pairs ``(i, i + 1)`` of ``parent.<name>`` (a Sequential of ``length`` entries) that the
    parent's code calls apart, as the set of their ``i``: the source of the parent's class (and its
    bases below nn.Module) indexed with ``self.<name>[k]`` or sliced ``self.<name>[a:b]`` (CompVis'
    ``ResBlock`` with ``use_scale_shift_norm`` calls ``out_layers[0]``, modulates, then
    ``out_layers[1:]``). None when it cannot be known (no source; a computed index; iteration)."""
    split: set = set()
    trees = _class_trees(parent_cls)
    if trees is None:
        return None
    for tree in trees:
        for node in ast.walk(tree):
            target = node.value if isinstance(node, ast.Subscript) else node.iter if isinstance(node, ast.For) else None
            if not (isinstance(target, ast.Attribute) and target.attr == name
                    and isinstance(target.value, ast.Name) and target.value.id == "self"):
                continue
            if isinstance(node, ast.For):
                return None
            taken = _constant_positions(node.slice, length)
            if taken is None:
                return None
            split |= {i for i in range(length - 1) if (i in taken) != (i + 1 in taken)}
    return split


def _constant_positions(index: ast.AST, length: int) -> Optional[range]:
    """The positions a constant index or slice takes from a sequence of ``length``; None otherwise."""
    def value(node):
        if node is None:
            return None
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return -node.operand.value
        raise ValueError
    try:
        if isinstance(index, ast.Slice):
            if index.step is not None:
                return None
            return range(length)[slice(value(index.lower), value(index.upper))]
        k = value(index)
    except ValueError:
        return None
    k = k + length if k < 0 else k
    return range(k, k + 1)


def _fuse_sequential(ctx: _Context, seq: nn.Sequential, holders: list) -> None:
    if type(seq).forward is not nn.Sequential.forward or _has_instance_forward(seq):
        return
    keys = list(seq._modules.keys())
    split: Optional[set] = set()
    for parent, name in holders:
        apart = _split_positions(parent, name, len(keys))
        split = None if apart is None or split is None else split | apart
    i = 0
    while i + 1 < len(keys):
        norm, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
        if isinstance(norm, nn.GroupNorm) and type(act) is nn.SiLU:
            why = _fusable_norm(ctx, norm)
            if why is None and (split is None or i in split):
                why = ("the code holding this Sequential calls the GroupNorm and the SiLU apart (indexes or slices "
                       "it between them, e.g. CompVis ResBlock's out_layers[0] with use_scale_shift_norm)"
                       if split is not None else
                       "the code holding this Sequential indexes or iterates it in a way that cannot be checked")
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


def _fuse_attribute_pairs(ctx: _Context, parent: nn.Module) -> None:
    """A GroupNorm child and an nn.SiLU child that the parent's code only ever calls as the pair
    ``x = self.<norm>(x)`` then ``x = self.<act>(x)`` (diffusers' ``conv_norm_out``/``conv_act`` in
    UNet2DConditionModel and the VAE Encoder): the norm gets ``activation="silu"`` and the SiLU
    entry becomes ``nn.Identity()`` (exact; the state dict is unchanged)."""
    if _has_instance_forward(parent):
        return
    children = parent._modules
    norms = [n for n, m in children.items() if type(m) in (ldm_nn.GroupNorm, ldm_nn.GroupNorm32)]
    acts = [n for n, m in children.items() if type(m) is nn.SiLU]
    for norm_name in norms:
        for act_name in acts:
            if not _called_as_pair(type(parent), norm_name, act_name):
                if (norm_name, act_name) == ("conv_norm_out", "conv_act"):  # diffusers' pair, called apart here
                    ctx.left(children[norm_name], "GroupNorm+SiLU fusion",
                             f"{type(parent).__qualname__}'s code does not call conv_norm_out then conv_act as one "
                             "adjacent pair (e.g. the VAE Decoder's latent_embeds branch)")
                continue
            norm, act = children[norm_name], children[act_name]
            why = _fusable_norm(ctx, norm)
            if why is None and (_any_hooks(act) or _has_instance_forward(act) or ctx.uses[id(act)] > 1):
                why = "the SiLU module has hooks, an instance-level forward or is shared (it would not be called)"
            if why is not None:
                ctx.left(norm, "GroupNorm+SiLU fusion", why)
                continue
            _set_silu(ctx, norm)
            identity = nn.Identity()
            ctx.record(_SetChild(parent, act_name, act, identity))
            children[act_name] = identity
            ctx.report.changed.append(ReportItem(_join(ctx.path(parent), act_name), SEQUENTIAL_SILU))


_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # class -> {(norm, act): answer}


def _called_as_pair(cls: type, norm: str, act: str) -> bool:
    """Cached :func:`_class_calls_as_pair` per class (weakly: a class seen is not kept alive)."""
    answers = _PAIRS.setdefault(cls, {})
    if (norm, act) not in answers:
        answers[norm, act] = _class_calls_as_pair(cls, norm, act)
    return answers[norm, act]


def _class_calls_as_pair(cls: type, norm: str, act: str) -> bool:
    """Whether the source of ``cls`` (and its bases below nn.Module) mentions ``self.<norm>`` and
    ``self.<act>`` only in adjacent statements ``v = self.<norm>(v)``; ``v = self.<act>(v)`` (a bare
    truth test of the norm, ``if self.<norm>:``, aside), at least once. False when it cannot be known."""
    def is_self_attr(node, name):
        return (isinstance(node, ast.Attribute) and node.attr == name and isinstance(node.value, ast.Name)
                and node.value.id == "self")

    def call_of(stmt, name):  # the v of ``v = self.<name>(v)``, else None
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Call) and is_self_attr(stmt.value.func, name)
                and len(stmt.value.args) == 1 and not stmt.value.keywords
                and isinstance(stmt.value.args[0], ast.Name) and stmt.value.args[0].id == stmt.targets[0].id):
            return stmt.targets[0].id
        return None

    pairs = mentions = 0
    trees = _class_trees(cls)
    if trees is None:
        return False
    for tree in trees:
        tests = {id(n.test) for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp, ast.While))}
        for node in ast.walk(tree):
            if (is_self_attr(node, norm) or is_self_attr(node, act)) and isinstance(node.ctx, ast.Load):
                mentions += 0 if id(node) in tests else 1
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None)
                if isinstance(stmts, list):
                    for first, second in zip(stmts, stmts[1:]):
                        v = call_of(first, norm)
                        if v is not None and call_of(second, act) == v:
                            pairs += 1
    return pairs > 0 and mentions == 2 * pairs


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
    kept = len(_install_per_module(ctx, "Transformer2DModel", "_get_output_for_continuous_inputs",
                                   transformer_output_unkept, ChannelsLastTransformerOutput, TRANSFORMER_LAYOUT,
                                   "Transformer2DModel channels-last output"))
    if kept:
        ctx.report.notes.append(f"channels_last: {kept} diffusers Transformer2DModels return their output in their "
                                "input's layout (no NCHW copy after the transformer)")
    if converted:
        ctx.report.changed.append(ReportItem("<root>", CHANNELS_LAST))
        ctx.report.notes.append(
            f"channels_last: {converted} 4-d/5-d parameters and buffers stored channels-last (same Parameter objects)"
        )
    else:
        ctx.report.notes.append("channels_last: nothing to convert (no 4-d/5-d parameters or buffers not yet channels-last)")


# --- attention -------------------------------------------------------------------------------


def _attention_pass(ctx: _Context) -> None:
    processor = _LdmAttnProcessor()  # stateless: one instance serves every Attention
    swapped = packed = 0
    for module in ctx.modules():
        if not is_diffusers_class(module, "Attention"):
            cls = type(module)
            if ((cls.__module__ or "").startswith("diffusers.") and cls.__name__.endswith("Attention")
                    and ("processor" in module.__dict__ or "processor" in module._modules)):
                ctx.left(module, cls.__name__, f"{cls.__module__}.{cls.__qualname__} is not diffusers' Attention "
                                               "(its processors are not the ones ldm_fast reproduces)")
            continue
        old = module.__dict__.get("processor", _MISSING)
        reason = attention_swap_refused(module, None if old is _MISSING else old)
        if reason is not None:
            ctx.left(module, "Attention processor", reason)
            continue
        ctx.record(_SetAttr(module, "processor", old, processor))
        module.__dict__["processor"] = processor
        ctx.changed(module, ATTENTION)
        swapped += 1
        if ctx.options["pack_weights"]:
            packed += _pack_projections(ctx, module)
    ctx.report.notes.append(
        f"attention: {swapped} diffusers Attention modules run ldm_fast.functional.attention (impl 'auto': SDPA "
        "unless a GPU measurement says the Triton kernel is faster; LDM_FAST_ATTENTION overrides); "
        f"{packed} compute their projections with one GEMM on packed weights (q/k/v, or k/v for cross-attention; "
        "inference on the Triton backend)"
    )


def _pack_projections(ctx: _Context, attn: nn.Module) -> int:
    """Pack ``attn``'s to_q/to_k/to_v (or to_k/to_v) weights into one buffer (PackedProjections); 1 if done."""
    reason = projections_unpackable(attn)
    if reason is None and PACK_ATTR in attn.__dict__:
        reason = "it already holds packed projections"
    with_q = reason is None and packs_query(attn)
    names = ("to_q", "to_k", "to_v") if with_q else ("to_k", "to_v")
    if reason is None:
        for name in names:
            if ctx.shares_parameters(getattr(attn, name)):
                reason = f"its {name} (or its weight) is shared with another module: packing would untie it"
                break
    if reason is not None:
        ctx.left(attn, "Attention projections (one GEMM)", reason)
        return 0
    pack = PackedProjections(tuple(getattr(attn, name) for name in names), with_q)
    ctx.record(_Unpack(pack))
    ctx.record(_SetAttr(attn, PACK_ATTR, _MISSING, pack))
    attn.__dict__[PACK_ATTR] = pack
    ctx.changed(attn, PACKED_PROJECTIONS)
    return 1


# --- geglu -----------------------------------------------------------------------------------


def _install_per_module(ctx: _Context, class_name: str, attr: str, refused, make, changed: str, left: str) -> int:
    """For each diffusers ``class_name`` module: ``refused(module)`` is None -> ``make(module)`` becomes its
    instance-level ``attr`` (recorded for restore, reported ``changed``), else it is reported ``left``
    with the reason. Returns the installed values."""
    installed = []
    for module in ctx.modules():
        if not is_diffusers_class(module, class_name):
            continue
        reason = refused(module)
        if reason is not None:
            ctx.left(module, left, reason)
            continue
        value = make(module)
        ctx.record(_SetAttr(module, attr, _MISSING, value))
        module.__dict__[attr] = value
        ctx.changed(module, changed)
        installed.append(value)
    return installed


def _geglu_pass(ctx: _Context) -> None:
    fused = len(_install_per_module(ctx, "GEGLU", "forward", geglu_unfusable, FusedGEGLUForward, GEGLU, "GEGLU fusion"))
    ctx.report.notes.append(f"geglu: {fused} diffusers GEGLU gates run ldm_fast.functional.geglu (one kernel)")


# --- add_layer_norm --------------------------------------------------------------------------


def _add_layer_norm_pass(ctx: _Context) -> None:
    if global_module_hooks():
        ctx.report.notes.append("add_layer_norm: skipped: global module forward hooks are registered")
        return
    forwards = _install_per_module(ctx, "BasicTransformerBlock", "forward", transformer_block_unfusable,
                                   FusedTransformerBlockForward, TRANSFORMER_FORWARD,
                                   "BasicTransformerBlock (add + LayerNorm fusion)")
    for forward in forwards:
        if not forward.ff_epilogue:
            ctx.left(forward.block.ff, "feed-forward residual in its output GEMM",
                     feed_forward_epilogue_refused(forward.block.ff))
    fused, epilogues = len(forwards), sum(f.ff_epilogue for f in forwards)
    ctx.report.notes.append(f"add_layer_norm: {fused} diffusers BasicTransformerBlocks add their residual into "
                            "the next LayerNorm in one ldm_fast.functional.add_layer_norm kernel; "
                            f"{epilogues} add the feed-forward's residual in its output GEMM (inference on the "
                            "Triton backend)")


# --- timestep_embedding ----------------------------------------------------------------------


def _timestep_embedding_pass(ctx: _Context) -> None:
    fused = len(_install_per_module(ctx, "Timesteps", "forward", timesteps_unfusable, FusedTimestepsForward,
                                    TIMESTEPS, "Timesteps (timestep_embedding kernel)"))
    ctx.report.notes.append(f"timestep_embedding: {fused} diffusers Timesteps modules run "
                            "ldm_fast.functional.timestep_embedding (one kernel)")
