"""``optimize(model, cuda_graph=True)``: :class:`CUDAGraphForward`, one CUDA graph per static call
signature of a model's forward, and the pass that installs it."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import warnings
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

from .. import backend
from ..ops._common import needs_grad
from .patch import Context, InstallPatch


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
        if needs_grad(*tensors, *self.model.parameters()):
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


class CudaGraphPatch(InstallPatch):
    """The model's ``forward``: a :class:`CUDAGraphForward` (an instance attribute, wrapping a previous
    instance-level forward if there was one)."""

    name = "cuda_graph"
    default = False
    doc = "model.forward replayed from CUDA graphs, one per static call signature (inference)"

    def make(self, model: nn.Module, ctx: Context) -> Any:
        return CUDAGraphForward(model, model.__dict__.get("forward"))

    def run(self, ctx: Context) -> None:
        model = ctx.model
        ctx.changed(self, model, self.apply(model, ctx))
        devices = _model_device_types(model)
        if not torch.cuda.is_available():
            note = "enabled, but CUDA is not available: every call runs the plain forward"
        elif devices and devices != {"cuda"}:
            note = (f"enabled, but the model is not on CUDA ({', '.join(sorted(devices))}): calls run the "
                    "plain forward until the model and its inputs are on CUDA")
        else:
            note = ("enabled; graphs are captured on the first CUDA call per input shape "
                    "(under torch.no_grad()/inference_mode or with frozen parameters)")
        if callable(getattr(type(model), "decode", None)):
            note += "; only forward() is graphed, not decode()/encode()"
        ctx.note(self, note)
