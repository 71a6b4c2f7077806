"""Backend dispatch: whether an op runs its fused Triton kernel or its eager PyTorch reference.

Every op asks :func:`kernel_ok` once per call, with its tensors. The answer is True when

* the backend asked for is ``auto`` (the default) and the tensors are on one CUDA device, or it is
  ``triton`` and the tensors are on one CUDA device, or on the CPU with Triton's interpreter on
  (``TRITON_INTERPRET=1``: how the tests prove the kernels without a GPU);
* triton imports (it ships for Linux only), and every tensor's dtype is one the kernel takes.

Otherwise the op runs its eager reference: plain PyTorch, always correct, and bit for bit what
``LDM_FAST_BACKEND=eager`` gives a user who wants no numerical change at all. A case a kernel does
not cover (dtype, layout, size) falls back to eager, never to a wrong answer.

One precedence rule for every switch, strongest first:

=====================  ======================================================================
1. context manager     ``with ldm_fast.use_backend("eager"):`` (innermost wins; per thread)
2. environment         ``LDM_FAST_BACKEND``, ``LDM_FAST_ATTENTION``, ``LDM_FAST_COMPILE``
3. the call's argument ``attention(..., impl=...)`` (an operator's environment variable overrides
                       what the code asked, so a deployed model can be switched without an edit)
4. auto                the default: the kernel where it runs and, for attention, where a GPU
                       measurement says it is faster (``attention_routes.json``)
=====================  ======================================================================

Environment variables (read here and nowhere else; read ONCE, at import, and again only by
:func:`reload_env` or on entering :func:`use_backend`, so no op reads the environment per call):

==========================  ==========================================================================
``LDM_FAST_BACKEND``        ``auto`` (default), ``triton`` or ``eager``.
``LDM_FAST_COMPILE``        Inside ``torch.compile``: ``auto`` (default), ``kernel`` or ``inductor``. With
                            ``inductor`` group_norm is traced as plain PyTorch, so Inductor generates and
                            fuses it exactly as without ldm_fast; ``kernel`` puts the Triton kernel in the
                            graph as one op; ``auto`` uses the kernel for groups of at least
                            ``COMPILE_KERNEL_MIN_GROUP`` elements (the VAE's large levels, where the H100
                            baseline measured Inductor's GroupNorm at ~2.5x the kernel's time) and
                            Inductor below (the U-Net's levels, where Inductor fuses GroupNorm with its
                            neighbours). reparameterize and q_sample always use their kernel op.
``LDM_FAST_DIRECT_LAUNCH``  ``1`` (default) or ``0``: repeat launches of a kernel specialization go to the
                            compiled kernel's launcher directly, skipping ``JITFunction.run``'s per-call
                            binding (``kernels/_launch.py``); ``0`` sends every launch through
                            ``kernel[grid]``.
``LDM_FAST_ATTENTION``      ``auto``, ``triton`` or ``sdpa``: overrides the ``impl`` argument of
                            :func:`ldm_fast.functional.attention` (and every module and processor that
                            calls it). Unset: each call's own ``impl`` (default ``auto``).
``TRITON_INTERPRET``        Triton's own switch, read by Triton when a kernel is decorated (at import of
                            ``ldm_fast.kernels.*``). ldm_fast never sets it: with ``1`` the kernels run
                            under Triton's CPU interpreter on CPU tensors (the tests and the CPU
                            benchmarks set it); unset, a machine without a GPU runs every op's eager
                            reference.
==========================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator, Optional

import torch

from .kernels import KERNEL_DTYPES
from .kernels._launch import Switch as _DirectLaunch

BACKENDS = ("auto", "triton", "eager")
COMPILE_POLICIES = ("auto", "kernel", "inductor")
ATTENTION_IMPLS = ("auto", "triton", "sdpa")
#: Under torch.compile with ``LDM_FAST_COMPILE=auto``, group_norm runs the kernel for groups of at
#: least this many elements (C // G * H * W): 128x512x512, 256x256x256 and 512x128x128 in the SD
#: VAE at 512 px and up take the kernel, every U-Net level (at most 40960) takes Inductor's code.
COMPILE_KERNEL_MIN_GROUP = 2**18

_state = threading.local()  # .stack: the use_backend() names, innermost last


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: deliberately hidden
        return False


_TRITON_AVAILABLE = _find_triton()


def _env_choice(name: str, choices: tuple, default: Optional[str]) -> Optional[str]:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class _Env:
    """The environment variables, as last read by :func:`reload_env`."""

    backend = "auto"
    compile_policy = "auto"
    attention: Optional[str] = None  # None: each call's own impl
    interpret = False


def reload_env() -> None:
    """Read ``LDM_FAST_BACKEND``, ``LDM_FAST_COMPILE``, ``LDM_FAST_ATTENTION``, ``LDM_FAST_DIRECT_LAUNCH`` and ``TRITON_INTERPRET``
    again (ldm_fast reads them once, at import: call this after changing one in a running process).
    A bad value raises ValueError naming the variable (at import too)."""
    backend = _env_choice("LDM_FAST_BACKEND", BACKENDS, "auto")
    policy = _env_choice("LDM_FAST_COMPILE", COMPILE_POLICIES, "auto")
    attention = _env_choice("LDM_FAST_ATTENTION", ATTENTION_IMPLS, None)
    direct = _env_choice("LDM_FAST_DIRECT_LAUNCH", ("0", "1"), "1")
    _Env.backend, _Env.compile_policy, _Env.attention = backend, policy, attention
    _DirectLaunch.enabled = direct == "1"
    _Env.interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def requested() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``LDM_FAST_BACKEND``, else auto."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _Env.backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (``auto``, ``triton`` or ``eager``).
    Entering it also re-reads the environment variables (:func:`reload_env`)."""
    if name not in BACKENDS:
        raise ValueError(f"use_backend(name) must be one of {BACKENDS}, got {name!r}")
    reload_env()
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def compile_policy() -> str:
    """``LDM_FAST_COMPILE``: what group_norm does inside torch.compile (``auto``, ``kernel``, ``inductor``)."""
    return _Env.compile_policy


def compile_uses_kernel(group_elements: int) -> bool:
    """Inside torch.compile, whether group_norm with groups of ``group_elements`` elements puts the
    kernel in the graph (else the plain PyTorch formula is traced for Inductor to fuse)."""
    policy = compile_policy()
    return policy == "kernel" or (policy == "auto" and group_elements >= COMPILE_KERNEL_MIN_GROUP)


def attention_impl(impl: str) -> str:
    """The attention implementation asked for: ``LDM_FAST_ATTENTION`` when set, else ``impl``."""
    forced = _Env.attention
    if forced is not None:
        return forced
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def triton_available() -> bool:
    """True when the triton package is installed (it ships for Linux only)."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1`` when read)."""
    return _Env.interpret


def kernel_ok(*tensors: Optional[torch.Tensor], dtypes: tuple = KERNEL_DTYPES) -> bool:
    """Whether the op runs its Triton kernel on these tensors (``None`` entries are ignored): the
    backend asked for allows it, triton imports, every dtype is in ``dtypes``, and the tensors lie
    on one device where a kernel runs in this process (CUDA; the CPU only for ``triton`` under the
    interpreter). The one check every op makes, once per call."""
    stack = getattr(_state, "stack", None)
    name = stack[-1] if stack else _Env.backend
    if name == "eager" or not _TRITON_AVAILABLE:
        return False
    first = device = None
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in dtypes:
            return False
        if first is None:
            first, device = t, t.device
        elif t.device != device:
            return False
    if first is None:
        return False
    if first.is_cuda:  # (not device.type: a string made per call; torch.compile folds is_cuda, not is_cpu)
        return not _Env.interpret
    return device.type == "cpu" and name == "triton" and _Env.interpret


def select(*tensors: Optional[torch.Tensor]) -> str:
    """``"triton"`` or ``"eager"``: the backend a call on ``tensors`` is routed to before the op's
    own coverage checks (dtype, layout): ``triton`` when asked for, or ``auto`` on CUDA tensors."""
    name = requested()
    if name == "eager" or not _TRITON_AVAILABLE:
        return "eager"
    if name == "triton":
        return "triton"
    return "triton" if all(t.is_cuda for t in tensors if t is not None) else "eager"


def can_run_kernel(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a kernel can run on these tensors in this process (all on one device: CUDA, or the
    CPU under the interpreter), whatever backend is asked for."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        return False
    device = devices.pop()
    return (device.type == "cuda" and not _Env.interpret) or (device.type == "cpu" and _Env.interpret)


reload_env()
