"""The diffusers sources ldm_fast reproduces: the installed diffusers' functions are the ones
:data:`SUPPORTED` lists (for its release), and the digest ignores what does not compute."""

from __future__ import annotations

import importlib
import inspect

import pytest

from ldm_fast.integrations.diffusers import supported
from ldm_fast.integrations.source import digest, digest_of_source

diffusers = pytest.importorskip("diffusers")


def _version(text: str) -> tuple:
    return tuple(int(x) for x in text.split(".")[:3])


def _installed(fn_name: str):
    rel, cls, name = supported.LOCATIONS[fn_name]
    module = importlib.import_module("diffusers." + rel[:-3].replace("/", "."))
    return getattr(module, name) if cls is None else getattr(getattr(module, cls), name)


@pytest.mark.parametrize("fn_name", sorted(supported.SUPPORTED))
def test_the_installed_source_is_known_for_this_release(fn_name):
    """CI runs this against the oldest and the newest supported diffusers (.ci/run)."""
    value = digest(_installed(fn_name))
    assert value in supported.SUPPORTED[fn_name], (
        f"diffusers {diffusers.__version__}: {fn_name} has source digest {value}, not in SUPPORTED")
    lo, hi = (_version(v) for v in supported.SUPPORTED[fn_name][value].releases.split("-"))
    installed = _version(diffusers.__version__)
    if _version(supported.RELEASES.split("-")[0]) <= installed <= _version(supported.RELEASES.split("-")[1]):
        assert lo <= installed <= hi, (fn_name, diffusers.__version__, supported.SUPPORTED[fn_name][value])


@pytest.mark.parametrize("fn_name", sorted(supported.SUPPORTED))
def test_the_version_table_reads_the_source_inspect_reads(fn_name):
    """benchmarks/diffusers_versions.py reads sources from wheels without importing them: the same
    lines inspect gives (so the generated table is the run-time check's)."""
    from benchmarks.diffusers_versions import function_source

    fn = _installed(fn_name)
    rel, cls, name = supported.LOCATIONS[fn_name]
    text = open(inspect.getsourcefile(inspect.unwrap(fn))).read()
    assert digest_of_source(function_source(text, cls, name)) == digest(fn)


def test_the_digest_ignores_formatting_comments_docstrings_and_annotations():
    a = '''
def f(self, x: "torch.Tensor", *args, **kwargs) -> "torch.Tensor":
    """Doc."""
    y: int
    return self.g(x)  # comment
'''
    b = '''
    @staticmethod
    def f(self, x, *args, **kwargs):
        return self.g(
            x)
'''
    c = '''
def f(self, x, *args, **kwargs):
    return self.g(x) + 0
'''
    assert digest_of_source(a) != digest_of_source(b)  # a decorator computes
    assert digest_of_source(a) == digest_of_source(b.replace("    @staticmethod\n", ""))
    assert digest_of_source(a) != digest_of_source(c)
