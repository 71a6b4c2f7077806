"""LatentDiffusion: the deep-ml numpy API, torch encoders of every accepted form, diffusers' VAE, the training loss."""

import numpy as np
import pytest
import torch

import ldm_fast
from ldm_fast import LatentDiffusion, make_schedule


def _numpy_vae():
    w = np.random.RandomState(0).randn(4, 3)

    def encoder_fn(x):  # (B, 3, H, W) -> mu, log_var (B, 4, H/8, W/8)
        h = np.einsum("oc,bchw->bohw", w, x[:, :, ::8, ::8])
        return h, 0.1 * h - 1.0

    return encoder_fn, lambda z: 2.0 * z


def test_deep_ml_numpy_api_is_unchanged():
    encoder_fn, decoder_fn = _numpy_vae()
    ldm = LatentDiffusion(encoder_fn, decoder_fn, scale_factor=0.18215)
    x = np.random.RandomState(1).randn(2, 3, 16, 16)

    np.random.seed(42)
    z = ldm.encode(x)
    np.random.seed(42)
    mu, log_var = encoder_fn(x)
    expected = (mu + np.exp(0.5 * log_var) * np.random.randn(*mu.shape)) * 0.18215
    assert isinstance(z, np.ndarray) and z.shape == (2, 4, 2, 2)
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-12)

    np.testing.assert_allclose(ldm.decode(z), decoder_fn(z / 0.18215), rtol=1e-12)

    alpha_bars = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.random.seed(7)
    z_t, noise = ldm.forward_diffusion(z, 10, alpha_bars)
    np.random.seed(7)
    expected_noise = np.random.randn(*z.shape)
    np.testing.assert_allclose(noise, expected_noise)
    np.testing.assert_allclose(z_t, np.sqrt(alpha_bars[10]) * z + np.sqrt(1 - alpha_bars[10]) * expected_noise, rtol=1e-12)


def test_numpy_forward_diffusion_default_schedule_and_tiny_logvar():
    ldm = LatentDiffusion(lambda x: (x, np.full_like(x, -1e4)), lambda z: z)
    x = np.ones((1, 4, 2, 2))
    # log_var clamped at -30: std = exp(-15) = 3e-7, so the sample is the mean to 1e-5
    np.testing.assert_allclose(ldm.encode(x), 0.18215 * x, atol=1e-5)
    z_t, _ = ldm.forward_diffusion(x, 0)
    assert z_t.shape == x.shape


@pytest.mark.parametrize("form", ["tuple", "dict", "moments"])
def test_torch_encoder_forms_and_triton_path(form, triton_backend):
    moments = torch.randn(2, 8, 4, 4)
    mean, logvar = moments.chunk(2, dim=1)
    encoder_fn = {
        "tuple": lambda x: (mean, logvar),
        "dict": lambda x: {"mu": mean, "log_var": logvar},
        "moments": lambda x: moments,
    }[form]
    ldm = LatentDiffusion(encoder_fn, lambda z: z, scale_factor=0.5, shift_factor=0.25)
    noise = torch.randn(2, 4, 4, 4)
    z = ldm.encode(None, noise=noise)
    assert triton_backend("reparameterize")
    expected = (mean + torch.exp(0.5 * logvar) * noise - 0.25) * 0.5
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(ldm.encode(None, sample=False), (mean - 0.25) * 0.5)
    torch.testing.assert_close(ldm.decode(z), z / 0.5 + 0.25)


def test_diffusers_autoencoder_kl_round_trip(triton_backend):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                        norm_num_groups=4).eval()
    ldm = LatentDiffusion(vae.encode, lambda z: vae.decode(z).sample, scale_factor=vae.config.scaling_factor)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(1)) * vae.config.scaling_factor
        noise = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
        z = ldm.encode(x, noise=noise)
        assert triton_backend("reparameterize")
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
        assert ldm.decode(z).shape == x.shape


def test_forward_diffusion_int_and_per_row_t(triton_backend):
    ldm = LatentDiffusion(lambda x: x, lambda z: z)
    z = torch.randn(3, 4, 5, 5)
    noise = torch.randn_like(z)
    abar = ldm.alphas_cumprod
    z_t, n = ldm.forward_diffusion(z, 500, noise=noise)
    torch.testing.assert_close(z_t, abar[500].sqrt() * z + (1 - abar[500]).sqrt() * noise)
    t = torch.tensor([0, 10, 999])
    z_t, _ = ldm.forward_diffusion(z, t, noise=noise)
    a = abar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(z_t, a.sqrt() * z + (1 - a).sqrt() * noise)
    assert triton_backend("q_sample") and n is noise


class _Denoiser(torch.nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.net = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.t_embed = torch.nn.Embedding(1000, channels)

    def forward(self, z_t, t, cond=None):
        h = self.net(z_t) + self.t_embed(t)[:, :, None, None]
        return h if cond is None else h + cond


@pytest.mark.parametrize("target", ["eps", "v"])
def test_training_loss_trains_the_denoiser_only(target, triton_backend):
    torch.manual_seed(0)
    encoder = torch.nn.Conv2d(3, 8, 4, stride=4)  # moments [B, 8, H/4, W/4]
    denoiser = _Denoiser()
    ldm = LatentDiffusion(encoder, lambda z: z, schedule=make_schedule("linear", 100), denoiser=denoiser)
    x = torch.randn(2, 3, 16, 16)
    loss = ldm.training_loss(x, target=target, noise_offset=0.05, seed=3)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert triton_backend("reparameterize") and triton_backend("q_sample")
    assert denoiser.net.weight.grad is not None and denoiser.net.weight.grad.abs().sum() > 0
    assert encoder.weight.grad is None  # the encoder is frozen
    # the same seed and t give the same loss
    t = torch.tensor([3, 50])
    assert ldm.training_loss(x, t, seed=9).item() == ldm.training_loss(x, t, seed=9).item()
    assert ldm.training_loss(x, 5, cond=torch.zeros(1), seed=9).item() > 0


def test_training_loss_needs_a_denoiser():
    ldm = LatentDiffusion(lambda x: x, lambda z: z)
    with pytest.raises(ValueError, match="needs a denoiser"):
        ldm.training_loss(torch.zeros(1, 8, 2, 2))


def test_bad_encoder_output_is_named():
    ldm = LatentDiffusion(lambda x: (x, x, x), lambda z: z)
    with pytest.raises(TypeError, match=r"encoder_fn must return \(mean, logvar\)"):
        ldm.encode(torch.zeros(1, 2))


def test_is_a_module_whose_state_dict_holds_only_the_models():
    encoder = torch.nn.Conv2d(3, 8, 1)
    ldm = LatentDiffusion(encoder, torch.nn.Identity())
    assert set(ldm.state_dict()) == {"encoder_fn.weight", "encoder_fn.bias"}
    assert ldm.to(torch.float64).alphas_cumprod.dtype == torch.float64
