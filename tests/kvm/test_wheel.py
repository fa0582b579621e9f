"""corral as a user or a distribution installs it: the wheel, in a fresh venv, far from the
checkout, boots the probe. The probe's sources must travel in the wheel for that to work."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import corral
from corral.images import probe

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]
# What a wheel build must not see: a stale build/lib would put deleted files back in the wheel.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "results"
)


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    assert r.returncode == 0, f"{cmd} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("tree") / "corral"
    shutil.copytree(ROOT, tree, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(tree)], timeout=300)
    wheels = list(out.glob("corral-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_carries_py_typed_and_the_probe_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "corral/py.typed" in names
    sources = {p.name for p in probe.PACKAGED_SOURCES.iterdir() if p.name.endswith(probe.SOURCE_SUFFIXES)}
    assert {"probe.ld", "boot.S", "main.c", "probe.h"} <= sources
    assert {f"corral/guest/{name}" for name in sources} <= names
    assert "corral/guest/Makefile" in names and "corral/guest/README.md" in names
    assert not [n for n in names if "/build/" in n or n.endswith(".o")]


def test_installed_wheel_boots_the_probe_from_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    # dependencies come from pip's cache (or the index), as for any user
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], timeout=300)

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_GUEST_SRC", "PYTHONPATH", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # an empty cache: the probe is built here

    where = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import corral; from corral.images import probe; "
            "print(corral.__version__); print(probe.probe_source_dir())",
        ],
        cwd=away,
        env=env,
        timeout=60,
    ).stdout.split()
    assert where[0] == corral.__version__
    assert Path(where[1]).is_relative_to(venv), where  # the wheel's copy, not the checkout's

    r = subprocess.run(
        [str(venv / "bin" / "corral"), "run", "--image", "probe", "--cmdline", "hello"],
        capture_output=True,
        text=True,
        cwd=away,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESULT hello=1" in r.stdout.splitlines(), r.stdout
    assert "probe: boot=pvh cmdline='hello'" in r.stdout, r.stdout
    # built from the packaged sources, under the same content key as the checkout's sources
    built = tmp_path / "xdg" / "corral" / "probe" / probe.source_digest(probe.PACKAGED_SOURCES)
    assert (built / probe.OUTPUT_NAME).is_file(), list((tmp_path / "xdg").rglob("*"))
