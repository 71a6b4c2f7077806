"""ldm_fast's diffusers knowledge: one module per block, each with the forward it reproduces, the
patch that installs it and the source digests it matches (:mod:`.supported`).

* :mod:`.resnet` - ``ResnetBlock2D`` (the ``resnet`` patch)
* :mod:`.transformer` - ``BasicTransformerBlock`` (``add_layer_norm``) and ``Transformer2DModel``'s
  output layout (part of ``channels_last``)
* :mod:`.attention` - ``Attention``: :class:`AttnProcessor` (``attention``) and
  :class:`PackedProjections` (``pack_weights``)
* :mod:`.geglu` - ``GEGLU`` (``geglu``)
* :mod:`.timesteps` - ``Timesteps`` (``timestep_embedding``)

Supported: diffusers 0.30.0 through 0.42.1 (:data:`.supported.RELEASES`). diffusers is never
imported here: its classes are recognized by name and module, their code by digest.

    from ldm_fast.integrations.diffusers import AttnProcessor
    unet.set_attn_processor(AttnProcessor())          # or: ldm_fast.optimize(unet, attention=True)
"""

from .attention import AttentionPatch, AttnProcessor, PackedProjections
from .geglu import GEGLUPatch
from .resnet import ResnetForward, ResnetPatch
from .supported import RELEASES, SUPPORTED, installed_version, is_diffusers
from .timesteps import TimestepsPatch
from .transformer import AddLayerNormPatch, ChannelsLastOutputPatch

__all__ = ["AddLayerNormPatch", "AttentionPatch", "AttnProcessor", "ChannelsLastOutputPatch", "GEGLUPatch",
           "PackedProjections", "RELEASES", "ResnetForward", "ResnetPatch", "SUPPORTED", "TimestepsPatch",
           "installed_version", "is_diffusers"]
