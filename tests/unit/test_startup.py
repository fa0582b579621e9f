"""corral.startup: the CLI skips pydantic's plugin scan (and its importlib.metadata import); a
program importing corral as a library keeps pydantic's own loader; validation still happens."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_the_cli_loads_neither_the_plugin_scan_nor_rich_nor_pyroute2() -> None:
    out = _run(
        "import sys, corral.cli\n"
        "print(sorted(m for m in ('importlib.metadata', 'rich', 'pyroute2') if m in sys.modules))"
    )
    assert out == "[]"


def test_a_library_import_keeps_pydantics_plugin_loader() -> None:
    out = _run(
        "import sys, corral.machine\n"
        "corral.machine.MachineConfig.model_validate({})\n"  # (a first validator: pydantic is in now)
        "print(getattr(sys.modules['pydantic.plugin._loader'], '__file__', None))"
    )
    assert out.endswith("_loader.py")


def test_the_users_own_plugin_setting_is_left_alone() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, corral.cli\ncorral.cli.MachineConfig.model_validate({})\n"
            "print(hasattr(sys.modules['pydantic.plugin._loader'], '__file__'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYDANTIC_DISABLE_PLUGINS": "some_plugin", "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_config_and_state_are_still_validated_under_the_cli() -> None:
    out = _run(
        "import corral.cli\n"
        "from corral.config import MachineConfig\n"
        "from corral.devices.virtio.queue import VirtqueueState\n"
        "from corral.errors import CorralError\n"
        "from pydantic import ValidationError\n"
        "bad = []\n"
        "try:\n    MachineConfig.build(kernel='k', cpus=0)\n"
        "except (CorralError, ValidationError):\n    bad.append('config')\n"
        "try:\n    VirtqueueState.model_validate({'size': 0})\nexcept CorralError:\n    bad.append('state')\n"
        "print(bad)"
    )
    assert out == "['config', 'state']"


@pytest.mark.parametrize("model", ["corral.state.model.MachineState", "corral.devices.base.NoState"])
def test_state_models_build_their_validator_on_first_use(model: str) -> None:
    mod, name = model.rsplit(".", 1)
    out = _run(f"import {mod} as m\nc = m.{name}\nprint(c.__pydantic_complete__)")
    assert out == "False"
