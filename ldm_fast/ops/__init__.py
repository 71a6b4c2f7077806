"""The ops, one module each: ``reparameterize``, ``q_sample``, ``group_norm``, ``attention``,
``sampler_step``, ``geglu``, ``add_layer_norm``, ``timestep_embedding``. Each module reads top to bottom: the public function (argument checks, then the
kernel or the eager reference), the ``torch.autograd.Function`` where training needs one, and the
``torch.library`` registration for torch.compile. :mod:`ldm_fast.functional` re-exports the public
functions.

Every op has two kernel call paths, chosen once per call:

* **eager** (the hot path users run): the kernel launcher is called directly, or, when autograd
  must record the call, through the ``torch.autograd.Function`` around the launchers. No
  ``torch.library`` dispatch: a ``custom_op`` costs tens of µs of host time per call, more than
  the kernels themselves at diffusion shapes (benchmarks/results/h100-2026-11-22-baseline-797cde7.md).
* **compiled** (``torch.compiler.is_compiling()``): the ``torch.ops.ldm_fast.*`` custom ops, with
  fake implementations (``register_fake``) and autograd formulas (``register_autograd``), so
  ``torch.compile(fullgraph=True)`` captures each op as one node without graph breaks.

Random seeds: an int is passed to the kernel by value; a seed drawn on the device (inside a CUDA
graph capture, or in a compiled graph) is a one-element int64 tensor the kernel loads, so every
replay draws new noise without the host reading it. The backward draws the forward's noise again
from the same seed instead of storing it.
"""

from . import add_layer_norm, attention, geglu, group_norm, q_sample, reparameterize, sampler_step, timestep_embedding
from ._common import ArgumentError, kernel_launches

__all__ = ["ArgumentError", "add_layer_norm", "attention", "geglu", "group_norm", "kernel_launches", "q_sample",
           "reparameterize", "sampler_step", "timestep_embedding"]
