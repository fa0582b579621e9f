"""Tiny guests written in assembly inside the tests (boot sectors, bzImages in miniature):
assembled with binutils' `as --32` and flattened to the bytes of their .text section."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def assemble_flat(source: str, workdir: Path, name: str) -> Path:
    """workdir/name: the raw .text of `source` (GNU as syntax, .code16/.code32 as it says);
    skips the test when binutils are not installed."""
    if not (shutil.which("as") and shutil.which("objcopy")):
        pytest.skip("binutils (as, objcopy) are not installed")
    src, obj, out = workdir / f"{name}.S", workdir / f"{name}.o", workdir / name
    src.write_text(source)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True)
    return out
