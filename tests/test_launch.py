"""kernels/_launch.py: repeat launches of a specialization go to the compiled kernel's launcher, with
exactly the arguments JITFunction.run would pass; anything that could select another
specialization goes through ``kernel[grid]``. Checked with a recording fake of a JIT function and
its compiled kernel (a GPU run checks the real ones: benchmarks/gpu_session.sh, tier 1)."""

from __future__ import annotations

import inspect

import pytest
import torch

from ldm_fast.kernels import _launch
from ldm_fast.kernels._launch import Kernel, Switch


class _Param:
    def __init__(self, p: inspect.Parameter, constexpr: bool):
        self.name, self.is_constexpr = p.name, constexpr
        self.has_default, self.default = p.default is not inspect.Parameter.empty, p.default


class _Compiled:
    """A compiled kernel: ``run`` records what a direct launch passes."""

    def __init__(self, key):
        self.key, self.function, self.packed_metadata, self.direct = key, object(), ("meta", key), []

    def run(self, *call):
        self.direct.append(call)


class _FakeJIT:
    """``kernel(x_ptr, y_ptr, n, scale, BLOCK: constexpr, HAS_Y: constexpr = False)``: each launch
    through ``[grid]`` computes Triton's own specialization (dtype and 16-byte alignment of the
    pointers, n == 1 / n % 16 == 0, the constexprs and num_warps) and returns its compiled kernel."""

    def __init__(self):
        def kernel(x_ptr, y_ptr, n, scale, BLOCK, HAS_Y=False):
            pass

        sig = inspect.signature(kernel)
        self.params = [_Param(p, name in ("BLOCK", "HAS_Y")) for name, p in sig.parameters.items()]
        self.compiled, self.slow = {}, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            x, y, n = args[0], args[1], args[2]
            key = (x.dtype, x.data_ptr() % 16 == 0, None if y is None else (y.dtype, y.data_ptr() % 16 == 0),
                   n == 1, n % 16 == 0, tuple(sorted(kwargs.items())))
            return self.compiled.setdefault(key, _Compiled(key))

        return launch


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(Switch, "enabled", True)
    k = Kernel(_FakeJIT())
    k._stream = lambda device: ("stream", device)
    return k


def test_repeat_launches_go_direct_with_the_arguments_run_would_pass(fake):
    x, y = torch.zeros(64), torch.zeros(64)
    first = fake[(4,)](x, y, 64, 0.5, BLOCK=128, num_warps=4)
    assert len(fake.fn.slow) == 1 and first.direct == []
    again = fake[(4, 2)](x, y, 64, 0.25, BLOCK=128, num_warps=4)  # another float, another grid: same specialization
    assert again is first and len(fake.fn.slow) == 1 and fake.direct == 1
    (call,) = first.direct
    # grid x, y, z, stream, function, packed metadata, launch metadata and hooks (None), every parameter in order
    assert call[:6] == (4, 2, 1, ("stream", -1), first.function, first.packed_metadata)
    assert call[6:9] == (None, None, None)
    assert call[9:] == (x, y, 64, 0.25, 128, False)


@pytest.mark.parametrize("change", ["misaligned x", "dtype", "n == 1", "n % 16", "constexpr", "num_warps", "y None"])
def test_anything_that_selects_another_specialization_goes_through_run(fake, change):
    x, y = torch.zeros(64), torch.zeros(64)
    fake[(1,)](x, y, 64, 1.0, BLOCK=128, num_warps=4)
    args, kwargs = [x, y, 64, 1.0], dict(BLOCK=128, num_warps=4)
    if change == "misaligned x":
        args[0] = torch.zeros(65)[1:]  # 4 bytes off a 16-byte boundary
    elif change == "dtype":
        args[0] = x.half()
    elif change == "n == 1":
        args[2] = 1
    elif change == "n % 16":
        args[2] = 63
    elif change == "constexpr":
        kwargs["BLOCK"] = 256
    elif change == "num_warps":
        kwargs["num_warps"] = 8
    else:
        args[1] = None
    fake[(1,)](*args, **kwargs)
    assert len(fake.fn.slow) == 2 and fake.direct == 0
    assert len(fake.fn.compiled) == 2  # Triton itself picked another specialization: the facts are fine enough


def test_not_cached_when_a_runtime_parameter_comes_by_keyword_or_an_argument_is_unknown(fake):
    x = torch.zeros(16)
    for _ in range(2):
        fake[(1,)](x, x, 16, scale=1.0, BLOCK=16)  # scale is not a constexpr: its value is not in the facts
        fake[(1,)](x, x, 16, 1.0, BLOCK=16, extra=3)  # an unknown keyword
        fake[(1,)](x, x, 16, [1.0], BLOCK=16)  # an argument type the facts do not describe
    assert fake.direct == 0 and len(fake.fn.slow) == 6


def test_switch_hooks_and_the_interpreter_send_every_launch_through_run(fake, monkeypatch):
    x = torch.zeros(16)
    fake[(1,)](x, x, 16, 1.0, BLOCK=16)
    monkeypatch.setattr(Switch, "enabled", False)
    fake[(1,)](x, x, 16, 1.0, BLOCK=16)
    monkeypatch.setattr(Switch, "enabled", True)
    hook = lambda *a: None  # noqa: E731  (a profiler's launch hook)
    _launch.knobs.runtime.launch_enter_hook.add(hook)
    try:
        fake[(1,)](x, x, 16, 1.0, BLOCK=16)
    finally:
        _launch.knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.undo()
    assert fake.direct == 0 and len(fake.fn.slow) == 3
    from ldm_fast.kernels.group_norm import _group_norm_fwd_one_pass_kernel

    assert _group_norm_fwd_one_pass_kernel._params is None  # interpreted (these tests): never direct


def test_the_environment_switch(monkeypatch):
    import ldm_fast

    monkeypatch.setenv("LDM_FAST_DIRECT_LAUNCH", "0")
    ldm_fast.backend.reload_env()
    assert Switch.enabled is False
    monkeypatch.setenv("LDM_FAST_DIRECT_LAUNCH", "2")
    with pytest.raises(ValueError, match="LDM_FAST_DIRECT_LAUNCH"):
        ldm_fast.backend.reload_env()
    monkeypatch.delenv("LDM_FAST_DIRECT_LAUNCH")
    ldm_fast.backend.reload_env()
    assert Switch.enabled is True
