"""ldm_fast.kernels: Triton kernels, each file beside its eager PyTorch reference.

Import kernel modules through :func:`ldm_fast.backend.kernel_module`, which decides between the
compiled and the interpreted Triton runtime before the kernels are decorated.
"""
