"""Models built from ldm_fast's fused modules.

- :class:`AutoencoderKL` (:mod:`ldm_fast.models.autoencoder`): the SD v1 VAE, CompVis keys.
- :class:`UNetModel` (:mod:`ldm_fast.models.unet`): the SD v1 U-Net, CompVis keys.
- :mod:`ldm_fast.models.convert`: diffusers <-> CompVis state dicts, checkpoint loading.
- :mod:`ldm_fast.models.text`: conditioning from a CLIP text model you have.
- :mod:`ldm_fast.models.mlp`: the vector (MLP) latent diffusion model of Edifice: VAE encoder and
  decoder, and a residual-MLP noise predictor.

    from ldm_fast.models import AutoencoderKL, UNetModel
    unet = UNetModel.from_diffusers(diffusers_unet)        # same weights, ldm_fast's modules
"""

from . import convert, mlp
from .autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from .unet import UNetModel

__all__ = ["AutoencoderKL", "DiagonalGaussianDistribution", "UNetModel", "convert", "mlp"]
