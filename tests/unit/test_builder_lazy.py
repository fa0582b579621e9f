"""The launch imports only what its machine uses (corral.builder.LAZY_MODULES), and preload()
imports the rest before a thread that may build a machine enters its seccomp filter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from corral import builder

SRC = Path(__file__).resolve().parents[2] / "src"
# the modules whose functions import what only some machines use
SCANNED = [
    SRC / "corral" / "builder.py",
    SRC / "corral" / "devices" / "legacy" / "fw_cfg.py",
    SRC / "corral" / "boot" / "loader.py",
]


def _function_imports(path: Path) -> set[str]:
    """The modules imported inside functions of `path` (`from a.b import c` counts as a.b.c
    when a.b.c is a module, else a.b)."""
    found: set[str] = set()
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    is_module = (SRC / Path(*sub.split("."))).with_suffix(".py").exists()
                    found.add(sub if is_module else node.module)
    return {m for m in found if m.startswith("corral.")}


def test_the_list_is_exactly_the_imports_made_inside_functions() -> None:
    made = set().union(*(_function_imports(p) for p in SCANNED))
    assert made == set(builder.LAZY_MODULES)
    assert len(builder.LAZY_MODULES) == len(set(builder.LAZY_MODULES))


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=SRC,
    )
    return set(out.stdout.split())


def test_preload_imports_every_one() -> None:
    """(That a launch imports none of them is tests/kvm/test_launch_modules.py's, on a real one.)"""
    preloaded = _modules_after("from corral.machine import preload\npreload()")
    assert set(builder.LAZY_MODULES) | {"corral.state.snapshot"} <= preloaded


def test_the_fork_servers_template_imports_them_for_its_children() -> None:
    """A child that imported them itself would hold its own copy (memory per VM, corral serve)."""
    template = _modules_after("from corral import forkserver\nforkserver.preload()")
    assert set(builder.LAZY_MODULES) | {"corral.state.snapshot"} <= template
