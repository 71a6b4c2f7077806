"""``optimize(model, cuda_graph=True)``: :class:`CUDAGraphForward`, one CUDA graph per static call
signature of a model's forward, and the patch that installs it."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import itertools
import re
import typing
import warnings
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import backend
from .patch import Context, InstallPatch


#: At most this many CUDA graphs (call signatures) per model; later signatures run the plain forward.
CUDA_GRAPH_MAX_SIGNATURES = 16
_WARMUP_ITERS = 3


class _NotGraphable(Exception):
    """The call cannot be served by a CUDA graph; the message says why."""


_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
               torch.layout)


class _Scalar:
    """A Python int or float passed for a parameter the forward also takes as a tensor (see
    :attr:`CUDAGraphForward.scalar_inputs`): keyed by its type, not its value, and handed to the
    graph as a 0-d device tensor (int64 or float64, as diffusers converts a timestep) filled at
    every call. One graph then serves every timestep."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


_SCALAR_DTYPES = {int: torch.int64, float: torch.float64}


def _tensor_key(t: torch.Tensor) -> tuple:
    if t.layout != torch.strided:
        raise _NotGraphable(f"a {t.layout} tensor argument")
    return ("T", tuple(t.shape), t.dtype, t.device, tuple(t.stride()), t.requires_grad)


def _signature(obj, tensors: list) -> Any:
    """The hashable description of an argument; tensors (and lifted scalars) are appended to
    ``tensors`` in order."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _tensor_key(obj)
    if type(obj) is _Scalar:
        tensors.append(obj)
        return ("S", type(obj.value))
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
    requires_grad, every other argument by value (and its type; a lifted scalar, :class:`_Scalar`,
    by type only), and the structure; ``tensors`` are the tensor arguments (and lifted scalars) in
    the order :func:`_replace_tensors` visits them (kwargs sorted by name). Raises
    :class:`_NotGraphable` for arguments it cannot key."""
    tensors: List[torch.Tensor] = []
    key = (_signature(tuple(args), tensors),
           tuple((name, _signature(kwargs[name], tensors)) for name in sorted(kwargs)))
    return key, tensors


def _replace_tensors(args: tuple, kwargs: dict, new: List[torch.Tensor]) -> Tuple[tuple, dict]:
    """args/kwargs with their tensors (and lifted scalars) replaced, in :func:`graph_key` order, by ``new``."""
    it = iter(new)

    def sub(obj):
        if isinstance(obj, torch.Tensor) or type(obj) is _Scalar:
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


def scalar_parameters(fn) -> Tuple[str, ...]:
    """The parameters of ``fn`` whose annotation accepts both a ``torch.Tensor`` and a Python
    ``int`` or ``float`` (diffusers' ``timestep: torch.Tensor | float | int``): the forward promises
    to treat a number and a tensor holding it alike, so :class:`CUDAGraphForward` may pass a 0-d
    tensor there. String annotations are read as text. ``()`` when the signature is unreadable."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    names = []
    for p in parameters:
        ann = p.annotation
        if ann is inspect.Parameter.empty:
            continue
        if isinstance(ann, str):
            words = set(re.findall(r"[A-Za-z_][\w.]*", ann))
            takes_tensor = bool({"Tensor", "torch.Tensor"} & words)
            takes_number = bool({"int", "float"} & words)
        else:
            options = typing.get_args(ann) or (ann,)
            takes_tensor = any(o is torch.Tensor for o in options)
            takes_number = any(o in (int, float) for o in options)
        if takes_tensor and takes_number:
            names.append(p.name)
    return tuple(names)


def _positions(fn, names: Sequence[str]) -> Tuple[Tuple[str, Optional[int]], ...]:
    """``(name, positional index or None)`` for each of ``names`` in ``fn``'s signature."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return tuple((name, None) for name in names)
    index = {}
    for i, p in enumerate(parameters):
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        index[p.name] = i
    return tuple((name, index.get(name)) for name in names)


# ---------------------------------------------------------------------------------------------
# what a graph cannot see by itself: the process-wide state it is keyed on, and a model-wide
# signal for re-registered parameters, buffers and submodules


def _flag_getters() -> tuple:
    """Getters of the global switches that change which kernels eager torch picks (so what a graph
    would freeze): TF32 and reduced-precision GEMMs, cuDNN, determinism, the SDPA backends
    (``torch.nn.attention.sdpa_kernel`` sets these). Each a C call of ~0.1 µs; the ones this torch lacks
    are left out."""
    names = ("_get_cublas_allow_tf32", "_get_float32_matmul_precision", "_get_cudnn_allow_tf32",
             "_get_cudnn_enabled", "_get_cudnn_benchmark", "_get_cudnn_deterministic",
             "_get_deterministic_algorithms", "_get_cublas_allow_fp16_reduced_precision_reduction",
             "_get_cublas_allow_bf16_reduced_precision_reduction", "_get_flash_sdp_enabled",
             "_get_mem_efficient_sdp_enabled", "_get_math_sdp_enabled", "_get_cudnn_sdp_enabled")
    return tuple(getattr(torch._C, name) for name in names if hasattr(torch._C, name))


_FLAG_GETTERS = _flag_getters()
_module_globals = nn.modules.module


class _Registrations:
    """A count of parameter, buffer and submodule registrations in the whole process (``module.w =
    nn.Parameter(...)``, ``load_state_dict(assign=True)``, ``register_buffer``, a submodule
    assigned, as LoRA/PEFT adapters do when they wrap a layer), from torch's global registration
    hooks, installed by the first :class:`CUDAGraphForward` (nothing is installed at import)."""

    count = 0
    installed = False


def _registered(*_args):
    _Registrations.count += 1


def _install_registration_hooks() -> None:
    if not _Registrations.installed:
        _Registrations.installed = True
        _module_globals.register_module_parameter_registration_hook(_registered)
        _module_globals.register_module_buffer_registration_hook(_registered)
        _module_globals.register_module_module_registration_hook(_registered)


def _sample(tensors: tuple) -> tuple:
    """The tensors whose pointers every call compares: the first and last parameter and buffer
    (a model-wide ``.to()``/``.half()``/``.cuda()`` moves every one of them)."""
    picked = []
    for t in tensors[:1] + tensors[-1:]:
        if not any(t is p for p in picked):
            picked.append(t)
    return tuple(picked)


class _Graph:
    __slots__ = ("graph", "inputs", "output")

    def __init__(self, graph, inputs, output):
        self.graph = graph
        self.inputs = inputs  # the static input tensors the graph reads (0-d tensors for lifted scalars)
        self.output = output  # the static output the graph writes


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

    def new_pool(self) -> Any:
        """A memory-pool token the graphs of one model share (``torch.cuda.graph_pool_handle()``)."""
        return torch.cuda.graph_pool_handle()

    def capture(self, device: torch.device, fn: Callable[[], Any], pool: Any = None) -> Tuple[Any, Any]:
        """``(graph, output)``: ``fn`` captured into a new CUDA graph, its memory from ``pool`` (None: its own)."""
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
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
    plus the state the forward's kernels depend on: ``model.training``, grad/inference mode, CUDA
    autocast (enabled, dtype), the ldm_fast backend asked for and ``LDM_FAST_ATTENTION`` (as last
    read by ``ldm_fast.backend.reload_env``), the TF32 / reduced-precision GEMM, cuDNN and
    determinism switches, the SDPA backends enabled (``torch.nn.attention.sdpa_kernel``) and the
    global module forward hooks. On the first call with a key it copies the inputs into static
    tensors, runs the forward 3 times on a side stream (warm-up), captures it with
    ``torch.cuda.graph`` and replays; later calls copy the inputs into the static tensors and
    replay. Outputs (tensors, tuples, namedtuples, lists, dicts, dataclasses such as diffusers
    ``UNet2DConditionOutput`` / ``DecoderOutput``) are rebuilt with every tensor cloned, so the
    next replay cannot overwrite what the caller holds.

    Scalars: a Python int or float passed for a parameter listed in :attr:`scalar_inputs` (by
    default the parameters whose annotation takes a tensor or a number, such as diffusers
    ``timestep: torch.Tensor | float | int``) is keyed by its type only and reaches the graph as a
    0-d device tensor (int64 / float64, what diffusers converts it to) refilled at every call: one
    graph serves every timestep. Any other number is keyed by value (a graph per value, at most
    ``max_signatures``): pass it as a tensor, or name its parameter in ``scalar_inputs``.

    Autocast: warm-up and capture run with autocast's weight-cast cache off (``cache_enabled=False``,
    as ``torch.cuda.make_graphed_callables`` requires): a cached fp16/bf16 copy of a weight is freed
    when the caller's autocast region ends, and a graph that read it would read freed memory; the
    casts are captured in the graph instead.

    Plain forward (no graph) otherwise, and for a call that cannot be captured (an argument or
    output of another type, a forward that modifies its inputs in place, a capture error such as
    a host sync in the forward): its key is remembered as un-graphable and a warning says why,
    once. At most ``max_signatures`` keys per model (a warning, then plain forwards for new keys).
    An error of the forward itself (during the warm-up) propagates.

    Memory: the graphs of one model share one memory pool (they never run at once, and each call
    copies its outputs out before the next replay), so captured signatures cost about the
    forward's largest activation memory plus each graph's outputs, not a pool per graph.

    The model's weights, and what a call costs: a graph replays the memory the model had at capture.
    A call under ``torch.no_grad()``/``inference_mode`` does work in the number of its inputs only:
    the key, the input copies, and the pointers of 4 sample tensors (the first and last parameter
    and buffer) plus one counter. That catches, without walking the model: a model-wide
    re-assignment (``model.to(...)``, ``.half()``, ``.cuda()``, model CPU offload moving the whole
    model: every pointer moves, the samples too) and any parameter, buffer or submodule
    registered anywhere since the last check (``module.weight = nn.Parameter(...)``,
    ``load_state_dict(assign=True)``, LoRA/PEFT adapters wrapping a layer: torch's global
    registration hooks count them); either makes the next call re-read every parameter and buffer
    once and, if any was re-assigned or added, drop every graph and capture again. With grad
    enabled a call also reads each parameter's ``requires_grad`` (O(parameters)) to decide whether
    autograd is needed. In-place updates (an optimizer step, ``load_state_dict``, ``copy_``, an EMA
    update, PEFT's in-place merge) are seen by the graphs.

    Not seen, by contract (call :meth:`reset` after them): a ``p.data = ...`` re-assignment of some
    parameters but not the samples (the memory a graph reads stays valid: the storages captured are
    kept alive until the next reset, so the graph computes with the old values instead of reading
    freed memory), LoRA adapters fused, unfused, re-scaled or switched (diffusers ``fuse_lora``,
    ``set_adapters``: Python state the forward reads), attention processors replaced, other Python
    attributes the forward reads, forward hooks added to or removed from submodules after capture,
    per-call caches the forward keeps, and a torch.compile'd or Triton kernel choice made on the
    values of the first call. Each graph replays on the current stream of its device. Not
    thread-safe. ``stats`` counts graph replays, captures, resets and plain calls per reason.
    """

    api = CUDAGraphAPI()

    def __init__(self, model: nn.Module, inner: Any = None, max_signatures: int = CUDA_GRAPH_MAX_SIGNATURES,
                 scalar_inputs: Optional[Sequence[str]] = None):
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
        #: The parameters whose Python numbers are passed to the graph as 0-d device tensors.
        self.scalar_inputs = tuple(scalar_parameters(wrapped) if scalar_inputs is None else scalar_inputs)
        self._scalar_slots = _positions(wrapped, self.scalar_inputs)
        self._pool = None
        # the model's parameters and buffers as last checked (see the class docstring)
        self._epoch = -1
        self._params: tuple = ()
        self._tracked: tuple = ()
        self._pointers: tuple = ()
        self._sample: tuple = ()
        self._alive: tuple = ()  # the storages the graphs read, kept alive while graphs exist
        _install_registration_hooks()

    # copies get an empty cache (a CUDA graph cannot be copied or pickled)
    def __reduce__(self):
        return (CUDAGraphForward, (self.model, self.inner, self.max_signatures, self.scalar_inputs))

    def __deepcopy__(self, memo):
        import copy

        return CUDAGraphForward(copy.deepcopy(self.model, memo), copy.deepcopy(self.inner, memo), self.max_signatures,
                                self.scalar_inputs)

    def __repr__(self) -> str:
        graphs = sum(isinstance(v, _Graph) for v in self.graphs.values())
        return f"<ldm_fast CUDAGraphForward of {type(self.model).__name__}: {graphs} graphs>"

    def reset(self) -> None:
        """Drop every captured graph (and the un-graphable keys, and their memory pool); the next
        calls capture again."""
        self.graphs.clear()
        self._pool = None
        self._alive = ()
        self._epoch = -1  # re-read the parameters at the next call

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
        device_type = self.api.device_type
        return (
            self.model.training,
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            backend.requested(),
            backend._Env.attention,
            tuple([get() for get in _FLAG_GETTERS]),
            tuple(_module_globals._global_forward_hooks),
            tuple(_module_globals._global_forward_pre_hooks),
        )

    def _lift_scalars(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        """args/kwargs with the Python ints/floats of :attr:`scalar_inputs` wrapped as :class:`_Scalar`."""
        for name, position in self._scalar_slots:
            if name in kwargs:
                value = kwargs[name]
                if type(value) is int or type(value) is float:
                    kwargs = dict(kwargs)
                    kwargs[name] = _Scalar(value)
            elif position is not None and position < len(args):
                value = args[position]
                if type(value) is int or type(value) is float:
                    args = args[:position] + (_Scalar(value),) + args[position + 1:]
        return args, kwargs

    def _check_model(self) -> None:
        """Re-read the model's parameters and buffers (O(parameters)): drop every graph when one was
        re-assigned, added or removed since the graphs were captured; remember them, their
        pointers and the registration count."""
        params = tuple(self.model.parameters())
        tracked = params + tuple(self.model.buffers())
        pointers = tuple([t.data_ptr() for t in tracked])
        if self.graphs and (pointers != self._pointers or len(tracked) != len(self._tracked)
                            or any(a is not b for a, b in zip(tracked, self._tracked))):
            self.stats["reset: parameters re-assigned"] += 1
            self.reset()
        self._params, self._tracked, self._pointers = params, tracked, pointers
        self._sample = tuple((t, t.data_ptr()) for t in _sample(params) + _sample(tracked[len(params):]))
        self._epoch = _Registrations.count

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():  # traced by torch.compile: the plain forward, nothing else
            return self._plain(*args, **kwargs)
        device_type = self.api.device_type
        call_args, call_kwargs = self._lift_scalars(args, kwargs) if self._scalar_slots else (args, kwargs)
        try:
            key, inputs = graph_key(call_args, call_kwargs)
        except _NotGraphable as exc:  # warned only for a model on the graph device
            on_device = any(p.device.type == device_type for p in itertools.islice(self.model.parameters(), 1))
            return self._fallback(str(exc), args, kwargs, warn=on_device)
        tensors = [t for t in inputs if type(t) is not _Scalar] if self._scalar_slots else inputs
        if not tensors or any(t.device.type != device_type for t in tensors):
            return self._fallback(f"inputs not on {device_type.upper()}", args, kwargs)
        if self.api.is_capturing():
            return self._fallback("inside another CUDA graph capture", args, kwargs)
        # the model's state: O(1) unless a registration happened or a sample pointer moved
        if _Registrations.count != self._epoch or any(t.data_ptr() != p for t, p in self._sample):
            self._check_model()
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors)
                                        or any(p.requires_grad for p in self._params)):
            return self._fallback("autograd needed (grad enabled and something requires grad)", args, kwargs)
        key = (key, self._context_key())
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_signatures:
                return self._fallback(f"more than {self.max_signatures} call signatures", args, kwargs, warn=True)
            entry = self._capture(key, inputs, call_args, call_kwargs, tensors[0].device)
        if isinstance(entry, str):
            return self._fallback(entry, args, kwargs)
        for static, t in zip(entry.inputs, inputs):
            if type(t) is _Scalar:
                static.fill_(t.value)
            else:
                static.copy_(t)
        entry.graph.replay()
        self.stats["graph replay"] += 1
        return map_output(_clone, entry.output)

    def _capture(self, key, inputs, args, kwargs, device):
        """Warm up and capture a graph for ``key``: the new ``_Graph``, or the reason (a str, also
        remembered for the key and warned once) it cannot be captured."""
        # static inputs are normal tensors even under inference_mode (their _version is read below;
        # an inference tensor has none), made without autograd
        with torch.inference_mode(False), torch.no_grad():
            static_inputs = [torch.full((), t.value, dtype=_SCALAR_DTYPES[type(t.value)], device=device)
                             if type(t) is _Scalar else t.clone() for t in inputs]
        static_args, static_kwargs = _replace_tensors(args, kwargs, static_inputs)
        versions = [t._version for t in static_inputs]
        plain = self._plain
        device_type = self.api.device_type

        if torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled():
            dtype = torch.get_autocast_dtype(device_type)

            def run():  # the caller's autocast, its weight-cast cache off (see the class docstring)
                with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
                    return plain(*static_args, **static_kwargs)
        else:
            def run():
                return plain(*static_args, **static_kwargs)

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
            if self._pool is None:
                self._pool = self.api.new_pool()
            try:
                graph, output = self.api.capture(device, run, self._pool)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: run it plainly
                reason = f"capture failed: {type(exc).__name__}: {exc}"
                self._pool = None  # a failed capture's pool is not reused
            else:
                entry = _Graph(graph, static_inputs, output)
                self.graphs[key] = entry
                if not self._alive:  # what the graphs read stays allocated until reset()
                    self._alive = tuple(t.untyped_storage() for t in self._tracked)
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
