"""sampler_step at SD inference shapes: CFG model output [2, 4, 64, 64] (uncond, cond), latents [1, 4, 64, 64].

Baseline: diffusers' StableDiffusionPipeline step, eager: ``noise_pred.chunk(2)``, the CFG combine
``u + g * (c - u)``, then ``DDIMScheduler.step`` (eta = 0) or ``DDPMScheduler.step`` (its noise drawn
with ``randn_tensor``), their math written out as the same torch ops on the same dtype (the
schedule values as Python floats, as diffusers' 0-d CPU tensors act). Minimum traffic: read x and
both halves of the model output once, write x_prev once; DDPM's noise is drawn in the kernel, never
stored.
"""

from __future__ import annotations

import torch

import ldm_fast
from ldm_fast import functional as F
from ldm_fast.samplers import DDIMSampler, DDPMSampler

from .common import Case, benchmark_tests, nbytes

SCHEDULE = ldm_fast.make_schedule("scaled_linear")
DDIM = DDIMSampler(SCHEDULE, 50)
DDPM = DDPMSampler(SCHEDULE)
GUIDANCE = 7.5
DDIM_T, DDPM_T = int(DDIM.timesteps[10]), 500  # 781 -> 761; 500 -> 499


def _make(batch: int, dtype: torch.dtype, device_t: bool = False):
    def make(device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 4, 64, 64, generator=g).to(device=device, dtype=dtype)
        model_output = torch.randn(2 * batch, 4, 64, 64, generator=g).to(device=device, dtype=dtype)
        inputs = {"x": x, "model_output": model_output}
        if device_t:  # built once per sampler and device, before the loop
            inputs.update(table=DDIM.coefficient_table(device), t=torch.tensor(DDIM_T, device=device))
        return inputs

    return make


def _fused_ddim(inputs):
    return DDIM.step(inputs["model_output"], DDIM_T, inputs["x"], guidance_scale=GUIDANCE)


def _fused_ddpm(inputs):
    return DDPM.step(inputs["model_output"], DDPM_T, inputs["x"], guidance_scale=GUIDANCE, seed=1234)


def _fused_device_t(inputs):
    """What a step with t on the GPU runs (a CUDA-graph or compiled loop): the coefficients read from
    the table on the device at row t, t range-checked by the kernel's device-side assertion (the
    variant compiled with ``debug=True``, so the audit covers it); on a CPU it is forced here."""
    from ldm_fast import ops

    return ops.sampler_step.kernel_call(inputs["model_output"], inputs["x"], inputs["table"], inputs["t"], None, None, GUIDANCE,
                            None, False, True)


def _cfg(model_output):
    # diffusers pipeline_stable_diffusion.py
    noise_pred_uncond, noise_pred_text = model_output.chunk(2)
    return noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)


def _eager_ddim(inputs):
    # diffusers DDIMScheduler.step, prediction_type "epsilon", eta = 0, clip_sample False
    sample, model_output = inputs["x"], _cfg(inputs["model_output"])
    i = DDIM.timesteps.tolist().index(DDIM_T)
    alpha_prod_t = float(DDIM.alphas_cumprod[DDIM_T])
    alpha_prod_t_prev = float(DDIM.alphas_cumprod[int(DDIM.timesteps[i + 1])])
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * model_output
    return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction


def _eager_ddpm(inputs):
    # diffusers DDPMScheduler.step, variance_type "fixed_small", clip_sample False
    sample, model_output = inputs["x"], _cfg(inputs["model_output"])
    alpha_prod_t = float(DDPM.alphas_cumprod[DDPM_T])
    alpha_prod_t_prev = float(DDPM.alphas_cumprod[DDPM_T - 1])
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    variance_noise = torch.randn(model_output.shape, device=model_output.device, dtype=model_output.dtype)
    variance = max(beta_prod_t_prev / beta_prod_t * current_beta_t, 1e-20) ** 0.5 * variance_noise
    return pred_prev_sample + variance


def _min_bytes(inputs):
    return nbytes(inputs["x"], inputs["model_output"]) + nbytes(inputs["x"])  # read x, eps_u, eps_c; write x_prev


def cases() -> list[Case]:
    ddim = [
        Case("sampler_step", f"sd-latent-cfg-b{b}-{name}-ddim", _make(b, dtype), _fused_ddim, _eager_ddim, _min_bytes,
             traffic_target=1.0, quick=b == 1 and name == "fp16")
        for b in (1, 4)
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32), ("bf16", torch.bfloat16))
    ]
    ddpm = [
        Case("sampler_step", f"sd-latent-cfg-b1-{name}-ddpm-noise-in-kernel", _make(1, dtype), _fused_ddpm, _eager_ddpm,
             _min_bytes, traffic_target=1.0, quick=name == "fp32")
        for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32))
    ]
    device_t = [
        Case("sampler_step", "sd-latent-cfg-b1-fp16-ddim-device-t", _make(1, torch.float16, True), _fused_device_t,
             _eager_ddim, _min_bytes, traffic_target=1.0, quick=True),
    ]
    return ddim + ddpm + device_t


test_eager, test_fused = benchmark_tests(cases)
