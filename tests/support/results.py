"""The one parser of what the probe guest reports on its console, for every runner (corral
through the library or the CLI, QEMU, the lab):

    RESULT key=value key=value ...      (merged over all RESULT lines: a later key wins)
    PROGRESS round=N checksum=0x... ok=1
"""

from __future__ import annotations

import re

PAIR = re.compile(r"(\w+)=(\S+)")


def parse_output(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(the RESULT pairs, one dict per PROGRESS line) of a console transcript."""
    results: dict[str, str] = {}
    progress: list[dict[str, str]] = []
    for line in text.replace("\r", "").splitlines():
        if line.startswith("RESULT "):
            results.update(PAIR.findall(line))
        elif line.startswith("PROGRESS "):
            progress.append(dict(PAIR.findall(line)))
    return results, progress


def parse_results(text: str) -> dict[str, str]:
    """The RESULT pairs of a console transcript."""
    return parse_output(text)[0]


def result_lines(text: str) -> list[str]:
    """The RESULT lines themselves, in order."""
    return [line for line in text.replace("\r", "").splitlines() if line.startswith("RESULT")]


def progress_rounds(text: str) -> dict[int, tuple[str, bool]]:
    """The complete PROGRESS lines of `mem-touch ... N|forever`: round -> (checksum, read back ok)."""
    return {
        int(p["round"]): (p["checksum"], p["ok"] == "1")
        for p in parse_output(text)[1]
        if {"round", "checksum", "ok"} <= p.keys()
    }
