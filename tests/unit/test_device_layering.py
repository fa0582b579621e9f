"""Arrows run down: backends/ (host sides) and devices/ (guest sides) sit beside each other and
know nothing of each other or of the machine; neither hides an import inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import corral

SRC = Path(corral.__file__).parent
# what each package may import from corral at run time (TYPE_CHECKING imports are types only)
ALLOWED = {
    "devices": ("corral.devices", "corral.errors", "corral.arch"),
    "backends": ("corral.backends", "corral.errors"),
}
LAZY_OK = {("backends/tap.py", "pyroute2")}      # a second to import; only a NIC needs it


def _imports(tree: ast.AST):
    """(module, at top level?, under TYPE_CHECKING?) for each import in the tree."""
    def walk(node, top, typing_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [child.module or ""] if isinstance(child, ast.ImportFrom) else \
                    [a.name for a in child.names]
                for name in names:
                    yield name, top, typing_only
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from walk(child, top, True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, False, typing_only)
            else:
                yield from walk(child, top, typing_only)
    yield from walk(tree, True, False)


def test_devices_and_backends_import_only_downward():
    bad = []
    for package, allowed in ALLOWED.items():
        for path in sorted((SRC / package).rglob("*.py")):
            rel = str(path.relative_to(SRC))
            for name, top, typing_only in _imports(ast.parse(path.read_text())):
                if not top and (rel, name.split(".")[0]) not in LAZY_OK:
                    bad.append(f"{rel}: function-level import of {name}")
                if name.startswith("corral") and not typing_only and not name.startswith(allowed):
                    bad.append(f"{rel}: imports {name}")
    assert bad == []


def test_the_scan_sees_what_it_should_refuse():
    tree = ast.parse("from corral.backends.disk import open_disk\n"
                     "def f():\n    import corral.machine\n")
    assert list(_imports(tree)) == [("corral.backends.disk", True, False),
                                    ("corral.machine", False, False)]
