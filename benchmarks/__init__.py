"""ldm_fast's benchmark suite: ``python -m benchmarks`` (see README.md).

The CPU instruments run ldm_fast's kernels under Triton's interpreter, so this package chooses it
explicitly: without a CUDA device and with ``TRITON_INTERPRET`` unset, importing ``benchmarks``
sets ``TRITON_INTERPRET=1`` for its own process (before any kernel is decorated). The library
itself never sets it.
"""

import importlib.metadata as _metadata
import os as _os
import sys as _sys

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"


def _import_installed_kernels() -> None:
    """Import the installed PyPI package named ``kernels`` (Hugging Face's, which transformers >= 5
    imports) before this checkout's ``kernels/`` folder can shadow it: run from the repository root,
    ``python -m`` puts the root on ``sys.path``, and ``import kernels`` would find ldm_fast's kernel
    sources (installed as ``ldm_fast.kernels``, never as ``kernels``)."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if "kernels" in _sys.modules:
        return
    try:
        _metadata.distribution("kernels")
    except _metadata.PackageNotFoundError:
        return
    saved = _sys.path[:]
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or ".") != root]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        _sys.path[:] = saved


_import_installed_kernels()
