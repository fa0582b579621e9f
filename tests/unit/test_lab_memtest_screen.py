"""The lab's memtest86+ screen reader (tests/support/lab_memtest.py): a VT100 stream as
memtest86+ sends it (cursor moves, then the changed region) replayed onto 80x25."""

from __future__ import annotations

from support.lab_memtest import Screen, current_test, pass_percent, passes

ESC = "\x1b["
STREAM = (
    f"{ESC}2J{ESC}?25l{ESC}1;1H{ESC}7m      Memtest86+ v6.10      {ESC}0m"
    f"{ESC}2;29H| Pass   %{ESC}3;29H| Test #0 [Address test, walking ones, no cache]"
    f"{ESC}9;1HUsing: Core #0                            | Pass:  0        Errors: 0"
    # later updates overwrite fields in place, as memtest86+ sends them
    f"{ESC}2;35H 97% ####{ESC}3;29H| Test #10 [Bit fade test, 2 patterns]{ESC}K"
    f"{ESC}9;52H1"
)


def test_fields_are_read_off_the_replayed_screen():
    screen = Screen().feed(STREAM)
    assert "Memtest86+ v6.10" in screen.text()
    assert current_test(screen) == "#10 [Bit fade test, 2 patterns]"
    assert pass_percent(screen) == 97
    assert passes(screen) == 1
    assert screen.field("Errors:") == "0"


def test_nothing_drawn_reads_as_not_started():
    screen = Screen().feed("SeaBIOS (version 1.16.2)\r\nBooting from ROM...\r\n")
    assert passes(screen) == -1 and pass_percent(screen) == -1 and current_test(screen) == ""
    assert screen.text().splitlines()[1] == "Booting from ROM..."
