"""sampler_step: one DDIM or DDPM step, classifier-free guidance included, in one kernel (checks,
kernel or reference, torch.library op, in that order).

Forward only (sampling needs no gradients): a call whose inputs need them runs the eager reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend
from ..kernels import sampler_step as _kernels
from ._common import (assert_index_on_device, check_float, check_index, check_like, check_same_device, check_seed,
                      eager_randn, finite_float, kernel_seed, launch, needs_grad, seed_as_tensor)

SAMPLER_METHODS = _kernels.METHODS


def sampler_step(
    model_output: Tensor,
    x: Tensor,
    alpha_t=None,
    alpha_prev=None,
    *,
    method: str = "ddim",
    eta: float = 0.0,
    coefficients=None,
    index=None,
    add_noise: Optional[bool] = None,
    guidance_scale: Optional[float] = None,
    clip_sample: Optional[float] = None,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    sync_check: bool = False,
) -> Tensor:
    """One DDIM or DDPM step from x at the current timestep to the previous one, classifier-free
    guidance included, in one kernel. Returns x_prev with x's shape, dtype and memory layout.

    - ``model_output``: the predicted noise eps, x's shape; or, with ``guidance_scale`` a float,
      the model's output on the batch ``[uncond, cond]`` (``[2B, *rest]``, unconditional rows
      first), combined as ``eps = eps_u + guidance_scale * (eps_c - eps_u)`` and read in place.
    - ``alpha_t``, ``alpha_prev``: the cumulative alphas (abar) at the current timestep and at the
      one the step lands on (DDIM's final step: ``abar[0]``, or 1 with ``set_alpha_to_one``; DDPM's:
      1). Floats (or one-element CPU tensors): the coefficients are computed on the host in float64.
    - ``method``: ``"ddim"`` (``eta`` scales its noise, sigma = eta * sqrt of the posterior
      variance) or ``"ddpm"`` (the posterior mean, variance "fixed_small").
    - ``coefficients`` + ``index``, instead of the alphas: a float32 table ``[N, 6]`` of
      :func:`ldm_fast.kernels.sampler_step.step_coefficients` rows on x's device (see
      ``DDIMSampler.coefficient_table``) and the row to use, an int or an integer tensor (``[]``,
      ``[1]`` or ``[B]``) on x's device read by the kernel: no host sync, CUDA-graph safe, and a
      compiled loop does not recompile per step. A device index is range-checked on the device (a
      bad one fails the launch); ``sync_check=True`` reads it on the host for the ValueError instead.
    - ``add_noise``: whether ``std * z`` is added; default: when std > 0 (alphas), always (table).
      z is ``noise`` (x's shape), else drawn in-kernel from ``seed`` (Philox; the eager path uses a
      torch generator seeded with it; None: a seed from torch's default generator). With
      ``add_noise=False`` a given ``noise`` is not used.
    - ``clip_sample``: clip the predicted x0 to ``[-clip_sample, clip_sample]`` (None: no clip, what
      latent diffusion uses).

    Every scalar must be finite (ValueError naming it). Eager equivalent (``LDM_FAST_BACKEND=eager``,
    :func:`~ldm_fast.kernels.sampler_step.sampler_step_reference`)::

        x0 = (x - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)
        x_prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev - sigma**2) * eps + sigma * z     # ddim
        x_prev = c0 * x0 + ct * x + std * z                                                     # ddpm
    """
    for name, value in (("model_output", model_output), ("x", x)):  # inline: each helper call is host time
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            check_float(name, value)
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension: shape [B, ...], got a scalar")
    if model_output.device != x.device:
        check_same_device("model_output", model_output, "x", x)
    if guidance_scale is not None:
        guidance_scale = finite_float("guidance_scale", guidance_scale)
        expected = (2 * x.shape[0],) + tuple(x.shape[1:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output must be the model's output on [uncond, cond] with shape {expected} (twice x's batch) "
                f"when guidance_scale is given, got {tuple(model_output.shape)}"
            )
    elif model_output.shape != x.shape:
        raise ValueError(f"model_output must have the shape of x {tuple(x.shape)}, got {tuple(model_output.shape)}")
    if clip_sample is not None:
        clip_sample = finite_float("clip_sample", clip_sample)
        if not clip_sample > 0.0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
    if noise is not None:
        check_like("noise", noise, "x", x)
    check_seed(seed)
    if add_noise is not None and not isinstance(add_noise, bool):
        raise TypeError(f"add_noise must be a bool or None, got {type(add_noise).__name__}")
    check_on_device = False
    if coefficients is None:
        coefs = step_coefficients_checked(alpha_t, alpha_prev, method, eta)
        add_noise = coefs.std > 0.0 if add_noise is None else add_noise
    elif alpha_t is not None or alpha_prev is not None:
        raise TypeError("pass either alpha_t and alpha_prev, or coefficients (with index), not both")
    elif isinstance(coefficients, Tensor):
        coefs = coefficients
        _check_table(coefficients, x.device)
        if index is None:
            raise TypeError("index (the row of coefficients to use: an int or an integer tensor) is required with a table")
        index, check_on_device = check_index("index", index, coefficients.shape[0], x.shape[0], x.device, sync_check,
                                             "the rows of coefficients")
        add_noise = True if add_noise is None else add_noise
    else:
        if len(coefficients) != _kernels.NUM_COEFFICIENTS:
            raise ValueError(f"coefficients must be a StepCoefficients (6 floats) or a table tensor, got {coefficients!r}")
        coefs = _kernels.StepCoefficients(*(finite_float("coefficients", v) for v in coefficients))
        add_noise = coefs.std > 0.0 if add_noise is None else add_noise
    if not add_noise:
        noise = None
    if x.dim() == 1:  # one value per sample: [B] -> [B, 1]
        model_output, x, noise = model_output[:, None], x[:, None], None if noise is None else noise[:, None]
        return _sampler_step(model_output, x, coefs, index, noise, seed, guidance_scale, clip_sample, add_noise,
                             check_on_device)[:, 0]
    return _sampler_step(model_output, x, coefs, index, noise, seed, guidance_scale, clip_sample, add_noise,
                         check_on_device)


def _sampler_step(model_output, x, coefs, index, noise, seed, guidance_scale, clip_sample, add_noise: bool,
                  check_on_device: bool) -> Tensor:
    """The checked call: the kernel, or the eager reference."""
    table = coefs if isinstance(coefs, Tensor) else None
    draw = noise is None and add_noise
    # (a tensor index was moved to x's device by check_index)
    if (not needs_grad(model_output, x, noise) and backend.kernel_ok(model_output, x, noise, table)
            and (table is None or table.dtype == torch.float32)):
        seed = kernel_seed(seed, x) if draw else None
        if torch.compiler.is_compiling():
            values = [0.0] * _kernels.NUM_COEFFICIENTS if table is not None else [float(v) for v in coefs]
            if table is not None and not isinstance(index, Tensor):
                index = torch.full((1,), index, dtype=torch.int64, device=x.device)
            return torch.ops.ldm_fast.sampler_step(
                model_output, x, noise, table, index if table is not None else None,
                None if seed is None else seed_as_tensor(seed, x), values,
                guidance_scale, clip_sample, add_noise, check_on_device,
            )
        return launch("sampler_step", _kernels.sampler_step_fwd, model_output, x, coefs, index, noise, seed,
                      guidance_scale, clip_sample, add_noise, check_index=check_on_device)
    if check_on_device:
        assert_index_on_device(index, table.shape[0], "sampler_step: index out of the table")
    if draw:
        noise = eager_randn(x, seed)
    if isinstance(index, Tensor) and index.dtype != torch.int64:
        index = index.long()  # an int64 gather (a uint8 index would be read as a mask)
    return _kernels.sampler_step_reference(model_output, x, coefs, noise if add_noise else None, guidance_scale,
                                           clip_sample, index=index)


def step_coefficients_checked(alpha_t, alpha_prev, method: str, eta) -> _kernels.StepCoefficients:
    """Validate the schedule values of one step; return its coefficients (float64 on the host)."""
    if method not in SAMPLER_METHODS:
        raise ValueError(f"method must be one of {SAMPLER_METHODS}, got {method!r}")
    if alpha_t is None or alpha_prev is None:
        raise TypeError("sampler_step needs alpha_t and alpha_prev (floats), or coefficients=<table> with index")
    a, ap = finite_float("alpha_t", alpha_t), finite_float("alpha_prev", alpha_prev)
    eta = finite_float("eta", eta)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha_t (the cumulative alpha at the current timestep) must lie in (0, 1), got {a}")
    if not 0.0 < ap <= 1.0:
        raise ValueError(f"alpha_prev (the cumulative alpha the step lands on) must lie in (0, 1], got {ap}")
    if eta < 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    stochastic = method == "ddpm" or eta > 0.0
    if stochastic and ap < a:
        raise ValueError(f"alpha_prev must be >= alpha_t for a step with noise (a denoising step), got alpha_t={a}, "
                         f"alpha_prev={ap}")
    coefficients = _kernels.step_coefficients(a, ap, method, eta)
    if method == "ddim" and eta > 0.0:
        sigma2 = coefficients.std**2
        if 1.0 - ap - sigma2 < -1e-12 * max(1.0, sigma2):
            raise ValueError(
                f"eta={eta} is too large for this step: sigma^2 = {sigma2:.6g} > 1 - alpha_prev = {1 - ap:.6g}"
            )
    return coefficients


def _check_table(coefficients: Tensor, device: torch.device) -> None:
    """A coefficient table ``[N, 6]`` (rows of step_coefficients) on x's device."""
    check_float("coefficients", coefficients)
    columns = _kernels.NUM_COEFFICIENTS
    if coefficients.dim() != 2 or coefficients.shape[1] != columns or not len(coefficients):
        raise ValueError(f"coefficients must be a table [N, {columns}] (rows of step_coefficients), "
                         f"got shape {tuple(coefficients.shape)}")
    if coefficients.device != device:
        raise ValueError(f"coefficients is on {coefficients.device} but x is on {device}; put them on one device")


def kernel_call(model_output, x, coefficients, index, noise, seed, guidance_scale, clip_sample, add_noise: bool,
                check_index: bool) -> Tensor:
    """The bare kernel launch of a checked call (benchmarks time it)."""
    return launch("sampler_step", _kernels.sampler_step_fwd, model_output, x, coefficients, index, noise, seed,
                  guidance_scale, clip_sample, add_noise, check_index=check_index)


# torch.compile: one op (forward only)


@torch.library.custom_op("ldm_fast::sampler_step", mutates_args=())
def _sampler_step_op(
    model_output: Tensor,
    x: Tensor,
    noise: Optional[Tensor],
    table: Optional[Tensor],
    index: Optional[Tensor],
    seed: Optional[Tensor],
    values: list[float],
    guidance_scale: Optional[float],
    clip_sample: Optional[float],
    add_noise: bool,
    check_index: bool,
) -> Tensor:
    coefficients = table if table is not None else _kernels.StepCoefficients(*values)
    return launch("sampler_step", _kernels.sampler_step_fwd, model_output, x, coefficients, index, noise, seed,
                  guidance_scale, clip_sample, add_noise, check_index=check_index)


@_sampler_step_op.register_fake
def _(model_output, x, noise, table, index, seed, values, guidance_scale, clip_sample, add_noise, check_index):
    return _kernels.empty_in_memory_order(x, _kernels.memory_order(x))[0]
