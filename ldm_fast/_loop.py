"""Host-side helpers of the sampling and training loops (:mod:`ldm_fast.samplers`, :mod:`ldm_fast.train`):
per-step seeds and the optional progress bar."""

from __future__ import annotations

from typing import Optional

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, step: int, salt: int, rank: int = 0) -> int:
    """An independent seed in [0, 2**63) for ``(seed, step, salt, rank)``: splitmix64, on the host (no device
    tensor, no sync). ``salt`` tells apart the streams of one step (batch order, noise, ...)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03 + rank * 0x8CB92BA72F3D8DD7) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def progress_bar(enabled: bool, total: int, initial: int = 0, desc: Optional[str] = None):
    """A tqdm bar of ``total`` steps (``initial`` already done), or None when ``enabled`` is false or tqdm
    is not installed (it is optional). The caller calls ``update(1)`` per step and ``close()``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
