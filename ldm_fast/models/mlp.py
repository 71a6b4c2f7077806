"""The vector latent diffusion model of Edifice (``Edifice.Generative.LatentDiffusion``, v0.2.0), in PyTorch.

An MLP-only LDM for feature vectors: no convolutions, no attention, no conditioning.
``build(input_size)`` returns ``(encoder, decoder, denoiser)``; layer names, widths, order and
defaults follow Edifice's Axon graphs, so ``denoiser_block_1.up.weight`` here is Edifice's
``denoiser_block_1_up`` kernel (transposed: torch stores ``[out, in]``, Axon ``[in, out]``).
With B the batch, I ``input_size``, L ``latent_size``, H ``hidden_size``, N ``num_layers``::

    encoder(x [B, I]) -> (mu [B, L], log_var [B, L])
        enc_dense_0 (I -> H), SiLU, enc_dense_1 (H -> H), SiLU; heads enc_mu, enc_log_var (H -> L)
    decoder(z [B, L]) -> x_hat [B, I]
        dec_dense_0 (L -> H), SiLU, dec_dense_1 (H -> H), SiLU, dec_output (H -> I), no activation
    denoiser(z_t [B, L], t [B]) -> eps_hat [B, L]
        time_embed: sinusoidal embedding of t / num_steps, no parameters      [B, 2*(H//2)]
        h = z_proj(z_t) + SiLU(time_mlp_1(emb))                               [B, H]
        N x denoiser_block_i:  h = h + down(SiLU(up(LayerNorm(h))))          (H -> 4H -> H)
        noise_pred (H -> L)

Every dense layer has a bias; LayerNorm has eps 1e-5 and an affine gamma/beta. Weights start as
Axon's dense defaults (Glorot-uniform kernel, zero bias); LayerNorm as gamma 1, beta 0.
At the defaults (287, 32, 256, 4) the three modules hold 2,490,751 parameters (see
:func:`param_count`). The diffusion schedule is DDPM's plain linear one (1e-4..0.02, 1000 steps)
and there is no latent scaling factor.

Training, as Edifice describes it: fit the VAE (:func:`vae_loss`), freeze it, then fit the denoiser
on its latents (:func:`latent_diffusion` gives an :class:`ldm_fast.LatentDiffusion` whose
``training_loss`` does the noising with :func:`ldm_fast.functional.q_sample`).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as lf
from .. import schedules
from ..latent_diffusion import LatentDiffusion

__all__ = [
    "Decoder", "Denoiser", "Encoder", "ResidualBlock", "TimestepEmbedding", "build", "kl_divergence",
    "latent_diffusion", "make_mlp_schedule", "output_size", "param_count", "recommended_defaults", "sample_latent",
    "timestep_embedding", "vae_loss",
]

#: Edifice's ``recommended_defaults()`` (its ``@default_*`` attributes, and input_size 287).
DEFAULTS = {"input_size": 287, "latent_size": 32, "hidden_size": 256, "num_layers": 4, "num_steps": 1000}
#: Edifice's schedule defaults: DDPM's linear betas (not SD's 0.00085..0.012 scaled-linear).
BETA_START, BETA_END = 1e-4, 0.02
#: Axon ``layer_norm``'s default epsilon (the same as torch's).
LAYER_NORM_EPS = 1e-5
#: sinusoidal embedding base, as in Transformer and DDPM positional embeddings.
MAX_PERIOD = 10000.0


def _check_size(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _dense(in_features: int, out_features: int) -> nn.Linear:
    """``nn.Linear`` initialised as Axon's ``dense``: Glorot-uniform weight, zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ---------------------------------------------------------------------------------------------
# the three networks


class Encoder(nn.Module):
    """VAE encoder: ``x [B, input_size] -> (mu, log_var)``, each ``[B, latent_size]``, in x's dtype.

    ``trunk = SiLU(enc_dense_1(SiLU(enc_dense_0(x))))``; ``mu = enc_mu(trunk)``,
    ``log_var = enc_log_var(trunk)`` (not clamped, as in Edifice).
    """

    def __init__(self, input_size: int, latent_size: int = 32, hidden_size: int = 256):
        super().__init__()
        self.enc_dense_0 = _dense(input_size, hidden_size)
        self.enc_act_0 = nn.SiLU()
        self.enc_dense_1 = _dense(hidden_size, hidden_size)
        self.enc_act_1 = nn.SiLU()
        self.enc_mu = _dense(hidden_size, latent_size)
        self.enc_log_var = _dense(hidden_size, latent_size)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.enc_act_1(self.enc_dense_1(self.enc_act_0(self.enc_dense_0(x))))  # [B, H]
        return self.enc_mu(h), self.enc_log_var(h)  # [B, L], [B, L]


class Decoder(nn.Module):
    """VAE decoder: ``z [B, latent_size] -> x_hat [B, input_size]``, a linear output (no final activation).

    ``x_hat = dec_output(SiLU(dec_dense_1(SiLU(dec_dense_0(z)))))``.
    """

    def __init__(self, input_size: int, latent_size: int = 32, hidden_size: int = 256):
        super().__init__()
        self.dec_dense_0 = _dense(latent_size, hidden_size)
        self.dec_act_0 = nn.SiLU()
        self.dec_dense_1 = _dense(hidden_size, hidden_size)
        self.dec_act_1 = nn.SiLU()
        self.dec_output = _dense(hidden_size, input_size)

    def forward(self, z: Tensor) -> Tensor:
        h = self.dec_act_1(self.dec_dense_1(self.dec_act_0(self.dec_dense_0(z))))  # [B, H]
        return self.dec_output(h)  # [B, I]


def timestep_embedding(t: Tensor, dim: int, num_steps: int) -> Tensor:
    """Edifice's parameter-free sinusoidal timestep embedding: ``[B] -> [B, 2 * (dim // 2)]`` float32.

    With ``half = dim // 2`` and ``i = 0 .. half-1``::

        freqs[i] = exp(-ln(10000) * i / max(half - 1, 1))
        args     = (t / num_steps)[:, None] * freqs[None, :]
        emb      = cat([sin(args), cos(args)], dim=-1)          # sin first

    t (any integer or floating dtype) is cast to float32 before the division, as Edifice does. This
    differs from SD's embedding (cos first, ``/ half``, raw t): t in [0, num_steps) gives arguments
    below 1 radian, so the embedding varies slowly with t. An odd ``dim`` gives ``dim - 1`` features.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half - 1, 1)
    )
    args = (t.to(torch.float32) / num_steps)[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # [B, 2*half]


class TimestepEmbedding(nn.Module):
    """:func:`timestep_embedding` as a module (no parameters, no buffers): ``t [B] -> [B, 2 * (dim // 2)]`` fp32."""

    def __init__(self, dim: int, num_steps: int):
        super().__init__()
        self.dim = dim
        self.num_steps = num_steps

    def forward(self, t: Tensor) -> Tensor:
        return timestep_embedding(t, self.dim, self.num_steps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_steps={self.num_steps}"


class ResidualBlock(nn.Module):
    """Pre-LayerNorm residual MLP block with 4x expansion: ``h + down(SiLU(up(LayerNorm(h))))``, ``[B, H] -> [B, H]``.

    Submodules ``norm``, ``up`` (H -> 4H), ``silu``, ``down`` (4H -> H): Edifice's
    ``{name}_norm``, ``{name}_up``, ``{name}_silu``, ``{name}_down``.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.up = _dense(hidden_size, 4 * hidden_size)
        self.silu = nn.SiLU()
        self.down = _dense(4 * hidden_size, hidden_size)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.down(self.silu(self.up(self.norm(h))))


class Denoiser(nn.Module):
    """Latent noise predictor: ``denoiser(z_t [B, latent_size], t) -> eps_hat [B, latent_size]``.

    ``h = z_proj(z_t) + SiLU(time_mlp_1(time_embed(t)))``, then ``num_layers`` blocks
    ``denoiser_block_1 .. denoiser_block_N`` (:class:`ResidualBlock`), then ``noise_pred``.

    t: the timestep index per row, an integer tensor ``[B]`` (any integer dtype, e.g. from
    ``torch.randint``) in ``[0, num_steps)``; a 0-d tensor or a Python int/float applies to every row;
    floating t (fractional timesteps) is accepted too, as Edifice casts any t to f32. The embedding is
    computed in float32 from ``t / num_steps`` and cast to the parameters' dtype; the output has the
    dtype of the layers' computation (z_t's, when it matches the parameters). t is not range-checked.
    """

    def __init__(self, latent_size: int = 32, hidden_size: int = 256, num_layers: int = 4, num_steps: int = 1000):
        super().__init__()
        self.num_layers = num_layers
        self.num_steps = num_steps
        self.time_embed = TimestepEmbedding(hidden_size, num_steps)
        self.time_mlp_1 = _dense(2 * (hidden_size // 2), hidden_size)
        self.time_mlp_silu = nn.SiLU()
        self.z_proj = _dense(latent_size, hidden_size)
        for i in range(1, num_layers + 1):
            self.add_module(f"denoiser_block_{i}", ResidualBlock(hidden_size))
        self.noise_pred = _dense(hidden_size, latent_size)

    @property
    def blocks(self) -> list[ResidualBlock]:
        """The residual blocks, in order."""
        return [getattr(self, f"denoiser_block_{i}") for i in range(1, self.num_layers + 1)]

    def forward(self, z_t: Tensor, t: Union[Tensor, int, float]) -> Tensor:
        batch = z_t.shape[0]
        if isinstance(t, bool) or not isinstance(t, (Tensor, int, float)):
            raise TypeError(f"t must be a tensor or a number, got {type(t).__name__}")
        if not isinstance(t, Tensor):
            t = torch.full((batch,), t, device=z_t.device)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must hold integer or real timesteps, got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a scalar or have shape [{batch}] (one timestep per row), got {tuple(t.shape)}")
        emb = self.time_embed(t.to(z_t.device).expand(batch))  # [B, 2*(H//2)] fp32
        time = self.time_mlp_silu(self.time_mlp_1(emb.to(self.time_mlp_1.weight.dtype)))  # [B, H]
        h = self.z_proj(z_t) + time  # [B, H]  ("combine")
        for block in self.blocks:
            h = block(h)
        return self.noise_pred(h)  # [B, L]


def build(
    input_size: int, latent_size: int = 32, hidden_size: int = 256, num_layers: int = 4, num_steps: int = 1000
) -> tuple[Encoder, Decoder, Denoiser]:
    """Edifice's ``build``: ``(encoder, decoder, denoiser)``, freshly initialised on the CPU in float32.

    ``num_steps`` is the diffusion length the denoiser's embedding divides t by; use the same number
    for :func:`make_mlp_schedule`. ``build(**recommended_defaults())`` gives the 2,490,751-parameter model.
    """
    _check_size("input_size", input_size)
    _check_size("latent_size", latent_size)
    _check_size("hidden_size", hidden_size, 2)
    _check_size("num_layers", num_layers)
    _check_size("num_steps", num_steps)
    return (
        Encoder(input_size, latent_size, hidden_size),
        Decoder(input_size, latent_size, hidden_size),
        Denoiser(latent_size, hidden_size, num_layers, num_steps),
    )


# ---------------------------------------------------------------------------------------------
# sizes


def recommended_defaults() -> dict:
    """Edifice's ``recommended_defaults()``: input_size 287, latent_size 32, hidden_size 256, num_layers 4,
    num_steps 1000 (a new dict each call)."""
    return dict(DEFAULTS)


def output_size(latent_size: int = 32) -> int:
    """The denoiser's output width: the latent size."""
    return _check_size("latent_size", latent_size)


def param_count(
    input_size: int, latent_size: int = 32, hidden_size: int = 256, num_layers: int = 4, num_steps: int = 1000
) -> int:
    """The exact number of parameters of ``build(...)``'s three modules (weights, biases, LayerNorm gamma/beta).

    With I, L, H, N as in the module docstring and ``E = 2 * (H // 2)`` the embedding width::

        encoder  = (I*H + H) + (H*H + H) + 2*(H*L + L)
        decoder  = (L*H + H) + (H*H + H) + (H*I + I)
        denoiser = (E*H + H) + (L*H + H) + N*(2*H + (H*4H + 4H) + (4H*H + H)) + (H*L + L)

    Defaults (287, 32, 256, 4): 155,968 + 147,999 + 2,186,784 = 2,490,751. (Edifice's own
    ``param_count``, documented as approximate, leaves out biases and LayerNorm and counts the
    encoder's second dense as I*H; it gives 2,489,600.) ``num_steps`` does not change the count; it is
    accepted so that ``param_count(**recommended_defaults())`` works.
    """
    i = _check_size("input_size", input_size)
    lat = _check_size("latent_size", latent_size)
    h = _check_size("hidden_size", hidden_size, 2)
    n = _check_size("num_layers", num_layers)
    _check_size("num_steps", num_steps)
    e = 2 * (h // 2)
    encoder = (i * h + h) + (h * h + h) + 2 * (h * lat + lat)
    decoder = (lat * h + h) + (h * h + h) + (h * i + i)
    block = 2 * h + (h * 4 * h + 4 * h) + (4 * h * h + h)
    denoiser = (e * h + h) + (lat * h + h) + n * block + (h * lat + lat)
    return encoder + decoder + denoiser


# ---------------------------------------------------------------------------------------------
# VAE and diffusion math


def kl_divergence(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)), summed over the last (latent) dim and averaged over the rest: a scalar.

    ``-0.5 * sum(1 + log_var - mu**2 - exp(log_var), dim=-1).mean()``. Computed in float32 at least
    (fp16/bf16 inputs are upcast; float64 stays float64). Differentiable.
    """
    dtype = torch.promote_types(torch.promote_types(mu.dtype, log_var.dtype), torch.float32)
    mu, log_var = mu.to(dtype), log_var.to(dtype)
    return (-0.5 * (1.0 + log_var - mu.square() - log_var.exp()).sum(dim=-1)).mean()


def sample_latent(
    mu: Tensor, log_var: Tensor, seed: Optional[int] = None, *, noise: Optional[Tensor] = None
) -> Tensor:
    """A posterior sample ``z = mu + exp(0.5 * log_var) * eps``, eps ~ N(0, I): mu's shape, promoted dtype.

    Runs :func:`ldm_fast.functional.reparameterize`: the fused kernel on CUDA (eps drawn in-kernel
    from ``seed``, regenerated in backward), the eager reference elsewhere (eps from a torch generator
    seeded with ``seed``). A given seed is reproducible on one path; the two paths draw different
    eps. ``seed=None`` follows ``torch.manual_seed``. ``noise`` gives eps explicitly.
    Differentiable in mu and log_var. Unlike Edifice, log_var is clamped to [-30, 20] first (as in
    SD/diffusers); no latent scaling factor is applied.
    """
    return lf.reparameterize(mu, log_var, noise=noise, seed=seed)


def make_mlp_schedule(
    num_steps: int = 1000, beta_start: float = BETA_START, beta_end: float = BETA_END
) -> schedules.Schedule:
    """Edifice's schedule: linear betas ``linspace(beta_start, beta_end, num_steps)``, ``abar = cumprod(1 - betas)``.

    Returns :func:`ldm_fast.make_schedule` ``("linear", ...)``, a :class:`~ldm_fast.schedules.Schedule` of
    float32 tables ``[num_steps]`` (including Edifice's ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod``). The cumprod is taken in float64; Edifice's float32
    ``exp(cumsum(log(alphas + 1e-10)))`` differs from it by at most 2.4e-7 at the defaults.
    """
    return schedules.make_schedule("linear", num_steps, beta_start, beta_end)


# ---------------------------------------------------------------------------------------------
# training helpers


def vae_loss(
    encoder: nn.Module, decoder: nn.Module, x: Tensor, *, kl_weight: float = 1.0, seed: Optional[int] = None
) -> Tensor:
    """The VAE's loss on a batch ``x [B, input_size]``: reconstruction + ``kl_weight`` * KL, a float32 scalar.

    ``mu, log_var = encoder(x)``; ``z = sample_latent(mu, log_var, seed)``; the reconstruction term
    is the squared error ``sum((decoder(z) - x)**2, dim=-1).mean()``: summed over features and averaged
    over the batch, the same reduction as :func:`kl_divergence`.
    """
    mu, log_var = encoder(x)
    x_hat = decoder(sample_latent(mu, log_var, seed))
    recon = (x_hat.float() - x.float()).square().sum(dim=-1).mean()
    return recon + kl_weight * kl_divergence(mu, log_var)


def latent_diffusion(
    encoder: nn.Module,
    decoder: nn.Module,
    denoiser: Optional[nn.Module] = None,
    *,
    num_steps: Optional[int] = None,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> LatentDiffusion:
    """The three modules as an :class:`ldm_fast.LatentDiffusion` with Edifice's settings.

    No latent scaling (``scale_factor=1.0``) and the linear :func:`make_mlp_schedule` of
    ``num_steps`` steps (default: the denoiser's ``num_steps``, else 1000). Its
    ``training_loss(x)`` samples ``z0`` from the frozen encoder, draws ``t`` uniformly per row,
    noises ``z0`` with :func:`ldm_fast.functional.q_sample` and returns
    ``mse(denoiser(z_t, t), eps)``.
    """
    if num_steps is None:
        num_steps = getattr(denoiser, "num_steps", DEFAULTS["num_steps"])
    schedule = make_mlp_schedule(num_steps, beta_start, beta_end)
    return LatentDiffusion(encoder, decoder, scale_factor=1.0, schedule=schedule, denoiser=denoiser)
