"""Training an LDM in two stages, as functions: :func:`train_vae`, then :func:`train_denoiser` on its latents.

    vae = AutoencoderKL(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, groups=8)   # 32x32 -> 4x8x8
    images = ldm_fast.data.shapes(4096)                                   # [N, 3, 32, 32] in [-1, 1]
    vae_losses = train_vae(vae, images, steps=900, batch_size=16, checkpoint="ckpt/vae.pt")
    scale = latent_scale(vae, images)                                     # 1 / std of the latents
    unet = UNetModel(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1, attention_levels=(1,), num_heads=4, context_dim=32, groups=8)
    ema = copy.deepcopy(unet)                                             # the weights to sample with
    losses = train_denoiser(unet, vae, images, steps=900, batch_size=32, lr=1e-3, scale_factor=scale,
                            context=torch.zeros(1, 1, 32), ema=ema, checkpoint="ckpt/unet.pt")

``python -m ldm_fast demo`` runs this, with He-initialized VAE convolutions (:mod:`ldm_fast.__main__`).

What runs fused (on CUDA tensors): the posterior sample (``posterior.sample(seed=..., scale=...)``:
the reparameterize kernel, noise drawn in the kernel and regenerated in its backward) and the
forward noising (:func:`ldm_fast.functional.q_sample`: noise drawn in the kernel; the noise it
returns is the regression target, nothing else is stored), plus the models' fused GroupNorms and
attention. On a CPU the same code runs the eager references.

Both functions share one loop:

- **Data**: a tensor ``[N, ...]`` (on the CPU or on the device). Batches are drawn without
  replacement from a permutation per epoch seeded by ``(seed, epoch)`` (drop-last); under
  ``torchrun`` the global batch of ``batch_size * world_size`` rows is split into one contiguous
  shard per rank, as ``DistributedSampler`` does for a data set.
- **Randomness** is a function of ``(seed, step, rank)``: batch order, timesteps (drawn for the
  global batch, so every rank agrees), posterior and diffusion noise seeds. A run resumed from a
  checkpoint therefore continues exactly where it stopped; torch's global RNG state (dropout) is
  saved and restored per rank as well.
- **Checkpoints** (``checkpoint=path``): every ``checkpoint_every`` steps and at the end, rank 0
  writes ``{model, optimizer, step, losses, rng, seed, batch_size, world_size}`` (and ``ema``) to a
  temporary file in the same directory and ``os.replace``-s it over ``path`` (atomic: a reader sees
  the old or the new file, never half of one). If ``path`` exists when training starts, training
  resumes from it (every rank reads it: use a shared file system across machines). Run N steps, or
  N/2 then N on the same path: the same weights, bit for bit. A resume that could not be exact is
  refused with a ValueError naming the argument (another ``seed`` or ``batch_size``; ``ema=None``
  for a checkpoint with EMA weights, or an ``ema`` for one without); another world size resumes with
  a RuntimeWarning. Files are read with ``torch.load(weights_only=True)`` (a pickled payload is
  refused, not run); an empty, truncated or foreign file raises a ValueError naming it.
- **Distributed**: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the process
  group is initialized (gloo on CPU, nccl on CUDA) and the model wrapped in
  ``DistributedDataParallel``; the returned losses are averaged over ranks.
- **Progress**: a tqdm bar when tqdm is importable (it is optional), else a line every
  ``log_every`` steps; rank 0 only; ``progress=False`` for silence.
- **Losses**: the list of per-step losses (floats) from step 0, resumed steps included.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import functional as lf
from ._loop import mix_seed, progress_bar
from .models.autoencoder import DiagonalGaussianDistribution
from .schedules import Schedule, make_schedule

__all__ = [
    "DistInfo", "VectorVAE", "default_device", "encode_moments", "init_distributed", "latent_scale",
    "load_checkpoint", "save_checkpoint", "train_denoiser", "train_vae",
]

CHECKPOINT_FORMAT = "ldm_fast.train/1"
_BATCH_SALT, _POSTERIOR_SALT, _NOISE_SALT, _T_SALT = 0xBA7C, 0x9057, 0x4015E, 0x7177


# ---------------------------------------------------------------------------------------------
# distributed


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the torchrun job this process belongs to, if any; return where it stands.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``. With ``WORLD_SIZE`` > 1 and no process group
    yet, initializes one: nccl when CUDA is available (and selects ``cuda:LOCAL_RANK``), else gloo.
    Idempotent; without torchrun returns ``DistInfo()`` (rank 0 of 1).
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank)


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path: Union[str, os.PathLike], state: dict) -> None:
    """Write ``state`` (``torch.save``) to ``path`` atomically: a temporary file in the same directory,
    flushed to disk, then ``os.replace`` over ``path``. On any error the temporary file is removed and
    ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Union[str, os.PathLike], map_location="cpu") -> Optional[dict]:
    """The state :func:`save_checkpoint` wrote to ``path``, or None when there is no file.

    Read with ``torch.load(weights_only=True)``: tensors, numbers, strings and plain containers only
    (all a checkpoint holds), so a pickled payload in the file is refused instead of run. A file that
    cannot be read (empty, truncated, not a ``torch.save`` file, or holding other objects) raises a
    ValueError naming it and what is wrong.
    """
    path = Path(path)
    if not path.exists():
        return None
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): not written by save_checkpoint (which replaces "
                         "the file atomically); delete it to start over")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {path} holds objects other than tensors, numbers, strings and plain "
                         f"containers; refused (torch.load weights_only=True), as a pickled payload would run "
                         f"code: {e}") from e
    except (EOFError, OSError, RuntimeError, KeyError) as e:  # what torch.load raises for torn or foreign bytes
        if isinstance(e, OSError) and e.filename is not None:
            raise  # the system's own error (permissions, ...), which names the file
        raise ValueError(f"checkpoint {path} ({size} bytes) is truncated or not a torch.save file "
                         f"({type(e).__name__}: {e})") from e


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# the shared loop


class _Batches:
    """Rank ``rank``'s rows of the global batch of each step: per-epoch permutations of ``n`` rows
    seeded by ``(seed, epoch)``, ``global_batch`` rows a step (drop-last), one contiguous shard per rank."""

    def __init__(self, n: int, batch_size: int, info: DistInfo, seed: int):
        self.global_batch = batch_size * info.world_size
        if n < self.global_batch:
            raise ValueError(f"the data hold {n} rows, fewer than one global batch ({batch_size} x "
                             f"{info.world_size} ranks = {self.global_batch})")
        self.steps_per_epoch = n // self.global_batch
        self.n, self.batch_size, self.rank, self.seed = n, batch_size, info.rank, seed
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> Tensor:
        """int64 ``[batch_size]`` row indices (CPU) for ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, _BATCH_SALT))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        start = k * self.global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size]


def _check_resume(state, checkpoint, kind: str, *, ema, seed: int, batch_size: int, info: DistInfo) -> None:
    """Refuse a checkpoint this run cannot continue exactly, naming the argument that differs.

    An EMA checkpoint needs ``ema`` (with ``ema=None`` the next checkpoint would drop the EMA
    weights), and a checkpoint without EMA weights cannot fill one. ``seed`` and ``batch_size``
    (per rank) must equal the recorded ones: both decide every later batch and noise. Another
    world size resumes, with a warning: the global batch and the per-rank RNG states change.
    Checkpoints written before ``seed``/``batch_size`` were recorded skip those two checks.
    """
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != kind:
        found = (state.get("format"), state.get("kind")) if isinstance(state, dict) else (type(state).__name__, None)
        raise ValueError(f"{checkpoint} is not a {kind} checkpoint of this trainer (format {found[0]!r}, kind "
                         f"{found[1]!r})")
    if "ema" in state and ema is None:
        raise ValueError(f"ema=None, but {checkpoint} holds EMA weights: pass ema=<a copy of the denoiser> to resume "
                         "them (with ema=None the next checkpoint would drop them), or start a new checkpoint")
    if "ema" not in state and ema is not None:
        raise ValueError(f"ema is given, but {checkpoint} holds no EMA weights; train with ema=None or start a new "
                         "checkpoint")
    for name, value in (("seed", seed), ("batch_size", batch_size)):
        if name in state and state[name] != value:
            raise ValueError(f"{name}={value!r}, but {checkpoint} was trained with {name}={state[name]!r}: resuming "
                             f"with another {name} is not an exact resume; pass {name}={state[name]!r} or start a "
                             "new checkpoint")
    if state.get("world_size", info.world_size) != info.world_size:
        warnings.warn(f"world_size={info.world_size}, but {checkpoint} was written by {state['world_size']} ranks: "
                      "resuming, but not exactly (the global batch and the per-rank RNG states change)",
                      RuntimeWarning, stacklevel=4)  # the caller of train_vae/train_denoiser


def _fit(
    kind: str,
    model: nn.Module,
    loss_module: nn.Module,
    batch_fn: Callable[[Tensor, int, int], tuple],
    n_rows: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: Optional[float],
    seed: int,
    checkpoint,
    checkpoint_every: int,
    progress: bool,
    log_every: int,
    device: torch.device,
    info: DistInfo,
    ema: Optional[nn.Module] = None,
    ema_decay: float = 0.999,
) -> list[float]:
    """The loop both stages share. ``batch_fn(indices, step, rank)`` returns the arguments of
    ``loss_module(*args)`` (a scalar loss) for this rank's rows at ``step``; ``model`` holds the
    trained parameters and is what checkpoints store."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} int, got {value!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    step, losses = 0, []
    # loaded on the CPU: RNG states must stay there; load_state_dict copies the rest to the device
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        _check_resume(state, checkpoint, kind, ema=ema, seed=seed, batch_size=batch_size, info=info)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], list(state["losses"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        rng = state["rng"]
        _set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0], device)

    wrapped = loss_module
    if _distributed():
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
    batches = _Batches(n_rows, batch_size, info, seed)
    bar = progress_bar(progress and info.is_main, steps, min(step, steps), kind)
    pending: list[Tensor] = []  # detached losses not yet read on the host (one sync per log interval)
    start_time, start_step = time.perf_counter(), step

    def flush() -> None:
        if pending:
            losses.extend(torch.stack(pending).float().tolist())
            pending.clear()

    def save() -> None:
        flush()
        rng = [_rng_state(device)]
        if _distributed():  # every rank's RNG state, gathered to rank 0
            rng = [None] * info.world_size
            dist.all_gather_object(rng, _rng_state(device))
        if info.is_main:
            save_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "kind": kind, "step": step, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "losses": losses, "rng": rng, "world_size": info.world_size,
                "seed": seed, "batch_size": batch_size,
                **({"ema": ema.state_dict()} if ema is not None else {}),
            })
        if _distributed():
            dist.barrier()

    model.train()
    while step < steps:
        args = batch_fn(batches.indices(step), step, info.rank)
        loss = wrapped(*args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if ema is not None:
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        reported = loss.detach()
        if _distributed():
            dist.all_reduce(reported)
            reported = reported / info.world_size
        pending.append(reported)
        step += 1
        if bar is not None:
            bar.update(1)
        if step % log_every == 0 or step == steps:
            flush()
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            elif progress and info.is_main:
                rate = (step - start_step) / max(time.perf_counter() - start_time, 1e-9)
                print(f"{kind} step {step}/{steps} loss {losses[-1]:.4g} ({rate:.2f} steps/s)", file=sys.stderr,
                      flush=True)
        if checkpoint is not None and (step % checkpoint_every == 0 or step == steps):
            save()
    if bar is not None:
        bar.close()
    flush()
    model.eval()
    return losses


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter; buffers copied."""
    # one multi-tensor kernel for all parameters, as torch.optim.swa_utils' EMA does
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---------------------------------------------------------------------------------------------
# stage 1: the autoencoder


class VectorVAE(nn.Module):
    """An encoder returning ``(mu, log_var)`` and a decoder (the vector LDM's, :func:`ldm_fast.models.mlp.build`)
    behind :class:`~ldm_fast.models.AutoencoderKL`'s interface: ``encode(x [B, I])`` -> a
    :class:`~ldm_fast.models.DiagonalGaussianDistribution` over ``[B, L]``; ``decode(z [B, L])`` -> ``[B, I]``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        mu, log_var = self.encoder(x)  # [B, L] each
        return DiagonalGaussianDistribution(torch.cat([mu, log_var], dim=1))  # moments [B, 2L]

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)


class _VAELoss(nn.Module):
    """``loss(x)`` of :func:`train_vae` as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, vae: nn.Module, kl_weight: float, recon: str, sample_posterior: bool):
        super().__init__()
        self.vae, self.kl_weight, self.recon, self.sample_posterior = vae, kl_weight, recon, sample_posterior

    def forward(self, x: Tensor, seed: int) -> Tensor:
        posterior = self.vae.encode(x)
        z = posterior.sample(seed=seed) if self.sample_posterior else posterior.mode()  # fused reparameterize
        diff = self.vae.decode(z).float() - x.float()
        rec = diff.abs().mean() if self.recon == "l1" else diff.square().mean()
        per_row = x[0].numel()  # KL per element of x: the same normalization as the reconstruction mean
        return rec + self.kl_weight * posterior.kl().mean() / per_row


def train_vae(
    vae: nn.Module,
    data: Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    recon: str = "l1",
    sample_posterior: bool = True,
    weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = None,
    seed: int = 0,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    log_every: int = 50,
    device=None,
) -> list[float]:
    """Fit a VAE to ``data`` ``[N, ...]`` (e.g. images ``[N, 3, H, W]`` in [-1, 1]); returns the per-step losses.

    ``vae``: an :class:`~ldm_fast.models.AutoencoderKL` or anything with ``encode(x)`` -> posterior
    (``sample(seed=)``, ``mode()``, ``kl()`` ``[B]``) and ``decode(z)``, e.g. :class:`VectorVAE`.
    Moved to ``device`` (default :func:`default_device`) and trained with AdamW (``lr``,
    ``weight_decay``; gradients clipped to ``max_grad_norm`` when given). The loss of a batch x::

        z    = posterior.sample(seed)              # fused reparameterize; posterior.mode() if not sample_posterior
        rec  = mean |decode(z) - x|                # recon="l1" (CompVis); "l2": mean squared error
        loss = rec + kl_weight * mean_b(KL_b) / numel(x[0])

    i.e. CompVis' ``sum rec + kl_weight * sum KL`` per image, divided by the elements per image
    (``kl_weight=1e-6`` is SD's). ``batch_size`` is per rank. See the module docstring for data,
    randomness, checkpoints (``checkpoint``, ``checkpoint_every``), torchrun and progress.
    """
    if recon not in ("l1", "l2"):
        raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
    info = init_distributed()
    device = torch.device(device) if device is not None else default_device()
    vae.to(device)
    loss_module = _VAELoss(vae, float(kl_weight), recon, sample_posterior)

    def batch_fn(indices: Tensor, step: int, rank: int):
        x = data[indices.to(data.device)].to(device, non_blocking=True)
        return x, mix_seed(seed, step, _POSTERIOR_SALT, rank)

    return _fit("vae", vae, loss_module, batch_fn, data.shape[0], steps=steps, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, progress=progress, log_every=log_every, device=device, info=info)


@torch.no_grad()
def encode_moments(vae: nn.Module, data: Tensor, *, batch_size: int = 256, device=None) -> Tensor:
    """The posterior moments ``[N, 2C, ...]`` of every row of ``data``, encoded in chunks (no grad),
    on ``device`` (default: the VAE's)."""
    if device is None:
        device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    chunks = [vae.encode(data[i:i + batch_size].to(device)).moments for i in range(0, data.shape[0], batch_size)]
    vae.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def latent_scale(vae: nn.Module, data: Tensor, *, n: int = 1024, seed: int = 0) -> float:
    """``1 / std`` of posterior samples of the first ``n`` rows of ``data``: the ``scale_factor`` that
    gives the denoiser unit-variance latents (how SD's 0.18215 was chosen)."""
    moments = encode_moments(vae, data[:n])
    z = DiagonalGaussianDistribution(moments).sample(seed=seed)
    return float(1.0 / z.float().std())


# ---------------------------------------------------------------------------------------------
# stage 2: the denoiser on the frozen VAE's latents


class _DenoiserLoss(nn.Module):
    """``loss(z0, t, seed)`` of :func:`train_denoiser` as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, denoiser: nn.Module, alphas_cumprod: Tensor, context: Optional[Tensor]):
        super().__init__()
        self.denoiser = denoiser
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.context = context

    def forward(self, z0: Tensor, t: Tensor, seed: int) -> Tensor:
        z_t, eps = lf.q_sample(z0, t, self.alphas_cumprod, seed=seed)  # noise drawn in the kernel; eps is the target
        if self.context is None:
            pred = self.denoiser(z_t, t)
        else:
            pred = self.denoiser(z_t, t, self.context.expand(z0.shape[0], *self.context.shape[1:]))
        return torch.nn.functional.mse_loss(pred.float(), eps.float())


def train_denoiser(
    denoiser: nn.Module,
    vae: nn.Module,
    data: Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-4,
    schedule: Optional[Schedule] = None,
    scale_factor: float = 1.0,
    context: Optional[Tensor] = None,
    cache_latents: bool = True,
    ema: Optional[nn.Module] = None,
    ema_decay: float = 0.999,
    weight_decay: float = 0.0,
    max_grad_norm: Optional[float] = 1.0,
    seed: int = 0,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    log_every: int = 50,
    device=None,
) -> list[float]:
    """Fit an eps-predicting ``denoiser`` on the latents of the frozen ``vae``; returns the per-step losses.

    ``data`` ``[N, ...]``: what the VAE encodes (the images). For a batch of rows x::

        z0        = vae.encode(x).sample(seed_1, scale=scale_factor)   # fused reparameterize, no grad
        t         ~ U{0, ..., T-1}  [B]                                 # T = len(schedule)
        z_t, eps  = q_sample(z0, t, schedule.alphas_cumprod, seed_2)    # noise drawn in the kernel
        loss      = mse(denoiser(z_t, t[, context]), eps)               # fp32

    ``schedule`` defaults to SD's ``make_schedule("scaled_linear")``; ``scale_factor`` is the latent
    scale (:func:`latent_scale`). ``context`` ``[1, L, D]`` (or ``[B, L, D]``) is passed, expanded to
    the batch, as the denoiser's third argument (a U-Net's cross-attention; zeros for an
    unconditional model); None calls ``denoiser(z_t, t)`` (the vector LDM). The VAE is put in eval
    mode with ``requires_grad_(False)``; with ``cache_latents`` its posterior moments of all of
    ``data`` are computed once (the VAE is frozen, so they do not change) and each step draws a
    fresh posterior sample from them, else every step encodes its batch. ``batch_size`` is per rank.
    ``ema``: a copy of the denoiser (``copy.deepcopy(denoiser)``) that gets the exponential moving
    average of the weights after every step, ``ema = d * ema + (1 - d) * denoiser`` with
    ``d = min(ema_decay, (1 + step) / (10 + step))``; sample from it. Checkpoints hold it too.
    AdamW with ``lr``, ``weight_decay``, gradient norm clipped to ``max_grad_norm`` (None: off).
    See the module docstring for data, randomness, checkpoints, torchrun and progress.
    """
    info = init_distributed()
    device = torch.device(device) if device is not None else default_device()
    denoiser.to(device)
    if ema is not None:
        ema.to(device).eval().requires_grad_(False)
    vae.to(device).eval().requires_grad_(False)
    schedule = schedule if schedule is not None else make_schedule("scaled_linear")
    num_steps = schedule.num_steps
    if context is not None:
        context = context.to(device)
    loss_module = _DenoiserLoss(denoiser, schedule.alphas_cumprod.to(device), context)
    moments = encode_moments(vae, data, device=device) if cache_latents else None
    scale = float(scale_factor)

    def batch_fn(indices: Tensor, step: int, rank: int):
        with torch.no_grad():
            if moments is not None:
                posterior = DiagonalGaussianDistribution(moments[indices.to(moments.device)])
            else:
                posterior = vae.encode(data[indices.to(data.device)].to(device, non_blocking=True))
            z0 = posterior.sample(seed=mix_seed(seed, step, _POSTERIOR_SALT, rank), scale=scale)
        # timesteps of the global batch, the same on every rank; this rank's shard of them
        g = torch.Generator().manual_seed(mix_seed(seed, step, _T_SALT))
        t = torch.randint(0, num_steps, (batch_size * info.world_size,), generator=g)
        t = t[info.rank * batch_size:(info.rank + 1) * batch_size].to(device, non_blocking=True)
        return z0, t, mix_seed(seed, step, _NOISE_SALT, rank)

    return _fit("denoiser", denoiser, loss_module, batch_fn, data.shape[0], steps=steps, batch_size=batch_size,
                lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, progress=progress, log_every=log_every, device=device, info=info,
                ema=ema, ema_decay=ema_decay)
