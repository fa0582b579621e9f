"""What a plain `corral run --kernel` imports: the launch pays only for what it runs (issue 16).

A real launch of the probe (`hello`, to its exit) in a fresh interpreter, which then lists
sys.modules: none of the modules only other commands, other options or a cold cache need may
be among them. Which modules, never how long: timings belong to bench/probe_bench.py."""

from __future__ import annotations

import subprocess
import sys

from support.cli import cli_env

from corral.builder import LAZY_MODULES
from corral.images.probe import build_probe

LAUNCH = """
import sys
from corral.cli import main
try:
    main(["run", "--kernel", sys.argv[1], "--cmdline", "hello", "--no-reboot", "--memory", "64M"])
except SystemExit as exc:
    print("EXIT", exc.code, file=sys.stderr)
print("MODULES", " ".join(sorted(sys.modules)), file=sys.stderr)
"""

# Each is imported by a command, an option or a first run, never by a plain launch.
NOT_ON_THE_LAUNCH_PATH = [
    "rich",  # tables: `corral doctor`, `image list`, `stats`
    "pyroute2",  # taps: --net
    "corral.api",  # the control socket: --api
    "corral.migration",
    "corral.firecracker",  # `corral firecracker`
    "corral.daemon",  # `corral serve`
    "corral.forkserver",
    "corral.debug",  # --gdb, --trace, --stats, dumps
    "corral.jail.launch",  # --jail
    "corral.images.registry",  # --image
    "http.server",
    "http.client",
    "email",
    "importlib.metadata",  # pydantic's plugin scan (corral.startup)
    "asyncio",
    "pyseccomp",  # compiling a filter: the cache holds them after the first launch
    "ctypes.util",
    "hashlib",  # OpenSSL's: a tap's default MAC, snapshots, migration (the seccomp cache needs none)
    "subprocess",
    # config and state models are lazy models: a launch validates its config on the quick path
    # and builds its devices' states from their defaults, never a pydantic class (corral.lazymodel)
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    # what only some machines have: virtio devices, a firmware, a snapshot (corral.builder)
    *LAZY_MODULES,
    "corral.state.snapshot",
    "socket",  # sockets: --api, vsock, migration (seccomp's lists name families by number)
]


def _launch(kernel, env) -> tuple[int, set[str]]:
    r = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(kernel)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=cli_env(env),
    )
    assert "RESULT hello=1" in r.stdout, (r.stdout, r.stderr[-2000:])
    marked = [line for line in r.stderr.splitlines() if line.startswith(("EXIT ", "MODULES "))]
    lines = dict(line.split(" ", 1) for line in marked)
    return int(lines["EXIT"]), set(lines["MODULES"].split())


def test_a_plain_launch_imports_nothing_it_does_not_run(tmp_path):
    kernel = build_probe()
    env = {"CORRAL_CACHE": str(tmp_path)}
    code, cold = _launch(kernel, env)  # fills the seccomp cache
    assert code == 0 and "pyseccomp" in cold
    code, modules = _launch(kernel, env)
    assert code == 0
    # what the launch does use is there (the list below is not vacuous)
    assert {"corral.machine", "corral.builder", "corral.seccomp", "click", "corral.lazymodel"} <= modules
    modules.discard("pydantic.plugin._loader")  # corral.startup's stand-in: a name, never imported
    found = sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in NOT_ON_THE_LAUNCH_PATH))
    assert found == [], f"imported by a plain launch: {found}"
