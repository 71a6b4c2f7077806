"""Measured global-memory traffic of the fused kernels and of the eager baseline, on the CPU.

Two counters, one per side, both reported against ``Case.min_bytes`` (each input read once, each
output written once):

* **Kernels** (:class:`KernelCounter`): the case's fused path runs under Triton's interpreter
  (``TRITON_INTERPRET=1``, CPU tensors) with the interpreter builder's memory ops instrumented:
  ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (plain ``create_load`` /
  ``create_store`` and tensor-descriptor loads and stores go through them) and the atomics
  ``create_atomic_rmw`` / ``create_atomic_cas`` (read and written). One call is one load or store
  instruction of one program; it is charged ``itemsize x`` the number of *distinct addresses among
  the active lanes*: masked-off lanes are excluded, and lanes of one instruction that read the same
  address (a scalar such as a timestep, broadcast to a block) count once, as the hardware coalesces
  them. A scalar load therefore costs its bytes once per program. ``InterpretedFunction.run`` is
  wrapped to record every launch (kernel, arguments, constexprs, ``num_warps``, grid), which is
  also what :mod:`benchmarks.audit` compiles (autotuning trial runs are not recorded), and per
  load/store site (kernel file and line) the bytes over all programs, the block geometry of the
  first call (lanes, contiguous axis and run, 16-byte alignment) and whether any mask splits an
  aligned 16-byte group.
* **Eager** (:class:`DispatchCounter`): a ``TorchDispatchMode`` charges every aten op the bytes of
  the tensors it reads and writes, each tensor's footprint once (elements over its non-broadcast
  dimensions, so an ``expand`` is not charged its expanded size). Free: views and metadata ops
  (every op whose schema says it returns a view, e.g. ``view``, ``t``, ``expand``, ``slice``,
  ``split``/``chunk``, ``alias``, ``as_strided``, ``detach``, plus :data:`FREE_OPS`, e.g.
  ``_unsafe_view``, ``lift_fresh``, ``set_``) and ``empty*`` allocations. Factory ops (``randn``,
  ``zeros``, and ``*_like`` / ``new_*`` ops, which read only their argument's metadata) are charged
  only their outputs; in-place ops read and write their mutated argument,
  except :data:`WRITE_ONLY_OPS` (``copy_``, ``fill_``, ``normal_``...) and ``out=`` arguments,
  which are only written. Each charged op on a tensor of at least one dimension counts one kernel
  launch (ops on 0-d tensors only, such as ``.item()`` of a CPU seed, are host work on a GPU).

The fused path is measured with both counters at once: kernel bytes from the interpreter and the
bytes of any aten op the launcher runs around the kernel (a ``.contiguous()`` copy would show
there); ``torch.library`` custom ops are entered, not charged, and Triton's own host-side copies
while a kernel runs are not charged. A fused measurement proves the kernel ran: the interpreter
saw a launch and ``ldm_fast.ops.kernel_launches`` increased, else :func:`check` fails it
(a silent eager fallback would otherwise look like a kernel).

Backward cases (``bwd-*``) need nothing special: their ``fused`` calls the backward op alone and
their ``eager`` runs ``torch.autograd.grad(..., retain_graph=True)`` over a forward graph built in
``make``. Both counters run under ``torch.no_grad()``, which does not stop ``autograd.grad``, and
the autograd engine carries the dispatch mode into the backward, so the eager side is charged
exactly the backward graph's aten ops (``silu_backward``, ``native_group_norm_backward``, ...) and
none of the forward's.

``python -m benchmarks.traffic [--quick] [--ops a,b] [--case ID ...]`` measures cases and prints
one JSON line per case (``python -m benchmarks`` runs it in worker processes with
``TRITON_INTERPRET=1`` and no visible CUDA device).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_fast import backend, ops

from .common import Case, discover, find_case, run_fused

#: Allowed excess over ``traffic_target x min_bytes``: per-program scalar loads (a timestep, a
#: seed) cost a few bytes per program; 0.5% covers them at the benchmark shapes.
EPSILON = 0.005

#: aten ops that move no data although their schema does not say "view".
FREE_OPS = frozenset({
    "_unsafe_view", "lift_fresh", "alias", "detach", "as_strided", "t", "expand", "slice", "split",
    "split_with_sizes", "chunk", "view", "set_", "resize_", "empty", "empty_like", "empty_strided",
    "new_empty", "new_empty_strided", "empty_permuted", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "_reshape_alias", "unbind", "select", "narrow", "unsqueeze", "squeeze",
    "permute", "transpose", "unflatten", "view_as", "_local_scalar_dense_noop", "record_stream",
})

#: In-place ops that overwrite their ``self`` without reading it.
WRITE_ONLY_OPS = frozenset({
    "copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
    "geometric_", "log_normal_", "cauchy_", "set_",
})

_TRITON_DIR = str(Path(__import__("triton").__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())


def footprint(t: torch.Tensor) -> int:
    """Bytes of ``t``'s distinct elements: its size over the dimensions it does not broadcast (stride 0)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


# ---------------------------------------------------------------------------------------------
# eager side: aten dispatch


class DispatchCounter(TorchDispatchMode):
    """Charges every aten op the bytes it reads and writes (see the module docstring).

    ``ops`` lists ``(name, read, write, launch)`` per charged op; ``read``, ``write`` and
    ``launches`` are the totals. Custom (non-aten) ops are entered, their aten ops charged.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int, bool]] = []
        self.paused = 0  # > 0 while a Triton kernel runs under the interpreter

    @property
    def read(self) -> int:
        return sum(r for _, r, _, _ in self.ops)

    @property
    def write(self) -> int:
        return sum(w for _, _, w, _ in self.ops)

    @property
    def launches(self) -> int:
        return sum(1 for *_, launch in self.ops if launch)

    def summary(self) -> dict:
        by_op: dict[str, list[int]] = {}
        for name, r, w, launch in self.ops:
            entry = by_op.setdefault(name, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += r
            entry[2] += w
            entry[3] += int(launch)
        return {
            "read": self.read, "write": self.write, "bytes": self.read + self.write, "launches": self.launches,
            "ops": [{"op": k, "calls": v[0], "read": v[1], "write": v[2], "launches": v[3]} for k, v in by_op.items()],
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prim", "prims"):
            return self._enter_custom_op(func, args, kwargs)
        out = func(*args, **kwargs)
        self._charge(func, args, kwargs, out)
        return out

    def _enter_custom_op(self, func, args, kwargs):
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(func._schema.name)
        if opdef is None:  # not a torch.library.custom_op: its internals stay uncounted
            self.ops.append((f"{func._schema.name} (not entered)", 0, 0, False))
            return func(*args, **kwargs)
        with self:
            return opdef._init_fn(*args, **kwargs)

    def _charge(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if func.is_view or name in FREE_OPS or torch.Tag.inplace_view in func.tags:
            return
        metadata_only = name.endswith("_like") or name.startswith("new_")  # randn_like(x) reads x's shape only
        read = write = 0
        tensors: list[torch.Tensor] = []
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            ts = _tensors(value)
            if not ts:
                continue
            tensors += ts
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            if mutated:
                write += sum(footprint(t) for t in ts)
            if not metadata_only and (not mutated or not (arg.is_out or name in WRITE_ONLY_OPS)):
                read += sum(footprint(t) for t in ts)
        returns = func._schema.returns
        outs = list(out) if isinstance(out, (tuple, list)) and len(returns) != 1 else [out]
        for ret, value in zip(returns, outs):
            if ret.alias_info is None:  # a fresh result (an aliased one is a mutated argument, charged above)
                ts = _tensors(value)
                tensors += ts
                write += sum(footprint(t) for t in ts)
        if read or write:
            self.ops.append((name, read, write, any(t.dim() > 0 for t in tensors)))


# ---------------------------------------------------------------------------------------------
# kernel side: the interpreter's memory ops


@dataclasses.dataclass
class Site:
    """One ``tl.load``/``tl.store`` call site of a kernel, as the interpreter ran it."""

    kind: str  # "load" or "store"
    file: str
    line: int
    function: str
    itemsize: int
    lanes: int = 0  # lanes of one call (the block size)
    max_active: int = 0  # most unmasked lanes of one call (lanes masked in every call are never loaded)
    shape: tuple = ()
    contiguous_bytes: int = 0  # longest run of consecutive addresses along one axis, in bytes (first call)
    contiguous_axis: int = -1  # that axis of the block (-1: none)
    aligned16: bool = False  # every such run starts on a 16-byte boundary (first call)
    mask_uniform16: bool = True  # masks never split an aligned 16-byte group (every call)
    descriptor: bool = False  # a tensor-descriptor (TMA-able) access
    calls: int = 0
    bytes: int = 0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        return d


def _describe_value(value) -> dict:
    """A JSON description of one kernel argument, enough to rebuild its specialization elsewhere."""
    import triton.language as tl

    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    if isinstance(value, tl.dtype):
        return {"kind": "tl_dtype", "value": value.name}
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        base = value if isinstance(value, torch.Tensor) else getattr(value, "base", value)  # TensorWrapper
        return {
            "kind": "tensor",
            "dtype": str(value.dtype).replace("torch.", ""),
            "misalign": int(value.data_ptr() % 16),
            "shape": list(getattr(base, "shape", ())),
            "stride": list(base.stride()) if hasattr(base, "stride") else [],
        }
    return {"kind": "unsupported", "repr": repr(value)[:200]}


@dataclasses.dataclass
class Launch:
    """One kernel launch seen by the interpreter, with the bytes it moved."""

    kernel: str  # "module:qualname"
    file: str
    args: dict  # name -> _describe_value(...)
    constexprs: list
    options: dict  # num_warps, num_stages, ...
    grid: list
    programs: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    sites: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = [s.as_dict() for s in self.sites.values()]
        return d


def _call_site() -> tuple[str, int, str, int]:
    """(file, line, function, bytecode offset) of the innermost frame outside triton and this module:
    the kernel source line (the offset tells apart two loads on one line)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_TRITON_DIR) or name == _THIS_FILE):
            return name, f.f_lineno, f.f_code.co_name, f.f_lasti
        f = f.f_back
    return "?", 0, "?", 0


def _geometry(addresses: np.ndarray, itemsize: int) -> tuple[int, bool, int]:
    """(longest run of consecutive addresses along one axis in bytes, whether every such run starts
    16-byte aligned, that axis; -1 when no axis is contiguous)."""
    a = addresses.astype(np.int64)
    if a.ndim == 0 or a.size <= 1:
        return itemsize, bool(a.reshape(-1)[0] % 16 == 0) if a.size else False, -1
    best, aligned, best_axis = itemsize, False, -1
    for axis in range(a.ndim):
        if a.shape[axis] < 2:
            continue
        if np.all(np.diff(a, axis=axis) == itemsize):
            run = a.shape[axis] * itemsize
            if run > best:
                best, aligned, best_axis = run, bool(np.all(np.take(a, 0, axis=axis) % 16 == 0)), axis
    return best, aligned, best_axis


def _mask_uniform16(mask: np.ndarray, axis: int, itemsize: int) -> bool:
    """True when the mask is constant over every group of 16 bytes along the contiguous ``axis``."""
    group = max(1, 16 // itemsize)
    if axis < 0 or mask.shape[axis] % group:
        return bool(mask.all() or not mask.any())
    g = np.moveaxis(mask, axis, -1).reshape(-1, group)
    return bool(np.all(g.all(axis=1) | ~g.any(axis=1)))


class KernelCounter:
    """Instruments the Triton interpreter while active: launches, bytes loaded and stored per launch and site.

    Use as a context manager in a process where ``TRITON_INTERPRET=1`` was set before the kernels
    were imported. ``dispatch`` (a :class:`DispatchCounter`) is paused while a kernel runs, so
    the interpreter's own host copies are not charged.
    """

    def __init__(self, dispatch: Optional[DispatchCounter] = None):
        self.launches: list[Launch] = []
        self.dispatch = dispatch
        self._current: Optional[Launch] = None
        self._descriptor = 0
        self._benching = 0
        self._saved: list[tuple[Any, str, Any]] = []

    @property
    def load_bytes(self) -> int:
        return sum(launch.load_bytes for launch in self.launches)

    @property
    def store_bytes(self) -> int:
        return sum(launch.store_bytes for launch in self.launches)

    # -- accounting

    def _account(self, kind: str, ptrs, mask, n_ops: int = 1) -> None:
        launch = self._current
        if launch is None:
            return
        from triton.runtime.interpreter import _get_np_dtype

        itemsize = _get_np_dtype(ptrs.get_element_ty()).itemsize
        addresses = ptrs.data
        active = np.broadcast_to(mask.data, addresses.shape) if mask is not None else np.ones(addresses.shape, bool)
        chosen = addresses[active]
        if chosen.size > 1 and not np.all(np.diff(chosen.astype(np.int64)) > 0):
            chosen = np.unique(chosen)
        nbytes = int(chosen.size) * itemsize
        file, line, function, offset = _call_site()
        key = (kind, file, line, function, offset)
        site = launch.sites.get(key)
        if site is None:
            contiguous, aligned, axis = _geometry(addresses, itemsize)
            site = launch.sites[key] = Site(
                kind, file, line, function, itemsize, lanes=int(addresses.size), shape=tuple(addresses.shape),
                contiguous_bytes=contiguous, contiguous_axis=axis, aligned16=aligned, descriptor=self._descriptor > 0,
            )
        site.calls += 1
        site.bytes += nbytes
        site.max_active = max(site.max_active, int(np.count_nonzero(active)))
        if site.mask_uniform16 and site.lanes > 1:
            site.mask_uniform16 = _mask_uniform16(active, site.contiguous_axis, itemsize)
        if kind == "load":
            launch.load_bytes += nbytes * n_ops
        else:
            launch.store_bytes += nbytes * n_ops

    # -- patches

    def _patch(self, owner, name: str, make) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def __enter__(self) -> "KernelCounter":
        from triton.runtime import interpreter as ti

        if not backend.interpreting():
            raise RuntimeError(
                "traffic measurement runs kernels under Triton's interpreter: set TRITON_INTERPRET=1 before "
                "ldm_fast's kernels are imported (python -m benchmarks does it in its worker processes)"
            )
        counter = self

        def masked_load(original):
            def wrapper(builder, ptrs, mask, other, *rest, **kw):
                counter._account("load", ptrs, mask)
                return original(builder, ptrs, mask, other, *rest, **kw)
            return wrapper

        def masked_store(original):
            def wrapper(builder, ptrs, value, mask, *rest, **kw):
                counter._account("store", ptrs, mask)
                return original(builder, ptrs, value, mask, *rest, **kw)
            return wrapper

        def atomic_rmw(original):
            def wrapper(builder, op, ptr, val, mask, *rest, **kw):
                counter._account("load", ptr, mask)
                counter._account("store", ptr, mask)
                return original(builder, op, ptr, val, mask, *rest, **kw)
            return wrapper

        def atomic_cas(original):
            def wrapper(builder, ptr, cmp, val, *rest, **kw):
                counter._account("load", ptr, None)
                counter._account("store", ptr, None)
                return original(builder, ptr, cmp, val, *rest, **kw)
            return wrapper

        def descriptor(original):
            def wrapper(builder, *args, **kw):
                counter._descriptor += 1
                try:
                    return original(builder, *args, **kw)
                finally:
                    counter._descriptor -= 1
            return wrapper

        def set_grid_idx(original):
            def wrapper(builder, x, y, z):
                if counter._current is not None:
                    counter._current.programs += 1
                return original(builder, x, y, z)
            return wrapper

        def autotune_bench(original):
            def wrapper(tuner, *args, **kw):
                counter._benching += 1
                try:
                    return original(tuner, *args, **kw)
                finally:
                    counter._benching -= 1
            return wrapper

        def run(original):
            def wrapper(fn_self, *args, grid, warmup, **kwargs):
                if warmup or counter._benching:  # autotuning trial runs are not the op's traffic
                    return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
                launch = _describe_launch(fn_self, args, kwargs, grid)
                counter.launches.append(launch)
                counter._current = launch
                if counter.dispatch is not None:
                    counter.dispatch.paused += 1
                try:
                    return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
                finally:
                    counter._current = None
                    if counter.dispatch is not None:
                        counter.dispatch.paused -= 1
            return wrapper

        builder = ti.InterpreterBuilder
        self._patch(builder, "create_masked_load", masked_load)
        self._patch(builder, "create_masked_store", masked_store)
        self._patch(builder, "create_atomic_rmw", atomic_rmw)
        self._patch(builder, "create_atomic_cas", atomic_cas)
        for name in ("create_descriptor_load", "create_descriptor_store", "create_descriptor_gather",
                     "create_descriptor_scatter"):
            if hasattr(builder, name):
                self._patch(builder, name, descriptor)
        self._patch(builder, "set_grid_idx", set_grid_idx)
        self._patch(ti.InterpretedFunction, "run", run)
        from triton.runtime.autotuner import Autotuner

        if hasattr(Autotuner, "_bench"):
            self._patch(Autotuner, "_bench", autotune_bench)
        return self

    def __exit__(self, *exc) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)


def _describe_launch(fn_self, args, kwargs, grid) -> Launch:
    """The launch record of ``InterpretedFunction.run(*args, grid=grid, **kwargs)``."""
    from triton.runtime.jit import _normalize_ty

    fn = fn_self.fn
    names = fn_self.arg_names
    annotations = {k: _normalize_ty(v) for k, v in inspect.get_annotations(fn).items()}
    constexprs = [n for n in names if annotations.get(n) == "constexpr"]
    bound = inspect.signature(fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    if callable(grid):
        grid = grid(dict(bound.arguments))
    return Launch(
        kernel=f"{fn.__module__}:{fn.__qualname__}",
        file=inspect.getsourcefile(fn) or "?",
        args={k: _describe_value(v) for k, v in bound.arguments.items()},
        constexprs=constexprs,
        options={k: v for k, v in options.items() if isinstance(v, (int, float, str, bool)) or v is None},
        grid=[int(g) for g in grid],
    )


# ---------------------------------------------------------------------------------------------
# one case


def _dtype_of(inputs: dict) -> str:
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return str(v.dtype).replace("torch.", "")
    return "?"


def measure_eager(fn, *args) -> DispatchCounter:
    """Run ``fn(*args)`` under a :class:`DispatchCounter` and return the counter."""
    counter = DispatchCounter()
    with torch.no_grad(), counter:
        fn(*args)
    return counter


def measure_fused(fn, *args) -> tuple[DispatchCounter, KernelCounter, Counter]:
    """Run ``fn(*args)`` with kernels interpreted and counted, and host aten ops counted.

    Returns the dispatch counter (host ops around the kernels), the kernel counter and the
    increase of ``ldm_fast.ops.kernel_launches`` per op.
    """
    dispatch = DispatchCounter()
    before = Counter(ops.kernel_launches)
    with torch.no_grad(), KernelCounter(dispatch) as kernels, dispatch:
        fn(*args)
    after = Counter(ops.kernel_launches)
    after.subtract(before)
    return dispatch, kernels, +after


_cache: dict[str, dict] = {}


def measure_case(case: Case, use_cache: bool = True, max_bytes: Optional[int] = None) -> dict:
    """Measure one case: fused (forced Triton backend, interpreted) and eager bytes, as a JSON-able dict.

    Results are cached per case id within the process (the tests and the audit share them). With
    ``max_bytes``, a case whose minimum traffic is larger is not run (the interpreter takes minutes
    on the largest shapes): the record says ``skipped`` and why.
    """
    if use_cache and case.id in _cache:
        return _cache[case.id]
    start = time.perf_counter()
    inputs = case.make(torch.device("cpu"))
    min_bytes = int(case.min_bytes(inputs))
    if max_bytes is not None and min_bytes > max_bytes:
        return {"case": case.id, "op": case.op, "name": case.name, "min_bytes": min_bytes,
                "skipped": f"min {min_bytes / 1e6:.0f} MB > --traffic-max-mb {max_bytes / 1e6:g}"}
    flops = int(case.flops(inputs)) if case.flops else 0
    host, kernels, op_launches = measure_fused(lambda i: run_fused(case, i), inputs)
    eager = measure_eager(case.eager, inputs)
    host_summary = host.summary()
    fused_bytes = kernels.load_bytes + kernels.store_bytes + host_summary["bytes"]
    record = {
        "case": case.id, "op": case.op, "name": case.name, "dtype": _dtype_of(inputs),
        "min_bytes": min_bytes, "flops": flops, "traffic_target": case.traffic_target,
        "fused": {
            "bytes": fused_bytes,
            "kernel_load": kernels.load_bytes, "kernel_store": kernels.store_bytes,
            "host_bytes": host_summary["bytes"], "host_ops": host_summary["ops"],
            "kernel_launches": len(kernels.launches),
            "launches": len(kernels.launches) + host_summary["launches"],
            "kernels": [launch.as_dict() for launch in kernels.launches],
        },
        "eager": eager.summary(),
        "op_launches": dict(op_launches),
        "seconds": round(time.perf_counter() - start, 3),
    }
    record["fused_ratio"] = fused_bytes / min_bytes if min_bytes else float("nan")
    record["eager_ratio"] = record["eager"]["bytes"] / min_bytes if min_bytes else float("nan")
    record["problems"] = check(record)
    _cache[case.id] = record
    return record


def check(record: dict) -> list[str]:
    """What is wrong with a measured case: bytes above target, or no kernel ran. Empty when all is well."""
    problems = []
    fused = record["fused"]
    if fused["kernel_launches"] == 0 or not record["op_launches"]:
        problems.append(
            f"fused path launched no Triton kernel (interpreter launches {fused['kernel_launches']}, "
            f"ldm_fast kernel_launches {record['op_launches']}): a silent eager fallback?"
        )
    limit = record["traffic_target"] * record["min_bytes"] * (1 + EPSILON)
    if fused["bytes"] > limit:
        problems.append(
            f"fused bytes {fused['bytes']} = {record['fused_ratio']:.4f}x min > target "
            f"{record['traffic_target']}x (+{EPSILON:.1%})"
        )
    return problems


# ---------------------------------------------------------------------------------------------
# command line (a worker of python -m benchmarks)


def _measure_line(case: Case, max_bytes: Optional[int] = None) -> str:
    try:
        record = measure_case(case, max_bytes=max_bytes)
    except Exception as e:  # reported, not hidden: the parent shows the error in its table
        record = {"case": case.id, "op": case.op, "name": case.name, "error": f"{type(e).__name__}: {e}"}
    return json.dumps(record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Measure global-memory bytes of fused and eager paths (interpreter).")
    parser.add_argument("--quick", action="store_true", help="the quick subset of each bench file")
    parser.add_argument("--ops", default="", help="comma-separated ops (bench file names)")
    parser.add_argument("--case", action="append", default=[], help="a case id, e.g. reparameterize[sd-latent-b1-fp16]")
    parser.add_argument("--serve", action="store_true", help="read case ids from stdin, one per line (worker mode)")
    parser.add_argument("--max-mb", type=float, default=None, help="skip cases whose minimum traffic exceeds this")
    args = parser.parse_args(argv)
    max_bytes = int(args.max_mb * 1e6) if args.max_mb is not None else None
    torch.set_num_threads(1)
    if args.serve:
        for line in sys.stdin:
            if line.strip():
                print(_measure_line(find_case(line.strip()), max_bytes), flush=True)
        return 0
    if args.case:
        cases = [find_case(c) for c in args.case]
    else:
        cases = discover([o for o in args.ops.split(",") if o] or None, quick=args.quick)
    for case in cases:
        print(_measure_line(case, max_bytes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
