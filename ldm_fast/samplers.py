"""Samplers: DDPM and DDIM over a :func:`ldm_fast.make_schedule` schedule, each step one fused kernel.

    sampler = DDIMSampler(make_schedule("scaled_linear"), 50)           # SD: timesteps 981, 961, ..., 1
    latents = sampler.sample(unet_eps, (1, 4, 64, 64), cond=text, uncond=empty_text, guidance_scale=7.5,
                             seed=0, device="cuda", dtype=torch.float16)
    x = sampler.step(eps, t, x)                                        # one step, diffusers-style

``model_fn(x, t, cond)`` returns the predicted noise eps for latents x ``[N, ...]`` at timesteps t
(an int64 tensor ``[N]`` on x's device). With ``guidance_scale != 1`` the batch ``[uncond, cond]``
goes through model_fn once per step and :func:`ldm_fast.functional.sampler_step` combines the two
halves in its kernel (``eps_u + s * (eps_c - eps_u)``, unconditional first, as CompVis and diffusers).

Timesteps follow diffusers' ``set_timesteps`` (``leading`` with ``steps_offset``, ``trailing``,
``linspace``): exactly ``num_inference_steps`` of them for any count. Where the references have
bugs, these samplers do not (ldm-facts 1.10): CompVis/labml's ``range(0, T, T // S)`` gives S + 1
steps when T % S != 0 (here: S); their img2img noises to one timestep and starts denoising at the
next (here: starts at the timestep it noised to, as diffusers); labml re-noises the inpainting
region after the step (here: before each step, as CompVis); labml draws DDPM noise on the CPU (here:
in the kernel, on x's device). Two deliberate differences from diffusers: ``leading`` spacing with
``num_inference_steps == T`` lists ``T, T-1, ..., 1`` there (t = T is outside the table, and its
step raises IndexError), here ``T-1, ..., 0``; and DDIM's step lands on the next listed timestep,
where diffusers' lands on ``t - T // S`` (the same for ``leading``, and for ``trailing`` when S
divides T; for ``trailing`` with 30 steps diffusers steps 966 -> 933 and then runs the model at 932).

The loop never reads a device tensor on the host: the coefficients of every step are computed once,
in float64, when the sampler is built, seeds per step are mixed on the host, and noise is drawn in
the kernel. ``step`` also takes a timestep tensor on the device: it then reads its coefficients
from a table on the device (:meth:`coefficient_table`), no sync, CUDA-graph safe.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from . import functional as lf
from ._loop import mix_seed, progress_bar
from .ops._common import check_seed
from .ops.sampler_step import step_coefficients_checked
from .kernels.sampler_step import NUM_COEFFICIENTS, StepCoefficients, step_coefficients
from .schedules import Schedule, make_schedule

__all__ = ["DDIMSampler", "DDPMSampler", "SPACINGS", "StepCoefficients", "make_timesteps", "step_coefficients"]

SPACINGS = ("leading", "trailing", "linspace")
_STEP_SALT, _MASK_SALT, _START_SALT = 0x51A3, 0x3A5C, 0x57A7


def make_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                   steps_offset: int = 1) -> Tensor:
    """The descending int64 timesteps of diffusers' ``set_timesteps`` for these settings (see the module
    docstring for the one difference: ``leading`` at ``num_inference_steps == num_train_timesteps``).

    ``leading``: ``arange(S) * (T // S) + steps_offset`` (SD: offset 1, 50 steps -> 981, ..., 1);
    ``trailing``: ``round(arange(T, 0, -T / S)) - 1`` (999 first); ``linspace``: ``round(linspace(0,
    T - 1, S))``. ``steps_offset`` applies to ``leading`` only, as in diffusers.
    """
    T, S = num_train_timesteps, num_inference_steps
    if isinstance(S, bool) or not isinstance(S, int) or not 1 <= S <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}] (the schedule's steps), got {S!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative int, got {steps_offset!r}")
    if spacing == "leading":
        ts = (np.arange(0, S) * (T // S)).round()[::-1].astype(np.int64) + steps_offset
        ts -= max(0, int(ts[0]) - (T - 1))  # never past the table's last timestep
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    else:
        ts = np.linspace(0, T - 1, S).round()[::-1].astype(np.int64)
    return torch.from_numpy(ts.copy())


def _alphas_cumprod(schedule) -> Tensor:
    table = schedule.alphas_cumprod if isinstance(schedule, Schedule) else schedule
    if not isinstance(table, Tensor) or not table.is_floating_point() or table.dim() != 1 or not len(table):
        raise TypeError("schedule must be a ldm_fast.Schedule (make_schedule(...)) or a 1-d float tensor of "
                        f"alphas_cumprod, got {type(schedule).__name__}")
    return table


def _module_attr(model_fn, attr: str):
    """``device``/``dtype`` of model_fn's first parameter when it is an nn.Module, else None."""
    if isinstance(model_fn, torch.nn.Module):
        for p in model_fn.parameters():
            return getattr(p, attr)
    return None


# ---------------------------------------------------------------------------------------------
# diffusers schedulers: their config fields, read without importing diffusers

#: diffusers' class defaults (DDIMScheduler, DDPMScheduler) of the fields ``from_diffusers`` reads.
_DIFFUSERS_DEFAULTS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                           trained_betas=None, clip_sample=True, clip_sample_range=1.0, prediction_type="epsilon",
                           thresholding=False, timestep_spacing="leading", steps_offset=0,
                           rescale_betas_zero_snr=False)
_DIFFUSERS_CLASS_DEFAULTS = {"DDIMScheduler": dict(set_alpha_to_one=True),
                             "DDPMScheduler": dict(variance_type="fixed_small")}
#: diffusers' beta_schedule -> make_schedule's kind
_DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def _diffusers_config(scheduler_or_config, class_name: str) -> dict:
    """The fields of a diffusers scheduler (``class_name``) or of its config mapping, diffusers' class
    defaults filled in; ValueError naming a field these samplers cannot reproduce."""
    if hasattr(scheduler_or_config, "config") and not isinstance(scheduler_or_config, Mapping):  # a scheduler
        if type(scheduler_or_config).__name__ != class_name:
            raise TypeError(f"scheduler_or_config must be a diffusers {class_name} or a config mapping, got a "
                            f"{type(scheduler_or_config).__name__}; pass its .config to take its schedule only")
        config = scheduler_or_config.config
    else:
        config = scheduler_or_config
    if not isinstance(config, Mapping):
        raise TypeError(f"scheduler_or_config must be a diffusers {class_name} or its config (a mapping), got "
                        f"{type(config).__name__}")
    # keys diffusers does not read into this class (``_class_name``, another scheduler's fields) are ignored, as
    # ``{class_name}.from_config`` ignores them
    cfg = {**_DIFFUSERS_DEFAULTS, **_DIFFUSERS_CLASS_DEFAULTS[class_name]}
    cfg.update((k, v) for k, v in config.items() if k in cfg)
    unsupported = [
        ("prediction_type", cfg["prediction_type"] != "epsilon", "the step kernel takes eps predictions only"),
        ("thresholding", bool(cfg["thresholding"]), "dynamic thresholding is not implemented"),
        ("rescale_betas_zero_snr", bool(cfg["rescale_betas_zero_snr"]),
         "zero terminal SNR (abar = 0 at the last timestep) is outside the samplers' (0, 1) range"),
        ("beta_schedule", cfg["trained_betas"] is None and cfg["beta_schedule"] not in _DIFFUSERS_BETA_SCHEDULES,
         f"supported: {tuple(_DIFFUSERS_BETA_SCHEDULES)} or trained_betas"),
        ("timestep_spacing", cfg["timestep_spacing"] not in SPACINGS, f"supported: {SPACINGS}"),
        ("variance_type", cfg.get("variance_type", "fixed_small") not in ("fixed_small", "fixed_small_log"),
         "DDPMSampler's variance is 'fixed_small' (the same as 'fixed_small_log')"),
    ]
    for field, bad, why in unsupported:
        if bad:
            raise ValueError(f"{class_name} {field}={cfg[field]!r} cannot be reproduced: {why}")
    return cfg


def _diffusers_alphas_cumprod(cfg: dict) -> Tensor:
    """float32 alphas_cumprod ``[num_train_timesteps]`` of a diffusers config (computed in float64;
    diffusers computes in float32, a difference below 1e-6)."""
    T = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()
        if len(betas) != T:
            raise ValueError(f"trained_betas holds {len(betas)} betas, but num_train_timesteps={T}")
        return torch.cumprod(1.0 - betas, 0).float()
    kind = _DIFFUSERS_BETA_SCHEDULES[cfg["beta_schedule"]]
    if kind == "cosine":  # diffusers' squaredcos_cap_v2: the same formula, max beta 0.999; no beta_start/end
        return make_schedule(kind, T).alphas_cumprod
    return make_schedule(kind, T, cfg["beta_start"], cfg["beta_end"]).alphas_cumprod


def _diffusers_steps(scheduler_or_config, num_inference_steps: Optional[int]) -> Optional[int]:
    """``num_inference_steps``, else the scheduler's own (after its ``set_timesteps``), else None."""
    if num_inference_steps is not None or isinstance(scheduler_or_config, Mapping):
        return num_inference_steps
    if getattr(scheduler_or_config, "custom_timesteps", False):
        raise ValueError("the scheduler has custom timesteps (set_timesteps(timesteps=...)); they cannot be "
                         "reproduced: give num_inference_steps")
    return getattr(scheduler_or_config, "num_inference_steps", None)


class _Sampler:
    """What DDPM and DDIM share: timesteps, per-step coefficients, ``step``, ``sample``."""

    method = "ddim"

    def __init__(self, schedule, timesteps: Tensor, final_alpha_cumprod: float, eta: float,
                 clip_sample: Optional[float], prev_timesteps: Optional[list] = None):
        table = _alphas_cumprod(schedule)
        self.alphas_cumprod = table.detach().to("cpu", torch.float32)  # the schedule's values, on the host
        abar = self.alphas_cumprod.double().tolist()
        self.num_train_timesteps = len(abar)
        self.timesteps = timesteps
        self.eta = float(eta)
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        ts = timesteps.tolist()
        #: the timestep each step lands on (-1: alpha = final_alpha_cumprod); the next listed one, unless
        #: from_diffusers gave diffusers' DDIM rule
        self.prev_timesteps = ts[1:] + [-1] if prev_timesteps is None else prev_timesteps
        self._index = {t: i for i, t in enumerate(ts)}
        self._steps = []
        for t, p in zip(ts, self.prev_timesteps):
            alpha_prev = abar[p] if p >= 0 else self.final_alpha_cumprod
            # the checked coefficients (a readable error here for a bad schedule or eta)
            self._steps.append(step_coefficients_checked(abar[t], alpha_prev, self.method, self.eta))
        self.stochastic = any(c.std > 0.0 for c in self._steps)
        self._tables: dict = {}
        self._device_alphas: dict = {}

    @property
    def num_inference_steps(self) -> int:
        return len(self._steps)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.num_inference_steps}, timesteps={self.timesteps[:3].tolist()}..."
                f"{self.timesteps[-1].item()}, eta={self.eta}, clip_sample={self.clip_sample})")

    # -----------------------------------------------------------------------------------------
    # one step

    def step_coefficients(self, t) -> StepCoefficients:
        """The coefficients of the step from timestep ``t`` (float64 values)."""
        return self._steps[self._step_index(t)]

    def _step_index(self, t) -> int:
        if isinstance(t, Tensor):
            if t.numel() != 1 or t.device.type != "cpu":
                raise TypeError(f"t must be an int or a one-element CPU tensor here, got shape {tuple(t.shape)} on "
                                f"{t.device}")
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"t must be an int timestep, got {type(t).__name__}")
        try:
            return self._index[int(t)]
        except KeyError:
            raise ValueError(f"t={int(t)} is not one of this sampler's timesteps {self.timesteps.tolist()}") from None

    def coefficient_table(self, device) -> Tensor:
        """float32 ``[T, 6]`` on ``device``: row t holds the coefficients of the step from timestep t
        (NaN for timesteps this sampler never visits), for ``ldm_fast.functional.sampler_step(..., coefficients=table,
        index=t)`` with t on the device. Built once per device."""
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            host = torch.full((self.num_train_timesteps, NUM_COEFFICIENTS), float("nan"))
            host[self.timesteps] = torch.tensor(self._steps, dtype=torch.float64).float()
            table = self._tables[device] = host.to(device)
        return table

    def step(self, model_output: Tensor, t, x: Tensor, *, noise: Optional[Tensor] = None, seed: Optional[int] = None,
             guidance_scale: Optional[float] = None) -> Tensor:
        """x at the timestep after ``t`` in :attr:`timesteps` (diffusers' ``scheduler.step(...).prev_sample``).

        ``model_output``: eps, x's shape; with ``guidance_scale`` the ``[uncond, cond]`` output
        ``[2B, ...]``, combined in the kernel. ``t``: an int (or CPU tensor) of :attr:`timesteps`:
        coefficients by value; or an integer tensor on x's device: coefficients from
        :meth:`coefficient_table`, read by the kernel (no host sync). Noise (DDPM, DDIM with eta > 0):
        ``noise``, or drawn in-kernel from ``seed``.
        """
        if isinstance(t, Tensor) and t.device.type != "cpu":
            return lf.sampler_step(model_output, x, coefficients=self.coefficient_table(t.device), index=t,
                                   add_noise=self.stochastic, guidance_scale=guidance_scale,
                                   clip_sample=self.clip_sample, noise=noise, seed=seed)
        return lf.sampler_step(model_output, x, coefficients=self._steps[self._step_index(t)],
                               guidance_scale=guidance_scale, clip_sample=self.clip_sample, noise=noise, seed=seed)

    # -----------------------------------------------------------------------------------------
    # the loop

    def sample(
        self,
        model_fn: Callable[[Tensor, Tensor, Any], Tensor],
        x_T_or_shape: Union[Tensor, Sequence[int]],
        *,
        cond: Any = None,
        uncond: Any = None,
        guidance_scale: float = 1.0,
        seed: Optional[int] = None,
        progress: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
        x0: Optional[Tensor] = None,
        strength: float = 1.0,
        mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Run the reverse process; returns the final latents (x at the end of :attr:`timesteps`).

        - ``x_T_or_shape``: the starting noise x_T, or its shape (then drawn on ``device`` from
          ``seed``; None: torch's default generator).
        - ``cond``/``uncond``/``guidance_scale``: with ``guidance_scale != 1`` (CFG) model_fn sees
          ``cat([x, x])`` and ``cat([uncond, cond])`` (an uncond of batch 1 is broadcast), once per step.
        - ``x0`` (image latents) + ``strength`` (img2img): the last ``int(S * strength)`` timesteps
          run; x starts at ``q_sample(x0, t_start, noise)`` with the noise given as x_T (or drawn)
          and the first step is taken at t_start itself (diffusers' semantics, not CompVis' next one).
        - ``mask`` (inpainting, with x0; 1 = keep the original, broadcastable to x): before each
          step the kept region is replaced by ``q_sample(x0, t)`` with fresh noise, as CompVis does.
          At ``strength=1`` the start is pure noise (CompVis and diffusers inpainting).
        - ``device``/``dtype``: default to x_T's, else x0's, else model_fn's parameters' (an
          nn.Module), else cond's device / float32. ``progress``: a tqdm bar if tqdm is installed.

        No host sync per step: timesteps, coefficients and seeds are host values; every noise is drawn
        on the device (in the kernels).
        """
        x_T = x_T_or_shape if isinstance(x_T_or_shape, Tensor) else None
        like = x_T if x_T is not None else x0
        if device is None:
            device = like.device if like is not None else _module_attr(model_fn, "device")
            if device is None:
                device = cond.device if isinstance(cond, Tensor) else torch.device("cpu")
        device = torch.device(device)
        if dtype is None:
            dtype = like.dtype if like is not None else (_module_attr(model_fn, "dtype") or torch.float32)
        shape = tuple(x_T.shape) if x_T is not None else tuple(int(s) for s in x_T_or_shape)
        cfg = float(guidance_scale) != 1.0
        if cfg:
            if not isinstance(cond, Tensor) or not isinstance(uncond, Tensor):
                raise ValueError("guidance_scale != 1 needs cond and uncond tensors (the unconditional embedding)")
            cond = cond.to(device)
            uncond = uncond.to(device)
            if uncond.shape[0] == 1 and cond.shape[0] > 1:
                uncond = uncond.expand((cond.shape[0],) + tuple(uncond.shape[1:]))
            model_cond = torch.cat([uncond, cond])
        else:
            model_cond = cond
        timesteps = self.timesteps.tolist()
        start = 0
        if x0 is not None:
            if not isinstance(x0, Tensor) or tuple(x0.shape) != shape:
                raise ValueError(f"x0 must be image latents of the sampled shape {shape}, got "
                                 f"{tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__}")
            strength = float(strength)
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")
            n = min(int(len(timesteps) * strength), len(timesteps))
            if n < 1:
                raise ValueError(f"strength={strength} with {len(timesteps)} steps runs no step "
                                 f"(int(steps * strength) = 0); raise strength or num_inference_steps")
            start = len(timesteps) - n
            x0 = x0.to(device=device, dtype=dtype)
        elif strength != 1.0 or mask is not None:
            raise ValueError("strength and mask need x0 (the image latents)")
        if mask is not None:
            mask = mask.to(device=device, dtype=dtype)
            try:
                fits = torch.broadcast_shapes(mask.shape, shape) == shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"mask must broadcast to x's shape {shape}, got {tuple(mask.shape)}")
        check_seed(seed)
        base = seed if seed is not None else int(torch.randint(0, 2**62, ()))

        def draw_noise():
            if seed is None:
                return torch.randn(shape, device=device, dtype=dtype)
            generator = torch.Generator(device=device).manual_seed(seed)
            return torch.randn(shape, device=device, dtype=dtype, generator=generator)

        if x0 is None:
            x = x_T.to(device=device, dtype=dtype) if x_T is not None else draw_noise()
        elif mask is not None and start == 0:  # inpainting from pure noise
            x = x_T.to(device=device, dtype=dtype) if x_T is not None else draw_noise()
        else:
            alphas = self._alphas_on(device)
            noise = x_T.to(device=device, dtype=dtype) if x_T is not None else None
            x, _ = lf.q_sample(x0, timesteps[start], alphas, noise=noise, seed=mix_seed(base, start, _START_SALT))

        steps_on_device = self.timesteps.to(device)
        batch = shape[0] * (2 if cfg else 1)
        bar = progress_bar(progress, len(timesteps) - start)
        for i in range(start, len(timesteps)):
            t = timesteps[i]
            if mask is not None:  # the kept region, noised to t, before the step (CompVis)
                known, _ = lf.q_sample(x0, t, self._alphas_on(device), seed=mix_seed(base, i, _MASK_SALT))
                x = torch.lerp(x, known, mask)
            t_model = steps_on_device[i].expand(batch)
            if cfg:
                eps = model_fn(torch.cat([x, x]), t_model, model_cond)
                x = self.step(eps, t, x, guidance_scale=guidance_scale, seed=mix_seed(base, i, _STEP_SALT))
            else:
                eps = model_fn(x, t_model, model_cond)
                x = self.step(eps, t, x, seed=mix_seed(base, i, _STEP_SALT))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return x

    def img2img(self, model_fn, x0: Tensor, strength: float = 0.75, *, noise: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """:meth:`sample` from image latents ``x0`` noised to the timestep ``strength`` of the way in."""
        x_T = noise if noise is not None else tuple(x0.shape)
        return self.sample(model_fn, x_T, x0=x0, strength=strength, **kwargs)

    def inpaint(self, model_fn, x0: Tensor, mask: Tensor, *, strength: float = 1.0, noise: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """:meth:`sample` keeping ``x0`` where ``mask`` is 1 (re-noised to each step's timestep)."""
        x_T = noise if noise is not None else tuple(x0.shape)
        return self.sample(model_fn, x_T, x0=x0, strength=strength, mask=mask, **kwargs)

    def _alphas_on(self, device: torch.device) -> Tensor:
        table = self._device_alphas.get(device)
        if table is None:
            table = self._device_alphas[device] = self.alphas_cumprod.to(device)
        return table


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021) with ``num_inference_steps`` steps: deterministic at ``eta=0``, DDPM-like
    noise at ``eta=1``.

    Built directly, it equals diffusers' ``DDIMScheduler`` only with SD's settings: a
    ``scaled_linear`` schedule, ``clip_sample=False``, ``set_alpha_to_one=False`` (the final step
    lands on ``abar[0]``, as CompVis) and ``steps_offset=1`` (``leading`` spacing); diffusers' class
    defaults differ (``linear``, ``clip_sample=True``, ``set_alpha_to_one=True``, ``steps_offset=0``).
    For any other scheduler use :meth:`from_diffusers`.
    """

    method = "ddim"

    def __init__(self, schedule, num_inference_steps: int = 50, eta: float = 0.0, spacing: str = "leading", *,
                 steps_offset: int = 1, clip_sample: Optional[float] = None, set_alpha_to_one: bool = False):
        abar = _alphas_cumprod(schedule)
        timesteps = make_timesteps(len(abar), num_inference_steps, spacing, steps_offset)
        final = 1.0 if set_alpha_to_one else float(abar[0])
        super().__init__(abar, timesteps, final, eta, clip_sample)

    @classmethod
    def from_diffusers(cls, scheduler_or_config, num_inference_steps: Optional[int] = None,
                       eta: float = 0.0) -> "DDIMSampler":
        """The sampler of a diffusers ``DDIMScheduler`` (or of its ``config``, a mapping: diffusers need
        not be imported) after ``set_timesteps(num_inference_steps)``, stepped with ``eta`` (the
        argument diffusers' ``step`` takes).

        Read: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``,
        ``squaredcos_cap_v2``) with ``beta_start``/``beta_end``, or ``trained_betas``;
        ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``, ``clip_sample`` with
        ``clip_sample_range``; missing fields take diffusers' class defaults, other keys are ignored
        (as ``DDIMScheduler.from_config`` does). ValueError naming the field for what the kernel
        cannot do: ``prediction_type`` other than ``"epsilon"``, ``thresholding=True``,
        ``rescale_betas_zero_snr=True``, another ``beta_schedule``. ``num_inference_steps`` defaults
        to the scheduler's own (after its ``set_timesteps``).

        Each step lands where diffusers' does, on ``t - num_train_timesteps // num_inference_steps``
        (``abar`` = ``final_alpha_cumprod`` below 0): the next listed timestep except for ``trailing``
        and ``linspace`` spacing when the step count does not divide ``num_train_timesteps`` (see the
        module docstring; ``DDIMSampler(...)`` itself always lands on the next listed timestep).
        The schedule is computed in float64 (diffusers: float32; abar differs by < 1e-6).
        """
        cfg = _diffusers_config(scheduler_or_config, "DDIMScheduler")
        steps = _diffusers_steps(scheduler_or_config, num_inference_steps)
        if steps is None:
            raise ValueError("num_inference_steps is needed (the scheduler has not run set_timesteps)")
        abar = _diffusers_alphas_cumprod(cfg)
        T = len(abar)
        timesteps = make_timesteps(T, steps, cfg["timestep_spacing"], cfg["steps_offset"])
        ratio = T // len(timesteps)
        prev = [t - ratio if t - ratio >= 0 else -1 for t in timesteps.tolist()]
        final = 1.0 if cfg["set_alpha_to_one"] else float(abar[0])
        clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        sampler = cls.__new__(cls)  # DDIMSampler's own __init__ lands on the next listed timestep
        _Sampler.__init__(sampler, abar, timesteps, final, eta, clip, prev_timesteps=prev)
        return sampler


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020), variance "fixed_small", over every timestep
    ``T-1, ..., 0`` (or ``num_inference_steps`` of them, spaced as diffusers' ``DDPMScheduler``).
    Equal to diffusers' ``DDPMScheduler.step`` with ``clip_sample=False`` (diffusers' class default
    is True) on the same schedule; the final step lands on abar = 1 (x0 itself) with no noise. For
    any other scheduler use :meth:`from_diffusers`.
    """

    method = "ddpm"

    def __init__(self, schedule, num_inference_steps: Optional[int] = None, spacing: str = "leading", *,
                 steps_offset: int = 1, clip_sample: Optional[float] = None):
        abar = _alphas_cumprod(schedule)
        T = len(abar)
        timesteps = (torch.arange(T - 1, -1, -1, dtype=torch.int64) if num_inference_steps is None
                     else make_timesteps(T, num_inference_steps, spacing, steps_offset))
        super().__init__(abar, timesteps, 1.0, 0.0, clip_sample)

    @classmethod
    def from_diffusers(cls, scheduler_or_config, num_inference_steps: Optional[int] = None) -> "DDPMSampler":
        """The sampler of a diffusers ``DDPMScheduler`` (or of its ``config``, a mapping: diffusers need
        not be imported), over ``num_inference_steps`` (default: the scheduler's own after its
        ``set_timesteps``, else every timestep).

        Reads the fields :meth:`DDIMSampler.from_diffusers` reads (no ``set_alpha_to_one``: DDPM ends
        on abar = 1) and ``variance_type``, which must be ``"fixed_small"`` or ``"fixed_small_log"``
        (the same variance); the same ValueErrors name what cannot be reproduced, and custom
        timesteps (``set_timesteps(timesteps=...)``) are refused.
        """
        cfg = _diffusers_config(scheduler_or_config, "DDPMScheduler")
        steps = _diffusers_steps(scheduler_or_config, num_inference_steps)
        clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        return cls(_diffusers_alphas_cumprod(cfg), steps, cfg["timestep_spacing"], steps_offset=cfg["steps_offset"],
                   clip_sample=clip)
