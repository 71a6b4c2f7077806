"""``python -m ldm_fast demo``: the quick image and vector demos end to end in a subprocess, their PNGs
checked by an independent reader (signature, chunk CRCs, IHDR, the decompressed scanlines), and the
PNG encoder, text and plots on their own."""

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_fast import __main__ as demo

pytestmark = pytest.mark.slow  # the demo's training runs

ROOT = Path(__file__).parents[1]


def read_png(path) -> np.ndarray:
    """Decode an 8-bit RGB or grey, non-interlaced PNG with filter 0 rows (what write_png writes), checking
    every CRC; returns uint8 [H, W, 3] or [H, W]."""
    blob = Path(path).read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        tag, body = blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == crc, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    assert pos == len(blob) and chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filtering, interlace) == (8, 0, 0, 0) and colour in (0, 2)
    channels = 3 if colour == 2 else 1
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape((height, width, channels) if channels == 3 else (height, width))


def _run_demo(out: Path, *flags: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # one thread: under pytest -n 2 on 2 cores, 2 OpenMP threads per process spin against the other worker
    cmd = [sys.executable, "-m", "ldm_fast", "demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1",
           *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done in" in proc.stdout
    return json.loads((out / "summary.json").read_text())


def _grid_size(n: int, cols: int, side: int = 32, scale: int = 2, pad: int = 2) -> tuple:
    """(height, width) of demo.image_grid, by its documented formula."""
    rows = math.ceil(n / cols)
    return 20 + rows * (side * scale + pad) + pad, cols * (side * scale + pad) + pad


def test_quick_image_demo_writes_its_pictures(tmp_path):
    out = tmp_path / "tmp"
    summary = _run_demo(out)
    cfg = demo.IMAGE_CONFIG["quick"]
    # samples | data | reconstructions, 16 gaps between the three grids
    grid_h, grid_w = _grid_size(cfg["n_samples"], cfg["cols"])
    samples = read_png(out / "samples.png")
    assert samples.shape == (grid_h, 3 * grid_w + 2 * 16, 3)
    # every grid cell was painted (no white cell: no background colour of the data is pure white)
    assert samples.std() > 10
    loss = read_png(out / "loss.png")
    assert loss.shape == (260, 2 * 400 + 8, 3)
    assert (loss != 255).any(axis=2).sum() > 2000  # axes, curves and labels drawn
    assert summary["sampler"] == "ldm_fast.samplers.DDIMSampler"
    assert summary["config"]["vae_steps"] == cfg["vae_steps"] and summary["config"]["steps"] == cfg["steps"]
    assert all(math.isfinite(v) for v in summary["vae_loss_first_last"] + summary["ldm_loss_first_last"])
    assert (out / "ckpt" / "vae.pt").exists() and (out / "ckpt" / "unet.pt").exists()


def test_quick_vector_demo_writes_its_pictures(tmp_path):
    out = tmp_path / "tmp"
    summary = _run_demo(out, "--vector")
    assert read_png(out / "scatter.png").shape == (300 + 24, 2 * 300 + 16, 3)
    assert read_png(out / "loss.png").shape == (260, 2 * 400 + 8, 3)
    text = (out / "summary.txt").read_text()
    assert "near a mode" in text and "samples" in text
    assert 0.0 <= summary["stats"]["samples"]["near_mode"] <= 1.0
    assert abs(sum(summary["stats"]["samples"]["component_share"]) - 1.0) < 1e-5


def test_png_round_trip_rgb_and_grey(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (4, 9), dtype=np.uint8)
    demo.write_png(tmp_path / "rgb.png", rgb)
    demo.write_png(tmp_path / "grey.png", torch.from_numpy(grey))
    assert np.array_equal(read_png(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_png(tmp_path / "grey.png"), grey)


def test_plots_take_awkward_values():
    for values in ([], [1.0], [2.0] * 50, [float("nan"), 1.0, 0.5], list(np.geomspace(100, 0.01, 300))):
        image = demo.plot_curve(values, "LOSS")
        assert image.shape == (260, 400, 3) and image.dtype == np.uint8
    demo.draw_text(np.zeros((5, 5, 3), np.uint8), 3, 3, "CLIPPED AT THE EDGE")  # must not raise
    grid = demo.image_grid(np.zeros((5, 32, 32, 3), np.uint8), 4, "T")
    assert grid.shape == (*_grid_size(5, 4), 3)
