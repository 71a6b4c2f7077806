"""triton and triton.language, or a stand-in where triton is not installed (it ships for Linux only).

The stand-in only lets a kernel module be imported so that its eager reference can run; its
kernels are never launched then, because :func:`ldm_fast.backend.select` answers ``"eager"``.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by tests in a subprocess that hides triton
    import types

    def _decorator(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_decorator, heuristics=lambda *_a, **_k: _decorator, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=object)

__all__ = ["triton", "tl"]
