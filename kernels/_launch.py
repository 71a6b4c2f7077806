"""Launching a Triton kernel at the floor: ``Kernel``, a ``@triton.jit`` function launched as
``kernel[grid](*args, **constexprs)`` whose repeat launches skip Triton's per-call work.

``JITFunction.run`` does, on every launch, what only the first launch of a specialization needs:
binding the arguments, computing the specialization key (each pointer's 16-byte alignment, each
integer's divisibility by 16 and equality to 1, types), the cache lookup, a globals check; 12-20 µs
of host time on an H100 host against ~3.4 µs for calling the compiled kernel's launcher (tritonbench
#1002, /work/shared/reference/call-path.md). ``Kernel`` launches the first call of each
specialization through ``kernel[grid]`` (which compiles or finds the kernel and returns it), keeps
that compiled kernel under the call's *facts* and launches later calls with the same facts
directly: ``compiled.run(grid, stream, function, metadata, None, None, None, *all arguments)``, the
call ``JITFunction.run`` itself makes (triton 3.6 through 3.9), with no launch metadata and no hooks
(Triton's hook chains are empty unless a profiler adds a hook).

The facts are finer than Triton's specialization, so equal facts imply the compiled kernel Triton
would pick: per positional argument, a tensor's dtype and whether its address is 16-byte aligned;
an int or a bool by value (an int's value decides Triton's facts about it: equality to 1,
divisibility by 16, 32/64-bit range; a size that changes only adds a cache entry); a float's or
None's type; every keyword (constexprs and options such as ``num_warps``) by name and value, in the call's order;
the device. A call
with anything else (another argument type, a non-constexpr parameter passed by keyword) and every
call while a Triton launch hook is set (profilers) go through ``kernel[grid]``, as does everything
under Triton's interpreter (CPU tests) and with ``LDM_FAST_DIRECT_LAUNCH=0``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch

try:
    from triton import knobs
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # no triton (the stand-in of _triton.py), or one without knobs: never direct
    knobs = InterpretedFunction = None

_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "debug", "sanitize_overflow",
                      "enable_fp_fusion", "launch_cooperative_grid", "launch_pdl"})


class Switch:
    """Whether repeat launches go direct (``ldm_fast.backend.reload_env`` sets it from
    ``LDM_FAST_DIRECT_LAUNCH``; tools that record launches at ``JITFunction.run`` turn it off)."""

    enabled = True


_Tensor = torch.Tensor
_I32 = 2**31


def facts(args: tuple) -> Optional[tuple]:
    """The positional arguments' part of the facts (see the module docstring), finer than Triton's
    specialization: a tensor's dtype and 16-byte alignment; an int as itself (its value decides
    Triton's facts about it: equality to 1, divisibility by 16, 32/64-bit range); a float's or
    None's type; a bool's value. None for an argument of another kind. One inline loop: this runs on
    every launch."""
    key = []
    add = key.append
    for a in args:
        cls = a.__class__
        if cls is int or cls is bool:
            add(a)
        elif cls is float or a is None:
            add(cls)
        elif isinstance(a, _Tensor):
            add(a.dtype)
            add(not a.data_ptr() & 15)
        else:
            return None
    return tuple(key)


class Kernel:
    """A ``@triton.jit`` function launched at the floor (see the module docstring). Launched as the
    JIT function is, ``kernel[grid](*args, **constexprs)``; every other attribute is the JIT
    function's. ``direct`` counts the launches made directly (tests and the GPU session read it)."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self._cache: dict = {}
        self.direct = 0
        params = getattr(fn, "params", None)
        interpreted = InterpretedFunction is not None and isinstance(fn, InterpretedFunction)
        self._params = None if params is None or knobs is None or interpreted else tuple(params)
        self._stream = None

    def __getattr__(self, name: str):
        return getattr(self.fn, name)

    def __repr__(self) -> str:
        return f"<ldm_fast Kernel {getattr(self.fn, '__name__', self.fn)!r}>"

    def __getitem__(self, grid):
        return partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        runtime = knobs.runtime if knobs is not None else None
        if (not Switch.enabled or self._params is None
                or _calls(runtime.launch_enter_hook) or _calls(runtime.launch_exit_hook)):
            return self.fn[grid](*args, **kwargs)
        arg_facts = facts(args)
        if arg_facts is None:
            return self.fn[grid](*args, **kwargs)
        device = _device(args)
        key = (device, arg_facts, tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)  # compiles or finds the specialization, and launches
            tail = self._tail(len(args), kwargs)
            if tail is not None and compiled is not None and getattr(compiled, "function", None) is not None:
                self._cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail, compiled)
            return compiled
        run, function, metadata, tail, compiled = entry
        if self._stream is None:
            from triton.runtime import driver

            self._stream = driver.active.get_current_stream
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, self._stream(device), function, metadata,
            None, None, None, *args, *tail)
        self.direct += 1
        return compiled

    def _tail(self, n_args: int, kwargs: dict) -> Optional[tuple]:
        """The values of the parameters after the ``n_args`` positional ones, in signature order
        (keywords, else defaults), when every one of them is a constexpr or has a default and no
        keyword is anything but those or a launch option; else None (not cached)."""
        tail, names = [], set()
        for p in self._params[n_args:]:
            names.add(p.name)
            if p.name in kwargs:
                if not p.is_constexpr:
                    return None
                tail.append(kwargs[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        if any(k not in names and k not in _OPTIONS for k in kwargs):
            return None
        return tuple(tail)


def _calls(hook) -> bool:
    """Whether a Triton launch hook is set (a ``HookChain`` with calls, or a hook set the older way):
    those launches go through ``kernel[grid]``, which builds the hooks' launch metadata."""
    return bool(getattr(hook, "calls", hook))


def _device(args: tuple) -> int:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.get_device()
    return -1


def kernel(fn) -> Kernel:
    """Decorator: ``@kernel`` above ``@triton.jit``."""
    return Kernel(fn)
