"""Firecracker's logger and metrics settings, applied to corral: the `corral` logger gets the
log file and level asked for (PUT /logger, --log-path, --level); FlushMetrics appends one JSON
line to the metrics file (PUT /metrics, --metrics-path)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from corral.errors import CorralError

LEVELS = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 10,
}


class LoggerError(CorralError):
    """A log level or log file that cannot be used."""


def configure_logging(log_path: str | None, level: str | None) -> None:
    """Send the `corral` logger to `log_path` (appended; None: leave it on stderr) at `level`
    (Firecracker's names, any case; None: leave it)."""
    if level is not None and level.lower() not in LEVELS:
        raise LoggerError(f"Invalid log level: {level}: give Error, Warning, Info, Debug, Trace or Off")
    root = logging.getLogger("corral")
    if log_path is not None:
        try:
            handler: logging.Handler = logging.FileHandler(log_path)
        except OSError as exc:
            raise LoggerError(f"Cannot open the log file {log_path}: {exc.strerror}") from None
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
        for h in list(root.handlers):
            if getattr(h, "_corral_fc", False):
                root.removeHandler(h)
                h.close()
        handler._corral_fc = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if level is not None:
        root.setLevel(LEVELS[level.lower()])


def write_metrics(path: str, fields: dict[str, Any]) -> None:
    """Append one metrics line: a timestamp and `fields`."""
    line = {"utc_timestamp_ms": int(time.time() * 1000), **fields}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as exc:
        raise CorralError(f"Cannot write the metrics file {path}: {exc.strerror}") from None


__all__ = ["LoggerError", "configure_logging", "write_metrics"]
