"""ldm_fast.kernels: Triton kernels, each file beside its eager PyTorch reference.

Triton chooses between compiling and interpreting a kernel when it is decorated, so the choice is
made here, before any kernel module is imported: without a CUDA device (and with
``TRITON_INTERPRET`` unset) kernels can only run under the interpreter, on CPU tensors.
"""

import os as _os

import torch as _torch

if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"
