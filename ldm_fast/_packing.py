"""Linear weights packed as row blocks of one buffer, so one GEMM serves several ``nn.Linear`` modules
(``optimize(pack_weights=True)``): the time-embedding projections of a U-Net's ResNet blocks
(:class:`PackedTimeProjections`) and an attention's q/k/v projections
(``ldm_fast.integrations.diffusers.attention.PackedProjections``)."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backend
from ._fusion import _version, global_module_hooks, intercepted, readable

__all__ = ["PackedLinears", "PackedTimeProjections", "linear_unpackable", "storage_key"]


def storage_key(t: Optional[Tensor]) -> Optional[tuple]:
    """(storage, offset, shape) of ``t``: equal exactly while ``t`` is the same view of the same
    storage (cheap: no data pointer, so it also holds on fake tensors)."""
    return None if t is None else (t.untyped_storage()._cdata, t.storage_offset(), t.shape)


class PackedLinears:
    """The weights (and biases) of ``torch.nn.Linear`` modules of one input width, dtype and device as row
    blocks of one buffer, so one GEMM computes all their outputs side by side.

    Packing sets each Parameter's ``.data`` to its block of the buffer: the Parameter objects, their
    ``requires_grad``, state dict keys and values stay; in-place updates (``load_state_dict``, an
    optimizer step, ``p.data.copy_()`` as an EMA's ``copy_to`` does, ``fuse_lora``'s copy) land in
    the buffer, so the packed GEMM always reads the live weights. A packed GEMM may run only while
    the module still holds that view and nothing intercepts its call (:meth:`intact`, checked per
    call): anything that re-allocates a weight after optimize (``model.to(dtype)``, ``.to(device)``,
    a merge that assigns ``.data``) or swaps the module (a LoRA layer) makes the user's own
    statements run. :meth:`unpack` (restore) gives every weight still in the buffer its own storage
    back. Copies (``copy.deepcopy``, pickle, ``torch.save``/``torch.load``) are packed too
    (:meth:`__setstate__`). Values: the same products; cuBLAS may pick another
    kernel for the wider GEMM, so low-precision results can differ from the separate GEMMs' in the
    last bit.

    ``weight`` ``[sum of out_features, K]``, ``bias`` ``[sum of out_features]`` or None;
    ``offsets[i]`` the first row of module i's block.
    """

    def __init__(self, modules: tuple) -> None:
        self.modules = modules
        self.offsets = [0]
        for m in modules:
            self.offsets.append(self.offsets[-1] + m.out_features)
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in modules])
            self.bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
            for i, m in enumerate(modules):
                rows = slice(self.offsets[i], self.offsets[i + 1])
                m.weight.data = self.weight[rows]
                if self.bias is not None:
                    m.bias.data = self.bias[rows]
        self._set_keys()

    def _set_keys(self) -> None:
        """What :meth:`intact` compares: each module's weight and bias Parameters and their views of
        the buffer; ``packed`` is False where a copy no longer shares the buffer (that module's
        packed GEMM never runs)."""
        checks = []
        for i, m in enumerate(self.modules):
            rows = slice(self.offsets[i], self.offsets[i + 1])
            w_key = storage_key(self.weight[rows])
            b_key = None if self.bias is None else storage_key(self.bias[rows])
            w, b = m._parameters.get("weight"), m._parameters.get("bias")
            packed = w is not None and storage_key(w) == w_key and storage_key(b) == b_key
            checks.append((packed, w, w_key, b, b_key))
        self._checks = tuple(checks)
        self.params = tuple(p for _, w, _, b, _ in checks for p in (w, b) if p is not None)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_checks"], state["params"]
        return state

    def __setstate__(self, state: dict) -> None:
        """A copy (``copy.deepcopy``, pickle) gives each weight its own storage again: put the copied
        values back into the copied buffer and the weights back on its views (``torch.save``/
        ``torch.load`` keep the sharing; then nothing moves). The modules are complete here: their
        state is restored before this object's."""
        self.__dict__.update(state)
        with torch.no_grad():
            for i, m in enumerate(self.modules):
                rows = slice(self.offsets[i], self.offsets[i + 1])
                params = m._parameters  # (registered ones only: a reparametrized weight stays the module's own)
                for p, buffer in ((params.get("weight"), self.weight), (params.get("bias"), self.bias)):
                    if p is not None and buffer is not None and storage_key(p) != storage_key(buffer[rows]):
                        buffer[rows].copy_(p.detach())
                        p.data = buffer[rows]
        self._set_keys()

    def intact(self, i: int) -> bool:
        """Whether module i still computes its block of the packed GEMM: the same weight and bias
        Parameters, still the buffer's views, nothing intercepting its call (per call: ~1 µs)."""
        packed, w, w_key, b, b_key = self._checks[i]
        m = self.modules[i]
        params = m._parameters
        return (packed and params.get("weight") is w and params.get("bias") is b and not intercepted(m)
                and storage_key(w) == w_key and (b is None or storage_key(b) == b_key))

    def inference(self, *tensors: Optional[Tensor]) -> bool:
        """Whether a packed GEMM may run on these inputs at all: the Triton backend runs (CUDA; the eager
        backend keeps the user's GEMMs bit for bit), no torch.compile, no gradient to record (training
        runs the separate GEMMs, whose weight gradients the Parameters need), no global module hooks."""
        return not (torch.compiler.is_compiling() or not backend.kernel_ok(*tensors)
                    or (torch.is_grad_enabled() and any(p.requires_grad for p in self.params))
                    or global_module_hooks())

    def unpack(self) -> None:
        """Give every Parameter still in the buffer its own storage (restore): the Parameters packed
        and any made from their data since, wherever the module keeps them now (``prune`` and
        ``spectral_norm`` keep the weight as ``weight_orig``, ``weight_norm`` makes ``weight_v`` of
        its data, ``parametrize`` holds it in a submodule)."""
        buffers = {t.untyped_storage()._cdata for t in (self.weight, self.bias) if t is not None}
        with torch.no_grad():
            for m, (_, w, _, b, _) in zip(self.modules, self._checks):
                for p in (*m.parameters(), w, b):
                    if p is not None and p.untyped_storage()._cdata in buffers:
                        p.data = p.data.clone()


class PackedTimeProjections(PackedLinears):
    """The time-embedding projections of a U-Net's ResNet blocks packed (:class:`PackedLinears`;
    diffusers' ``ResnetBlock2D.time_emb_proj``, ldm_fast's ``ResBlock.emb_layers[1]``): every block
    of a U-Net projects the same time embedding, so the first block of a step computes all the
    projections with one GEMM (``[B, sum of widths]``) and each block reads its columns as a view
    (the GroupNorm kernel reads the shift's rows in place): SD 1.5 runs 22 GEMMs a step, now 1.

    The GEMM's output is kept for the other blocks of the same step: it serves each block ONCE,
    while the input is the same tensor object (at the same version); a block's second call with
    that input (calling one block twice, e.g. after updating its weights in place) computes anew.
    Nothing else is kept across calls. Inference on the Triton backend only (:meth:`project`).
    """

    def __init__(self, modules: tuple) -> None:
        super().__init__(modules)
        self.index = {id(m): i for i, m in enumerate(modules)}
        self._last: Optional[list] = None  # [weakref to the input, its version, the output, blocks not yet served]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["index"], state["_last"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        self._last = None

    def __repr__(self) -> str:
        return f"<ldm_fast packed time projections of {len(self.modules)} ResNet blocks: {tuple(self.weight.shape)}>"

    def project(self, module: nn.Module, temb: Tensor) -> Optional[Tensor]:
        """``module(temb)`` (``module`` one of the packed Linears, as the calling block holds it now)
        as columns of the packed GEMM's output, or None where the packed GEMM does not apply (the
        caller calls the module)."""
        i = self.index.get(id(module))
        if i is None or not self.inference(temb) or self.modules[i] is not module or not self.intact(i):
            return None  # (inference first: it steps aside under torch.compile before any storage is read)
        last = self._last
        if last is not None and i in last[3] and last[0]() is temb and last[1] == _version(temb):
            last[3].discard(i)
            out = last[2]
        else:
            out = F.linear(temb, self.weight, self.bias)
            self._last = [weakref.ref(temb), _version(temb), out, set(range(len(self.modules))) - {i}]
        return out[..., self.offsets[i]:self.offsets[i + 1]]


def linear_unpackable(m: Optional[nn.Module], name: str) -> Optional[str]:
    """None when ``m`` (the module's ``name``) is a plain ``torch.nn.Linear`` a :class:`PackedLinears` may
    hold, else why not."""
    if type(m) is not nn.Linear:
        return f"its {name} is a {type(m).__name__}, not an nn.Linear (e.g. a LoRA layer)"
    if intercepted(m):
        return f"its {name} has hooks or an instance-level forward (the packed GEMM would not call them)"
    if not readable(m):  # (not intercepted: a weight or bias kept outside its Parameters)
        return f"its {name} weight or bias is not a registered Parameter (a reparametrization keeps it)"
    if not m.weight.is_floating_point():
        return f"its {name} weight is {m.weight.dtype}, not a floating dtype"
    return None
