"""The one `NAME[,key=value]` option parser: round trips, and one clear line for junk."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.config import DISK, NET, VIRTIO_CONSOLE, VSOCK, DiskConfig, NetConfig, VsockConfig
from corral.errors import FieldError
from corral.options import FLAG, OPTIONAL, VALUE, OptionSyntax

ALL = [DISK, NET, VSOCK, VIRTIO_CONSOLE]
# values never hold the separators; the positional may hold '=' (a path like a=b.img)
text = st.text(st.characters(codec="utf-8", exclude_characters=",=\0"), min_size=1, max_size=12)
positional = st.text(st.characters(codec="utf-8", exclude_characters=",\0"), min_size=1, max_size=12)


@st.composite
def valid_values(draw, syntax: OptionSyntax) -> dict:
    """Parsed values `syntax` accepts: its positional, any keys, exactly one of each group."""
    values: dict = {}
    if syntax.positional is not None:
        values[syntax.positional] = draw(positional)
    grouped = {k for g in syntax.one_of for k in g}
    chosen = {draw(st.sampled_from(g)) for g in syntax.one_of}
    chosen |= {k for k in syntax.keys if k not in grouped and draw(st.booleans())}
    for key in chosen:
        kind = syntax.keys[key]
        if kind == FLAG:
            values[key] = True
        elif kind == OPTIONAL:
            values[key] = draw(st.one_of(st.just(""), text))
        else:
            values[key] = draw(text)
    return values


@given(st.data())
def test_format_then_parse_round_trips(data):
    syntax = data.draw(st.sampled_from(ALL))
    values = data.draw(valid_values(syntax))
    assert syntax.parse(syntax.format(values)) == values


@given(st.data())
def test_key_order_does_not_matter(data):
    syntax = data.draw(st.sampled_from(ALL))
    values = data.draw(valid_values(syntax))
    elements = syntax.format(values).split(",")
    head = elements[:1] if syntax.positional is not None else []
    rest = data.draw(st.permutations(elements[len(head) :]))
    assert syntax.parse(",".join(head + list(rest))) == values


def _rejected(syntax: OptionSyntax, spec: str, where: str | None = None) -> str:
    with pytest.raises(FieldError) as exc:
        syntax.parse(spec, where)
    err = exc.value
    assert err.field == (where or syntax.field)
    assert len(err.problems) == 1 and "\n" not in str(err)
    assert str(err).endswith(f": use {syntax.syntax}")  # every error shows the syntax
    return err.problems[0][1]


@given(st.data())
def test_unknown_keys_are_refused(data):
    syntax = data.draw(st.sampled_from(ALL))
    values = data.draw(valid_values(syntax))
    junk = data.draw(text.filter(lambda k: k not in syntax.keys))
    value = data.draw(st.one_of(st.just(""), st.just("=x")))
    spec = f"{syntax.format(values)},{junk}{value}"
    assert f"unknown key {junk!r}" in _rejected(syntax, spec, "disks[3]")


@given(st.data())
def test_repeated_keys_are_refused(data):
    syntax = data.draw(st.sampled_from(ALL))
    values = data.draw(valid_values(syntax))
    key = data.draw(st.sampled_from(list(syntax.keys)))
    element = key if syntax.keys[key] == FLAG else f"{key}={data.draw(text)}"
    spec = f"{syntax.format(values)},{element},{element}"
    assert f"{key!r} twice" in _rejected(syntax, spec)


@pytest.mark.parametrize(
    "syntax,spec,needle",
    [
        (DISK, "", "has no path first"),
        (DISK, ",ro", "has no path first"),
        (DISK, "a.img,,ro", "empty element"),
        (DISK, "a.img,ro=yes", "gives 'ro' a value; it takes none"),
        (DISK, "a.img,serial=", "gives 'serial' no value"),
        (DISK, "a.img,serial", "gives 'serial' no value"),
        (VSOCK, "uds=x", "needs cid"),
        (VSOCK, "cid=3", "needs uds"),
        (VIRTIO_CONSOLE, "", "empty element"),
        (VIRTIO_CONSOLE, "pty,file=x", "gives more than one of pty, file"),
        (VIRTIO_CONSOLE, "tty", "unknown key 'tty'"),
        (NET, "mac=52:54:00:00:00:01", "needs tap"),
    ],
)
def test_malformed_options(syntax, spec, needle):
    assert needle in _rejected(syntax, spec)


def test_configs_parse_through_their_syntax():
    assert DiskConfig.parse("a=b.img,ro,serial=s1,overlay=o.qcow") == DiskConfig(
        path="a=b.img", read_only=True, serial="s1", overlay="o.qcow"
    )
    assert NetConfig.parse("tap", 2).tap == "corral2"
    assert NetConfig.parse("mac=52:54:00:00:00:01,tap=t9").tap == "t9"
    assert VsockConfig.parse("uds=/tmp/v,cid=7") == VsockConfig(cid=7, uds_path="/tmp/v")


@pytest.mark.parametrize(
    "parse,field,needle",
    [
        (lambda: DiskConfig.parse("a.img,nope", 2), "disks[2]", "unknown key 'nope'"),
        (lambda: DiskConfig.parse("a.img,serial=" + "s" * 21, 1), "disks[1].serial", "at most 20 characters"),
        (lambda: NetConfig.parse("user", 1), "nets[1]", "only tap networking exists"),
        (lambda: NetConfig.parse("tap=t0,mac=01:00:5e:00:00:01"), "nets[0].mac", "multicast"),
        (lambda: VsockConfig.parse("cid=2,uds=x"), "vsock.cid", "greater than or equal to 3"),
        (lambda: VsockConfig.parse("cid=many,uds=x"), "vsock.cid", "valid integer"),
    ],
)
def test_config_parse_errors_name_the_field(parse, field, needle):
    with pytest.raises(FieldError) as exc:
        parse()
    assert exc.value.field == field and needle in str(exc.value)
    assert str(exc.value).startswith(f"{field}: ")
    assert "--" not in str(exc.value)  # the library never speaks of CLI flags


def test_syntax_constants_are_the_cli_metavars():
    from corral.cli import run

    metavars = {p.name: p.metavar for p in run.params}
    assert metavars["disks"] == DISK.syntax and metavars["nets"] == NET.syntax
    assert metavars["vsock"] == VSOCK.syntax and metavars["virtio_console"] == VIRTIO_CONSOLE.syntax
    assert all(s.field in metavars for s in ALL)  # each option fills the field named like its flag


def test_value_kinds_are_the_three_declared():
    assert {k for s in ALL for k in s.keys.values()} == {FLAG, VALUE, OPTIONAL}
