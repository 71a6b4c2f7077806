"""Small procedural data sets, generated on the fly from a seed (no download, no files).

- :func:`shapes`: RGB images ``[N, 3, S, S]`` in [-1, 1] of one anti-aliased circle, square or
  triangle (random colour, position, size, rotation) on a random background colour. All images are
  drawn at once with tensor ops; 4,096 images of 32x32 take a fraction of a second on a CPU.
- :func:`gaussian_mixture`: vectors ``[N, dim]`` from a mixture of Gaussians that lies near a
  2-plane of R^dim (its components on a circle in the plane, plus a little isotropic noise);
  :func:`mixture_basis` gives that plane, to project samples for a picture.

The same ``seed`` gives the same tensors on every machine (parameters are drawn on the CPU by a
seeded ``torch.Generator``; only the rasterization runs on ``device``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SHAPE_KINDS", "shapes", "gaussian_mixture", "mixture_basis", "mixture_means"]

#: The shape kinds :func:`shapes` draws, by index (the ``labels`` it returns).
SHAPE_KINDS = ("circle", "square", "triangle")


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def shapes(n: int, size: int = 32, *, seed: int = 0, device=None, return_labels: bool = False):
    """``n`` images ``[n, 3, size, size]`` float32 in [-1, 1]: one shape each on a plain background.

    Per image (all drawn from ``seed``): a kind (circle, square, triangle; equally likely), a
    radius r of 0.18-0.38 of the side, a centre at least r + 1 pixels from every border (circles
    and triangles, of circumradius r, stay inside; a rotated square's corners reach 1.13 r), a
    rotation, a shape colour and a background colour, each channel uniform in [0, 1] with the two
    at least 0.5 apart (L1 over RGB) so the shape is visible. Edges are anti-aliased over one pixel
    (coverage from the signed distance). ``return_labels=True`` also returns the kinds ``[n]``
    int64 (indices of :data:`SHAPE_KINDS`).
    """
    _check_count("n", n)
    _check_count("size", size, 4)
    g = _generator(seed)
    kind = torch.randint(0, len(SHAPE_KINDS), (n,), generator=g)
    radius = (0.18 + 0.20 * torch.rand(n, generator=g)) * size  # [n] pixels
    margin = radius + 1.0
    centre = margin[:, None] + torch.rand(n, 2, generator=g) * (size - 2 * margin)[:, None]  # [n, 2] (x, y)
    angle = torch.rand(n, generator=g) * (2 * math.pi)  # rotation of squares and triangles
    background = torch.rand(n, 3, generator=g)
    colour = torch.rand(n, 3, generator=g)
    # redraw a colour too close to its background (a few rounds leave ~1e-6 of them unchanged)
    for _ in range(8):
        close = (colour - background).abs().sum(1) < 0.5
        colour = torch.where(close[:, None], torch.rand(n, 3, generator=g), colour)

    dev = torch.device(device) if device is not None else torch.device("cpu")
    kind, radius, centre, angle = kind.to(dev), radius.to(dev), centre.to(dev), angle.to(dev)
    coords = torch.arange(size, dtype=torch.float32, device=dev) + 0.5  # pixel centres
    dx = coords[None, None, :] - centre[:, 0, None, None]  # [n, 1, S]
    dy = coords[None, :, None] - centre[:, 1, None, None]  # [n, S, 1]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # [n, S, S] rotated into the shape's frame
    r = radius[:, None, None]
    circle = torch.sqrt(dx * dx + dy * dy) - r  # [n, S, S] signed distances, pixels
    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r  # inscribed in a circle of radius 1.13 r
    # equilateral triangle with circumradius r: inradius r/2, outward edge normals 120 degrees apart
    edges = [(0.0, 1.0), (math.sqrt(3) / 2, -0.5), (-math.sqrt(3) / 2, -0.5)]
    triangle = torch.stack([nx * u + ny * v for nx, ny in edges]).amax(0) - 0.5 * r
    distance = torch.where(kind[:, None, None] == 0, circle, torch.where(kind[:, None, None] == 1, square, triangle))
    coverage = (0.5 - distance).clamp(0.0, 1.0)[:, None]  # [n, 1, S, S]
    rgb = background.to(dev)[:, :, None, None] * (1 - coverage) + colour.to(dev)[:, :, None, None] * coverage
    images = (rgb * 2 - 1).contiguous()  # [n, 3, S, S] in [-1, 1]
    return (images, kind) if return_labels else images


def mixture_basis(dim: int, *, seed: int = 1234) -> Tensor:
    """The plane the :func:`gaussian_mixture` data lie near: ``[2, dim]`` float32, orthonormal rows.

    A fixed function of ``(dim, seed)`` (QR of a seeded Gaussian matrix); project data with
    ``x @ mixture_basis(dim).T`` -> ``[N, 2]``.
    """
    _check_count("dim", dim, 2)
    q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=_generator(seed), dtype=torch.float64))
    return q.T.float().contiguous()


def mixture_means(components: int = 6, *, radius: float = 2.0) -> Tensor:
    """The components' centres in the plane, ``[components, 2]``: evenly spaced on a circle of ``radius``."""
    _check_count("components", components)
    phi = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
    return (radius * torch.stack([torch.cos(phi), torch.sin(phi)], dim=1)).float()


def gaussian_mixture(
    n: int,
    dim: int = 16,
    *,
    components: int = 6,
    radius: float = 2.0,
    std: float = 0.15,
    noise: float = 0.05,
    seed: int = 0,
    basis_seed: int = 1234,
    device=None,
    return_labels: bool = False,
):
    """``n`` vectors ``[n, dim]`` float32 from a Gaussian mixture near a 2-plane of R^dim.

    ``x = (m_k + std * e) @ B + noise * e'`` with ``k`` uniform over ``components``, ``m_k`` the
    :func:`mixture_means` (a circle of ``radius`` in the plane), ``B`` = :func:`mixture_basis`
    ``(dim, seed=basis_seed)`` ``[2, dim]``, ``e [2]`` and ``e' [dim]`` standard normal. ``seed``
    picks the samples; ``basis_seed`` the plane (keep it fixed to compare data with samples).
    ``return_labels=True`` also returns the components ``[n]`` int64.
    """
    _check_count("n", n)
    _check_count("dim", dim, 2)
    g = _generator(seed)
    label = torch.randint(0, components, (n,), generator=g)
    plane = mixture_means(components, radius=radius)[label] + std * torch.randn(n, 2, generator=g)  # [n, 2]
    x = plane @ mixture_basis(dim, seed=basis_seed) + noise * torch.randn(n, dim, generator=g)  # [n, dim]
    x = x.to(torch.device(device) if device is not None else torch.device("cpu"))
    return (x, label.to(x.device)) if return_labels else x
