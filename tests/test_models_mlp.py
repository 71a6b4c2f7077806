"""The Edifice vector LDM (ldm_fast.models.mlp): structure, exact parameter count, the math, a short training run."""

import math

import pytest
import torch

from ldm_fast.models import mlp


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# structure


def test_shapes_at_the_defaults():
    encoder, decoder, denoiser = mlp.build(**mlp.recommended_defaults())
    x = torch.randn(3, 287)
    mu, log_var = encoder(x)
    assert mu.shape == log_var.shape == (3, 32)
    assert decoder(mu).shape == (3, 287)
    eps_hat = denoiser(mu, torch.tensor([0, 500, 999]))
    assert eps_hat.shape == (3, 32) and eps_hat.dtype == torch.float32


@pytest.mark.parametrize(
    "t",
    [torch.tensor([0, 7, 999]), torch.tensor([0, 7, 999], dtype=torch.int32), torch.tensor([0.0, 7.0, 999.0])],
    ids=["int64", "int32", "float32"],
)
def test_denoiser_takes_any_real_t_dtype(t):
    torch.manual_seed(0)
    *_, denoiser = mlp.build(6, latent_size=4, hidden_size=8, num_layers=2)
    z = torch.randn(3, 4)
    expected = denoiser(z, torch.tensor([0, 7, 999]))
    torch.testing.assert_close(denoiser(z, t), expected, rtol=0, atol=0)


def test_denoiser_broadcasts_a_scalar_t_and_runs_in_bf16():
    torch.manual_seed(0)
    *_, denoiser = mlp.build(6, latent_size=4, hidden_size=8, num_layers=1)
    z = torch.randn(3, 4)
    rows = denoiser(z, torch.full((3,), 42))
    torch.testing.assert_close(denoiser(z, 42), rows, rtol=0, atol=0)
    torch.testing.assert_close(denoiser(z, torch.tensor(42)), rows, rtol=0, atol=0)
    out = denoiser.to(torch.bfloat16)(z.bfloat16(), torch.tensor([1, 2, 3]))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4)


@pytest.mark.parametrize(
    "t, error, match",
    [
        (torch.tensor([1, 2]), ValueError, r"shape \[3\]"),
        (torch.zeros(3, 1, dtype=torch.long), ValueError, r"shape \[3\]"),
        (torch.tensor([True, False, True]), TypeError, "integer or real"),
        ("5", TypeError, "tensor or a number"),
    ],
    ids=["wrong-batch", "2-d", "bool", "str"],
)
def test_denoiser_rejects_bad_t(t, error, match):
    *_, denoiser = mlp.build(6, latent_size=4, hidden_size=8, num_layers=1)
    with pytest.raises(error, match=match):
        denoiser(torch.randn(3, 4), t)


def test_layer_names_follow_edifice():
    encoder, decoder, denoiser = mlp.build(10, latent_size=4, hidden_size=8, num_layers=2)
    names = lambda m: {k.rsplit(".", 1)[0] for k in m.state_dict()}  # noqa: E731
    assert names(encoder) == {"enc_dense_0", "enc_dense_1", "enc_mu", "enc_log_var"}
    assert names(decoder) == {"dec_dense_0", "dec_dense_1", "dec_output"}
    assert names(denoiser) == {"time_mlp_1", "z_proj", "noise_pred"} | {
        f"denoiser_block_{i}.{part}" for i in (1, 2) for part in ("norm", "up", "down")
    }
    assert [type(m) for m in denoiser.denoiser_block_1.children()] == [
        torch.nn.LayerNorm, torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear
    ]
    assert denoiser.denoiser_block_1.up.out_features == 32 and denoiser.denoiser_block_1.norm.eps == 1e-5
    # Axon's dense initialisation: zero biases
    assert all(p.abs().sum() == 0 for k, p in denoiser.named_parameters() if k.endswith("bias") and "norm" not in k)


@pytest.mark.parametrize(
    "config",
    [
        dict(input_size=287),  # Edifice's recommended defaults
        dict(input_size=10, latent_size=4, hidden_size=8, num_layers=1),
        dict(input_size=5, latent_size=3, hidden_size=7, num_layers=3),  # odd hidden: embedding width 6
        dict(input_size=1, latent_size=1, hidden_size=2, num_layers=2),  # smallest: half = 1
    ],
    ids=["defaults-287", "small", "odd-hidden", "minimal"],
)
def test_param_count_is_exact(config):
    modules = mlp.build(**config)
    assert mlp.param_count(**config) == sum(_numel(m) for m in modules)


def test_param_count_at_the_defaults_decomposes():
    encoder, decoder, denoiser = mlp.build(287)
    assert (_numel(encoder), _numel(decoder), _numel(denoiser)) == (155_968, 147_999, 2_186_784)
    assert mlp.param_count(287) == mlp.param_count(**mlp.recommended_defaults()) == 2_490_751


def test_defaults_and_output_size():
    assert mlp.recommended_defaults() == dict(input_size=287, latent_size=32, hidden_size=256, num_layers=4,
                                              num_steps=1000)
    assert mlp.output_size() == 32 and mlp.output_size(64) == 64


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(input_size=0), ValueError), (dict(input_size=4, hidden_size=1), ValueError),
     (dict(input_size=4.0), TypeError), (dict(input_size=4, num_layers=0), ValueError)],
    ids=["input-0", "hidden-1", "float-size", "no-layers"],
)
def test_build_rejects_bad_sizes(kwargs, error):
    with pytest.raises(error):
        mlp.build(**kwargs)


# ---------------------------------------------------------------------------------------------
# math


def test_kl_divergence_matches_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    per_row = [
        sum(0.5 * (m * m + math.exp(lv) - 1.0 - lv) for m, lv in zip(mu[b].tolist(), log_var[b].tolist()))
        for b in range(4)
    ]
    kl = mlp.kl_divergence(mu, log_var)
    assert kl.shape == () and kl.item() == pytest.approx(sum(per_row) / 4, rel=1e-6)
    assert mlp.kl_divergence(torch.zeros(3, 5), torch.zeros(3, 5)).abs().item() < 1e-7
    half = mlp.kl_divergence(mu.half(), log_var.half())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(kl.item(), rel=2e-3)


@pytest.mark.parametrize("dim", [8, 7, 2], ids=["even", "odd", "half-1"])
def test_timestep_embedding_is_parameter_free_and_matches_the_formula(dim):
    embed = mlp.TimestepEmbedding(dim, num_steps=1000)
    assert list(embed.parameters()) == [] and list(embed.buffers()) == []
    t = torch.tensor([0, 1, 250, 999])
    half = dim // 2
    expected = [
        [math.sin(v / 1000 * math.exp(-math.log(10000) * i / max(half - 1, 1))) for i in range(half)]
        + [math.cos(v / 1000 * math.exp(-math.log(10000) * i / max(half - 1, 1))) for i in range(half)]
        for v in t.tolist()
    ]
    got = embed(t)
    assert got.dtype == torch.float32 and got.shape == (4, 2 * half)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    # the denoiser's own embedding is this module, and the denoiser holds no other embedding weights
    *_, denoiser = mlp.build(3, latent_size=2, hidden_size=dim, num_layers=1)
    assert list(denoiser.time_embed.parameters()) == []
    torch.testing.assert_close(denoiser.time_embed(t), got, rtol=0, atol=0)


def test_sample_latent_with_a_seed_is_reproducible():
    g = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    a, b = mlp.sample_latent(mu, log_var, seed=5), mlp.sample_latent(mu, log_var, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, mlp.sample_latent(mu, log_var, seed=6))
    eps = (a - mu) / torch.exp(0.5 * log_var)  # the noise it drew, recovered
    torch.testing.assert_close(mlp.sample_latent(mu, log_var, noise=eps), a)
    # Edifice's check: a tiny variance returns the mean
    near = mlp.sample_latent(torch.full((64, 8), 5.0), torch.full((64, 8), -20.0), seed=1)
    assert (near - 5.0).abs().max().item() < 1e-3


def test_sample_latent_with_a_seed_is_reproducible_on_the_kernel(triton_backend):
    g = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    a, b = mlp.sample_latent(mu, log_var, seed=5), mlp.sample_latent(mu, log_var, seed=5)
    assert triton_backend("reparameterize")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, mlp.sample_latent(mu, log_var, seed=6))


def test_make_mlp_schedule_is_edifices_linear_schedule():
    s = mlp.make_mlp_schedule()
    assert not hasattr(mlp, "make_schedule") and not hasattr(mlp, "reparameterize")  # no shadows of the public API
    assert s.kind == "linear" and s.num_steps == 1000 and s.alphas_cumprod.dtype == torch.float32
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6) and s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    # Edifice: abar = exp(cumsum(log(1 - betas + 1e-10))) in float32
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    edifice = torch.exp(torch.cumsum(torch.log(1 - betas + 1e-10), dim=0))
    assert (s.alphas_cumprod - edifice).abs().max().item() < 3e-7
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert mlp.make_mlp_schedule(50, beta_start=0.001, beta_end=0.05).alphas_cumprod[0].item() > 0.99


# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture
def one_thread():
    """One intra-op thread: these small matmuls run ~10x faster than with 2 threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_the_vector_ldm_trains(one_thread):
    """VAE (recon + KL), then the denoiser on the frozen VAE's latents: both losses fall well below their start.

    Seeded, so deterministic; measured margins: VAE loss 0.54-0.59 of its start and 0.64-0.66 of the
    data variance, denoiser MSE 0.34-0.36 from a start of 2.3-2.8 (seeds 0-3).
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, dim = 256, 24
    # 4-dimensional structure in 24 features, plus a little noise
    x = torch.tanh(torch.randn(n, 4, generator=g) @ torch.randn(4, dim, generator=g) / 2)
    x = x + 0.05 * torch.randn(n, dim, generator=g)
    encoder, decoder, denoiser = mlp.build(dim, latent_size=8, hidden_size=32, num_layers=2)

    def vae_eval():
        with torch.no_grad():
            return mlp.vae_loss(encoder, decoder, x, seed=123).item()

    vae_start = vae_eval()
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    for _ in range(150):
        loss = mlp.vae_loss(encoder, decoder, x[torch.randint(0, n, (64,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae_end = vae_eval()
    variance = (x - x.mean(0)).square().sum(-1).mean().item()  # what predicting the mean with KL 0 scores
    assert vae_end < 0.75 * vae_start and vae_end < 0.8 * variance, (vae_start, vae_end, variance)

    ldm = mlp.latent_diffusion(encoder, decoder, denoiser)
    assert ldm.num_steps == 1000 and ldm.scale_factor == 1.0
    for p in [*encoder.parameters(), *decoder.parameters()]:
        p.requires_grad_(False)

    def denoiser_eval():
        with torch.no_grad():
            torch.manual_seed(7)  # the same t for every evaluation
            return sum(ldm.training_loss(x, seed=9 + i).item() for i in range(4)) / 4

    denoiser_start = denoiser_eval()
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    for _ in range(150):
        loss = ldm.training_loss(x[torch.randint(0, n, (128,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    denoiser_end = denoiser_eval()
    # predicting zero noise scores 1.0
    assert denoiser_end < 0.6 and denoiser_end < 0.5 * denoiser_start, (denoiser_start, denoiser_end)
