"""Test setup: kernels run under Triton's interpreter on CPU tensors (set before any kernel is decorated)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import benchmarks  # noqa: E402,F401  (imports the installed `kernels` package before the checkout's folder shadows it)
import ldm_fast  # noqa: E402


@pytest.fixture(autouse=True)
def _reread_environment():
    """ldm_fast reads its environment variables once; tests that change one call
    ``ldm_fast.backend.reload_env()``, and after each test (monkeypatch's changes undone) it is read again."""
    yield
    ldm_fast.backend.reload_env()


@pytest.fixture
def poison(monkeypatch):
    """Fill every fresh ``torch.empty``/``empty_like`` allocation with NaN, so unwritten outputs fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreted on CPU) and yield a function that says whether ``op`` launched."""
    before = ldm_fast.ops.kernel_launches.copy()
    with ldm_fast.use_backend("triton"):
        yield lambda op: ldm_fast.ops.kernel_launches[op] > before[op]


@pytest.fixture
def run_on(monkeypatch):
    """``run_on(backend)``: a context for the default backend, or one forcing the Triton attention
    kernel (and the other kernels) under the interpreter; ``launched()`` says whether the attention
    kernel ran since the fixture started."""
    import contextlib

    before = ldm_fast.ops.kernel_launches["attention"]

    def context(name):
        if name == "default":
            return contextlib.nullcontext()
        monkeypatch.setenv("LDM_FAST_ATTENTION", "triton")
        ldm_fast.backend.reload_env()
        return ldm_fast.use_backend("triton")

    context.launched = lambda: ldm_fast.ops.kernel_launches["attention"] > before
    return context
