"""The call path: what an eager call dispatches and launches, what torch.compile captures, and that
validation never reads a device tensor on the host (the CUDA-graph and no-sync contract)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton.runtime.interpreter as interpreter
from torch.utils._python_dispatch import TorchDispatchMode

import ldm_fast
from ldm_fast import backend
from ldm_fast import functional as F
from ldm_fast.ops._common import check_index
from ldm_fast.kernels import group_norm as gn

# aten ops that only allocate or describe memory: no kernel on a GPU.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view",
              "as_strided", "slice", "select", "split", "split_with_sizes", "chunk", "expand", "t", "permute",
              "transpose", "unsqueeze", "squeeze", "alias", "detach", "lift_fresh", "_reshape_alias", "movedim",
              "unbind", "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}


class _Record(TorchDispatchMode):
    """Every op an eager call dispatches, outside the kernels (the interpreter's own tensor work
    while a kernel runs is not the op's)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.launches: list[str] = []
        self.in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_kernel:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recording(monkeypatch):
    """Record dispatched ops and Triton launches (kernel names) of the calls inside the block."""
    rec = _Record()
    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        rec.launches.append(self.fn.__name__)
        rec.in_kernel = True
        try:
            return run(self, *args, **kwargs)
        finally:
            rec.in_kernel = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted_run)
    with rec:
        yield rec


def _kernel_work(ops: list[str]) -> list[str]:
    """The ops that would launch a GPU kernel (everything but allocation and views)."""
    return [op for op in ops if op.split("::")[-1] not in _NO_KERNEL]


def _gn_inputs(shape, groups=4, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w, b = 1 + torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    return tuple(t.requires_grad_(requires_grad) for t in (x, w, b))


# ---------------------------------------------------------------------------------------------
# (a) no torch.library dispatch in eager; one op in a compiled graph


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_eager_calls_do_not_dispatch_custom_ops(triton_backend, monkeypatch, grad):
    x, w, b = _gn_inputs((2, 8, 3, 3), requires_grad=grad)
    moments = torch.randn(2, 8, 4, 4, requires_grad=grad)
    table = ldm_fast.make_schedule().alphas_cumprod
    with recording(monkeypatch) as rec:
        y = F.group_norm(x, 4, w, b, activation="silu")
        z = F.reparameterize_moments(moments, scale=0.18215)
        F.q_sample(torch.randn(2, 4, 3, 3), torch.tensor([1, 5]), table)
        if grad:
            (y.sum() + z.sum()).backward()
    assert not [op for op in rec.ops if op.startswith("ldm_fast::")], rec.ops
    assert triton_backend("group_norm") and triton_backend("reparameterize") and triton_backend("q_sample")


def _graph_ops(fn, *args):
    """The ops of the FX graph torch.compile(fullgraph=True) captures for ``fn(*args)``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    torch.compile(fn, fullgraph=True, backend=capture)(*args)
    assert len(graphs) == 1
    return [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]


def test_compile_captures_group_norm_as_one_op(triton_backend, monkeypatch):
    monkeypatch.setenv("LDM_FAST_COMPILE", "kernel")
    ldm_fast.backend.reload_env()
    x, w, b = _gn_inputs((2, 8, 3, 3))
    ops = _graph_ops(lambda x: F.group_norm(x, 4, w, b, activation="silu"), x)
    assert ops.count("ldm_fast.group_norm") == 1, ops


def test_compile_auto_leaves_small_groups_to_inductor(triton_backend, monkeypatch):
    """LDM_FAST_COMPILE=auto: U-Net-sized groups are traced as plain PyTorch (the graph torch.compile
    builds without ldm_fast), groups of COMPILE_KERNEL_MIN_GROUP elements and up take the kernel."""
    monkeypatch.delenv("LDM_FAST_COMPILE", raising=False)
    ldm_fast.backend.reload_env()
    x, w, b = _gn_inputs((2, 8, 3, 3))  # groups of 2 * 9 = 18 elements
    fn = lambda x: F.group_norm(x, 4, w, b, activation="silu")  # noqa: E731
    assert not [op for op in _graph_ops(fn, x) if "ldm_fast" in op]
    monkeypatch.setattr(backend, "COMPILE_KERNEL_MIN_GROUP", 18)
    assert _graph_ops(fn, x).count("ldm_fast.group_norm") == 1
    monkeypatch.setenv("LDM_FAST_COMPILE", "inductor")
    ldm_fast.backend.reload_env()
    assert not [op for op in _graph_ops(fn, x) if "ldm_fast" in op]
    monkeypatch.setenv("LDM_FAST_COMPILE", "fast")
    with pytest.raises(Exception, match="LDM_FAST_COMPILE must be one of"):
        ldm_fast.backend.reload_env()  # the environment is read once, at import or here
        _graph_ops(fn, x)


def test_compile_captures_reparameterize_and_q_sample(triton_backend):
    table = ldm_fast.make_schedule().alphas_cumprod
    ops = _graph_ops(lambda m, t: F.q_sample(F.reparameterize_moments(m), t, table), torch.randn(2, 8, 2, 2),
                     torch.tensor([3, 4]))
    assert ops.count("ldm_fast.reparameterize") == 1 and ops.count("ldm_fast.q_sample") == 1, ops


# ---------------------------------------------------------------------------------------------
# (d) launch counts: the Triton kernels and nothing else that would launch on a GPU


@pytest.mark.parametrize(
    "shape, split, fwd_launches, bwd_launches",
    [
        ((2, 8, 3, 3), False, 1, 2),  # one pass: the kernel; backward kernel + one column sum
        ((2, 8, 13, 11), True, 2, 3),  # split: stats, apply (merging the chunks); backward stats, finalize (+ dw, db), apply
    ],
    ids=["one-pass", "split"],
)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_group_norm_launches_only_its_kernels(triton_backend, monkeypatch, shape, split, fwd_launches, bwd_launches,
                                             affine):
    if split:
        for name in ("ONE_PASS_MAX", "ONE_PASS_MAX_BYTES", "ONE_PASS_MAX_BWD"):
            monkeypatch.setattr(gn, name, 0)
        monkeypatch.setattr(gn, "TILE", 32)
    x, w, b = _gn_inputs(shape, requires_grad=True)
    if not affine:
        w = b = None
    with recording(monkeypatch) as rec:
        y = F.group_norm(x, 4, w, b, activation="silu")
    assert len(rec.launches) == fwd_launches, rec.launches
    assert not _kernel_work(rec.ops), rec.ops
    grad = torch.randn_like(y)
    with recording(monkeypatch) as rec:
        y.backward(grad)
    expected_bwd = bwd_launches if affine or split else 1
    assert len(rec.launches) == expected_bwd, rec.launches
    # autograd's own bookkeeping (accumulating grads into .grad) is not the op's
    assert not [op for op in _kernel_work(rec.ops) if op not in ("aten::ones_like",)], rec.ops


def test_reparameterize_and_q_sample_launch_one_kernel_and_nothing_else(triton_backend, monkeypatch):
    moments = torch.randn(2, 8, 4, 4)
    table = ldm_fast.make_schedule().alphas_cumprod
    x0 = torch.randn(2, 4, 3, 3)
    for call in (
        lambda: F.reparameterize_moments(moments, seed=3, scale=0.18215),
        lambda: F.reparameterize_moments(moments, scale=0.18215),  # seed from torch's generator, on the host
        lambda: F.q_sample(x0, 7, table, seed=1),  # int t: no fill of a t tensor
        lambda: F.q_sample(x0, torch.tensor(7), table, seed=1),  # 0-d t: read in place with stride 0
        lambda: F.q_sample(x0, torch.tensor([7, 9], dtype=torch.int32), table, target="v"),  # no cast of t
    ):
        with recording(monkeypatch) as rec:
            call()
        assert len(rec.launches) == 1, rec.launches
        # allowed: drawing a seed on the host, and the host range check of a t that lives on the CPU
        # (here every t does; a t on the GPU is checked in the kernel, see the meta-tensor test)
        host_only = ("aten::randint", "aten::random_", "aten::aminmax", "aten::_local_scalar_dense")
        assert not [op for op in _kernel_work(rec.ops) if op not in host_only], rec.ops


# ---------------------------------------------------------------------------------------------
# (b) validation never reads device data on the host; graph-safe seeds


def test_validation_of_a_device_t_reads_no_data():
    """Meta tensors raise on any data access: q_sample's checks of a t that lives on a device must
    not touch it (no sync, so the call can be captured in a CUDA graph)."""
    x0 = torch.empty(2, 4, 8, 8, device="meta")
    table = torch.empty(1000, device="meta")
    t = torch.empty(2, dtype=torch.int64, device="meta")
    t_checked, check_t = check_index("t", t, 1000, 2, x0.device, False, "len(alphas_cumprod)")
    assert check_t and t_checked.device.type == "meta"
    x_t, target = F.q_sample(x0, t, table, noise=torch.empty_like(x0))  # the eager path on meta, end to end
    assert x_t.shape == x0.shape and target.shape == x0.shape
    with pytest.raises((RuntimeError, NotImplementedError)):
        check_index("t", t, 1000, 2, x0.device, True, "len(alphas_cumprod)")  # the opt-in sync check does read t


def test_group_norm_and_reparameterize_validation_read_no_data():
    x = torch.empty(2, 64, 8, 8, device="meta")
    w = torch.empty(64, device="meta")
    assert F.group_norm(x, 32, w, w, activation="silu").shape == x.shape
    moments = torch.empty(2, 8, 4, 4, device="meta")
    assert F.reparameterize_moments(moments, noise=torch.empty(2, 4, 4, 4, device="meta")).shape == (2, 4, 4, 4)


def test_cpu_t_out_of_range_still_raises_value_error(triton_backend):
    table = ldm_fast.make_schedule().alphas_cumprod
    for t in (1000, -1, torch.tensor([0, 1000])):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
            F.q_sample(torch.randn(2, 4), t, table)


def test_seed_drawn_on_the_device_is_read_by_the_kernel(triton_backend):
    """A seed given as a device tensor (what a CUDA-graph capture or a compiled graph draws) gives
    the same numbers as the same seed passed by value: replays that redraw it redraw the noise."""
    from ldm_fast.kernels.reparameterize import reparameterize_fwd

    mean, logvar = torch.zeros(3, 37), torch.zeros(3, 37)
    by_value = reparameterize_fwd(mean, logvar, None, 1234, 1.0, 0.0)
    by_pointer = reparameterize_fwd(mean, logvar, None, torch.tensor([1234]), 1.0, 0.0)
    assert torch.equal(by_value, by_pointer)
    x0 = torch.zeros(3, 4, 5)
    table = torch.full((10,), 0.25)
    x_t, eps = ldm_fast.ops.q_sample.kernel_call(x0, 2, table, None, None, torch.tensor([99]), 0.0, False, False)
    x_t2, eps2 = ldm_fast.ops.q_sample.kernel_call(x0, 2, table, None, None, 99, 0.0, False, False)
    assert torch.equal(eps, eps2) and torch.equal(x_t, x_t2)


# ---------------------------------------------------------------------------------------------
# attention: the same contract


@pytest.mark.parametrize("layout", ["flat", "bhnd"])
def test_attention_launches_only_its_kernels(triton_backend, monkeypatch, layout):
    """Forward: one launch, no torch kernels around it (no head split/merge copies, no contiguous
    copy of q/k/v slices of a fused projection); backward: two launches (dq with delta, then dk+dv)."""
    qkv = torch.randn(2, 21, 3 * 2 * 40, requires_grad=True)
    q, k, v = qkv.chunk(3, dim=-1)
    heads = 2
    if layout == "bhnd":
        q, k, v = (x.unflatten(2, (2, 40)).transpose(1, 2) for x in (q, k, v))
        heads = None
    with recording(monkeypatch) as rec:
        out = F.attention(q, k, v, heads=heads, impl="triton")
    assert rec.launches == ["_attention_fwd_kernel"], rec.launches
    assert not _kernel_work(rec.ops), rec.ops
    assert not [op for op in rec.ops if op.startswith("ldm_fast::")], rec.ops
    grad = torch.randn_like(out)
    with recording(monkeypatch) as rec:
        torch.autograd.grad(out, (q, k, v), grad)
    assert rec.launches == ["_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel"], rec.launches
    assert not [op for op in rec.ops if op.startswith("ldm_fast::")], rec.ops
    # the only work besides the kernels: autograd's accumulation of the three slices' gradients into qkv's
    assert not [op for op in _kernel_work(rec.ops) if op not in ("aten::ones_like", "aten::add", "aten::cat")], rec.ops


def test_compile_captures_attention_as_one_op(triton_backend):
    q, k, v = (torch.randn(2, 9, 80) for _ in range(3))
    ops = _graph_ops(lambda q, k, v: F.attention(q, k, v, heads=2, impl="triton"), q, k, v)
    assert ops.count("ldm_fast.attention") == 1, ops


def test_attention_validation_reads_no_data():
    q = torch.empty(2, 64, 512, device="meta")
    assert F.attention(q, q, q).shape == (2, 64, 512)
    assert F.attention(q, q, q, heads=8, impl="triton").shape == (2, 64, 512)


# ---------------------------------------------------------------------------------------------
# the Python between a module call and its launcher (host µs per call on a GPU)


def _python_path(monkeypatch, launcher_module, launcher_name: str, call) -> list[tuple[str, str]]:
    """The Python functions ``(file, name)`` entered from the start of ``call()`` until the launcher
    ``launcher_module.launcher_name`` is entered (it is stubbed: the path before it is what counts)."""
    import sys

    entered: list[tuple[str, str]] = []

    class _Reached(Exception):
        pass

    def stub(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(launcher_module, launcher_name, stub)

    def profile(frame, event, arg):
        if event == "call":
            entered.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        call()
    except _Reached:
        pass
    else:
        raise AssertionError("the launcher was not reached: the call took another path")
    finally:
        sys.setprofile(None)
    # the stub itself is not on the path, nor this test's lambda, nor Counter's first-count __missing__
    return [(f, n) for f, n in entered[:-1] if not f.endswith("test_call_path.py") and n != "__missing__"]


def _ldm_fast_files(path) -> set:
    return {file.split("ldm_fast")[-1] for file, _ in path if "/ldm_fast/" in file or "/kernels/" in file}


def test_group_norm_module_reaches_its_launcher_in_few_functions(monkeypatch):
    """``nn.GroupNorm(...)(x)``: module -> ops/group_norm.py (+ ops/_common.py's needs_grad and launch)
    -> backend.kernel_ok -> launcher, each check once: 5 functions of ours in 3 files between the
    module and the launcher (issue #15's target: at most 3 files and about 8 functions)."""
    norm = ldm_fast.nn.GroupNorm(4, 8, activation="silu")
    x = torch.randn(2, 8, 4, 4)
    with ldm_fast.use_backend("triton"), torch.no_grad():
        path = _python_path(monkeypatch, ldm_fast.ops.group_norm._kernels, "group_norm_fwd", lambda: norm(x))
    names = [name for _, name in path]
    assert names[0] == "_wrapped_call_impl" or "forward" in names, names
    ours = [(f, n) for f, n in path if "/ldm_fast/" in f or "/kernels/" in f]
    assert len(ours) <= 5, ours  # forward, group_norm, kernel_ok, launch (+ nothing else of ours)
    # with torch's own: Module.__call__ (2), the weight and bias (Module.__getattr__), is_compiling (2)
    assert len(path) <= 11, path
    assert len(_ldm_fast_files(ours[1:])) <= 3, ours  # between the module and the launcher
    assert names.count("kernel_ok") == 1 and "is_channels_last" not in names, names


@pytest.mark.parametrize("op", ["attention", "reparameterize", "q_sample", "sampler_step"])
def test_functional_ops_reach_their_launcher_in_few_functions(monkeypatch, op):
    q = torch.randn(1, 8, 16)
    calls = {
        "attention": (ldm_fast.ops.attention._kernels, "attention_fwd",
                      lambda: F.attention(q, q, q, heads=2, impl="triton")),
        "reparameterize": (ldm_fast.ops.reparameterize._kernels, "reparameterize_fwd",
                           lambda: F.reparameterize(q, q, seed=1)),
        "q_sample": (ldm_fast.ops.q_sample._kernels, "q_sample_fwd",
                     lambda: F.q_sample(q, torch.tensor([3]), torch.rand(10), seed=1)),
        "sampler_step": (ldm_fast.ops.sampler_step._kernels, "sampler_step_fwd",
                         lambda: F.sampler_step(q, q, 0.5, 0.6, seed=1)),
    }
    module, name, call = calls[op]
    with ldm_fast.use_backend("triton"), torch.no_grad():
        path = _python_path(monkeypatch, module, name, call)
    ours = [(f, n) for f, n in path if "/ldm_fast/" in f or "/kernels/" in f]
    # ops/<op>.py, ops/_common.py (checks, launch), backend.py, kernels/<op>.py (attention's int32 check)
    assert len(_ldm_fast_files(ours)) <= 4, ours
    assert [n for _, n in ours].count("kernel_ok") == 1, ours
    assert len(ours) <= {"attention": 8}.get(op, 14), ours


# ---------------------------------------------------------------------------------------------
# CUDA-only branches, reached on the CPU: the seed's form, the device guard (issue 25, items 4, 5)


def test_a_drawn_seed_on_cuda_is_always_a_device_tensor(monkeypatch):
    """Warm-up and capture must launch the same kernel variant (a variant first loaded inside a CUDA
    graph capture fails it): on CUDA a drawn seed is a device tensor (SEED_FROM_PTR) whether or not
    a capture is under way; a given seed stays an int; on the CPU a drawn seed is a host int."""
    import types

    from ldm_fast.ops._common import kernel_seed

    cuda_like = types.SimpleNamespace(is_cuda=True, device=torch.device("cpu"))  # only these are read
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        seed = kernel_seed(None, cuda_like)
        assert isinstance(seed, torch.Tensor) and seed.shape == (1,) and seed.dtype == torch.int64
        assert kernel_seed(7, cuda_like) == 7
    assert isinstance(kernel_seed(None, torch.zeros(1)), int)


def test_a_given_noise_takes_no_seed(triton_backend, monkeypatch):
    """q_sample and reparameterize with ``noise`` given draw no seed (no randint launch on a GPU, no
    seeded kernel variant), and their launchers pass none even if one is handed to them."""
    from ldm_fast.kernels import q_sample as qs_kernels
    from ldm_fast.kernels import reparameterize as rp_kernels

    def no_seed(*args):
        raise AssertionError("a seed was drawn for a call that gets its noise")

    for module in (ldm_fast.ops.q_sample, ldm_fast.ops.reparameterize):
        monkeypatch.setattr(module, "kernel_seed", no_seed)
    x0 = torch.randn(2, 4, 3, 3)
    table = ldm_fast.make_schedule().alphas_cumprod
    with recording(monkeypatch) as rec:
        F.q_sample(x0, torch.tensor([3, 5]), table, noise=torch.randn_like(x0), target="v")
        F.reparameterize(x0, x0, noise=torch.randn_like(x0))
    assert rec.launches == ["_q_sample_kernel", "_reparameterize_fwd_kernel"]
    assert "aten::randint" not in rec.ops and "aten::random_" not in rec.ops, rec.ops

    seen = []

    def record(self, *args, grid, warmup, **kwargs):
        seen.append(kwargs["SEED_FROM_PTR"])

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", record)
    device_seed = torch.tensor([5])
    qs_kernels.q_sample_fwd(x0, 3, table, torch.randn_like(x0), None, device_seed, 0.0, False)
    rp_kernels.reparameterize_fwd(x0, x0, torch.randn_like(x0), device_seed, 1.0, 0.0)
    rp_kernels.reparameterize_bwd(x0, x0, torch.randn_like(x0), device_seed, 1.0)
    qs_kernels.q_sample_fwd(x0, 3, table, None, None, device_seed, 0.0, False)  # drawing: by pointer
    assert seen == [False, False, False, True]


class _FakeCudaDevice:
    """``torch.cuda.device`` for a fake machine: entering makes ``index`` the current device."""

    current = 0
    entered: list = []

    def __init__(self, index):
        self.index = index

    def __enter__(self):
        _FakeCudaDevice.entered.append(self.index)
        self.previous, _FakeCudaDevice.current = _FakeCudaDevice.current, self.index

    def __exit__(self, *exc):
        _FakeCudaDevice.current = self.previous


class _OnDevice:
    """Stands for a tensor on CUDA device ``index`` (the guard reads only ``get_device()``)."""

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """Triton launches on the current device: ``launch`` switches to the tensors' device when it
    differs (cuda:1 tensors while cuda:0 is current), and only then; CPU tensors never ask CUDA."""
    from ldm_fast.ops import _common
    from ldm_fast.ops._common import launch

    monkeypatch.setattr(backend._Env, "interpret", False)  # the GPU branch of launch
    monkeypatch.setattr(_FakeCudaDevice, "current", 0)
    monkeypatch.setattr(_FakeCudaDevice, "entered", [])
    monkeypatch.setattr(_common, "_cuda_current_device", lambda: _FakeCudaDevice.current)
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    ran_on = []

    def launcher(x, *args, **kwargs):  # records the device current while it launches
        ran_on.append(_FakeCudaDevice.current)
        return args, kwargs

    assert launch("guard-test", launcher, _OnDevice(1), 2, k=3) == ((2,), {"k": 3})
    assert ran_on == [1] and _FakeCudaDevice.entered == [1] and _FakeCudaDevice.current == 0
    launch("guard-test", launcher, _OnDevice(0))  # already current: no switch
    assert ran_on == [1, 0] and _FakeCudaDevice.entered == [1]

    def no_cuda():
        raise AssertionError("a CPU launch asked for the current CUDA device")

    monkeypatch.setattr(_common, "_cuda_current_device", no_cuda)
    launch("guard-test", launcher, torch.zeros(1))  # get_device() == -1
    assert ran_on == [1, 0, 0] and _FakeCudaDevice.entered == [1]
