"""GDB remote serial protocol framing: `$payload#cs` packets, acks, the Ctrl-C byte.

Everything here is pure and bounded: a peer that sends an endless packet, bad checksums or
binary junk gets events that say so, never unbounded buffering.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_PACKET = 16384  # the PacketSize we announce: bytes between '$' and '#', as gdb counts them
INTERRUPT = 0x03  # Ctrl-C from gdb: stop the running target

EventKind = Literal["packet", "ack", "nak", "interrupt", "bad"]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    data: bytes = b""  # the payload of a packet; the reason for "bad"


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


_ESCAPED = frozenset(b"$#}*")


def escape(data: bytes) -> bytes:
    """Binary data for a packet: '$', '#', '}' and '*' become '}' + (byte ^ 0x20)."""
    if not _ESCAPED.intersection(data):
        return data
    out = bytearray()
    for b in data:
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The bytes of an escaped binary payload (X packets). A trailing lone '}' is an error."""
    if b"}" not in data:
        return data
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("binary data ends inside an escape")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """A whole packet for `payload` (escaped as needed)."""
    body = escape(payload)
    return b"$" + body + b"#" + b"%02x" % checksum(body)


class PacketReader:
    """Turns the byte stream from gdb into events, whatever the chunking."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._body: bytearray | None = None  # inside a packet, before '#'
        self._cs: bytearray | None = None  # after '#': the checksum's hex digits
        self._skipping = False  # after an overlong packet: drop bytes until its '#xx'

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        for b in data:
            if self._cs is not None:
                self._cs.append(b)
                if len(self._cs) == 2:
                    ev = self._finish()
                    if ev is not None:
                        events.append(ev)
            elif self._body is not None:
                if b == 0x23:  # '#'
                    self._cs = bytearray()
                elif len(self._body) >= self.max_packet:
                    self._body = None
                    self._skipping = True
                    events.append(Event("bad", b"packet longer than %d bytes" % self.max_packet))
                else:
                    self._body.append(b)
            elif self._skipping:
                if b == 0x23:
                    self._skipping = False
                    self._cs = bytearray()
                    self._body = None
            elif b == 0x24:  # '$'
                self._body = bytearray()
            elif b == 0x2B:  # '+'
                events.append(Event("ack"))
            elif b == 0x2D:  # '-'
                events.append(Event("nak"))
            elif b == INTERRUPT:
                events.append(Event("interrupt"))
            # anything else between packets is noise: ignored, as gdb does
        return events

    def _finish(self) -> Event | None:
        assert self._cs is not None
        digits, body = bytes(self._cs), self._body
        self._cs, self._body = None, None
        if body is None:  # the tail of an overlong packet, already reported
            return None
        try:
            want = int(digits, 16)
        except ValueError:
            return Event("bad", b"checksum is not hex")
        if want != checksum(bytes(body)):
            return Event("bad", b"bad checksum")
        return Event("packet", bytes(body))
