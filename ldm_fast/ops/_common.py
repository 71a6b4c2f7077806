"""What the ops share: argument checks, seeds, the timestep/table-index check, the launch counter."""

from __future__ import annotations

import functools
import math
import numbers
import threading
from collections import Counter
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import backend

#: Kernel launches per op name since import; tests read it to prove the Triton path ran.
kernel_launches: Counter = Counter()

# Triton's interpreter patches triton.language globally while it runs a kernel, so two threads
# interpreting at once break each other; interpreted launches are serialized (GPU launches are not).
_INTERPRETER_LOCK = threading.Lock()


class ArgumentError(ValueError, RuntimeError):
    """A bad argument where torch itself raises RuntimeError (group_norm's num_groups, shapes):
    a ValueError, as every ldm_fast argument error, that ``except RuntimeError`` still catches."""


#: The current CUDA device's index without ``torch.cuda.current_device``'s lazy-init check (called
#: only with a CUDA tensor in hand: CUDA is initialized); absent from CPU builds of torch.
_cuda_current_device = getattr(torch._C, "_cuda_getDevice", None)


def launch(op: str, launcher, *args, **kwargs):
    """Call a kernel launcher, counting the call (tests read the count to prove the kernel ran).

    ``args[0]`` is a tensor on the kernel's device (every launcher's first argument is). Triton
    launches on the CURRENT device and its current stream, not the tensors': a tensor on
    ``cuda:1`` while ``cuda:0`` is current would be read by a kernel on cuda:0 (an illegal memory
    access). So a launch whose tensors are on another CUDA device than the current one runs under
    ``torch.cuda.device(that device)`` (and so on that device's current stream, as torch's own ops
    on those tensors do); the common case costs one device-index compare, no context switch.
    """
    kernel_launches[op] += 1
    if backend._Env.interpret:  # read directly: one Python call less per launch
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    index = args[0].get_device()  # -1 off CUDA
    if index >= 0 and index != _cuda_current_device():
        with torch.cuda.device(index):
            return launcher(*args, **kwargs)
    return launcher(*args, **kwargs)


# What torch.autograd.Function.apply runs when no functorch transform is active: dead functorch
# wrappers unwrapped, then the C apply. (A torch without these names: Function.apply itself.)
try:
    from torch._C._functorch import unwrap_if_dead as _unwrap_if_dead

    _FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]
    _functorch_active = torch._C._are_functorch_transforms_active
except (ImportError, AttributeError, KeyError):  # pragma: no cover
    _FUNCTION_APPLY = None


def apply(function, *args):
    """``function.apply(*args)`` for an op's ``torch.autograd.Function``, without ``Function.apply``'s
    Python preamble where all it does is what this does: with no functorch transform active, unwrap
    dead functorch wrappers among the tensors and call the C apply (~4 µs less a call in a U-Net
    training step, where 109 Functions run). Under a transform it is ``function.apply`` (which raises
    for these Functions: they define no ``setup_context``)."""
    if _FUNCTION_APPLY is None or _functorch_active():
        return function.apply(*args)
    return _FUNCTION_APPLY(function, *[_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])


def first_order(backward):
    """``torch.autograd.function.once_differentiable`` for an op's ``backward``, without its wrapper's
    cost (a ``no_grad`` context and a check, ~2 µs a call) where it does nothing: autograd runs a
    backward with grad mode off unless ``create_graph=True``, and torch's wrapper then only calls it.
    With grad mode on (a double backward asked for) it is torch's wrapper, whose outputs raise if
    differentiated again."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            return once(ctx, *grads)
        return backward(ctx, *grads)

    return wrapper


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these tensors (the one test every op uses)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_float(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_like(name: str, x, ref_name: str, ref: Tensor) -> None:
    """``x`` is a float tensor with ``ref``'s shape, on ``ref``'s device."""
    if not (isinstance(x, Tensor) and x.is_floating_point()):  # inline tests: each helper call is host time
        check_float(name, x)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")
    if x.device != ref.device:
        check_same_device(name, x, ref_name, ref)


def check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def finite_float(name: str, value) -> float:
    """A finite Python float from a number, or from a one-element CPU tensor (reading it is free);
    TypeError / ValueError naming the argument otherwise (a device tensor would need a host sync)."""
    if type(value) is float or type(value) is int:  # the common case, without the numbers.Real ABC check
        value = float(value)
    elif isinstance(value, Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            raise TypeError(
                f"{name} must be a float or a one-element CPU tensor, got a tensor of shape {tuple(value.shape)} on "
                f"{value.device} (reading a device value would sync the host)"
            )
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    else:
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def kernel_seed(seed: Optional[int], like: Tensor):
    """The seed a kernel that draws noise gets: the given int (passed by value); for None, one drawn
    from torch's default generators (so ``torch.manual_seed`` governs it).

    On CUDA (and while a graph is compiled) a drawn seed is always drawn ON THE DEVICE, a
    one-element int64 tensor the kernel loads (``SEED_FROM_PTR``), captured or not: every replay of
    a CUDA graph then draws new noise, as ``torch.randn`` does in a graph, and a warm-up before a
    capture launches the very kernel variant the capture records (a variant first loaded inside a
    capture fails it: "operation not permitted when stream is capturing"). One tiny ``randint``
    kernel on the device, no sync. On the CPU (the interpreter) it is drawn on the host. Call it
    only when the kernel draws noise: a given noise tensor needs no seed.
    """
    if seed is not None:
        return seed
    if like.is_cuda or torch.compiler.is_compiling():
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=like.device)
    return int(torch.randint(0, 2**62, ()))


def seed_as_tensor(seed, like: Tensor) -> Tensor:
    """A seed for the registered (torch.compile) ops: a one-element int64 tensor on ``like``'s device."""
    if isinstance(seed, Tensor):
        return seed
    return torch.full((1,), seed, dtype=torch.int64, device=like.device)


def eager_randn(like: Tensor, seed: Optional[int]) -> Tensor:
    """Standard normal noise of ``like``'s shape for the eager path: torch's generator, seeded when
    asked (a meta tensor has no values to draw: its noise is a meta tensor too)."""
    if seed is None or like.device.type == "meta":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def derived_seed(seed: Optional[int], salt: int) -> Optional[int]:
    """A second, independent seed from ``seed`` for a second stream (None stays None)."""
    return None if seed is None else (seed ^ salt) % 2**63


def check_index(name: str, value, length: int, batch: int, device: torch.device, sync_check: bool, what: str):
    """Check a row index into a table of ``length`` rows (q_sample's t into alphas_cumprod,
    sampler_step's index into its coefficient table); return ``(index, check_on_device)``.

    ``value`` is an int (every batch row) or an integer tensor of shape ``[]``, ``[1]`` (both
    broadcast over the batch) or ``[batch]``, of any integer dtype. An int, or a tensor on the CPU,
    has its range ``[0, length)`` checked on the host (free: no device is involved) and raises
    ValueError naming it; a CPU tensor is then moved to ``device``. A tensor on the device is never
    read by the host (no sync, CUDA-graph safe): ``check_on_device`` is True and the caller asserts
    its range on the device, unless ``sync_check`` asks for the host check (a sync) and its
    ValueError. ``what`` names the table in the error (``"len(alphas_cumprod)"``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}")
    if isinstance(value, int):
        _check_range(name, value, value, length, what)
        return value, False
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {'timesteps' if name == 't' else 'rows'}, got dtype {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be a scalar or have shape [{batch}] (one per batch row; [1] broadcasts), "
                         f"got {tuple(value.shape)}")
    if sync_check or (value.device.type == "cpu" and not torch.compiler.is_compiling()):
        if value.numel():
            lo, hi = (int(v) for v in torch.aminmax(value))
            _check_range(name, lo, hi, length, what)
        return value.to(device), False
    return value.to(device), True


def _check_range(name: str, lo: int, hi: int, length: int, what: str) -> None:
    if lo < 0 or hi >= length:
        raise ValueError(f"{name} must lie in [0, {length}) ({what}), got values in [{lo}, {hi}]")


def assert_index_on_device(index: Tensor, length: int, message: str) -> None:
    """The eager path's device-side range check of a device index: asynchronous, no host sync."""
    torch._assert_async(((index >= 0) & (index < length)).all(), message)


def as_rows_index(index: Tensor, batch: int) -> Tensor:
    """An index tensor ``[]``, ``[1]`` or ``[batch]`` as ``[batch]`` int64 (for the eager gathers:
    an int64 index of any source dtype, so uint8 is never read as a mask)."""
    return index.long().reshape(-1).expand(batch)
