"""Which ldm_fast patches apply on each diffusers release: ``python -m benchmarks.diffusers_versions``.

For each release it reads the published wheel (downloaded with ``pip download --no-deps`` into
``--wheels``, default ``benchmarks/results/diffusers-wheels``; nothing is imported), takes the
source of every function :data:`ldm_fast.integrations.diffusers.supported.SUPPORTED` lists (the
lines ``inspect.getsource`` would give), computes its digest
(:func:`ldm_fast.integrations.source.digest_of_source`) and marks a patch as applying when every
function it needs (``PATCH_SOURCES``) is known. Prints the markdown table of docs/diffusers.md;
``--check`` also fails when a release range written in SUPPORTED differs from the supported
releases whose wheels ship that source (the ranges are derived, never guessed). Older releases
are in the table to show what ldm_fast recognizes there.
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from ldm_fast.integrations.diffusers.supported import LOCATIONS, PATCH_SOURCES, SUPPORTED
from ldm_fast.integrations.diffusers.supported import RELEASES as SUPPORTED_RELEASES
from ldm_fast.integrations.source import digest_of_source

from .common import BENCH_DIR

#: The releases the table covers: two before the supported range, then every release in it.
RELEASES = ("0.28.2", "0.29.2", "0.30.0", "0.30.1", "0.30.2", "0.30.3", "0.31.0", "0.32.0", "0.32.1", "0.32.2",
            "0.33.0", "0.33.1", "0.34.0", "0.35.0", "0.35.1", "0.35.2", "0.36.0", "0.37.0", "0.37.1", "0.38.0",
            "0.39.0", "0.40.0", "0.41.0", "0.42.0", "0.42.1")


def wheel(version: str, where: Path) -> Path:
    found = sorted(where.glob(f"diffusers-{version}-*.whl"))
    if not found:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"diffusers=={version}",
                        "-d", str(where)], check=True)
        found = sorted(where.glob(f"diffusers-{version}-*.whl"))
    return found[0]


def function_source(text: str, cls: str | None, name: str) -> str | None:
    """The lines ``inspect.getsource`` gives for ``cls.name`` (or the module-level ``name``) in ``text``:
    from its first decorator (or ``def``) to its last line."""
    tree = ast.parse(text)
    body = tree.body
    if cls is not None:
        owners = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls]
        if not owners:
            return None
        body = owners[0].body
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            return "\n".join(text.splitlines()[first - 1:node.end_lineno]) + "\n"
    return None


def digests(path: Path) -> dict:
    """``{function: digest or None}`` for the wheel at ``path``."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for fn, (rel, cls, name) in LOCATIONS.items():
            try:
                text = io.TextIOWrapper(zf.open(f"diffusers/{rel}"), encoding="utf-8").read()
            except KeyError:
                out[fn] = None
                continue
            source = function_source(text, cls, name)
            out[fn] = None if source is None else digest_of_source(source)
    return out


def table(per_release: dict) -> str:
    patches = list(PATCH_SOURCES)
    lines = ["| diffusers | " + " | ".join(f"`{p}`" for p in patches) + " |",
             "|---|" + "---|" * len(patches)]
    for version, found in per_release.items():
        marks = ["yes" if all(found.get(fn) in SUPPORTED[fn] for fn in PATCH_SOURCES[p]) else "no" for p in patches]
        lines.append(f"| {version} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def _key(version: str) -> tuple:
    return tuple(int(x) for x in version.split("."))


def check(per_release: dict) -> list:
    """The SUPPORTED entries whose written release range differs from the supported releases
    (:data:`~ldm_fast.integrations.diffusers.supported.RELEASES`) that ship them."""
    lo, hi = (_key(v) for v in SUPPORTED_RELEASES.split("-"))
    supported = {v: found for v, found in per_release.items() if lo <= _key(v) <= hi}
    problems = []
    for fn, known in SUPPORTED.items():
        for value, source in known.items():
            shipped = [v for v, found in supported.items() if found.get(fn) == value]
            written = source.releases.split("-")
            if not shipped or [shipped[0], shipped[-1]] != [written[0], written[-1]]:
                problems.append(f"{fn} {value[:12]}: written {source.releases}, shipped by {shipped or 'none'}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, default=BENCH_DIR / "results" / "diffusers-wheels")
    parser.add_argument("--check", action="store_true", help="fail when SUPPORTED's release ranges are not the wheels'")
    args = parser.parse_args(argv)
    per_release = {v: digests(wheel(v, args.wheels)) for v in RELEASES}
    print(table(per_release))
    problems = check(per_release) if args.check else []
    for p in problems:
        print("MISMATCH:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
