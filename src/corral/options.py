"""One parser for the `NAME[,key=value]` option syntax (--disk, --net, --vsock, --virtio-console).

Each option declares its keys once, in an OptionSyntax: an optional positional first element,
flags (`ro`), keys that need a value (`serial=ID`) and keys where the value may be left out
(`tap[=NAME]`), plus the SYNTAX line users read. That line is the CLI's metavar and ends every
error, so help and errors cannot drift apart (Cloud Hypervisor's option_parser works this way).
Errors are FieldErrors naming the config field the option fills (`disks[0]`); the CLI shows the
flag instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from corral.errors import FieldError

FLAG = "flag"  # `ro`: there or not; parses to True
VALUE = "value"  # `serial=ID`: needs a non-empty value
OPTIONAL = "optional"  # `tap` or `tap=NAME`: the value may be left out (parses to "")

Parsed = dict[str, "str | bool"]


class OptionSyntax(NamedTuple):
    """The keys of one `NAME[,key=value]` option and the SYNTAX line shown in help and errors."""

    field: str  # the config field it fills: "disks"
    syntax: str  # "PATH[,ro][,serial=ID][,overlay=FILE]"
    keys: Mapping[str, str]  # key -> FLAG | VALUE | OPTIONAL, in display order
    positional: str | None = None  # the first element, taken verbatim, under this name
    one_of: tuple[tuple[str, ...], ...] = ()  # exactly one key of each group

    def error(self, text: str, reason: str, where: str | None = None) -> FieldError:
        """The one error shape: the field, what is wrong with `text` (quoted by repr, so the
        line stays one line whatever was typed), and the syntax to use."""
        return FieldError(where or self.field, f"{text!r} {reason}: use {self.syntax}")

    def parse(self, text: str, where: str | None = None) -> Parsed:
        """Split `text` into {positional or key: value}; unknown, repeated, empty or missing keys
        raise one FieldError for `where` (default: the option's field)."""
        elements = text.split(",")
        out: Parsed = {}
        if self.positional is not None:
            first, *elements = elements
            if not first:
                raise self.error(text, f"has no {self.positional} first", where)
            out[self.positional] = first
        for element in elements:
            if not element:
                raise self.error(text, "has an empty element", where)
            key, eq, value = element.partition("=")
            kind = self.keys.get(key)
            if kind is None:
                raise self.error(text, f"has an unknown key {key!r}", where)
            if key in out:
                raise self.error(text, f"gives {key!r} twice", where)
            if kind == FLAG and eq:
                raise self.error(text, f"gives '{key}' a value; it takes none", where)
            if kind == VALUE and not value:
                raise self.error(text, f"gives '{key}' no value", where)
            out[key] = True if kind == FLAG else value
        for group in self.one_of:
            given = [k for k in group if k in out]
            if len(given) != 1:
                raise self.error(
                    text,
                    f"needs {' or '.join(group)}"
                    if not given
                    else f"gives more than one of {', '.join(group)}",
                    where,
                )
        return out

    def format(self, values: Mapping[str, str | bool]) -> str:
        """The option text for parsed `values`: parse(format(v)) == v."""
        parts = [str(values[self.positional])] if self.positional is not None else []
        for key, kind in self.keys.items():
            if key not in values:
                continue
            value = values[key]
            if kind == FLAG:
                if value:
                    parts.append(key)
            elif kind == OPTIONAL and value == "":
                parts.append(key)
            else:
                parts.append(f"{key}={value}")
        return ",".join(parts)
