"""Models built on ldm_fast's ops. Import a submodule directly, e.g. ``from ldm_fast.models import mlp``.

- :mod:`ldm_fast.models.mlp`: the vector (MLP) latent diffusion model of Edifice: VAE encoder and
  decoder, and a residual-MLP noise predictor.
"""
