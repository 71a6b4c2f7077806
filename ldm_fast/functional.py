"""The functional API: every op by its public name (each lives in :mod:`ldm_fast.ops`, one module
per op: its argument checks, the kernel-or-reference choice, its autograd and torch.compile
registration).

Each op runs its fused Triton kernel where :func:`ldm_fast.backend.kernel_ok` allows it (CUDA
tensors, or forced onto CPU tensors under Triton's interpreter), and its eager PyTorch reference
otherwise; a case a kernel does not cover (dtype, device, an input that needs a gradient the kernel
does not give) runs the reference, which is always correct. Bad arguments raise ``TypeError`` or
``ValueError`` naming the argument.

    import ldm_fast.functional as lf
    z = lf.reparameterize_moments(moments, scale=0.18215)          # [B, 2C, H, W] -> [B, C, H, W]
    x_t, eps = lf.q_sample(z, t, schedule.alphas_cumprod)          # forward noising
    h = lf.group_norm(x, 32, weight, bias, activation="silu")      # GroupNorm + SiLU
    out = lf.attention(q, k, v, heads=8)                           # [B, N, heads*D] in place
    x_prev = lf.sampler_step(eps, x, alpha_t, alpha_prev)          # one DDIM step
    ff = lf.geglu(proj)                                            # [..., 2F] -> [..., F]
    h, n = lf.add_layer_norm(attn_out, h, norm.weight, norm.bias)   # h = attn_out + h; n = norm(h)
    t_emb = lf.timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)  # [N] -> [N, 320]
"""

from .ops.add_layer_norm import add_layer_norm
from .ops.attention import ATTENTION_ROUTES_FILE, attention, attention_route
from .ops.geglu import geglu
from .ops.group_norm import ACTIVATIONS as GROUP_NORM_ACTIVATIONS
from .ops.group_norm import group_norm
from .ops.q_sample import q_sample
from .ops.reparameterize import reparameterize, reparameterize_moments
from .ops.sampler_step import SAMPLER_METHODS, sampler_step
from .ops.timestep_embedding import timestep_embedding

__all__ = ["ATTENTION_ROUTES_FILE", "GROUP_NORM_ACTIVATIONS", "SAMPLER_METHODS", "add_layer_norm", "attention",
           "attention_route", "geglu", "group_norm", "q_sample", "reparameterize", "reparameterize_moments",
           "sampler_step", "timestep_embedding"]
