"""One-line adoption: ``report = ldm_fast.optimize(model)`` and ``ldm_fast.restore(model)``.

:func:`optimize` changes a model IN PLACE, keeping every module object, every Parameter object,
the state dict keys, hooks, optimizers and adapters that refer to them; :func:`restore` undoes
exactly what it changed. What it does is a list of small passes (:data:`PASSES`), run in order:

``group_norm``
    Every module whose type is exactly ``torch.nn.GroupNorm`` gets its ``__class__`` set to
    :class:`ldm_fast.nn.GroupNorm` (``activation=None``): the same object and Parameters, its
    forward now :func:`ldm_fast.functional.group_norm` (the fused Triton kernel on CUDA, the exact
    eager ``F.group_norm`` elsewhere). The CompVis/SD ``GroupNorm32`` (a direct subclass whose
    forward is ``super().forward(x.float()).type(x.dtype)``) becomes :class:`ldm_fast.nn.GroupNorm32`
    (``isinstance`` with the original ``GroupNorm32`` class no longer holds until :func:`restore`).
    Any other subclass, and a norm with an instance-level ``forward`` (an accelerate hook), is left
    alone and listed in the report with the reason.
``silu_fusion`` (part of ``group_norm=True``)
    GroupNorm followed by SiLU becomes one fused GroupNorm+SiLU kernel where that is exact:

    * diffusers ``ResnetBlock2D``: the block gets an instance-level forward that reproduces the
      diffusers 0.42 ``ResnetBlock2D.forward`` statement for statement, with ``norm1`` and ``norm2``
      computing the SiLU themselves (under ``time_embedding_norm="scale_shift"`` the time modulation
      sits between norm2 and the SiLU, so only norm1; ``"default"`` and the VAE decoder's
      ``"group"``, which take the forward's last branch, fuse both). The block's
      ``nonlinearity`` module stays (it is applied to the time embedding too). Done only when the
      class's ``forward`` source is the one implemented (checked by its AST hash, so another
      diffusers version is never silently run with a different forward), the nonlinearity is an
      ``nn.SiLU``, the norms are plain GroupNorms used nowhere else, and nothing hooks them.
    * ``nn.Sequential(..., GroupNorm, nn.SiLU(), ...)`` (the CompVis U-Net's
      ``nn.Sequential(normalization(ch), nn.SiLU(), conv)``): the norm gets ``activation="silu"``
      and that SiLU entry becomes ``nn.Identity()`` (no state; the state dict is unchanged).
    * a GroupNorm child and an ``nn.SiLU`` child that the parent class's source (its bases
      included) only ever calls as the adjacent pair ``x = self.norm(x); x = self.act(x)``
      (diffusers' ``conv_norm_out``/``conv_act`` in ``UNet2DConditionModel`` and the VAE
      ``Encoder``): the same change (the VAE ``Decoder`` calls them apart and is left, reported).

    Every other SiLU is left alone. A norm or SiLU with forward hooks is not fused (the hooks would
    see a different tensor, or not fire): it is listed as left, with the reason. Note that a forward
    hook added to a fused norm AFTER optimize sees the norm's output after the SiLU.
``geglu`` (``geglu=True``, the default)
    Every diffusers ``GEGLU`` (the feed-forward gate of the transformer blocks) whose ``forward``
    and ``gelu`` are the diffusers 0.42 source (checked by AST hash) gets an instance-level forward
    running ``proj`` then :func:`ldm_fast.functional.geglu`: one kernel reading the projection in
    place (3F elements a row instead of 5F, one launch instead of two). The eager statements on a
    CPU and under torch.compile (Inductor fuses them itself).
``add_layer_norm`` (``add_layer_norm=True``, the default)
    Every diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"`` (SD 1.x/2.x, SDXL)
    whose ``forward`` is the diffusers 0.42 source (AST hash), plain ``nn.LayerNorm`` norms without
    hooks and no positional embedding gets an instance-level forward in which each residual add
    that feeds a LayerNorm (``attn1``'s output into ``norm2``, ``attn2``'s into ``norm3``) and that
    norm are one :func:`ldm_fast.functional.add_layer_norm` kernel (under CUDA autocast, which runs
    LayerNorm in fp32, with the norm's output in fp32 as autocast gives it). diffusers' own
    statements on a CPU (CPU autocast included), for a 4-d input or GLIGEN kwargs, and under
    torch.compile. The ``ResnetBlock2D`` forward of ``silu_fusion`` also computes the time
    embedding's SiLU once per step instead of once per block (inference only). In inference on the
    Triton backend the feed-forward's residual goes into its output GEMM: norm3's kernel writes
    ``s + ff.net[2].bias`` and ``addmm`` accumulates the projection onto it (diffusers'
    ``FeedForward`` checked by AST hash; unchunked, unhooked).
``silu_fusion``'s ``ResnetBlock2D`` forward, more (inference on the Triton backend)
    A 1x1 ``conv_shortcut`` (the blocks that change the channel count) runs as a GEMM accumulating
    onto ``conv2``'s output (``conv2`` carries both biases, their sum cached by version): no
    shortcut tensor, no residual add.
``timestep_embedding`` (``timestep_embedding=True``, the default)
    Every diffusers ``Timesteps`` (the U-Net's sinusoidal time embedding) whose ``forward`` and
    ``get_timestep_embedding`` are the diffusers 0.42 source (AST hash) gets an instance-level
    forward running :func:`ldm_fast.functional.timestep_embedding`: one kernel for arange, exp,
    the outer product, sin, cos and the cats (~10 launches). diffusers' statements on a CPU and
    under torch.compile.
``pack_weights`` (``pack_weights=True``, the default)
    Linear weights one GEMM can serve together are stored as row blocks of one buffer
    (:class:`ldm_fast.integrations.diffusers.PackedLinears`: the same Parameter objects, state dict
    keys and values, each ``.data`` a view; safetensors saves them): the ``time_emb_proj`` of every
    fused ``ResnetBlock2D`` and the ``emb_layers[1]`` of ldm_fast's own ``ResBlock`` (the first
    block of a step computes all of them with one GEMM, each block slices its columns: 22 GEMMs a
    SD 1.5 step -> 1) and, with ``attention``, each ``Attention``'s projections. Used in inference on the Triton backend while the views are intact
    (checked per call); ``model.to(dtype)`` or ``.to(device)`` after optimize re-allocates them and
    the separate GEMMs run (optimize after moving the model); :func:`restore` unpacks.
``channels_last`` (``channels_last=True``)
    Every 4-d parameter and buffer (conv weights) is stored ``torch.channels_last`` (5-d:
    ``channels_last_3d``) by re-assigning ``.data`` (and ``.grad``), so the Parameter objects stay
    the same. Inputs are not touched: convolutions with channels-last weights produce
    channels-last activations, and the GroupNorm kernel reads and writes that layout directly.
    diffusers ``Transformer2DModel``s (their ``_get_output_for_continuous_inputs`` checked by AST
    hash) return their output in their input's layout instead of copying it to NCHW, so the U-Net's
    activations stay channels-last from block to block (the same values).
``attention`` (``attention=True``)
    Every diffusers ``Attention`` module (the U-Net's self- and cross-attention, the VAE's mid-block
    attention) whose processor is diffusers' default, ``AttnProcessor2_0`` (or ``AttnProcessor``
    with the default scale ``D**-0.5``), gets :class:`ldm_fast.integrations.diffusers.AttnProcessor`
    (``AttnProcessor2_0`` statement for statement, the attention computed by
    :func:`ldm_fast.functional.attention` on the ``[B, N, heads * D]`` projections, no transposes);
    :func:`restore` puts the original processor object back. Any other processor (IP-Adapter, LoRA,
    added-KV, a processor that is an ``nn.Module``, an ``AttnProcessor`` with another scale) is left
    and listed with the reason. Off by default: ``functional.attention``'s ``impl="auto"`` runs
    SDPA until a GPU measurement says the Triton kernel is faster (``LDM_FAST_ATTENTION=triton``
    forces it), so today the swap saves the transposes and copies around SDPA, not the attention.
    With ``pack_weights``, each swapped module's ``to_q``/``to_k``/``to_v`` weights (plain
    ``nn.Linear``s, not tied to another module) are packed as row blocks of one buffer
    (:class:`ldm_fast.integrations.diffusers.PackedProjections`: the same Parameter objects, state
    dict and values, each ``.data`` a view), and the processor computes a self-attention's q, k and v
    with one GEMM and a cross-attention's k and v with one (SD 1.5 U-Net: 96 projection GEMMs a step
    become 48), in inference on the Triton backend while every weight is still its view (checked per
    call; ``model.to(dtype)`` after optimize, a LoRA layer swapped in, a hook on a projection or a
    recorded gradient run diffusers' GEMMs). :func:`restore` gives each weight its own storage back.
``cuda_graph`` (``cuda_graph=True``)
    ``model.forward`` becomes a :class:`CUDAGraphForward` (an instance attribute): one CUDA graph per
    static call signature, captured on the first CUDA call with it, replayed afterwards, outputs
    cloned. Plain forward for CPU inputs, when autograd is needed, inside another capture or
    torch.compile, and for calls that cannot be captured (warned once). See its docstring for the
    contract (what is keyed, what the graphs cannot see).

Calling :func:`optimize` on a model that is already optimized raises ``RuntimeError`` (it is not
idempotent on purpose: to change the options, :func:`restore` first). The bookkeeping lives on the
model (the private attribute ``_ldm_fast_optimized``), so :func:`restore` is exact, and a
``copy.deepcopy`` of an optimized model can be restored on its own.

diffusers is optional: it is never imported here; diffusers blocks (and attention processors)
are recognized by class name and module, by :mod:`ldm_fast.integrations.diffusers`, which holds
all of ldm_fast's diffusers knowledge.

The package: :mod:`~ldm_fast.optimize.api` (optimize, restore, the pass list :data:`PASSES`),
:mod:`~ldm_fast.optimize.report` (the report), :mod:`~ldm_fast.optimize.undo` (the undo
records), :mod:`~ldm_fast.optimize.passes` (group_norm, silu_fusion, geglu, add_layer_norm, timestep_embedding,
channels_last, attention) and
:mod:`~ldm_fast.optimize.cuda_graph` (:class:`CUDAGraphForward`). ``ldm_fast.optimize`` is the
function; ``from ldm_fast.optimize import CUDAGraphForward`` reads the package.
"""

from .api import PASSES, Context, Pass, optimize, report_of, restore
from .cuda_graph import CUDA_GRAPH_MAX_SIGNATURES, CUDAGraphAPI, CUDAGraphForward, graph_key, map_output
from .report import (ATTENTION, CHANNELS_LAST, CUDA_GRAPH, FUSED, GEGLU, GROUP_NORM, GROUP_NORM32, PACKED_PROJECTIONS,
                     RESNET_FORWARD, SEQUENTIAL_SILU, TIME_PROJECTIONS, TIMESTEPS, TRANSFORMER_FORWARD, TRANSFORMER_LAYOUT, OptimizeReport, ReportItem)

__all__ = ["ATTENTION", "CHANNELS_LAST", "CUDA_GRAPH", "CUDA_GRAPH_MAX_SIGNATURES", "CUDAGraphAPI", "CUDAGraphForward",
           "Context", "FUSED", "GEGLU", "GROUP_NORM", "GROUP_NORM32", "OptimizeReport", "PACKED_PROJECTIONS", "PASSES", "Pass",
           "RESNET_FORWARD",
           "ReportItem", "SEQUENTIAL_SILU", "TIME_PROJECTIONS", "TIMESTEPS", "TRANSFORMER_FORWARD", "TRANSFORMER_LAYOUT", "graph_key", "map_output", "optimize", "report_of", "restore"]
