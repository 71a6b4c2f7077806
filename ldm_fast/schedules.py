"""Noise schedules of DDPM-style diffusion: betas and the tables derived from them.

Every table is computed in float64 and stored in float32 (CompVis and labml do the same; diffusers
computes ``scaled_linear`` in float32, a difference of at most 1.9e-9 in beta).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

#: Default (beta_start, beta_end) per kind: SD v1 for scaled_linear, DDPM for linear.
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}
KINDS = ("linear", "scaled_linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A noise schedule: every field is a float32 tensor ``[num_steps]``.

    ``alphas_cumprod[t]`` is abar_t, the signal fraction left after t+1 noising steps (0-based t).
    """

    kind: str
    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    def to(self, device) -> "Schedule":
        """The same schedule with every table on ``device``."""
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self) if f.name != "kind"}
        )


def make_schedule(
    kind: str = "scaled_linear",
    num_steps: int = 1000,
    beta_start: Optional[float] = None,
    beta_end: Optional[float] = None,
) -> Schedule:
    """Build a schedule.

    - ``"linear"``: ``betas = linspace(beta_start, beta_end, num_steps)`` (DDPM; default 1e-4..0.02).
    - ``"scaled_linear"``: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), num_steps) ** 2``
      (Stable Diffusion; default 0.00085..0.012, giving abar_500 = 0.276333).
    - ``"cosine"``: Nichol & Dhariwal's ``abar(t) = cos((t/T + s)/(1 + s) * pi/2) ** 2`` with
      s = 0.008, betas clipped at 0.999 (beta_start/beta_end must be None).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("beta_start and beta_end do not apply to the cosine schedule; leave them None")
        s = 0.008
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    else:
        start, end = DEFAULT_BETAS[kind]
        start = start if beta_start is None else float(beta_start)
        end = end if beta_end is None else float(beta_end)
        if not 0.0 < start <= end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}")
        if kind == "linear":
            betas = torch.linspace(start, end, num_steps, dtype=torch.float64)
        else:
            betas = torch.linspace(start**0.5, end**0.5, num_steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    return Schedule(
        kind=kind,
        betas=betas.float(),
        alphas=alphas.float(),
        alphas_cumprod=alphas_cumprod.float(),
        sqrt_alphas_cumprod=alphas_cumprod.sqrt().float(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt().float(),
    )
