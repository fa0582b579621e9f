"""corral's version, in one place: pyproject.toml reads it at build time, and snapshots and
migration streams carry it, so a state written by another release is refused by name."""

__version__ = "0.1.0"
