"""ldm_fast.kernels: Triton kernels, each file beside its launcher and eager PyTorch reference.

Importing a kernel module decorates its kernels, which is when Triton reads ``TRITON_INTERPRET``:
``1`` runs them under Triton's CPU interpreter on CPU tensors (the tests set it). Nothing here
sets it or anything else: importing has no side effects.
"""

import torch as _torch

#: The dtypes every kernel takes (fp64 and the rest run the eager reference).
KERNEL_DTYPES = (_torch.float32, _torch.float16, _torch.bfloat16)
