"""Where corral keeps what it builds once and reuses: $CORRAL_CACHE, else
$XDG_CACHE_HOME/corral, else ~/.cache/corral.

A module of its own, below everything, so that the launch path (the seccomp filter cache) finds
the directory without importing the image cache and its archive tools.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if env := os.environ.get("CORRAL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "corral"
