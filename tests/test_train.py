"""ldm_fast.data and ldm_fast.train: the procedural data, losses that fall, atomic checkpoints with exact
resume, and DistributedDataParallel over 2 processes (gloo, CPU) against a single process.

Run as a script (``torchrun ... tests/test_train.py --ddp-worker OUT``) it is the DDP test's worker.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_fast import data, train
from ldm_fast.models import AutoencoderKL, UNetModel, mlp

VAE_TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, groups=4)  # 16x16 -> 4x8x8
UNET_TINY = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), num_heads=2, context_dim=8, groups=4)
QUIET = dict(progress=False, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: under ``pytest -n 2`` on 2 cores, two workers with 2 OpenMP threads
    each spin against each other and these tests run about 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_TINY)


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNetModel(**UNET_TINY)


def _vector(seed=0):
    torch.manual_seed(seed)
    encoder, decoder, denoiser = mlp.build(8, latent_size=2, hidden_size=32, num_layers=1, num_steps=100)
    return train.VectorVAE(encoder, decoder), denoiser


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# data


def test_shapes_are_deterministic_images_in_range():
    x, kinds = data.shapes(64, 16, seed=3, return_labels=True)
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, data.shapes(64, 16, seed=3))
    assert not torch.equal(x, data.shapes(64, 16, seed=4))
    assert set(kinds.tolist()) == {0, 1, 2}
    # every image shows two colours at least 0.5 apart (L1 over RGB): background and shape
    flat = x.flatten(2)  # [n, 3, pixels]
    spread = (flat.amax(2) - flat.amin(2)).sum(1) / 2  # in [0, 1] colour units
    assert spread.min() >= 0.5 - 1e-6


def test_gaussian_mixture_lies_near_its_plane():
    x, labels = data.gaussian_mixture(2000, 12, seed=1, return_labels=True)
    basis = data.mixture_basis(12)
    assert x.shape == (2000, 12) and basis.shape == (2, 12)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), rtol=0, atol=1e-6)
    plane = x @ basis.T
    off = (x - plane @ basis).square().sum(1).mean().sqrt()
    assert off < 0.05 * 12**0.5 * 1.2  # only the isotropic noise leaves the plane
    # each point lies near its own component's mean
    dist = (plane - data.mixture_means()[labels]).norm(dim=1)
    assert dist.median() < 0.3
    assert torch.equal(x, data.gaussian_mixture(2000, 12, seed=1))


# ---------------------------------------------------------------------------------------------
# losses fall


def test_vae_loss_falls():
    images = data.shapes(256, 16, seed=0)
    losses = train.train_vae(_vae(), images, steps=100, batch_size=8, lr=2e-3, **QUIET)
    assert len(losses) == 100 and torch.isfinite(torch.tensor(losses)).all()
    assert _mean(losses[-10:]) < 0.8 * _mean(losses[:10])  # measured: 0.53 -> 0.38


def test_denoiser_loss_falls_with_a_frozen_vae():
    images = data.shapes(256, 16, seed=0)
    vae = _vae()
    before = copy.deepcopy(vae.state_dict())
    unet = _unet()
    losses = train.train_denoiser(unet, vae, images, steps=40, batch_size=8, lr=2e-3, scale_factor=1.0,
                                  context=torch.zeros(1, 1, 8), **QUIET)
    assert len(losses) == 40
    assert _mean(losses[-8:]) < 0.75 * _mean(losses[:8])  # measured: 0.95 -> 0.60
    assert _state_equal(vae.state_dict(), before)  # frozen
    assert not any(p.requires_grad for p in vae.parameters())


def test_vector_ldm_trains_with_both_stages():
    x = data.gaussian_mixture(512, 8, seed=0)
    vae, denoiser = _vector()
    vae_losses = train.train_vae(vae, x, steps=60, batch_size=32, lr=3e-3, kl_weight=1e-3, recon="l2", **QUIET)
    assert _mean(vae_losses[-10:]) < 0.5 * _mean(vae_losses[:10])
    scale = train.latent_scale(vae, x)
    losses = train.train_denoiser(denoiser, vae, x, steps=150, batch_size=32, lr=3e-3, scale_factor=scale,
                                  schedule=mlp.make_mlp_schedule(100), cache_latents=False, **QUIET)
    assert _mean(losses[-20:]) < 0.8 * _mean(losses[:10])  # measured: 1.07 -> 0.69


def test_bad_arguments_are_named():
    x = data.shapes(8, 16)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.train_vae(_vae(), x, steps=1, batch_size=16, **QUIET)
    with pytest.raises(ValueError, match="recon must be"):
        train.train_vae(_vae(), x, steps=1, batch_size=4, recon="l3", **QUIET)
    with pytest.raises(ValueError, match="steps must be"):
        train.train_vae(_vae(), x, steps=-1, batch_size=4, **QUIET)


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_resume_is_exact_for_the_vae(tmp_path):
    images = data.shapes(64, 16, seed=0)
    kw = dict(batch_size=8, lr=2e-3, seed=5, checkpoint_every=3, **QUIET)
    vae_once = _vae()
    losses_once = train.train_vae(vae_once, images, steps=10, checkpoint=tmp_path / "once.pt", **kw)

    vae_a = _vae()
    first = train.train_vae(vae_a, images, steps=5, checkpoint=tmp_path / "split.pt", **kw)
    vae_b = _vae(seed=123)  # a fresh process would build different weights: the checkpoint must win
    losses = train.train_vae(vae_b, images, steps=10, checkpoint=tmp_path / "split.pt", **kw)
    assert losses[:5] == first and losses == losses_once
    assert _state_equal(vae_b.state_dict(), vae_once.state_dict())
    once, split = train.load_checkpoint(tmp_path / "once.pt"), train.load_checkpoint(tmp_path / "split.pt")
    assert once["step"] == split["step"] == 10
    assert torch.equal(once["rng"][0]["cpu"], split["rng"][0]["cpu"])
    for a, b in zip(once["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_for_the_denoiser_with_ema_and_dropout(tmp_path):
    # dropout draws from torch's global generator: its saved RNG state must be restored as well
    images = data.shapes(64, 16, seed=0)
    vae = _vae()
    kw = dict(batch_size=8, lr=2e-3, seed=9, scale_factor=0.7, context=torch.zeros(1, 1, 8), ema_decay=0.9,
              checkpoint_every=2, **QUIET)

    def run(steps, path, weights_seed=0):
        torch.manual_seed(weights_seed)
        unet = UNetModel(**UNET_TINY, dropout=0.1)
        ema = copy.deepcopy(unet)
        losses = train.train_denoiser(unet, vae, images, steps=steps, ema=ema, checkpoint=path, **kw)
        return unet, ema, losses

    unet_once, ema_once, losses_once = run(8, tmp_path / "once.pt")
    torch.manual_seed(1000)  # a different global RNG state before the second half
    run(4, tmp_path / "split.pt")
    torch.manual_seed(2000)
    unet, ema, losses = run(8, tmp_path / "split.pt", weights_seed=77)
    assert losses == losses_once
    assert _state_equal(unet.state_dict(), unet_once.state_dict())
    assert _state_equal(ema.state_dict(), ema_once.state_dict())
    assert not _state_equal(ema.state_dict(), unet.state_dict())


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "vae.pt"
    train.save_checkpoint(path, {"step": 1, "payload": torch.arange(4)})
    good = path.read_bytes()

    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # a torn write ...
        raise OSError("disk full")  # ... and the writer dies

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(path, {"step": 2, "payload": torch.arange(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == good  # the previous checkpoint, intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae.pt"]  # no temporary file left behind
    assert train.load_checkpoint(path)["step"] == 1
    assert train.load_checkpoint(tmp_path / "missing.pt") is None


def test_a_checkpoint_of_the_other_stage_is_refused(tmp_path):
    images = data.shapes(32, 16, seed=0)
    path = tmp_path / "ckpt.pt"
    train.train_vae(_vae(), images, steps=1, batch_size=8, checkpoint=path, **QUIET)
    with pytest.raises(ValueError, match="not a denoiser checkpoint"):
        train.train_denoiser(_unet(), _vae(), images, steps=2, batch_size=8, context=torch.zeros(1, 1, 8),
                             checkpoint=path, **QUIET)


class _Payload:
    """Unpickling this runs ``marker.touch()``: what a crafted checkpoint could do on resume."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _vector_checkpoint(path, steps=2, ema=False, **kw):
    """A short vector-LDM denoiser run writing ``path``; returns its losses."""
    x = data.gaussian_mixture(64, 8, seed=0)
    vae, denoiser = _vector()
    args = dict(batch_size=8, lr=1e-3, seed=0, schedule=mlp.make_mlp_schedule(100), checkpoint=path, **QUIET)
    args.update(kw)
    return train.train_denoiser(denoiser, vae, x, steps=steps, ema=copy.deepcopy(denoiser) if ema else None, **args)


def test_resuming_an_ema_checkpoint_without_ema_is_refused(tmp_path):
    """#17.9: with ema=None the run used to resume and its next checkpoint dropped the EMA weights."""
    path = tmp_path / "ema.pt"
    _vector_checkpoint(path, ema=True)
    with pytest.raises(ValueError, match="ema=None, but .*ema.pt holds EMA weights"):
        _vector_checkpoint(path, steps=4, ema=False)
    assert "ema" in train.load_checkpoint(path) and train.load_checkpoint(path)["step"] == 2  # left as it was
    _vector_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="ema is given, but .*plain.pt holds no EMA weights"):
        _vector_checkpoint(tmp_path / "plain.pt", steps=4, ema=True)


@pytest.mark.parametrize("name, value", [("seed", 1), ("batch_size", 16)])
def test_resuming_with_another_seed_or_batch_size_is_refused_by_name(tmp_path, name, value):
    """#17.9: another seed or batch size used to resume silently, and not exactly."""
    path = tmp_path / "ckpt.pt"
    _vector_checkpoint(path)
    state = train.load_checkpoint(path)
    assert (state["seed"], state["batch_size"], state["world_size"]) == (0, 8, 1)  # recorded
    with pytest.raises(ValueError, match=f"{name}={value}, but .* was trained with {name}="):
        _vector_checkpoint(path, steps=4, **{name: value})
    assert len(_vector_checkpoint(path, steps=4)) == 4  # the recorded settings resume


def test_resuming_on_another_world_size_warns(tmp_path):
    path = tmp_path / "ckpt.pt"
    _vector_checkpoint(path)
    state = train.load_checkpoint(path)
    train.save_checkpoint(path, {**state, "world_size": 2})
    with pytest.warns(RuntimeWarning, match="world_size=1, but .* written by 2 ranks"):
        _vector_checkpoint(path, steps=3)


def test_a_pickled_payload_in_a_checkpoint_is_refused_not_run(tmp_path):
    """#17.10: checkpoints are read with weights_only=True; every field the trainer writes loads that way."""
    marker, path = tmp_path / "payload-ran", tmp_path / "crafted.pt"
    torch.save({"format": train.CHECKPOINT_FORMAT, "kind": "denoiser", "model": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="crafted.pt holds objects other than tensors.*weights_only=True"):
        _vector_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what the old loader did: the payload runs
    assert marker.exists()


@pytest.mark.parametrize("keep", [0, 0.5, 20], ids=["empty", "half", "20-bytes"])
def test_an_empty_or_truncated_checkpoint_names_the_file(tmp_path, keep):
    """#17.11: these gave a bare EOFError / RuntimeError without the file's name."""
    path = tmp_path / "torn.pt"
    _vector_checkpoint(path)
    blob = path.read_bytes()
    path.write_bytes(blob[:int(keep * len(blob)) if isinstance(keep, float) else keep])
    what = "is empty" if keep == 0 else "is truncated or not a torch.save file"
    with pytest.raises(ValueError, match=f"checkpoint .*torn.pt .*{what}"):
        train.load_checkpoint(path)
    with pytest.raises(ValueError, match="torn.pt"):
        _vector_checkpoint(path, steps=3)


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes, gloo, against one process with the doubled batch

DDP_STEPS, DDP_BATCH = 6, 4


def _ddp_vae_run(images, batch_size, checkpoint=None):
    vae = _vae()
    losses = train.train_vae(vae, images, steps=DDP_STEPS, batch_size=batch_size, lr=2e-3, seed=3,
                             sample_posterior=False, checkpoint=checkpoint, checkpoint_every=DDP_STEPS, **QUIET)
    return vae, losses


def _ddp_worker(out: Path) -> None:
    """One rank of the DDP test (launched by torchrun): train, then save this rank's results."""
    info = train.init_distributed()
    images = data.shapes(64, 16, seed=0)
    vae, vae_losses = _ddp_vae_run(images, DDP_BATCH, checkpoint=out / "vae.pt")
    unet = _unet()
    unet_losses = train.train_denoiser(unet, vae, images, steps=12, batch_size=DDP_BATCH, lr=3e-3, seed=4,
                                       context=torch.zeros(1, 1, 8), **QUIET)
    torch.save({"vae": vae.state_dict(), "unet": unet.state_dict(), "vae_losses": vae_losses,
                "unet_losses": unet_losses, "info": info}, out / f"rank{info.rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--ddp-worker", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["info"] for r in ranks] == [train.DistInfo(0, 2, 0), train.DistInfo(1, 2, 1)]
    # the ranks end with the same weights and report the same (all-reduced) losses
    for key in ("vae", "unet"):
        assert _state_equal(ranks[0][key], ranks[1][key])
    assert ranks[0]["vae_losses"] == ranks[1]["vae_losses"]
    # only rank 0 wrote the checkpoint, with both ranks' RNG states
    ckpt = train.load_checkpoint(tmp_path / "vae.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == DDP_STEPS
    assert _state_equal(ckpt["model"], ranks[0]["vae"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.pt", "rank1.pt", "vae.pt"]
    # = one process with batch 2 x DDP_BATCH (deterministic posterior: the same rows, the same maths)
    images = data.shapes(64, 16, seed=0)
    single, single_losses = _ddp_vae_run(images, 2 * DDP_BATCH)
    torch.testing.assert_close(torch.tensor(ranks[0]["vae_losses"]), torch.tensor(single_losses), rtol=1e-5,
                               atol=1e-6)
    # Weights agree to rounding, amplified by Adam where a gradient is near zero; the attention key
    # biases get exactly zero gradient (softmax ignores a shift shared by all keys), so Adam turns
    # pure rounding noise into lr-sized steps there: those are compared through the outputs only.
    for name, value in single.state_dict().items():
        if not name.endswith("attn_1.k.bias"):
            torch.testing.assert_close(ranks[0]["vae"][name], value, rtol=1e-3, atol=1e-4, msg=name)
    ddp = _vae()
    ddp.load_state_dict(ranks[0]["vae"])
    with torch.no_grad():
        torch.testing.assert_close(ddp(images[:8], sample_posterior=False)[0],
                                   single(images[:8], sample_posterior=False)[0], rtol=1e-3, atol=1e-4)
    # the denoiser learned across the ranks
    unet_losses = ranks[0]["unet_losses"]
    assert _mean(unet_losses[-3:]) < 0.8 * _mean(unet_losses[:3])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--ddp-worker":
    _ddp_worker(Path(sys.argv[2]))
