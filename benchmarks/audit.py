"""Static audit of the kernels for real GPUs: compile each launch ahead of time for sm_80 and sm_90, read the SASS.

No GPU is needed. For every kernel launch a case makes (recorded by :mod:`benchmarks.traffic`
under the interpreter: the kernel, each argument's type, pointer alignment and integer value,
the constexprs and ``num_warps``), a clean child process (``TRITON_INTERPRET=0``: the compiler
does not work in a process where the interpreter patched ``triton.language``) rebuilds stand-in
arguments with the same dtypes and 16-byte alignment, runs Triton's own launcher binder for the
target (``create_function_from_signature`` + ``JITFunction._pack_args``), so the signature, the
``tt.divisibility`` specializations and the constexprs are exactly those a launch at the benchmark
shape would compile, and calls ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
Then, with the tools that ship in ``triton/backends/nvidia/bin``:

* ``ptxas -v`` on the PTX (Triton's own flags): registers, stack frame, **spill stores/loads**;
* ``cuobjdump -res-usage`` on the cubin: REG, STACK, SHARED, LOCAL;
* ``nvdisasm`` on the cubin: the global loads and stores by width (``LDG.E.128``, ``LDGSTS...128``,
  ``STG.E.128``, ``.64``, 32-bit, ``.U16``...), local ``LDL``/``STL``, TMA (``UTMALDG``...) and
  tensor-core instructions (``HMMA``, ``HGMMA``...).

The rules (:func:`check`), each a failure of the audit test:

1. it compiles, for both targets;
2. no spills: ptxas reports 0 spill bytes and cuobjdump ``LOCAL:0`` (a stack frame without spills,
   e.g. the local array of libdevice's sin/cos range reduction, is reported, not failed);
3. 128-bit access on aligned contiguous data: every ``tl.load``/``tl.store`` site whose block is
   contiguous in runs of at least 16 bytes starting 16-byte aligned, whose mask never splits a
   16-byte group, and which gives each thread at least 16 bytes (``active lanes x itemsize >= 16 x
   32 x num_warps``) must compile to ``active lanes x itemsize / (16 x 32 x num_warps)`` 128-bit
   instructions (active lanes: the most any call left unmasked);
   the kernel must hold at least the sum of that over its load sites in 128-bit global loads, and
   likewise for stores. Scalars (a timestep, a seed), gathers and small blocks are exempt. A
   kernel that issues TMA (``UTMALDG``/``UTMASTG``) satisfies its tensor-descriptor sites.
4. a case with matrix work (``Case.flops``) must use tensor cores: ``HMMA`` on sm_80, ``HGMMA`` or
   ``HMMA`` on sm_90;
5. the shared memory the compiled kernel asks for fits one block of the target (:data:`SHARED_LIMIT`:
   163 KB on sm_80, the A100's opt-in maximum per block; 227 KB on sm_90): above it the launch fails
   with "out of resources".

A constexpr that a launcher sets only under the interpreter, to work around the interpreter's
numerics (:data:`GPU_CONSTEXPRS`, e.g. attention's ``BF16_AS_F32``, add_layer_norm's ``BF16_RNE``),
is compiled with the value a GPU launch passes: the audit inspects the binary the GPU runs, not the interpreter's workaround.

Compiles are cached per (kernel, specialization, target) within a run, and by Triton's own cache
across runs. ``python -m benchmarks.audit [--quick] [--ops a,b]`` audits from the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

ARCHS = (80, 90)
REPO = Path(__file__).resolve().parent.parent

#: Constexprs the launchers set only under Triton's CPU interpreter, with the value every GPU launch
#: passes (the audit compiles that value). ``BF16_AS_F32`` (kernels/attention.py ``_dot``): the
#: interpreter's ``tl.dot`` mishandles bf16, so on the CPU bf16 operands multiply as fp32; on a GPU
#: they go to the tensor cores as they are.
GPU_CONSTEXPRS = {"BF16_AS_F32": False, "BF16_RNE": False, "OUT_BF16_RNE": False, "INTERPRETER_MATH": False}

#: Most shared memory one block may use, bytes (``cudaDevAttrMaxSharedMemoryPerBlockOptin``): A100
#: 163 KB (of 164 KB per SM), H100 227 KB (of 228 KB per SM).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# ---------------------------------------------------------------------------------------------
# parsers (pure functions of tool output; unit-tested on saved snippets)

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_SASS_RE = re.compile(r"/\*[0-9a-fA-F]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
MMA_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "OMMA", "UTCHMMA", "UTCQMMA")
TMA_LOAD_OPS = ("UTMALDG", "UBLKCP")
TMA_STORE_OPS = ("UTMASTG", "UTMAREDG")


def parse_res_usage(text: str) -> dict:
    """``cuobjdump -res-usage`` output -> ``{REG, STACK, SHARED, LOCAL}`` of the (single) function."""
    out = {}
    for line in text.splitlines():
        for key in ("REG", "STACK", "SHARED", "LOCAL"):
            m = re.search(rf"\b{key}:(\d+)", line)
            if m and key not in out:
                out[key] = int(m.group(1))
    return out


def parse_ptxas_log(text: str) -> dict:
    """``ptxas -v`` output -> ``{regs, stack, spill_stores, spill_loads}`` (the last function reported)."""
    out = {}
    for key, pattern in _PTXAS_RE.items():
        found = pattern.findall(text)
        if found:
            out[key] = int(found[-1])
    return out


def _width(modifiers: list[str]) -> int:
    if "128" in modifiers:
        return 128
    if "64" in modifiers:
        return 64
    if "U16" in modifiers or "S16" in modifiers:
        return 16
    if "U8" in modifiers or "S8" in modifiers:
        return 8
    return 32


def parse_sass(text: str) -> dict:
    """``nvdisasm`` output -> instruction counts.

    ``global_loads`` / ``global_stores``: ``{bits: count}`` of ``LDG``/``LDGSTS`` and ``STG`` (bits
    from the ``.128``/``.64``/``.U16``/``.U8`` modifier, else 32); ``local_loads`` / ``local_stores``:
    ``LDL``/``STL`` counts; ``tma_loads`` / ``tma_stores``; ``mma``: ``{opcode: count}``;
    ``atomics``: ``RED``/``ATOM``/``ATOMG`` count.
    """
    out = {"global_loads": {}, "global_stores": {}, "local_loads": 0, "local_stores": 0,
           "tma_loads": 0, "tma_stores": 0, "mma": {}, "atomics": 0, "instructions": 0}
    for line in text.splitlines():
        m = _SASS_RE.search(line)
        if not m:
            continue
        parts = m.group(1).split(".")
        op, mods = parts[0], parts[1:]
        out["instructions"] += 1
        if op in ("LDG", "LDGSTS"):
            w = _width(mods)
            out["global_loads"][w] = out["global_loads"].get(w, 0) + 1
        elif op == "STG":
            w = _width(mods)
            out["global_stores"][w] = out["global_stores"].get(w, 0) + 1
        elif op == "LDL":
            out["local_loads"] += 1
        elif op == "STL":
            out["local_stores"] += 1
        elif op in TMA_LOAD_OPS:
            out["tma_loads"] += 1
        elif op in TMA_STORE_OPS:
            out["tma_stores"] += 1
        elif op in MMA_OPS:
            out["mma"][op] = out["mma"].get(op, 0) + 1
        elif op in ("RED", "REDG", "ATOM", "ATOMG"):
            out["atomics"] += 1
    return out


# ---------------------------------------------------------------------------------------------
# expectations from the interpreter's sites, and the rules


def expected_128(launch: dict) -> dict:
    """Per kind (``load``/``store``): the 128-bit instructions full vectorization gives, and the sites behind it.

    A site counts when its block is contiguous in runs of >= 16 bytes starting 16-byte aligned, its
    mask never splits a 16-byte group, it is not a tensor-descriptor access, and each thread of
    the launch moves >= 16 bytes of it; it then needs ``active*itemsize / (16*threads)`` 128-bit
    instructions (at least one), ``active`` being the most lanes any call left unmasked: lanes
    masked in every call (a block padded past the data, e.g. 40 channels in a 64-wide block) are
    removed by the compiler. This is a lower bound on what a vectorized kernel holds: the static
    code has every thread's largest share, the average is below it.
    """
    threads = 32 * int(launch["options"].get("num_warps", 4))
    out = {"load": {"count": 0, "sites": [], "descriptor_sites": 0},
           "store": {"count": 0, "sites": [], "descriptor_sites": 0}}
    for site in launch["sites"]:
        entry = out[site["kind"]]
        if site["descriptor"]:
            entry["descriptor_sites"] += 1
            continue
        per_thread = site["max_active"] * site["itemsize"] / threads
        if (site["contiguous_bytes"] >= 16 and site["aligned16"] and site["mask_uniform16"] and per_thread >= 16):
            n = max(1, int(per_thread // 16))
            entry["count"] += n
            entry["sites"].append(f"line {site['line']} x{n}")
    return out


def check(result: dict, launch: dict, has_flops: bool) -> list[str]:
    """The audit rules (module docstring) for one compiled launch at one target; empty when it passes."""
    arch = f"sm_{result['arch']}"
    if result.get("error"):
        return [f"{arch}: does not compile: {result['error'].splitlines()[0][:300]}"]
    problems = []
    spills = result.get("spill_stores", 0) + result.get("spill_loads", 0)
    if spills or result.get("LOCAL", 0):
        problems.append(
            f"{arch}: spills {result.get('spill_stores', 0)} B stored / {result.get('spill_loads', 0)} B loaded "
            f"(LOCAL {result.get('LOCAL', 0)} B, {result.get('local_stores', 0)} STL)"
        )
    want = expected_128(launch)
    have = {"load": result["global_loads"].get(128, 0), "store": result["global_stores"].get(128, 0)}
    tma = {"load": result.get("tma_loads", 0), "store": result.get("tma_stores", 0)}
    for kind in ("load", "store"):
        if have[kind] < want[kind]["count"]:
            problems.append(
                f"{arch}: {have[kind]} 128-bit global {kind}s, full vectorization needs {want[kind]['count']} "
                f"({', '.join(want[kind]['sites'])}); widths {result['global_' + kind + 's']}"
            )
        if want[kind]["descriptor_sites"] and not (tma[kind] or have[kind]):
            problems.append(f"{arch}: tensor-descriptor {kind}s compiled to neither TMA nor 128-bit accesses")
    limit = SHARED_LIMIT.get(result["arch"])
    if limit is not None and result.get("shared", 0) > limit:
        problems.append(f"{arch}: {result['shared']} B of shared memory, more than a block may use ({limit} B)")
    if has_flops:
        mma = result.get("mma", {})
        ok = mma.get("HMMA", 0) > 0 if result["arch"] < 90 else (mma.get("HGMMA", 0) + mma.get("HMMA", 0)) > 0
        if not ok:
            problems.append(f"{arch}: matrix work without tensor-core instructions (mma {mma})")
    return problems


# ---------------------------------------------------------------------------------------------
# the child: compile and inspect (TRITON_INTERPRET=0)


def _bin(tool: str) -> str:
    import triton

    path = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / tool
    return str(path)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself assembles with for ``arch`` (it picks between its bundled builds, and
    the PTX version it emits follows that choice), so the rerun with ``-v`` accepts the same PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _jit_function(kernel: str):
    import importlib

    from triton.runtime.jit import JITFunction

    module, qualname = kernel.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction):  # autotune / heuristics wrappers
        if not hasattr(obj, "fn"):
            raise TypeError(f"{kernel} is {type(obj).__name__}, not a triton.jit kernel (is TRITON_INTERPRET=0?)")
        obj = obj.fn
    return obj


def _stand_in(desc: dict):
    """An argument value with the recorded type, alignment and value."""
    import torch
    import triton.language as tl

    kind = desc["kind"]
    if kind == "tensor":
        dtype = getattr(torch, desc["dtype"])
        item = torch.empty((), dtype=dtype).element_size()
        buf = torch.empty(256, dtype=torch.uint8)
        off = desc["misalign"] + (-buf.data_ptr()) % 16
        return buf[off: off + 16 * item].view(dtype)
    if kind == "tl_dtype":
        return getattr(tl, desc["value"])
    if kind == "none":
        return None
    if kind == "unsupported":
        raise TypeError(f"cannot rebuild argument {desc['repr']}")
    return desc["value"]


def gpu_launch(launch: dict) -> dict:
    """``launch`` as a GPU makes it: the interpreter-only constexprs (:data:`GPU_CONSTEXPRS`) set to their GPU value."""
    fix = {n: v for n, v in GPU_CONSTEXPRS.items() if n in launch["constexprs"] and n in launch["args"]
           and launch["args"][n].get("value") != v}
    if not fix:
        return launch
    args = dict(launch["args"])
    for name, value in fix.items():
        args[name] = dict(args[name], value=value)
    return dict(launch, args=args)


def compile_launch(launch: dict, arch: int, workdir: str) -> dict:
    """Compile one recorded launch for ``sm_<arch>`` and inspect the binary (call in a TRITON_INTERPRET=0 process)."""
    launch = gpu_launch(launch)
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource, compile as triton_compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    start = time.perf_counter()
    fn = _jit_function(launch["kernel"])
    target = GPUTarget("cuda", arch, 32)
    be = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, be)
    values = {name: _stand_in(d) for name, d in launch["args"].items()}
    kwargs = dict(launch["options"])
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run does
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs.update({n: values[n] for n in launch["constexprs"]})
    # the launcher's own binder: the signature, specializations and constexprs a real launch gets
    bound, specialization, options = binder(**values, **{k: v for k, v in kwargs.items() if k not in values})
    options, signature, constexprs, attrs = fn._pack_args(be, kwargs, bound, specialization, options)
    kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)

    result = {"arch": arch, "kernel": launch["kernel"], "num_warps": options.num_warps,
              "shared": int(kernel.metadata.shared), "signature": signature,
              "divisible16": sorted(k[0] for k, v in attrs.items() if v)}
    stem = os.path.join(workdir, f"k{abs(hash((launch['kernel'], json.dumps(launch['args'], sort_keys=True), arch)))}")
    with open(stem + ".cubin", "wb") as f:
        f.write(kernel.asm["cubin"])
    with open(stem + ".ptx", "w") as f:
        f.write(kernel.asm["ptx"])
    res = subprocess.run([_bin("cuobjdump"), "-res-usage", stem + ".cubin"], capture_output=True, text=True, check=True)
    result.update(parse_res_usage(res.stdout))
    sass = subprocess.run([_bin("nvdisasm"), "-c", stem + ".cubin"], capture_output=True, text=True, check=True)
    result.update(parse_sass(sass.stdout))
    fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
    ptxas = subprocess.run(
        [_ptxas(arch), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
         stem + ".ptx", "-o", stem + ".o"],
        capture_output=True, text=True, check=True,
    )
    result.update(parse_ptxas_log(ptxas.stderr + ptxas.stdout))
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _arg_class(name: str, desc: dict, constexprs: list) -> object:
    """What of an argument the compiled binary depends on: a constexpr's value; a tensor's dtype and
    16-byte alignment; an integer's width and its ==1 / %16 specialization; a float nothing but its type."""
    if name in constexprs or desc["kind"] in ("none", "bool", "str", "tl_dtype", "unsupported"):
        return desc
    if desc["kind"] == "tensor":
        return ["tensor", desc["dtype"], desc["misalign"] == 0]
    if desc["kind"] == "int":
        v = desc["value"]
        return ["int", -2**31 <= v < 2**31, v == 1, v % 16 == 0]
    return [desc["kind"]]


def compile_key(launch: dict, arch: int) -> str:
    """What decides the compiled binary: kernel, argument classes (:func:`_arg_class`), options, target."""
    launch = gpu_launch(launch)
    args = {k: _arg_class(k, d, launch["constexprs"]) for k, d in launch["args"].items()}
    return json.dumps([launch["kernel"], args, launch["options"], arch], sort_keys=True)


def _child_main(in_path: str, out_path: str) -> int:
    """Compile every (launch, arch) job of ``in_path``; one JSON line per result to stdout and all to ``out_path``."""
    jobs = json.loads(Path(in_path).read_text())
    results = []
    with tempfile.TemporaryDirectory(prefix="ldm_fast_audit_") as workdir:
        for job in jobs:
            try:
                result = compile_launch(job["launch"], job["arch"], workdir)
            except Exception as e:  # a kernel that does not compile is a finding, reported as such
                detail = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
                result = {"arch": job["arch"], "kernel": job["launch"]["kernel"], "error": f"{type(e).__name__}: {detail}"}
            result["key"] = job["key"]
            results.append(result)
            print(json.dumps({"done": job["key"][:80], "kernel": result["kernel"], "arch": result["arch"]}), flush=True)
    Path(out_path).write_text(json.dumps(results))
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: run children


def child_env() -> dict:
    """Environment of a compile process: the interpreter off (explicitly: ldm_fast turns it on when unset)."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


_results: dict[str, dict] = {}


def compile_launches(launches: Iterable[dict], archs: Iterable[int] = ARCHS, jobs: int = 1,
                     progress=None) -> dict[str, dict]:
    """Compile each distinct (launch, arch) in ``jobs`` child processes; ``{compile_key: result}``.

    ``progress(message)`` is called once per finished compile. Results are cached in this process.
    """
    launches = list(launches)
    todo, seen = [], set()
    for launch in launches:
        for arch in archs:
            key = compile_key(launch, arch)
            if key not in _results and key not in seen:
                seen.add(key)
                todo.append({"key": key, "arch": arch, "launch": launch})
    if todo:
        shards = [todo[i::max(1, jobs)] for i in range(max(1, min(jobs, len(todo))))]
        with tempfile.TemporaryDirectory(prefix="ldm_fast_audit_") as tmp:
            errors: list[str] = []

            def run_shard(i: int, shard: list) -> None:
                src, dst, log = (os.path.join(tmp, f"{name}{i}.json") for name in ("in", "out", "err"))
                Path(src).write_text(json.dumps(shard))
                with open(log, "w+") as err:
                    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.audit", "--child", src, dst], cwd=REPO,
                                            env=child_env(), stdout=subprocess.PIPE, stderr=err, text=True)
                    for line in proc.stdout:
                        if progress is not None and line.startswith("{"):
                            msg = json.loads(line)
                            progress(f"{msg['kernel'].split(':')[-1]} sm_{msg['arch']}")
                    if proc.wait() != 0 or not os.path.exists(dst):
                        err.seek(0)
                        errors.append(err.read()[-3000:])
                        return
                for result in json.loads(Path(dst).read_text()):
                    for kind in ("global_loads", "global_stores"):  # JSON made the bit widths strings
                        if kind in result:
                            result[kind] = {int(k): v for k, v in result[kind].items()}
                    _results[result["key"]] = result

            threads = [threading.Thread(target=run_shard, args=(i, shard)) for i, shard in enumerate(shards)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError("audit compile process failed:\n" + "\n".join(errors))
    return {compile_key(launch, arch): _results[compile_key(launch, arch)] for launch in launches for arch in archs}


def audit_records(records: list[dict], archs: Iterable[int] = ARCHS, jobs: int = 1, progress=None) -> list[dict]:
    """Audit every kernel launch of the traffic ``records`` (from :func:`benchmarks.traffic.measure_case`).

    Returns one entry per (case, launch, arch): the compile result, the expectations and ``problems``.
    """
    archs = tuple(archs)
    launches = [k for r in records if "fused" in r for k in r["fused"]["kernels"]]
    compiled = compile_launches(launches, archs, jobs=jobs, progress=progress)
    entries = []
    for record in records:
        if "fused" not in record:
            continue
        for index, launch in enumerate(record["fused"]["kernels"]):
            for arch in archs:
                result = compiled[compile_key(launch, arch)]
                entries.append({
                    "case": record["case"], "launch": index, "kernel": launch["kernel"], "arch": arch,
                    "result": result, "expected_128": expected_128(launch),
                    "problems": check(result, launch, bool(record.get("flops"))),
                })
    return entries


def format_entry(entry: dict) -> str:
    """One line per audited kernel config, for logs and failures."""
    r = entry["result"]
    if r.get("error"):
        return f"{entry['kernel'].split(':')[-1]} sm_{entry['arch']}: ERROR {r['error'][:200]}"
    return (
        f"{entry['kernel'].split(':')[-1]} sm_{entry['arch']} warps={r['num_warps']}: regs {r.get('regs')} "
        f"spill {r.get('spill_stores', 0)}/{r.get('spill_loads', 0)} B stack {r.get('stack', 0)} B "
        f"LOCAL {r.get('LOCAL', 0)} smem {r['shared']} B, LDG {r['global_loads']} STG {r['global_stores']} "
        f"STL {r['local_stores']} mma {r['mma'] or '-'}; need 128-bit ld>={entry['expected_128']['load']['count']} "
        f"st>={entry['expected_128']['store']['count']}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every benchmarked kernel for sm_80/sm_90 and audit the SASS.")
    parser.add_argument("--child", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ops", default="")
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(*args.child)
    from . import traffic
    from .common import discover

    if os.environ.get("TRITON_INTERPRET", "") not in ("1", "true", "on", "yes"):
        print("python -m benchmarks.audit records launches under the interpreter: run it with TRITON_INTERPRET=1",
              file=sys.stderr)
        return 2
    records = [traffic.measure_case(c) for c in discover([o for o in args.ops.split(",") if o] or None, quick=args.quick)]
    entries = audit_records(records, jobs=args.jobs)
    failed = 0
    for entry in entries:
        print(f"{entry['case']}: {format_entry(entry)}")
        for p in entry["problems"]:
            failed += 1
            print(f"  FAIL {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
