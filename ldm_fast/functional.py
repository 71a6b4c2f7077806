"""Functional API: each op validates its arguments, then runs the fused Triton kernel or the eager reference.

Which one runs is :func:`ldm_fast.backend.select`'s answer; cases a kernel does not cover (dtype,
device, an input that needs a gradient the kernel does not give) run the eager reference, which
is always correct. Bad arguments raise ``TypeError`` or ``ValueError`` naming the argument.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import backend, ops
from .kernels import attention as _attention_kernels
from .kernels import group_norm as _group_norm_kernels
from .kernels import q_sample as _q_sample_kernels
from .kernels import reparameterize as _reparameterize_kernels
from .kernels import sampler_step as _sampler_step_kernels

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["reparameterize", "reparameterize_moments", "q_sample", "group_norm", "attention"]


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_float(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(x.shape)}")


def _check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; put them on one device")


def _check_seed(seed) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _kernel_seed(seed: Optional[int], like: Tensor):
    """The seed a kernel gets: the given int; for None, one drawn from torch's default generators.

    While a CUDA graph is captured or a graph is compiled the seed is drawn ON THE DEVICE (a
    one-element int64 tensor the kernel loads), so every replay draws new noise, as ``torch.randn``
    does in a graph; otherwise it is drawn on the host (no launch, no sync).
    """
    if seed is not None:
        return seed
    if torch.compiler.is_compiling() or (like.is_cuda and torch.cuda.is_current_stream_capturing()):
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=like.device)
    return int(torch.randint(0, 2**62, ()))


def _eager_randn(like: Tensor, seed: Optional[int]) -> Tensor:
    """Standard normal noise of ``like``'s shape for the eager path: torch's generator, seeded when asked."""
    if seed is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)


def _derived_seed(seed: Optional[int], salt: int) -> Optional[int]:
    """A second, independent seed from ``seed`` for a second stream (None stays None)."""
    return None if seed is None else (seed ^ salt) % 2**63


def _check_timesteps(t, batch: int, device: torch.device, num_steps: int, sync_check: bool):
    """Check ``t`` (an int, or an integer tensor ``[]`` or ``[batch]``); return ``(t, check_t)``.

    An int, or a tensor on the CPU, has its range ``[0, num_steps)`` checked on the host (free: no
    device is involved) and raises ValueError naming t; a CPU tensor is then moved to ``device``. A
    tensor on the device is never read by the host (no sync, CUDA-graph safe): ``check_t`` is True
    and the caller asserts its range on the device, unless ``sync_check`` asks for the host check
    (a sync) with its ValueError.
    """
    if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
        raise TypeError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if isinstance(t, int):
        _check_range(t, t, num_steps)
        return t, False
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer timesteps, got dtype {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != batch):
        raise ValueError(f"t must be a scalar or have shape [{batch}] (one timestep per batch row), got {tuple(t.shape)}")
    if sync_check or (t.device.type == "cpu" and not torch.compiler.is_compiling()):
        _check_range_on_host(t, num_steps)
        return t.to(device), False
    return t.to(device), True


def _check_range_on_host(t: Tensor, num_steps: int) -> None:
    """Raise ValueError unless every value of ``t`` lies in ``[0, num_steps)`` (reads t's values)."""
    if t.numel():
        _check_range(*(int(v) for v in torch.aminmax(t)), num_steps)


def _check_range(lo: int, hi: int, num_steps: int) -> None:
    if lo < 0 or hi >= num_steps:
        raise ValueError(f"t must lie in [0, {num_steps}) (len(alphas_cumprod)), got values in [{lo}, {hi}]")


def _assert_range_on_device(t: Tensor, num_steps: int) -> None:
    """The eager path's device-side check of a device t: an asynchronous assertion, no host sync."""
    torch._assert_async(((t >= 0) & (t < num_steps)).all(), "q_sample: t must lie in [0, len(alphas_cumprod))")


def _kernel_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether the Triton kernels can take these tensors (dtype, device) in this process."""
    for t in tensors:
        if t is not None and t.dtype not in KERNEL_DTYPES:
            return False
    return backend.can_run_kernel(*tensors)


# ---------------------------------------------------------------------------------------------
# reparameterize


def reparameterize(
    mean: Tensor,
    logvar: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """Sample a VAE latent and scale it, in one pass.

    Returns ``(mean + exp(0.5 * clamp(logvar, -30, 20)) * eps - shift) * scale`` with the shape of
    ``mean`` (any shape, typically ``[B, C, H, W]``) and the promoted dtype of mean and logvar.

    - ``noise``: eps, the same shape as mean. With it the result equals diffusers'
      ``DiagonalGaussianDistribution(moments).sample()`` (then ``* scaling_factor``) up to rounding.
    - ``seed``: with ``noise=None``, eps is drawn inside the kernel (counter-based Philox; the eager
      path uses a torch generator seeded with it) and never stored; the backward draws it again.
      ``None`` draws the seed from torch's default generator, so ``torch.manual_seed`` governs it.
    - ``scale``/``shift``: the latent normalization, e.g. SD v1 ``scale=0.18215``; SD3
      ``scale=1.5305, shift=0.0609``.

    Differentiable in mean and logvar. Eager equivalent:
    ``(mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * noise - shift) * scale`` in fp32.
    """
    _check_float("mean", mean)
    _check_float("logvar", logvar)
    _check_same_shape("logvar", logvar, "mean", mean)
    _check_same_device("logvar", logvar, "mean", mean)
    if noise is not None:
        _check_float("noise", noise)
        _check_same_shape("noise", noise, "mean", mean)
        _check_same_device("noise", noise, "mean", mean)
    _check_seed(seed)
    scale, shift = float(scale), float(shift)

    use_kernel = (
        backend.select(mean, logvar, noise) == "triton"
        and mean.dtype == logvar.dtype
        and not (noise is not None and noise.requires_grad)
        and _kernel_ok(mean, logvar, noise)
    )
    if use_kernel:
        return ops.reparameterize(mean, logvar, noise, _kernel_seed(seed, mean), scale, shift)
    if noise is None:
        noise = _eager_randn(mean, seed)
    return _reparameterize_kernels.reparameterize_reference(mean, logvar, noise, scale, shift)


def reparameterize_moments(
    moments: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    scale: float = 1.0,
    shift: float = 0.0,
) -> Tensor:
    """:func:`reparameterize` on an encoder's moments ``[B, 2C, *spatial]`` (mean = first C channels,
    logvar = last C), read in place without copying the halves. Returns ``[B, C, *spatial]``.

    Eager equivalent: ``reparameterize(*moments.chunk(2, dim=1), ...)``.
    """
    _check_float("moments", moments)
    if moments.dim() < 2 or moments.shape[1] % 2:
        raise ValueError(
            f"moments must be [B, 2C, ...] with an even channel count, got shape {tuple(moments.shape)}"
        )
    mean, logvar = moments.chunk(2, dim=1)
    return reparameterize(mean, logvar, noise=noise, seed=seed, scale=scale, shift=shift)


# ---------------------------------------------------------------------------------------------
# q_sample

_OFFSET_SALT = 0x5DEECE66D


def q_sample(
    x0: Tensor,
    t,
    alphas_cumprod: Tensor,
    *,
    noise: Optional[Tensor] = None,
    seed: Optional[int] = None,
    target: str = "eps",
    noise_offset: float = 0.0,
    sync_check: bool = False,
) -> tuple[Tensor, Tensor]:
    """Forward diffusion of a batch: ``(x_t, target)`` with x_t and target the shape and dtype of x0.

    ``x_t = sqrt(abar[t_b]) * x0 + sqrt(1 - abar[t_b]) * eps`` for batch row b, where
    ``abar = alphas_cumprod`` (``[T]``) and ``t`` is an int (every row) or an integer tensor
    ``[B]`` in ``[0, T)``. The gather and square roots happen in fp32 whatever x0's dtype.

    - ``noise``: eps, x0's shape. ``None`` draws it in-kernel from ``seed`` (counter-based Philox;
      the eager path uses a torch generator seeded with it); ``seed=None`` takes the seed from
      torch's default generator.
    - ``target``: ``"eps"`` returns eps (the noise actually added) as the second output; ``"v"``
      returns the v-prediction target ``sqrt(abar) * eps - sqrt(1 - abar) * x0``.
    - ``noise_offset``: adds ``noise_offset * randn(B, C)`` per (sample, channel) to eps, the offset
      noise of SD fine-tuning (``C = x0.shape[1]``; drawn with torch's generator).
    - t's range is checked without a host sync: an int or a CPU tensor on the host (ValueError), a
      tensor on the GPU by a device-side assertion (a bad t fails the launch, as torch's indexing
      does; CUDA-graph safe). ``sync_check=True`` reads a GPU t on the host instead (a sync) to
      raise the ValueError. alphas_cumprod on x0's device avoids a copy per call.

    Eager equivalent (diffusers ``DDPMScheduler.add_noise`` in fp32): ``a = abar[t].sqrt()``,
    ``s = (1 - abar[t]).sqrt()`` broadcast over the trailing dims, ``a * x0 + s * noise``.
    """
    _check_float("x0", x0)
    if x0.dim() == 0:
        raise ValueError("x0 must have a batch dimension: shape [B, ...], got a scalar")
    _check_float("alphas_cumprod", alphas_cumprod)
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-d tensor [T], got shape {tuple(alphas_cumprod.shape)}")
    if noise is not None:
        _check_float("noise", noise)
        _check_same_shape("noise", noise, "x0", x0)
        _check_same_device("noise", noise, "x0", x0)
    if target not in ("eps", "v"):
        raise ValueError(f"target must be 'eps' or 'v', got {target!r}")
    _check_seed(seed)
    num_steps = alphas_cumprod.shape[0]
    t, check_t = _check_timesteps(t, x0.shape[0], x0.device, num_steps, sync_check)
    if x0.dim() == 1:  # one value per sample: [B] -> [B, 1]
        x_t, tgt = q_sample(x0[:, None], t, alphas_cumprod, noise=None if noise is None else noise[:, None],
                            seed=seed, target=target, noise_offset=noise_offset, sync_check=sync_check)
        return x_t[:, 0], tgt[:, 0]

    noise_offset = float(noise_offset)
    offset = None
    if noise_offset != 0.0:  # seed None: drawn on x0's device (graph-safe); a seed: a CPU generator, then copied
        if seed is None:
            offset = torch.randn(x0.shape[0], x0.shape[1], device=x0.device)
        else:
            generator = torch.Generator().manual_seed(_derived_seed(seed, _OFFSET_SALT))
            offset = torch.randn(x0.shape[0], x0.shape[1], generator=generator).to(x0.device)
    target_v = target == "v"
    needs_grad = x0.requires_grad or (noise is not None and noise.requires_grad)
    if backend.select(x0, noise) == "triton" and not needs_grad and _kernel_ok(x0, noise):
        if alphas_cumprod.device != x0.device:
            alphas_cumprod = alphas_cumprod.to(x0.device)
        return ops.q_sample(
            x0, t, alphas_cumprod, noise, offset, _kernel_seed(seed, x0), noise_offset, target_v, check_t
        )
    if check_t:
        _assert_range_on_device(t, num_steps)
    t = torch.full((x0.shape[0],), t, device=x0.device) if isinstance(t, int) else t.expand(x0.shape[0])
    if noise is None:
        noise = _eager_randn(x0, seed)
    return _q_sample_kernels.q_sample_reference(x0, t, alphas_cumprod, noise, offset, noise_offset, target_v)


# ---------------------------------------------------------------------------------------------
# group_norm

GROUP_NORM_ACTIVATIONS = (None, "silu")
_CHANNELS_LAST_FORMATS = (torch.channels_last, torch.channels_last_3d)


def _check_group_norm_args(x, num_groups, weight, bias, activation, out_memory_format) -> Optional[bool]:
    """Validate group_norm's arguments (the errors torch's own group_norm raises, naming the
    argument); return the output layout asked for: True channels-last, False NCHW, None x's own."""
    _check_float("x", x)
    if x.dim() < 2:
        raise RuntimeError(
            f"group_norm: x must have at least 2 dimensions [B, C, *spatial], got shape {tuple(x.shape)}"
        )
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"group_norm: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1:
        raise RuntimeError(f"group_norm: num_groups must be positive, got {num_groups}")
    channels = x.shape[1]
    if channels % num_groups:
        raise RuntimeError(
            f"group_norm: the channel count of x (C={channels}, shape {tuple(x.shape)}) must be divisible by "
            f"num_groups ({num_groups})"
        )
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        _check_float(name, param)
        if param.dim() != 1 or param.shape[0] != channels:
            raise RuntimeError(
                f"group_norm: {name} must be a vector of C={channels} elements (x's channels), "
                f"got shape {tuple(param.shape)}"
            )
        _check_same_device(name, param, "x", x)
    if activation not in GROUP_NORM_ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be one of {GROUP_NORM_ACTIVATIONS}, got {activation!r}")
    if out_memory_format is None or out_memory_format == torch.preserve_format:
        return None
    if out_memory_format == torch.contiguous_format:
        return False
    if out_memory_format in _CHANNELS_LAST_FORMATS:
        return True
    raise ValueError(
        "group_norm: out_memory_format must be None, torch.preserve_format, torch.contiguous_format, "
        f"torch.channels_last or torch.channels_last_3d, got {out_memory_format!r}"
    )


def _to_layout(y: Tensor, channels_last: bool) -> Tensor:
    """y ``[B, C, *spatial]`` NCHW-contiguous, or channels-last (channels fastest)."""
    if not channels_last or y.dim() < 3:
        return y.contiguous()
    if y.dim() in (4, 5):
        return y.contiguous(memory_format=_CHANNELS_LAST_FORMATS[y.dim() - 4])
    return y.movedim(1, -1).contiguous().movedim(-1, 1)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    activation: Optional[str] = None,
    out_memory_format: Optional[torch.memory_format] = None,
) -> Tensor:
    """Group normalization of ``x`` ``[B, C, *spatial]`` (images ``[B, C, H, W]``, video latents
    ``[B, C, T, H, W]``), optionally followed by SiLU in the same pass.

    Statistics per (sample, group of ``C // num_groups`` channels) in fp32 (two-pass variance),
    the affine ``weight``/``bias`` (``[C]``, fp32/fp16/bf16 independently of x) applied in fp32, the
    result in x's dtype. x may be NCHW-contiguous or channels-last; ``out_memory_format``:
    ``None`` keeps x's layout, ``torch.channels_last`` (or ``channels_last_3d``) writes the output
    channels-last whatever x's layout, ``torch.contiguous_format`` writes NCHW.
    ``activation``: ``None`` or ``"silu"``. Differentiable in x, weight and bias (backward in Triton).

    Eager equivalent (what ``LDM_FAST_BACKEND=eager`` runs, bit for bit):
    ``F.silu(F.group_norm(x, num_groups, weight, bias, eps))``, without the silu when activation is None.
    """
    return _group_norm(x, num_groups, weight, bias, eps, activation, out_memory_format, upcast=False)


def _group_norm(x, num_groups, weight, bias, eps, activation, out_memory_format, *, upcast: bool) -> Tensor:
    """:func:`group_norm`; ``upcast=True`` makes the eager path the SD U-Net's GroupNorm32
    (``F.group_norm(x.float(), ...).type(x.dtype)``). The kernel computes in fp32 either way."""
    channels_last_out = _check_group_norm_args(x, num_groups, weight, bias, activation, out_memory_format)
    eps = float(eps)
    use_kernel = backend.select(x, weight, bias) == "triton" and x.numel() > 0 and _kernel_ok(x, weight, bias)
    if use_kernel and torch.compiler.is_compiling():  # LDM_FAST_COMPILE: the kernel, or Inductor's own code
        use_kernel = backend.compile_uses_kernel(x.numel() // (x.shape[0] * num_groups))
    if use_kernel:
        if channels_last_out is None:
            channels_last_out = _group_norm_kernels.is_channels_last(x)
        return ops.group_norm(x, weight, bias, num_groups, eps, activation, channels_last_out)
    y = _group_norm_kernels.group_norm_reference(x, num_groups, weight, bias, eps, activation, upcast=upcast)
    return y if channels_last_out is None else _to_layout(y, channels_last_out)


# ---------------------------------------------------------------------------------------------
# attention

ATTENTION_ROUTES_FILE = Path(__file__).with_name("attention_routes.json")


def _check_attention_args(q, k, v, heads, scale) -> tuple[int, float]:
    """Validate attention's arguments (errors name the argument); return ``(heads, scale)``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
    if not q.dim() == k.dim() == v.dim() or q.dim() not in (3, 4):
        raise ValueError(
            "attention: q, k and v must all be [B, N, heads*D] or all [B, H, N, D], got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_same_device("k", k, "q", q)
    _check_same_device("v", v, "q", q)
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"attention: heads must be a positive int or None, got {heads!r}")
    if q.dim() == 4:
        if heads is not None and heads != q.shape[1]:
            raise ValueError(f"attention: heads={heads} but q [B, H, N, D] has H={q.shape[1]}")
        heads = q.shape[1]
        if k.shape[1] != heads or v.shape[1] != heads:
            raise ValueError(f"attention: k and v must have q's {heads} heads, got shapes {tuple(k.shape)}, {tuple(v.shape)}")
    else:
        heads = 1 if heads is None else heads
        if q.shape[2] % heads:
            raise ValueError(f"attention: q's last dim ({q.shape[2]}) must be divisible by heads ({heads})")
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"attention: k's last dim must equal q's ({q.shape[2]} = heads*D), got {k.shape[2]}")
        if v.shape[2] % heads:
            raise ValueError(f"attention: v's last dim ({v.shape[2]}) must be divisible by heads ({heads})")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"attention: q, k and v must have one batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    seq = -2 if q.dim() == 4 else 1
    if k.shape[seq] != v.shape[seq]:
        raise ValueError(f"attention: k and v must have one sequence length, got {k.shape[seq]} and {v.shape[seq]}")
    head_dim = q.shape[-1] if q.dim() == 4 else q.shape[2] // heads
    if q.dim() == 4 and k.shape[-1] != head_dim:
        raise ValueError(f"attention: k's head dim must equal q's ({head_dim}), got {k.shape[-1]}")
    if scale is None:
        return heads, head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
    return heads, float(scale)


@functools.lru_cache(maxsize=None)
def _attention_routes() -> dict:
    """``attention_routes.json``: per GPU name, the cases where the GPU benchmark measured the Triton
    kernel faster than SDPA (``python -m benchmarks.bench_attention --write-routes`` writes it)."""
    routes: dict = {}
    for entry in json.loads(ATTENTION_ROUTES_FILE.read_text())["routes"]:
        routes.setdefault(entry["device"], []).append(entry)
    return routes


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def attention_route(device: torch.device, dtype: torch.dtype, head_dim: int, nq: int, nk: int) -> str:
    """What ``impl="auto"`` runs for this case: ``"triton"`` where a measurement on this GPU (by name)
    says the kernel is faster than SDPA for this dtype and head dim at these sequence lengths or
    longer, else ``"sdpa"``."""
    for entry in _attention_routes().get(_device_name(device), ()):
        if (entry["dtype"] == str(dtype).removeprefix("torch.") and entry["head_dim"] == head_dim
                and nq >= entry["min_q"] and nk >= entry["min_k"]):
            return "triton"
    return "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, *, heads: Optional[int] = None, scale: Optional[float] = None,
              impl: str = "auto") -> Tensor:
    """Scaled dot-product attention, ``softmax(q @ k^T * scale) @ v`` per batch and head, no mask.

    Layouts (both read in place through strides: no transpose, no contiguous copy):

    * q ``[B, Nq, heads*D]``, k ``[B, Nk, heads*D]``, v ``[B, Nk, heads*Dv]`` (what ``to_q``/``to_k``/
      ``to_v`` Linear layers produce, or slices of one fused qkv projection) -> ``[B, Nq, heads*Dv]``,
      ready for the output projection; ``heads=None`` means one head;
    * q ``[B, H, Nq, D]``, k and v ``[B, H, Nk, D]`` like ``F.scaled_dot_product_attention`` ->
      ``[B, H, Nq, D]`` (a transposed view of a ``[B, Nq, H, D]`` buffer, as FlashAttention returns).

    ``scale`` defaults to ``D ** -0.5``. Self or cross attention (any Nk >= 1, Nq != Nk), head dims
    up to 512, fp32/fp16/bf16; differentiable in q, k and v (the backward in Triton too).

    ``impl`` (overridden by ``LDM_FAST_ATTENTION``):
    ``"sdpa"`` runs ``F.scaled_dot_product_attention`` (cuDNN/Flash/memory-efficient kernels);
    ``"triton"`` runs ldm_fast's kernel (FlashAttention-2 style with fp32 softmax statistics; head
    dims above 256, the SD VAE's 512, tiled over D; fp32 inputs multiply as TF32 on a GPU);
    ``"auto"`` runs the kernel only where the GPU benchmark measured it faster than SDPA on this
    GPU (``ldm_fast/attention_routes.json``), SDPA everywhere else. The kernel runs where the
    backend allows it (CUDA, or forced with ``LDM_FAST_BACKEND=triton``); a case it does not cover
    (fp64, head dim above 512, Dv != D, Nk = 0) runs SDPA. The backward is deterministic.

    Eager equivalent: ``F.scaled_dot_product_attention(q4, k4, v4, scale=scale)`` on the
    ``[B, H, N, D]`` views (``q.unflatten(2, (heads, D)).transpose(1, 2)``), merged back to
    ``[B, Nq, heads*D]`` for the 3-d layout.
    """
    heads, scale = _check_attention_args(q, k, v, heads, scale)
    impl = backend.attention_impl(impl)
    flat = q.dim() == 3
    if flat:
        q4 = q.unflatten(2, (heads, q.shape[2] // heads)).transpose(1, 2)
        k4 = k.unflatten(2, (heads, k.shape[2] // heads)).transpose(1, 2)
        v4 = v.unflatten(2, (heads, v.shape[2] // heads)).transpose(1, 2)
    else:
        q4, k4, v4 = q, k, v
    if impl != "sdpa" and backend.select(q, k, v) == "triton" and _attention_kernel_ok(q4, k4, v4):
        if impl == "auto" and (torch.compiler.is_compiling()
                               or attention_route(q.device, q.dtype, q4.shape[3], q4.shape[2], k4.shape[2]) != "triton"):
            impl = "sdpa"
        if impl != "sdpa":
            out = ops.attention(q4, k4, v4, scale)  # [B, Nq, H, D]
            return out.flatten(2) if flat else out.transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, scale=scale)  # [B, H, Nq, Dv]
    return out.transpose(1, 2).flatten(2) if flat else out


def _attention_kernel_ok(q4: Tensor, k4: Tensor, v4: Tensor) -> bool:
    """Whether the attention kernel covers these ``[B, H, N, D]`` tensors (else SDPA runs)."""
    return (
        q4.dtype in _attention_kernels.KERNEL_DTYPES
        and q4.shape[3] <= _attention_kernels.MAX_HEAD_DIM
        and v4.shape[3] == q4.shape[3]
        and k4.shape[2] > 0
        and q4.numel() > 0
        and backend.can_run_kernel(q4, k4, v4)
        and _attention_kernels.fits_int32(q4, k4, v4)
    )


# ---------------------------------------------------------------------------------------------
# sampler_step

SAMPLER_METHODS = _sampler_step_kernels.METHODS


def _host_float(name: str, value) -> float:
    """A Python number, or a one-element tensor on the CPU (reading it is free), as a float."""
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or value.numel() != 1:
            raise TypeError(
                f"{name} must be a float or a one-element CPU tensor, got a tensor of shape {tuple(value.shape)} on "
                f"{value.device} (reading a device value would sync; pass coefficients=<table> and index=<device t>)"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _check_step_coefficients(alpha_t, alpha_prev, method: str, eta) -> _sampler_step_kernels.StepCoefficients:
    """Validate the schedule values of one step; return its coefficients (float64 on the host)."""
    if method not in SAMPLER_METHODS:
        raise ValueError(f"method must be one of {SAMPLER_METHODS}, got {method!r}")
    if alpha_t is None or alpha_prev is None:
        raise TypeError("sampler_step needs alpha_t and alpha_prev (floats), or coefficients=<table> with index")
    a, ap, eta = _host_float("alpha_t", alpha_t), _host_float("alpha_prev", alpha_prev), _host_float("eta", eta)
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
    coefficients = _sampler_step_kernels.step_coefficients(a, ap, method, eta)
    if method == "ddim" and eta > 0.0:
        sigma2 = coefficients.std**2
        if 1.0 - ap - sigma2 < -1e-12 * max(1.0, sigma2):
            raise ValueError(
                f"eta={eta} is too large for this step: sigma^2 = {sigma2:.6g} > 1 - alpha_prev = {1 - ap:.6g}"
            )
    return coefficients


def _check_table_index(coefficients: Tensor, index, batch: int, device: torch.device, sync_check: bool):
    """Check a coefficient table ``[N, 6]`` and its index; return ``(index, check_index)`` (as
    :func:`_check_timesteps`: an int or a CPU index is checked on the host, a device one by the kernel)."""
    _check_float("coefficients", coefficients)
    columns = _sampler_step_kernels.NUM_COEFFICIENTS
    if coefficients.dim() != 2 or coefficients.shape[1] != columns or not len(coefficients):
        raise ValueError(
            f"coefficients must be a table [N, {_sampler_step_kernels.NUM_COEFFICIENTS}] (rows of step_coefficients), "
            f"got shape {tuple(coefficients.shape)}"
        )
    if coefficients.device != device:
        raise ValueError(f"coefficients is on {coefficients.device} but x is on {device}; put them on one device")
    n = coefficients.shape[0]
    if index is None:
        raise TypeError("index (the row of coefficients to use: an int or an integer tensor) is required with a table")
    if isinstance(index, bool) or not isinstance(index, (int, Tensor)):
        raise TypeError(f"index must be an int or an integer tensor, got {type(index).__name__}")
    if isinstance(index, int):
        if not 0 <= index < n:
            raise ValueError(f"index must lie in [0, {n}) (the rows of coefficients), got {index}")
        return index, False
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(f"index must hold integers, got dtype {index.dtype}")
    if index.numel() not in (1, batch) or index.dim() > 1:
        raise ValueError(f"index must be a scalar or have shape [{batch}] (one per batch row), got {tuple(index.shape)}")
    if sync_check or (index.device.type == "cpu" and not torch.compiler.is_compiling()):
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < 0 or hi >= n:
            raise ValueError(f"index must lie in [0, {n}) (the rows of coefficients), got values in [{lo}, {hi}]")
        return index.to(device), False
    return index.to(device), True


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
      ``DDIMSampler.coefficient_table``) and the row to use, an int or an integer tensor (``[]`` or
      ``[B]``) on x's device read by the kernel: no host sync, CUDA-graph safe, and a compiled loop
      does not recompile per step. A device index is range-checked on the device (a bad one fails
      the launch); ``sync_check=True`` reads it on the host for the ValueError instead.
    - ``add_noise``: whether ``std * z`` is added; default: when std > 0 (alphas), always (table).
      z is ``noise`` (x's shape), else drawn in-kernel from ``seed`` (Philox; the eager path uses a
      torch generator seeded with it; None: a seed from torch's default generator).
    - ``clip_sample``: clip the predicted x0 to ``[-clip_sample, clip_sample]`` (None: no clip, what
      latent diffusion uses).

    Forward only (sampling needs no gradients): inputs that require grad run the eager reference.
    Eager equivalent (``LDM_FAST_BACKEND=eager``, :func:`~ldm_fast.kernels.sampler_step.sampler_step_reference`)::

        x0 = (x - sqrt(1 - alpha_t) * eps) / sqrt(alpha_t)
        x_prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev - sigma**2) * eps + sigma * z     # ddim
        x_prev = c0 * x0 + ct * x + std * z                                                     # ddpm
    """
    _check_float("model_output", model_output)
    _check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension: shape [B, ...], got a scalar")
    _check_same_device("model_output", model_output, "x", x)
    if guidance_scale is not None:
        guidance_scale = _host_float("guidance_scale", guidance_scale)
        expected = (2 * x.shape[0],) + tuple(x.shape[1:])
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output must be the model's output on [uncond, cond] with shape {expected} (twice x's batch) "
                f"when guidance_scale is given, got {tuple(model_output.shape)}"
            )
    else:
        _check_same_shape("model_output", model_output, "x", x)
    if clip_sample is not None:
        clip_sample = _host_float("clip_sample", clip_sample)
        if not clip_sample > 0.0:
            raise ValueError(f"clip_sample must be > 0 or None, got {clip_sample}")
    if noise is not None:
        _check_float("noise", noise)
        _check_same_shape("noise", noise, "x", x)
        _check_same_device("noise", noise, "x", x)
    _check_seed(seed)
    if add_noise is not None and not isinstance(add_noise, bool):
        raise TypeError(f"add_noise must be a bool or None, got {type(add_noise).__name__}")
    check_index = False
    if coefficients is None:
        coefs = _check_step_coefficients(alpha_t, alpha_prev, method, eta)
        add_noise = coefs.std > 0.0 if add_noise is None else add_noise
    elif alpha_t is not None or alpha_prev is not None:
        raise TypeError("pass either alpha_t and alpha_prev, or coefficients (with index), not both")
    elif isinstance(coefficients, Tensor):
        coefs = coefficients
        index, check_index = _check_table_index(coefficients, index, x.shape[0], x.device, sync_check)
        add_noise = True if add_noise is None else add_noise
    else:
        if len(coefficients) != _sampler_step_kernels.NUM_COEFFICIENTS:
            raise ValueError(
                f"coefficients must be a StepCoefficients (6 floats) or a table tensor, got {coefficients!r}"
            )
        coefs = _sampler_step_kernels.StepCoefficients(*(_host_float("coefficients", v) for v in coefficients))
        add_noise = coefs.std > 0.0 if add_noise is None else add_noise
    if x.dim() == 1:  # one value per sample: [B] -> [B, 1]
        return sampler_step(
            model_output[:, None], x[:, None], coefficients=coefs, index=index, add_noise=add_noise,
            guidance_scale=guidance_scale, clip_sample=clip_sample, noise=None if noise is None else noise[:, None],
            seed=seed, sync_check=sync_check,
        )[:, 0]

    table = coefs if isinstance(coefs, Tensor) else None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (model_output, x, noise))
    use_kernel = (
        backend.select(model_output, x, noise) == "triton"
        and not needs_grad
        and _kernel_ok(model_output, x, noise, table)
        and (table is None or (table.dtype == torch.float32
                               and backend.can_run_kernel(x, index if isinstance(index, Tensor) else None)))
    )
    draw = noise is None and add_noise
    if use_kernel:
        return ops.sampler_step(model_output, x, coefs, index, noise, _kernel_seed(seed, x) if draw else None,
                                guidance_scale, clip_sample, add_noise, check_index)
    if check_index:
        torch._assert_async(((index >= 0) & (index < table.shape[0])).all(), "sampler_step: index out of the table")
    if draw:
        noise = _eager_randn(x, seed)
    return _sampler_step_kernels.sampler_step_reference(
        model_output, x, coefs, noise if add_noise else None, guidance_scale, clip_sample, index=index
    )


__all__ += ["sampler_step", "SAMPLER_METHODS"]
