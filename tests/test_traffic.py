"""Measured global-memory traffic (benchmarks/traffic.py): the counters on cases whose bytes are known
exactly, then every quick-subset benchmark case against its Case.traffic_target."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import traffic
from benchmarks.common import Case, discover, nbytes

QUICK = discover(quick=True)


@triton.jit
def _scale_kernel(x_ptr, s_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i_pid = tl.program_id(0)
    o = i_pid * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_s = tl.load(s_ptr)  # a scalar: 4 bytes per program
    b_s2 = tl.load(s_ptr + o * 0)  # the same scalar broadcast to BLOCK lanes: one address, 4 bytes per program
    b_x = tl.load(x_ptr + o, mask=m).to(tl.float32)  # fp16, masked tail
    tl.store(y_ptr + o, b_x * b_s * b_s2, mask=m)


def test_kernel_counter_counts_exact_bytes():
    n, block = 1001, 256  # 4 programs, the last one 233 lanes
    x = torch.randn(n).half()
    s = torch.tensor([2.0])
    y = torch.empty(n)
    dispatch = traffic.DispatchCounter()
    with traffic.KernelCounter(dispatch) as k, dispatch:
        _scale_kernel[(triton.cdiv(n, block),)](x, s, y, n, BLOCK=block)
    assert torch.equal(y, x.float() * 4.0)
    assert len(k.launches) == 1
    launch = k.launches[0]
    assert launch.programs == 4 and launch.grid == [4]
    assert k.load_bytes == n * 2 + 4 * (4 + 4)  # x once (masked lanes excluded) + two scalars per program
    assert k.store_bytes == n * 4
    assert dispatch.ops == []  # the interpreter's own host copies are not charged
    sites = {(s.kind, s.lanes, s.itemsize): s for s in launch.sites.values()}
    x_site, y_site = sites[("load", block, 2)], sites[("store", block, 4)]
    assert (x_site.contiguous_bytes, x_site.aligned16, x_site.calls, x_site.bytes) == (block * 2, True, 4, n * 2)
    assert (x_site.lanes, x_site.max_active, x_site.contiguous_axis) == (block, block, 0)
    assert (y_site.contiguous_bytes, y_site.bytes) == (block * 4, n * 4)
    assert x_site.mask_uniform16 is False  # 1001 is not a multiple of 8 fp16: the tail splits a 16-byte group
    assert sites[("load", 1, 4)].bytes == 4 * 4
    assert launch.args["x_ptr"]["kind"] == "tensor" and launch.args["n"] == {"kind": "int", "value": n}
    assert launch.constexprs == ["BLOCK"]


def test_dispatch_counter_on_a_known_eager_expression():
    x = torch.randn(1000)  # 4000 bytes
    with traffic.DispatchCounter() as d:
        x.view(10, 100).t().expand(2, 100, 10)  # views: free
        x.detach()
        a, b = x.chunk(2)  # free
        torch.empty(1000)  # free
        y = x * 2.0 + 1.0  # mul: r 4000 w 4000; add: r 4000 w 4000
        z = torch.randn(1000)  # factory: w 4000
        torch.randn_like(x)  # reads x's metadata only: w 4000
        z.copy_(y)  # r 4000 (src), w 4000 (self, not read)
        x.half()  # _to_copy: r 4000 w 2000
        x[:10].expand(5, 10).sum()  # reads the 10 distinct elements (40 B), writes 4 B
        a.add_(b)  # r 2000 + 2000, w 2000
    assert d.read == 4000 + 4000 + 4000 + 4000 + 40 + 4000
    assert d.write == 4000 + 4000 + 4000 + 4000 + 4000 + 2000 + 4 + 2000
    assert d.launches == 8
    assert {name for name, *_ in d.ops} == {"mul", "add", "randn", "randn_like", "copy_", "_to_copy", "sum", "add_"}


def test_eager_fallback_is_caught():
    """A 'fused' path that silently runs eager must fail the check, whatever its bytes."""

    def make(device):
        return {"x": torch.randn(4, 16)}

    fake = Case("fake", "eager-only", make, fused=lambda i: i["x"] * 2, eager=lambda i: i["x"] * 2,
                min_bytes=lambda i: 2 * nbytes(i["x"]), traffic_target=1.0)
    record = traffic.measure_case(fake, use_cache=False)
    assert record["fused"]["kernel_launches"] == 0
    assert any("launched no Triton kernel" in p for p in record["problems"])


BACKWARD = [c for c in QUICK if c.name.startswith("bwd-")]

#: aten ops of the baselines' forward graphs (diffusers' sample(), F.silu(F.group_norm(...))), which
#: a backward case's eager side must not run: its forward graph is built in make().
FORWARD_OPS = {"native_group_norm", "silu", "silu_", "randn", "exp", "clamp", "split", "chunk", "_to_copy"}


def test_quick_subset_has_backward_cases():
    assert {c.op for c in BACKWARD} >= {"reparameterize", "group_norm"}, [c.id for c in QUICK]


@pytest.mark.parametrize("case", BACKWARD, ids=[c.id for c in BACKWARD])
def test_backward_baseline_charges_only_the_backward(case):
    """A ``bwd-*`` case's eager side is autograd.grad over a graph built in make(): the dispatch counter
    sees the backward's aten ops (the autograd engine carries the mode into the backward), none of the
    forward's, and one gradient per leaf."""
    inputs = case.make(torch.device("cpu"))
    counter = traffic.measure_eager(case.eager, inputs)
    names = {name for name, *_ in counter.ops}
    assert names and not names & FORWARD_OPS, names
    assert counter.launches >= 1 and counter.read + counter.write >= case.min_bytes(inputs)
    grads = case.eager(inputs)  # retain_graph: the graph runs again
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", QUICK, ids=[c.id for c in QUICK])
def test_fused_traffic_within_target(case):
    record = traffic.measure_case(case)
    fused, eager = record["fused"], record["eager"]
    # the kernel really ran (not an eager fallback): interpreter launches and ldm_fast's counter
    assert fused["kernel_launches"] >= 1, record
    assert sum(record["op_launches"].values()) >= 1, record["op_launches"]  # ldm_fast.ops.kernel_launches rose
    assert all(k["programs"] >= 1 for k in fused["kernels"])
    assert fused["kernel_load"] > 0 and fused["kernel_store"] > 0
    limit = case.traffic_target * record["min_bytes"] * (1 + traffic.EPSILON)
    assert fused["bytes"] <= limit, (
        f"{case.id}: fused moves {fused['bytes']} B = {record['fused_ratio']:.4f}x the minimum "
        f"{record['min_bytes']} B, target {case.traffic_target}x; kernels {[k['kernel'] for k in fused['kernels']]}, "
        f"host ops {fused['host_ops']}"
    )
    # the eager baseline cannot move less than the minimum: if it does, the dispatch counter missed ops
    assert eager["bytes"] >= record["min_bytes"], eager
    assert record["problems"] == []
