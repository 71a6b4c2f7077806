"""Backend dispatch: the environment variable, the context manager, and life without triton or a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ldm_fast
from ldm_fast import backend, ops
from ldm_fast import functional as F


def test_auto_picks_eager_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("LDM_FAST_BACKEND", raising=False)
    ldm_fast.backend.reload_env()
    assert backend.requested() == "auto"
    assert backend.select(torch.zeros(1)) == "eager"


@pytest.mark.parametrize("name", ["eager", "triton", "auto"])
def test_environment_variable(monkeypatch, name):
    monkeypatch.setenv("LDM_FAST_BACKEND", name.upper())
    ldm_fast.backend.reload_env()
    assert backend.requested() == name


def test_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("LDM_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LDM_FAST_BACKEND must be one of"):
        backend.reload_env()  # the environment is read once, at import or here
        backend.requested()


def test_use_backend_nests_and_beats_the_environment(monkeypatch):
    monkeypatch.setenv("LDM_FAST_BACKEND", "eager")
    ldm_fast.backend.reload_env()
    with ldm_fast.use_backend("triton"):
        assert backend.select(torch.zeros(1)) == "triton"
        with ldm_fast.use_backend("eager"):
            assert backend.select(torch.zeros(1)) == "eager"
        assert backend.requested() == "triton"
    assert backend.requested() == "eager"
    with pytest.raises(ValueError, match="use_backend"):
        with ldm_fast.use_backend("fast"):
            pass


def test_environment_variable_reaches_the_ops(monkeypatch):
    mean, logvar, noise = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    before = ops.kernel_launches["reparameterize"]
    monkeypatch.setenv("LDM_FAST_BACKEND", "triton")
    ldm_fast.backend.reload_env()
    F.reparameterize(mean, logvar, noise=noise)
    assert ops.kernel_launches["reparameterize"] == before + 1
    monkeypatch.setenv("LDM_FAST_BACKEND", "eager")
    ldm_fast.backend.reload_env()
    F.reparameterize(mean, logvar, noise=noise)
    assert ops.kernel_launches["reparameterize"] == before + 1


def test_kernels_run_interpreted_without_a_gpu():
    assert not torch.cuda.is_available()
    assert backend.interpreting()
    assert backend.can_run_kernel(torch.zeros(1))
    assert not backend.can_run_kernel(torch.zeros(1), torch.zeros(1, device="meta"))


def _run(code, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LDM_FAST_BACKEND")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_import_without_triton_runs_eager():
    result = _run(
        """
        import sys
        sys.modules["triton"] = None  # as on a platform without triton
        import torch, ldm_fast
        from ldm_fast import functional as F
        assert not ldm_fast.backend.triton_available()
        with ldm_fast.use_backend("triton"):
            z = F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), noise=torch.ones(2, 3), scale=2.0)
            x_t, _ = F.q_sample(torch.ones(2, 3), 0, torch.tensor([0.25]), noise=torch.zeros(2, 3))
        assert torch.equal(z, torch.full((2, 3), 2.0)) and torch.equal(x_t, torch.full((2, 3), 0.5))
        assert sum(ldm_fast.ops.kernel_launches.values()) == 0
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.slow
def test_import_leaves_the_environment_unchanged():
    """No import-time side effects: importing ldm_fast (and its kernels) sets no variable, TRITON_INTERPRET
    included (it would change every other library's Triton kernels in the process)."""
    code = """
        import json, os
        before = dict(os.environ)
        import ldm_fast, ldm_fast.functional, ldm_fast.kernels.group_norm, ldm_fast.kernels.attention
        print(json.dumps([dict(os.environ) == before, os.environ.get("TRITON_INTERPRET")]))
        """
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[true, null]'


@pytest.mark.slow
def test_without_the_interpreter_a_cpu_runs_eager():
    """TRITON_INTERPRET unset and no GPU: even a forced triton backend runs the eager reference on CPU tensors."""
    result = _run(
        """
        import torch, ldm_fast
        from ldm_fast import functional as F
        with ldm_fast.use_backend("triton"):
            z = F.reparameterize(torch.zeros(2, 3), torch.zeros(2, 3), noise=torch.ones(2, 3), scale=2.0)
        assert torch.equal(z, torch.full((2, 3), 2.0)) and sum(ldm_fast.ops.kernel_launches.values()) == 0
        assert not ldm_fast.backend.interpreting()
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
