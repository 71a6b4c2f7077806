"""``python -m ldm_fast demo``: train a small latent diffusion model from scratch and draw samples.

    python -m ldm_fast demo [--out DIR] [--quick] [--steps N] [--vae-steps N] [--vector] [--seed S]
    torchrun --nproc_per_node 2 -m ldm_fast demo     # the same, data-parallel (gloo on CPU, nccl on CUDA)

Image demo (default): procedural 32x32 shapes (:func:`ldm_fast.data.shapes`), a small
:class:`~ldm_fast.models.AutoencoderKL` (4 latent channels at 8x8), then an unconditional
:class:`~ldm_fast.models.UNetModel` on its latents (the cross-attention sees a zero context),
sampled with DDIM. Writes ``samples.png`` (samples | data | VAE reconstructions of the data),
``loss.png`` (both loss curves), ``summary.json`` and the checkpoints (``ckpt/``: rerunning with
the same ``--out`` resumes, or skips finished training; another ``--seed`` or ``--quick`` there is
refused, as not an exact resume: use another ``--out``). ``--vector``: the vector LDM
(:mod:`ldm_fast.models.mlp`) on a Gaussian mixture in R^16 (:func:`ldm_fast.data.gaussian_mixture`);
writes ``loss.png``, ``scatter.png`` (data and samples projected on the mixture's plane),
``summary.txt`` and ``summary.json``.

Runs on CUDA when available (the fused kernels then run), else on the CPU (eager references). PNGs
are written by a small zlib encoder here (no PIL or matplotlib needed).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# pictures: a PNG encoder, a 3x5 font, grids, curves and scatter plots as uint8 [H, W, 3] arrays

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (128, 128, 128), (225, 225, 225)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def write_png(path, image) -> None:
    """Write ``image`` (uint8 ``[H, W, 3]`` RGB or ``[H, W]`` grey, numpy or torch) as an 8-bit PNG."""
    image = np.ascontiguousarray(image.cpu().numpy() if isinstance(image, torch.Tensor) else image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 [H, W, 3] or [H, W], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    colour_type = 2 if image.ndim == 3 else 0  # truecolour / greyscale

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    rows = image.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


_GLYPHS = {  # 3 wide x 5 high, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", ":": "000010000010000", "+": "000010111010000",
    "=": "000111000111000", "/": "001001010100100", "(": "010100100100010", ")": "010001001001010",
    ",": "000000000010100", " ": "000000000000000",
}


def draw_text(image: np.ndarray, x: int, y: int, text: str, colour=BLACK, scale: int = 2) -> None:
    """Draw ``text`` (upper-cased; digits, letters, ``.-:+=/(),``) with its top-left corner at (x, y)."""
    for i, ch in enumerate(text.upper()):
        glyph = np.array([c == "1" for c in _GLYPHS.get(ch, _GLYPHS[" "])]).reshape(5, 3)
        block = np.kron(glyph, np.ones((scale, scale), bool))
        x0 = x + i * 4 * scale
        region = image[y:y + 5 * scale, x0:x0 + 3 * scale]
        region[block[:region.shape[0], :region.shape[1]]] = colour


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * 4 * scale - scale


def _draw_polyline(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, colour) -> None:
    """Connect the points (pixel coordinates) with one-pixel lines."""
    if len(xs) == 1:
        xs, ys = np.repeat(xs, 2), np.repeat(ys, 2)
    for (x0, x1), (y0, y1) in zip(zip(xs[:-1], xs[1:]), zip(ys[:-1], ys[1:])):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        px = np.rint(np.linspace(x0, x1, n)).astype(int)
        py = np.rint(np.linspace(y0, y1, n)).astype(int)
        keep = (px >= 0) & (px < image.shape[1]) & (py >= 0) & (py < image.shape[0])
        image[py[keep], px[keep]] = colour


def _format(v: float) -> str:
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")


def plot_curve(values: Sequence[float], title: str, width: int = 400, height: int = 260,
               smooth: int = 25) -> np.ndarray:
    """A loss curve panel, uint8 ``[height, width, 3]``: axes, the raw values (light) and their running
    mean over ``smooth`` steps (dark), a log y axis when the values are positive and span 10x or more;
    labelled with the title, the y range and the step count."""
    image = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 60, 12, 28, 26
    draw_text(image, left, 6, title)
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    x_axis, y_axis = height - bottom, left - 1
    image[top:x_axis + 1, y_axis] = BLACK
    image[x_axis, y_axis:width - right] = BLACK
    if len(values) == 0:
        draw_text(image, left + 10, top + 10, "NO DATA")
        return image
    k = max(1, min(smooth, len(values) // 5 or 1))
    mean = np.convolve(values, np.ones(k) / k, mode="valid")
    log = values.min() > 0 and values.max() / values.min() >= 10
    f = np.log10 if log else (lambda a: a)
    lo, hi = f(values.min()), f(values.max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    plot_w, plot_h = width - right - left - 1, x_axis - top - 1

    def to_px(steps, vals):
        return left + steps / max(len(values) - 1, 1) * plot_w, x_axis - 1 - (f(vals) - lo) / (hi - lo) * plot_h

    _draw_polyline(image, *to_px(np.arange(len(values)), values), (160, 190, 230))
    _draw_polyline(image, *to_px(np.arange(len(mean)) + (k - 1) / 2, mean), COLOURS[0])
    draw_text(image, 4, top, _format(10 ** hi if log else hi))
    draw_text(image, 4, x_axis - 10, _format(10 ** lo if log else lo))
    if log:
        draw_text(image, 4, top + 16, "LOG")
    draw_text(image, left, x_axis + 6, "0")
    label = f"{len(values)} STEPS"
    draw_text(image, width - right - text_width(label), x_axis + 6, label)
    return image


def hstack(panels: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """Panels side by side on white, top-aligned."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[:p.shape[0], x:x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]`` (clamped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, cols: int, title: str = "", scale: int = 2, pad: int = 2) -> np.ndarray:
    """uint8 ``[N, h, w, 3]`` -> one image: a titled grid of ``cols`` columns, each picture enlarged
    ``scale`` times (nearest), ``pad`` white pixels between them. Size: width ``cols * (w * scale +
    pad) + pad``, height ``20 + rows * (h * scale + pad) + pad``."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    out = np.full((20 + rows * cell_h + pad, cols * cell_w + pad, 3), 255, np.uint8)
    draw_text(out, pad, 4, title)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = 20 + pad + r * cell_h, pad + c * cell_w
        out[y:y + h * scale, x:x + w * scale] = big[i]
    return out


def scatter(groups: Sequence[tuple[np.ndarray, tuple]], title: str, limit: float, size: int = 300) -> np.ndarray:
    """Points ``[n, 2]`` in ``[-limit, limit]^2`` as 2x2-pixel dots, one colour per group, on a titled
    ``size`` x ``size`` panel with axes through the origin."""
    top = 24
    image = np.full((size + top, size, 3), 255, np.uint8)
    draw_text(image, 4, 4, title)
    image[top + size // 2, :] = LIGHT
    image[top:, size // 2] = LIGHT
    image[top, :] = image[-1, :] = image[top:, 0] = image[top:, -1] = GREY
    for points, colour in groups:
        px = np.rint((points[:, 0] / limit + 1) / 2 * (size - 3)).astype(int) + 1
        py = np.rint((1 - points[:, 1] / limit) / 2 * (size - 3)).astype(int) + 1 + top
        keep = (px >= 1) & (px < size - 2) & (py >= top + 1) & (py < top + size - 2)
        for dx in (0, 1):
            for dy in (0, 1):
                image[py[keep] + dy, px[keep] + dx] = colour
    return image


# ---------------------------------------------------------------------------------------------
# the demos

#: Sizes per mode. ``quick`` is for tests (seconds); the default takes 2-3 minutes on 2 CPU cores.
IMAGE_CONFIG = {
    "default": dict(n_data=4096, vae_steps=900, vae_batch=16, vae_lr=1e-3, steps=900, batch=32, lr=1e-3,
                    n_samples=64, cols=8, sampling_steps=25),
    "quick": dict(n_data=256, vae_steps=20, vae_batch=8, vae_lr=1e-3, steps=20, batch=8, lr=1e-3,
                  n_samples=16, cols=4, sampling_steps=5),
}
VECTOR_CONFIG = {
    "default": dict(n_data=8192, vae_steps=1500, vae_batch=128, vae_lr=2e-3, steps=3000, batch=256, lr=1e-3,
                    n_samples=2000, sampling_steps=50),
    "quick": dict(n_data=1024, vae_steps=50, vae_batch=64, vae_lr=2e-3, steps=50, batch=64, lr=1e-3,
                  n_samples=500, sampling_steps=10),
}
IMAGE_SIZE, LATENT_CHANNELS, CONTEXT_DIM = 32, 4, 32
#: What both demos sample with (DDIM, eta 0, SD's leading spacing), as written to summary.json.
SAMPLER_NAME = "ldm_fast.samplers.DDIMSampler"
VECTOR_DIM, VECTOR_LATENT, VECTOR_COMPONENTS = 16, 4, 6


def he_init(model: torch.nn.Module) -> torch.nn.Module:
    """He-normal weights and zero biases for every convolution of ``model`` (in place; returns it).

    With torch's default init the small VAE starts out nearly linear (its residual branches are
    small) and learns the shapes' colours slowly: 600 steps reach a mean L1 error of about 0.23
    with it and about 0.1 with this.
    """
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    return model


def _config(table: dict, args) -> dict:
    cfg = dict(table["quick" if args.quick else "default"])
    for key in ("steps", "vae_steps", "n_samples", "sampling_steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    return cfg


def _log(info, *parts) -> None:
    if info.is_main:
        print(*parts, flush=True)


def image_demo(args, info, device) -> Optional[dict]:
    from .data import shapes
    from .models import AutoencoderKL, UNetModel
    from .samplers import DDIMSampler
    from .schedules import make_schedule
    from .train import latent_scale, train_denoiser, train_vae

    cfg = _config(IMAGE_CONFIG, args)
    out, progress = Path(args.out), not args.no_progress
    times = {}
    t0 = time.perf_counter()
    data = shapes(cfg["n_data"], IMAGE_SIZE, seed=args.seed, device=device)
    torch.manual_seed(args.seed)
    vae = he_init(AutoencoderKL(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=LATENT_CHANNELS,
                                embed_dim=LATENT_CHANNELS, groups=8))
    unet = UNetModel(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1, attention_levels=(1,), num_heads=4, context_dim=CONTEXT_DIM, groups=8)
    ema = copy.deepcopy(unet)
    times["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _log(info, f"[1/3] VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {cfg['vae_steps']} steps "
               f"of {cfg['vae_batch']} x {info.world_size} images on {device}")
    vae_losses = train_vae(vae, data, steps=cfg["vae_steps"], batch_size=cfg["vae_batch"], lr=cfg["vae_lr"],
                           kl_weight=1e-6, seed=args.seed, checkpoint=out / "ckpt" / "vae.pt",
                           progress=progress, device=device)
    times["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scale = latent_scale(vae, data, seed=args.seed)
    schedule = make_schedule("scaled_linear")
    context = torch.zeros(1, 1, CONTEXT_DIM, device=device)
    _log(info, f"[2/3] U-Net: {sum(p.numel() for p in unet.parameters()):,} parameters, {cfg['steps']} steps of "
               f"{cfg['batch']} x {info.world_size} latents {LATENT_CHANNELS}x8x8 (scale factor {scale:.4g})")
    ldm_losses = train_denoiser(unet, vae, data, steps=cfg["steps"], batch_size=cfg["batch"], lr=cfg["lr"],
                                schedule=schedule, scale_factor=scale, context=context, ema=ema, ema_decay=0.995,
                                seed=args.seed, checkpoint=out / "ckpt" / "unet.pt", progress=progress, device=device)
    times["unet"] = time.perf_counter() - t0
    if not info.is_main:
        return None

    t0 = time.perf_counter()
    sampler = DDIMSampler(schedule, cfg["sampling_steps"])
    _log(info, f"[3/3] sampling {cfg['n_samples']} images, {cfg['sampling_steps']} DDIM steps ({SAMPLER_NAME})")
    latent_hw = IMAGE_SIZE // 4
    with torch.no_grad():
        model_fn = lambda x, t, cond: ema(x, t, context.expand(x.shape[0], -1, -1))  # noqa: E731
        z = sampler.sample(model_fn, (cfg["n_samples"], LATENT_CHANNELS, latent_hw, latent_hw), seed=args.seed,
                           progress=progress, device=device, dtype=torch.float32)
        samples = vae.decode(z / scale).clamp(-1, 1)
        real = shapes(cfg["n_samples"], IMAGE_SIZE, seed=args.seed + 1, device=device)
        recon = vae.decode(vae.encode(real).mode()).clamp(-1, 1)
    times["sampling"] = time.perf_counter() - t0

    cols = cfg["cols"]
    grid = hstack([image_grid(to_uint8(samples), cols, "SAMPLES"), image_grid(to_uint8(real), cols, "DATA"),
                   image_grid(to_uint8(recon), cols, "VAE RECON")], gap=16)
    write_png(out / "samples.png", grid)
    write_png(out / "loss.png", hstack([plot_curve(vae_losses, "VAE LOSS (L1 + KL)"),
                                        plot_curve(ldm_losses, "LDM LOSS (EPS MSE)")]))
    summary = {
        "mode": "image", "quick": args.quick, "device": str(device), "world_size": info.world_size,
        "sampler": SAMPLER_NAME, "config": cfg, "scale_factor": scale, "seconds": times,
        "vae_loss_first_last": [_mean(vae_losses[:10]), _mean(vae_losses[-10:])],
        "ldm_loss_first_last": [_mean(ldm_losses[:10]), _mean(ldm_losses[-10:])],
        "recon_l1": float((recon - real).abs().mean()),
        "samples_png": list(grid.shape[1::-1]), "files": ["samples.png", "loss.png", "summary.json"],
    }
    return summary


def vector_demo(args, info, device) -> Optional[dict]:
    from .data import gaussian_mixture, mixture_basis, mixture_means
    from .models import mlp
    from .samplers import DDIMSampler
    from .train import VectorVAE, latent_scale, train_denoiser, train_vae

    cfg = _config(VECTOR_CONFIG, args)
    out, progress = Path(args.out), not args.no_progress
    times = {}
    data = gaussian_mixture(cfg["n_data"], VECTOR_DIM, components=VECTOR_COMPONENTS, seed=args.seed, device=device)
    torch.manual_seed(args.seed)
    encoder, decoder, denoiser = mlp.build(VECTOR_DIM, latent_size=VECTOR_LATENT, hidden_size=128, num_layers=3)
    vae = VectorVAE(encoder, decoder)

    t0 = time.perf_counter()
    _log(info, f"[1/3] vector VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, R^{VECTOR_DIM} -> "
               f"R^{VECTOR_LATENT}, {cfg['vae_steps']} steps on {device}")
    vae_losses = train_vae(vae, data, steps=cfg["vae_steps"], batch_size=cfg["vae_batch"], lr=cfg["vae_lr"],
                           kl_weight=1e-3, recon="l2", seed=args.seed, checkpoint=out / "ckpt" / "vector_vae.pt",
                           progress=progress, device=device)
    times["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scale = latent_scale(vae, data, seed=args.seed)
    schedule = mlp.make_mlp_schedule(denoiser.num_steps)
    _log(info, f"[2/3] MLP denoiser: {sum(p.numel() for p in denoiser.parameters()):,} parameters, "
               f"{cfg['steps']} steps (scale factor {scale:.4g})")
    ldm_losses = train_denoiser(denoiser, vae, data, steps=cfg["steps"], batch_size=cfg["batch"], lr=cfg["lr"],
                                schedule=schedule, scale_factor=scale, seed=args.seed,
                                checkpoint=out / "ckpt" / "vector_denoiser.pt", progress=progress, device=device)
    times["denoiser"] = time.perf_counter() - t0
    if not info.is_main:
        return None

    t0 = time.perf_counter()
    sampler = DDIMSampler(schedule, cfg["sampling_steps"])
    _log(info, f"[3/3] sampling {cfg['n_samples']} vectors, {cfg['sampling_steps']} DDIM steps ({SAMPLER_NAME})")
    with torch.no_grad():
        z = sampler.sample(lambda x, t, cond: denoiser(x, t), (cfg["n_samples"], VECTOR_LATENT), seed=args.seed,
                           progress=progress, device=device, dtype=torch.float32)
        samples = vae.decode(z / scale).cpu()
    times["sampling"] = time.perf_counter() - t0

    real = gaussian_mixture(cfg["n_samples"], VECTOR_DIM, components=VECTOR_COMPONENTS, seed=args.seed + 1)
    basis = mixture_basis(VECTOR_DIM)
    means = mixture_means(VECTOR_COMPONENTS)
    stats = {name: _mixture_stats(x, basis, means) for name, x in (("data", real), ("samples", samples))}
    limit = 3.2
    plots = [scatter([((real @ basis.T).numpy(), COLOURS[0])], "DATA", limit),
             scatter([((samples @ basis.T).numpy(), COLOURS[1])], "SAMPLES", limit)]
    write_png(out / "scatter.png", hstack(plots, gap=16))
    write_png(out / "loss.png", hstack([plot_curve(vae_losses, "VAE LOSS (L2 + KL)"),
                                        plot_curve(ldm_losses, "LDM LOSS (EPS MSE)")]))
    lines = [f"vector LDM demo: R^{VECTOR_DIM} Gaussian mixture ({len(means)} components on a circle in a 2-plane), "
             f"latent R^{VECTOR_LATENT}, sampler {SAMPLER_NAME}",
             f"VAE loss {_mean(vae_losses[:10]):.4g} -> {_mean(vae_losses[-10:]):.4g}; "
             f"denoiser loss {_mean(ldm_losses[:10]):.4g} -> {_mean(ldm_losses[-10:]):.4g}",
             f"{'':8} {'near a mode':>12} {'off-plane rms':>14}  share per component"]
    for name, s in stats.items():
        shares = " ".join(f"{v:.3f}" for v in s["component_share"])
        lines.append(f"{name:8} {s['near_mode']:12.3f} {s['off_plane_rms']:14.4f}  {shares}")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return {
        "mode": "vector", "quick": args.quick, "device": str(device), "world_size": info.world_size,
        "sampler": SAMPLER_NAME, "config": cfg, "scale_factor": scale, "seconds": times,
        "vae_loss_first_last": [_mean(vae_losses[:10]), _mean(vae_losses[-10:])],
        "ldm_loss_first_last": [_mean(ldm_losses[:10]), _mean(ldm_losses[-10:])],
        "stats": stats, "scatter_png": [2 * 300 + 16, 300 + 24],
        "files": ["scatter.png", "loss.png", "summary.txt", "summary.json"],
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _mixture_stats(x: torch.Tensor, basis: torch.Tensor, means: torch.Tensor, std: float = 0.15) -> dict:
    """How mixture-like vectors ``[n, dim]`` are: the share within 3 std of a component mean in the
    plane, the rms distance off the plane, and the share nearest each component."""
    plane = x.float() @ basis.T  # [n, 2]
    off = x.float() - plane @ basis  # [n, dim]
    dist = torch.cdist(plane, means)  # [n, K]
    nearest = dist.min(1)
    share = torch.bincount(nearest.indices, minlength=len(means)).float() / len(x)
    return {"near_mode": float((nearest.values < 3 * std).float().mean()),
            "off_plane_rms": float(off.square().sum(1).mean().sqrt()), "component_share": share.tolist()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_fast",
                                     description="Train a small latent diffusion model from scratch and draw samples.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small LDM on procedural data, write samples.png and loss.png")
    demo.add_argument("--out", default="ldm_fast_demo", help="output folder (default: ./ldm_fast_demo)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes, for tests (seconds, not minutes)")
    demo.add_argument("--vector", action="store_true", help="the vector (MLP) LDM on a Gaussian mixture in R^16")
    demo.add_argument("--steps", type=int, help="denoiser training steps (default: 900 images, 3000 vector)")
    demo.add_argument("--vae-steps", type=int, help="VAE training steps (default: 900 images, 1500 vector)")
    demo.add_argument("--samples", dest="n_samples", type=int, help="how many samples to draw")
    demo.add_argument("--sampling-steps", type=int, help="DDIM steps (default: 25 images, 50 vector)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on 2 cores that other "
                      "jobs share, 1 is up to 3x faster than 2")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars or per-step lines")
    args = parser.parse_args(argv)

    from .train import default_device, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed()
    device = torch.device(args.device) if args.device else default_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        summary = (vector_demo if args.vector else image_demo)(args, info, device)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary is not None:
        summary["seconds"]["total"] = time.perf_counter() - start
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"done in {summary['seconds']['total']:.1f} s: " + ", ".join(str(out / f) for f in summary["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
