"""The latent diffusion core: encode to scaled latents, noise them, decode back, and the training loss."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from . import functional as lf
from .ops._common import derived_seed
from .schedules import Schedule, make_schedule

_NOISE_SALT = 0x2545F4914F6CDD1D


def _split_posterior(out: Any):
    """Read an encoder's output as ``("moments", m)`` or ``("mean_logvar", (mean, logvar))``.

    Accepted: a ``(mean, logvar)`` pair; a dict with ``mean``/``logvar`` or ``mu``/``log_var``;
    a diffusers ``AutoencoderKLOutput`` (``.latent_dist``) or ``DiagonalGaussianDistribution``
    (``.parameters``, the moments); a single moments tensor/array ``[B, 2C, ...]``.
    """
    out = getattr(out, "latent_dist", out)
    if isinstance(out, dict):
        for keys in (("mean", "logvar"), ("mu", "log_var"), ("mu", "logvar")):
            if all(k in out for k in keys):
                return "mean_logvar", (out[keys[0]], out[keys[1]])
        raise TypeError(f"encoder_fn returned a dict without mean/logvar keys: {sorted(out)}")
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"encoder_fn must return (mean, logvar); got a sequence of {len(out)} items")
        return "mean_logvar", tuple(out)
    if hasattr(out, "parameters") and isinstance(out.parameters, Tensor):
        return "moments", out.parameters
    if isinstance(out, (Tensor, np.ndarray)):
        return "moments", out
    raise TypeError(f"encoder_fn returned {type(out).__name__}; expected (mean, logvar), a dict, or moments")


class LatentDiffusion(torch.nn.Module):
    """Latent diffusion around a VAE: ``encode`` -> ``forward_diffusion`` -> denoiser -> ``decode``.

    - ``encoder_fn(x)`` returns the posterior (see :func:`_split_posterior`): ``(mean, logvar)``,
      moments ``[B, 2C, ...]``, or a diffusers encoder output.
    - ``decoder_fn(z)`` maps unscaled latents back to data.
    - ``z = (sample - shift_factor) * scale_factor``: SD v1 0.18215 / 0.0, SDXL 0.13025 / 0.0,
      SD3 1.5305 / 0.0609.
    - ``schedule``: a :class:`~ldm_fast.schedules.Schedule`; SD v1's scaled_linear by default.
    - ``denoiser(z_t, t[, cond])``: the noise (or v) predictor used by :meth:`training_loss`.

    numpy in, numpy out: with numpy arrays ``encode``, ``decode`` and ``forward_diffusion`` keep the
    deep-ml "Latent Diffusion Encoding and Decoding" API, drawing noise from ``np.random``.
    """

    def __init__(
        self,
        encoder_fn: Callable,
        decoder_fn: Callable,
        scale_factor: float = 0.18215,
        shift_factor: float = 0.0,
        schedule: Optional[Schedule] = None,
        denoiser: Optional[Callable] = None,
    ):
        super().__init__()
        self.encoder_fn = encoder_fn
        self.decoder_fn = decoder_fn
        self.denoiser = denoiser
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.schedule = schedule if schedule is not None else make_schedule("scaled_linear")
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.clone(), persistent=False)

    @property
    def num_steps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def encode(self, x, *, noise=None, seed: Optional[int] = None, sample: bool = True):
        """Scaled latents ``(mean + std * eps - shift) * scale`` of data x ``[B, C, H, W]`` (or any shape).

        ``sample=False`` returns the posterior mode ``(mean - shift) * scale``. With numpy x, eps is
        ``np.random.randn(*mean.shape)`` and the result is numpy.
        """
        kind, value = _split_posterior(self.encoder_fn(x))
        if isinstance(x, np.ndarray):
            mean, logvar = (np.split(np.asarray(value), 2, axis=1) if kind == "moments" else value)
            mean, logvar = torch.as_tensor(np.asarray(mean)), torch.as_tensor(np.asarray(logvar))
            if not sample:
                return ((mean - self.shift_factor) * self.scale_factor).numpy()
            eps = torch.as_tensor(np.random.randn(*mean.shape)).to(mean.dtype) if noise is None else torch.as_tensor(noise)
            return lf.reparameterize(mean, logvar, noise=eps, scale=self.scale_factor, shift=self.shift_factor).numpy()
        if not sample:
            mean = value.chunk(2, dim=1)[0] if kind == "moments" else value[0]
            return (mean - self.shift_factor) * self.scale_factor
        kw = dict(noise=noise, seed=seed, scale=self.scale_factor, shift=self.shift_factor)
        if kind == "moments":
            return lf.reparameterize_moments(value, **kw)
        return lf.reparameterize(*value, **kw)

    def decode(self, z):
        """``decoder_fn(z / scale + shift)``; numpy in, the decoder's numpy out."""
        return self.decoder_fn(z / self.scale_factor + self.shift_factor)

    def forward_diffusion(self, z, t, alpha_bars=None, *, noise=None, seed: Optional[int] = None, target: str = "eps"):
        """``(z_t, noise)`` with ``z_t = sqrt(abar[t]) * z + sqrt(1 - abar[t]) * noise``.

        t: an int for the whole batch, or one per batch row. ``alpha_bars`` defaults to the
        schedule's alphas_cumprod. With numpy z the noise is ``np.random.randn(*z.shape)`` and the
        results are numpy. ``target="v"`` returns the v-prediction target in place of the noise.
        """
        if isinstance(z, np.ndarray):
            zt = torch.as_tensor(z)
            abar = self.alphas_cumprod if alpha_bars is None else torch.as_tensor(np.asarray(alpha_bars, dtype=np.float64))
            tt = torch.as_tensor(np.asarray(t)) if not isinstance(t, int) else t
            eps = torch.as_tensor(np.random.randn(*z.shape)).to(zt.dtype) if noise is None else torch.as_tensor(noise)
            x_t, tgt = lf.q_sample(zt, tt, abar.to(zt.dtype), noise=eps, target=target)
            return x_t.numpy(), tgt.numpy()
        abar = self.alphas_cumprod if alpha_bars is None else torch.as_tensor(alpha_bars)
        return lf.q_sample(z, t, abar, noise=noise, seed=seed, target=target)

    def training_loss(
        self,
        x0: Tensor,
        t=None,
        cond=None,
        denoiser: Optional[Callable] = None,
        *,
        target: str = "eps",
        noise_offset: float = 0.0,
        seed: Optional[int] = None,
    ) -> Tensor:
        """One LDM training step's loss: MSE between the denoiser's prediction and the target.

        The encoder is frozen (no gradient); t is drawn uniformly per sample when None;
        ``denoiser(z_t, t)`` or ``denoiser(z_t, t, cond)`` predicts the noise (``target="eps"``) or
        v (``target="v"``). The MSE is taken in fp32.
        """
        denoiser = denoiser if denoiser is not None else self.denoiser
        if denoiser is None:
            raise ValueError("training_loss needs a denoiser: pass denoiser= here or to LatentDiffusion(...)")
        with torch.no_grad():
            z0 = self.encode(x0, seed=seed)
        if t is None:
            t = torch.randint(0, self.num_steps, (z0.shape[0],), device=z0.device)
        # a seed of its own for the diffusion noise, so it is independent of the posterior sample's
        z_t, tgt = lf.q_sample(z0, t, self.alphas_cumprod, seed=derived_seed(seed, _NOISE_SALT), target=target,
                              noise_offset=noise_offset)
        # one timestep per row for the denoiser, without reading a device t on the host
        t_rows = t.expand(z0.shape[0]) if isinstance(t, Tensor) else torch.full((z0.shape[0],), t, device=z0.device)
        pred = denoiser(z_t, t_rows) if cond is None else denoiser(z_t, t_rows, cond)
        return torch.nn.functional.mse_loss(pred.float(), tgt.float())
