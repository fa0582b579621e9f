"""The shape of the house, held: every import arrow in src/corral points down the layers, and no
two modules import each other (directly or around a loop), not even from inside a function.

A new upward import fails here with the edge that broke the rule; to add a package, give it a
layer below everything that imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom first. A module may import from its own unit (package or module) or from a lower layer.
LAYERS: list[set[str]] = [
    {"corral._version", "corral.errors", "corral.startup", "corral.files", "corral.cachedir"},
    {"corral.lazymodel"},  # pydantic models that become pydantic classes on first use
    {"corral.kvm"},
    {"corral.seccomp"},  # per-thread syscall filters: the threads of every layer above enter them
    {"corral.arch"},
    {"corral.options"},  # the one NAME[,key=value] parser
    {"corral.memory", "corral.eventloop", "corral.backends", "corral.images"},
    {"corral.config"},
    {"corral.boot", "corral.devices"},
    {"corral.vstate"},  # everything that holds a KVM fd
    {"corral.state", "corral.builder", "corral.host"},
    {"corral.machine"},
    {"corral.migration", "corral.debug"},  # debug: the gdb stub, above the machine
    {"corral.firecracker"},  # Firecracker's API: models, VMM, routes, HTTP server
    {"corral.api"},  # the control socket: that API over a running machine, and its client
    {"corral.jail"},  # the jailer: starts `corral run` / `corral firecracker` in a jail
    {"corral.console"},  # the terminal the CLI runs a guest on
    {"corral.forkserver"},  # the warm template VM processes fork from (runs the CLI it preloads)
    {"corral.daemon"},  # corral serve: VMs as `corral firecracker` processes
    {"corral.cli"},
    {"corral", "corral.__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layered unit a module belongs to: corral.<top-level package or module>."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported corral module, line, only for type checking)]."""
    found: dict[str, list[tuple[str, int, bool]]] = {}
    for path in sorted((SRC / "corral").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        typing_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        edges = []
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            edges += [
                (n, node.lineno, id(node) in typing_only)
                for n in names
                if n == "corral" or n.startswith("corral.")
            ]
        found[_module_name(path)] = edges
    return found


IMPORTS = _imports()


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in IMPORTS}
    assert units - RANK.keys() == set(), "give these packages a layer in LAYERS"


def upward_imports(imports: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    upward = []
    for module, edges in imports.items():
        for target, line, _ in edges:
            src, dst = _unit(module), _unit(target)
            if src != dst and RANK.get(dst, -1) >= RANK.get(src, -1):
                upward.append(f"{module}:{line} imports {target} ({dst} is not below {src})")
    return upward


def test_every_import_points_down():
    assert upward_imports(IMPORTS) == []


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("corral.state.snapshot", "corral"),  # the package, for its version
        ("corral.devices.virtio.blk", "corral.machine"),
        ("corral.vstate.vcpu", "corral.builder"),
        ("corral.boot.loader", "corral.devices.base"),  # a sibling layer is not below
    ],
)
def test_the_scan_catches_an_upward_import(module, target):
    assert len(upward_imports({module: [(target, 1, False)]})) == 1


def test_no_import_cycles():
    graph = {
        m: {t for t, _, typing in edges if not typing and t in IMPORTS and t != m}
        for m, edges in IMPORTS.items()
    }
    # a module importing `corral.x.y` also runs the package `corral.x`'s __init__: ignore that
    # edge direction only where the package is an ancestor of the importer
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == []


# -- devices and backends: siblings that know nothing of each other or of the machine ------------
# what each package may import from corral at run time (TYPE_CHECKING imports are types only)
ALLOWED = {
    "devices": ("corral.devices", "corral.errors", "corral.arch", "corral.lazymodel"),
    "backends": ("corral.backends", "corral.errors", "corral.files"),
}
LAZY_OK = {("backends/tap.py", "pyroute2")}  # a second to import; only a NIC needs it
LAZY_OK.add(("devices/base.py", "pydantic"))  # state models are pydantic on first use (corral.lazymodel)
# a firmware's ACPI and SMBIOS tables, for its machines only: imported while the machine is
# built, before any filter (corral.builder.LAZY_MODULES, held by test_builder_lazy.py)
LAZY_OK |= {
    ("devices/legacy/fw_cfg.py", "corral.arch.x86"),
    ("devices/legacy/fw_cfg.py", "corral.arch.x86.acpi_loader"),
}


def _imports(tree: ast.AST):
    """(module, at top level?, under TYPE_CHECKING?) for each import in the tree."""

    def walk(node, top, typing_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = (
                    [child.module or ""]
                    if isinstance(child, ast.ImportFrom)
                    else [a.name for a in child.names]
                )
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
        for path in sorted((SRC / "corral" / package).rglob("*.py")):
            rel = str(path.relative_to(SRC / "corral"))
            for name, top, typing_only in _imports(ast.parse(path.read_text())):
                if not top and not {(rel, name.split(".")[0]), (rel, name)} & LAZY_OK:
                    bad.append(f"{rel}: function-level import of {name}")
                if name.startswith("corral") and not typing_only and not name.startswith(allowed):
                    bad.append(f"{rel}: imports {name}")
    assert bad == []


def test_the_scan_sees_what_it_should_refuse():
    tree = ast.parse("from corral.backends.disk import open_disk\ndef f():\n    import corral.machine\n")
    assert list(_imports(tree)) == [("corral.backends.disk", True, False), ("corral.machine", False, False)]
