"""The README is the user's door: its commands are the ones CI runs, and its usage example runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_command() -> str:
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_shows_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    assert _ci_command() in readme


def test_readme_benchmark_command_names_the_bench_extra():
    readme = (ROOT / "README.md").read_text()
    assert 'pip install "torch==2.13.0" -e ".[bench]" && python -m benchmarks' in readme


def _example(text: str, heading: str) -> str:
    example = re.search(rf"## {heading}\n+```python\n(.*?)```", text, re.S)
    assert example, f"a ## {heading} section with a python example"
    return example.group(1)


@pytest.mark.slow
def test_readme_usage_example_runs(monkeypatch):
    """The README's first example, as a user runs it, with only the download and the GPU replaced:
    from_pretrained returns a tiny pipeline built offline (tests/_pipelines.py), .to("cuda") keeps it
    on the CPU. Five statements, ending in print(report)."""
    diffusers = pytest.importorskip("diffusers")
    import _pipelines

    code = _example((ROOT / "README.md").read_text(), "Usage")
    statements = [line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from"))]
    assert len(statements) <= 5 and statements[-1].startswith("print(report)"), statements
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: _pipelines.sd_pipeline()))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", lambda self, *args, **kwargs: self)
    namespace: dict = {}
    exec(compile(code, "README-usage", "exec"), namespace)
    report = namespace["report"]
    assert report.counts["resnet"] > 0 and report.counts["add_layer_norm"] > 0 and report.left == []
    assert namespace["image"].size[0] > 0  # a PIL image


def test_the_kernels_guide_example_runs(triton_backend):
    """docs/kernels.md's example of the functional API and the modules."""
    namespace: dict = {}
    exec(compile(_example((ROOT / "docs" / "kernels.md").read_text(), "Usage"), "kernels-usage", "exec"), namespace)
    assert "loss" in namespace and namespace["loss"].dim() == 0


def test_readme_links_resolve():
    for text_file in (ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text_file.read_text()):
            if "://" not in target:
                assert (text_file.parent / target).exists(), (text_file.name, target)
