"""One-line adoption: ``report = ldm_fast.optimize(model)`` and ``ldm_fast.restore(model)``.

:func:`optimize` changes a model IN PLACE, keeping every module object, every Parameter object,
the state dict keys, hooks, optimizers and adapters that refer to them; :func:`restore` undoes
exactly what it changed. What it does is a list of :class:`Patch` es (:data:`PATCHES`), each an
option of :func:`optimize` and the name of its report items:

=======================  =======  =====================================================================
patch (option)           default  what it does
=======================  =======  =====================================================================
``group_norm``           on       ``nn.GroupNorm`` (and CompVis ``GroupNorm32``) run the fused kernel
``group_norm_silu``      on       a Sequential's GroupNorm, SiLU pair as one kernel (CompVis U-Nets)
``resnet``               on       diffusers ``ResnetBlock2D``: GroupNorm+SiLU, the time-embedding add
                                  and the 1x1 shortcut fused
``geglu``                on       diffusers ``GEGLU``: the gate in one kernel
``add_layer_norm``       on       diffusers ``BasicTransformerBlock``: residual add + LayerNorm in one
                                  kernel, the feed-forward's residual in its output GEMM
``timestep_embedding``   on       diffusers ``Timesteps``: one kernel
``channels_last``        off      4-d weights channels-last; ``Transformer2DModel`` keeps the layout
``attention``            off      diffusers ``Attention``: ldm_fast's processor
``pack_weights``         on       time projections / q,k,v as one GEMM on packed weights
``cuda_graph``           off      ``model.forward`` replayed from CUDA graphs
=======================  =======  =====================================================================

The package: :mod:`~ldm_fast.optimize.api` (optimize, restore, :data:`PATCHES`),
:mod:`~ldm_fast.optimize.patch` (:class:`Patch`, :class:`Context`), :mod:`~ldm_fast.optimize.patches`
(the patches that know no library's blocks), :mod:`~ldm_fast.optimize.report` and
:mod:`~ldm_fast.optimize.cuda_graph` (:class:`CUDAGraphForward`); the diffusers patches live in
:mod:`ldm_fast.integrations.diffusers`. ``ldm_fast.optimize`` is the function;
``from ldm_fast.optimize import CUDAGraphForward`` reads the package. docs/optimize.md is the guide.
"""

from .api import OPTIONS, PATCHES, optimize, report_of, restore
from .cuda_graph import CUDA_GRAPH_MAX_SIGNATURES, CUDAGraphAPI, CUDAGraphForward, graph_key, map_output
from .patch import Context, InstallPatch, Patch
from .report import OptimizeReport, ReportItem

__all__ = ["CUDA_GRAPH_MAX_SIGNATURES", "CUDAGraphAPI", "CUDAGraphForward", "Context", "InstallPatch", "OPTIONS",
           "OptimizeReport", "PATCHES", "Patch", "ReportItem", "graph_key", "map_output", "optimize", "report_of",
           "restore"]
