"""The README is the user's door: its commands are the ones CI runs, and its usage example runs."""

import pathlib
import re

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


def test_readme_usage_example_runs(triton_backend):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Usage\n+```python\n(.*?)```", readme, re.S)
    assert example, "README has a ## Usage section with a python example"
    namespace: dict = {}
    exec(compile(example.group(1), "README-usage", "exec"), namespace)
    assert "loss" in namespace and namespace["loss"].dim() == 0
