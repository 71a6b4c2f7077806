"""Backend dispatch: which implementation (fused Triton kernel or eager PyTorch) runs an op.

Every public op asks :func:`select` once per call. The answer is

* ``"triton"`` when the tensors are on CUDA and triton imports (``auto``, the default);
* ``"eager"`` otherwise: the reference implementation in plain PyTorch. It is also the
  *exact* mode: bit-for-bit the plain PyTorch result, so it is what ``LDM_FAST_BACKEND=eager``
  gives a user who wants no numerical change at all.

``LDM_FAST_BACKEND=auto|triton|eager`` (read at every call) and the context manager
:func:`use_backend` override the choice. Forcing ``"triton"`` on CPU tensors runs the real
kernel source under Triton's interpreter: that is how the tests prove the kernels on a machine
with no GPU. An op that cannot run a case in Triton (dtype, layout, size) falls back to eager,
never to a wrong answer.

Environment variables (read here and nowhere else):

=====================  ==========================================================================
``LDM_FAST_BACKEND``   ``auto`` (default), ``triton`` or ``eager``.
``LDM_FAST_COMPILE``   Inside ``torch.compile``: ``auto`` (default), ``kernel`` or ``inductor``. With
                       ``inductor`` group_norm is traced as plain PyTorch, so Inductor generates and
                       fuses it exactly as without ldm_fast; ``kernel`` puts the Triton kernel in the
                       graph as one op; ``auto`` uses the kernel for groups of at least
                       ``COMPILE_KERNEL_MIN_GROUP`` elements (the VAE's large levels, where the H100
                       baseline measured Inductor's GroupNorm at ~2.5x the kernel's time) and
                       Inductor below (the U-Net's levels, where Inductor fuses GroupNorm with its
                       neighbours). reparameterize and q_sample always use their kernel op.
``LDM_FAST_ATTENTION`` ``auto``, ``triton`` or ``sdpa``: overrides the ``impl`` argument of
                       :func:`ldm_fast.functional.attention` (and every module and processor that
                       calls it). Unset: each call's own ``impl`` (default ``auto``).
``TRITON_INTERPRET``   Triton's own switch, read when a kernel is decorated. Importing ldm_fast
                       (its ``ldm_fast.kernels`` package) sets it to ``1`` when no CUDA device
                       exists and the variable is unset: without a GPU a kernel can only run, on
                       CPU tensors, under the interpreter. Set it to ``0`` to keep it off.
=====================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from collections import Counter
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "eager")
COMPILE_POLICIES = ("auto", "kernel", "inductor")
#: Under torch.compile with ``LDM_FAST_COMPILE=auto``, group_norm runs the kernel for groups of at
#: least this many elements (C // G * H * W): 128x512x512, 256x256x256 and 512x128x128 in the SD
#: VAE at 512 px and up take the kernel, every U-Net level (at most 40960) takes Inductor's code.
COMPILE_KERNEL_MIN_GROUP = 2**18

_state = threading.local()

#: Kernel launches per op name since import; tests read it to prove the Triton path ran.
kernel_launches: Counter = Counter()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def requested() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else ``LDM_FAST_BACKEND``, else auto."""
    override = getattr(_state, "stack", None)
    if override:
        return override[-1]
    return _check_name(os.environ.get("LDM_FAST_BACKEND", "auto").strip().lower() or "auto", "LDM_FAST_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` (``auto``, ``triton`` or ``eager``)."""
    _check_name(name, "use_backend(name)")
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
    name = os.environ.get("LDM_FAST_COMPILE", "auto").strip().lower() or "auto"
    if name not in COMPILE_POLICIES:
        raise ValueError(f"LDM_FAST_COMPILE must be one of {COMPILE_POLICIES}, got {name!r}")
    return name


ATTENTION_IMPLS = ("auto", "triton", "sdpa")


def attention_impl(impl: str) -> str:
    """The attention implementation asked for: ``LDM_FAST_ATTENTION`` when set, else ``impl``."""
    name = os.environ.get("LDM_FAST_ATTENTION", "").strip().lower()
    if name:
        if name not in ATTENTION_IMPLS:
            raise ValueError(f"LDM_FAST_ATTENTION must be one of {ATTENTION_IMPLS}, got {name!r}")
        return name
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def compile_uses_kernel(group_elements: int) -> bool:
    """Inside torch.compile, whether group_norm with groups of ``group_elements`` elements puts the
    kernel in the graph (else the plain PyTorch formula is traced for Inductor to fuse)."""
    policy = compile_policy()
    return policy == "kernel" or (policy == "auto" and group_elements >= COMPILE_KERNEL_MIN_GROUP)


def _find_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: deliberately hidden
        return False


_TRITON_AVAILABLE = _find_triton()


def triton_available() -> bool:
    """True when the triton package is installed (it ships for Linux only)."""
    return _TRITON_AVAILABLE


def select(*tensors: torch.Tensor | None) -> str:
    """``"triton"`` or ``"eager"`` for a call on ``tensors`` (``None`` entries are ignored)."""
    name = requested()
    if name == "eager" or not triton_available():
        return "eager"
    if name == "triton":
        return "triton"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    return "triton" if on_cuda else "eager"


_interpreting: list = []  # the answer, once read (a plain cache: dynamo traces it without warnings)


def interpreting() -> bool:
    """True when kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``). Read once:
    Triton makes the choice when the kernels are decorated, at import."""
    if not _interpreting:
        _interpreting.append(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))
    return _interpreting[0]


def can_run_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel can run on these tensors in this process (all on one device: CUDA, or the
    CPU under the interpreter)."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    if device is None:
        return False
    if device.type == "cuda":
        return not interpreting()
    return device.type == "cpu" and interpreting()
