"""ldm_fast's benchmark suite: ``python -m benchmarks`` (see README.md).

The CPU instruments run ldm_fast's kernels under Triton's interpreter, so this package chooses it
explicitly: without a CUDA device and with ``TRITON_INTERPRET`` unset, importing ``benchmarks``
sets ``TRITON_INTERPRET=1`` for its own process (before any kernel is decorated). The library
itself never sets it.
"""

import os as _os

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"
