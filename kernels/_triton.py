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



#: Launch options of a kernel variant whose ``tl.device_assert`` checks must run (q_sample's t,
#: sampler_step's index on the device, as torch's own index asserts): ``debug=True`` keeps the
#: asserts, and ``sanitize_overflow=False`` keeps out the integer-overflow checks that ``debug``
#: would otherwise add to every int32 add/sub/mul (the Philox counters and random-word arithmetic
#: wrap by design: a sanitizer assert there is a device-side assert that leaves the CUDA context
#: unusable). Both are Triton compile options (3.6 and newer); the interpreter ignores them.
DEVICE_ASSERTS = {"debug": True, "sanitize_overflow": False}


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a JIT function: microseconds a call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


__all__ = ["DEVICE_ASSERTS", "cdiv", "next_pow2", "triton", "tl"]
