"""Tolerances judged against the eager reference's own low-precision error, never a loose constant."""

from __future__ import annotations

import torch

#: Absolute floor per dtype: a few units in the last place of values of order 1.
ATOL_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of x's shape and dtype filled with NaN (poison: unwritten elements fail)."""
    return torch.full_like(x, float("nan"))


def assert_close_to_exact(out: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, *, factor: float = 2.0) -> None:
    """Assert ``|out - exact| <= factor * max|eager - exact| + atol_floor`` elementwise-max.

    ``exact`` is the float64 reference; ``eager`` the eager reference run at ``out``'s dtype. A
    kernel is as good as eager PyTorch when its worst error is within a small factor of eager's.
    """
    assert out.shape == exact.shape, (out.shape, exact.shape)
    assert out.dtype == eager.dtype, (out.dtype, eager.dtype)
    assert torch.isfinite(out).all() or not torch.isfinite(exact).all(), "kernel wrote NaN/inf (unwritten output?)"
    err = (out.double() - exact.double()).abs().max().item()
    eager_err = (eager.double() - exact.double()).abs().max().item()
    bound = factor * eager_err + ATOL_FLOOR[out.dtype] * max(1.0, exact.abs().max().item())
    assert err <= bound, f"kernel error {err:.3g} > bound {bound:.3g} (eager error {eager_err:.3g}, dtype {out.dtype})"


def check_attention(out, exact, eager, backend, run_on):
    """The module's result against the float64 reference, with the eager fp32 formula's own error as
    the yardstick (float64 results: against the float64 reference, to 1e-12 of its scale)."""
    if out.dtype == torch.float64:
        scale = max(1.0, exact.abs().max().item())
        assert (out - exact).abs().max().item() <= 1e-12 * scale
    else:
        assert_close_to_exact(out, exact, eager)
    if backend == "triton":
        assert run_on.launched(), "the Triton attention kernel did not run"
