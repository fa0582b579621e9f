"""Style gates: ruff's lint and format check over src, tests and bench, and mypy over src.

The rules live in pyproject.toml ([tool.ruff], [tool.mypy]), so an editor or a bare `ruff check`
agrees with this test. Each tool runs under this interpreter (`python -m ...`) from the repository
root; a failure shows the tool's own report. A tool that is not installed skips its test: both
come with the `test` extra (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATHS = ["src", "tests", "bench"]


def _run(tool: str, *args: str) -> None:
    if importlib.util.find_spec(tool) is None:
        pytest.skip(f"{tool} is not installed: pip install -e '.[test]'")
    proc = subprocess.run(
        [sys.executable, "-m", tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join((tool, *args))}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}",
            pytrace=False,
        )


def test_ruff_lint() -> None:
    _run("ruff", "check", "--no-fix", *PATHS)


def test_ruff_format() -> None:
    _run("ruff", "format", "--check", *PATHS)


def test_mypy() -> None:
    _run("mypy")  # files, plugins and strictness from [tool.mypy]


def test_test_modules_have_unique_basenames():
    # pytest imports test files by basename (rootdir-relative, no __init__.py): two files with one
    # name in different folders stop the whole run at collection
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, list[str]] = {}
    for p in tests.rglob("test_*.py"):
        seen.setdefault(p.name, []).append(str(p.relative_to(tests)))
    assert {n: ps for n, ps in seen.items() if len(ps) > 1} == {}
