"""Noise schedules against the SD v1 numbers of the reference implementations."""

import pytest
import torch

from ldm_fast import make_schedule


def test_sd_v1_scaled_linear_values():
    s = make_schedule("scaled_linear", 1000)
    abar = s.alphas_cumprod
    assert abar.dtype == torch.float32 and s.num_steps == 1000
    for t, value in [(0, 0.99915), (1, 0.998296), (20, 0.981314), (500, 0.276333), (981, 0.0057755), (999, 0.0046601)]:
        assert abar[t].item() == pytest.approx(value, abs=5e-7 if value > 0.01 else 5e-8), t
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    torch.testing.assert_close(s.sqrt_alphas_cumprod, abar.double().sqrt().float())
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod, (1 - abar.double()).sqrt().float())
    torch.testing.assert_close(s.alphas, 1 - s.betas)


def test_matches_diffusers_within_its_float32_linspace():
    from diffusers import DDPMScheduler

    ours = make_schedule("scaled_linear").alphas_cumprod
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert (ours - theirs).abs().max().item() < 1e-6
    linear = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    assert (make_schedule("linear").alphas_cumprod - linear).abs().max().item() < 1e-6


def test_cosine_is_decreasing_and_bounded():
    s = make_schedule("cosine", 100)
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    assert (s.betas <= 0.999).all() and (s.betas > 0).all()
    assert s.alphas_cumprod[0].item() > 0.99


def test_to_moves_every_table():
    s = make_schedule().to("meta")
    assert s.alphas_cumprod.device.type == "meta" and s.betas.device.type == "meta" and s.kind == "scaled_linear"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="quadratic"), "kind must be one of"),
        (dict(num_steps=0), "num_steps must be a positive int"),
        (dict(beta_start=0.02, beta_end=0.01), "beta_start <= beta_end"),
        (dict(kind="cosine", beta_start=0.1), "do not apply to the cosine"),
    ],
    ids=["kind", "steps", "betas-order", "cosine-betas"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)
