"""GDB remote-protocol framing (corral.debug.packets): checksums, escapes, acks and Ctrl-C
split out of any chunking, and hostile streams (bad checksums, endless packets, junk) turned
into bounded events."""

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.debug.packets import Event, PacketReader, checksum, escape, frame, unescape


def test_frame_is_dollar_payload_hash_and_two_hex_digit_checksum():
    assert frame(b"OK") == b"$OK#9a"  # 'O' + 'K' = 0x4f + 0x4b
    assert frame(b"") == b"$#00"


def test_special_bytes_are_escaped_and_counted_escaped():
    assert escape(b"a$b#c}d*") == b"a}\x04b}\x03c}]d}\x0a"
    body = escape(b"#")
    assert frame(b"#") == b"$" + body + b"#%02x" % checksum(body)


@given(st.binary(max_size=300))
def test_escape_round_trips(data):
    assert unescape(escape(data)) == data


def test_a_lone_escape_at_the_end_is_an_error():
    try:
        unescape(b"abc}")
    except ValueError as exc:
        assert "escape" in str(exc)
    else:
        raise AssertionError("no error")


def test_packets_acks_and_interrupts_in_one_stream():
    events = PacketReader().feed(b"+$qC#b4-\x03$g#67")
    assert events == [
        Event("ack"),
        Event("packet", b"qC"),
        Event("nak"),
        Event("interrupt"),
        Event("packet", b"g"),
    ]


@given(st.lists(st.binary(max_size=60), max_size=8), st.data())
def test_chunking_does_not_change_what_is_read(payloads, data):
    stream = b"".join(frame(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, events = PacketReader(), []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        events += reader.feed(stream[a:b])
    assert [unescape(e.data) for e in events] == payloads
    assert all(e.kind == "packet" for e in events)


def test_a_bad_checksum_is_reported_and_the_next_packet_still_read():
    events = PacketReader().feed(b"$qC#00$qC#b4$qC#zz")
    assert events == [
        Event("bad", b"bad checksum"),
        Event("packet", b"qC"),
        Event("bad", b"checksum is not hex"),
    ]


def test_an_overlong_packet_is_dropped_once_and_reading_goes_on():
    reader = PacketReader(max_packet=16)
    events = reader.feed(b"$" + b"x" * 1000)
    events += reader.feed(b"y" * 1000 + b"#00+$g#67")
    assert events == [Event("bad", b"packet longer than 16 bytes"), Event("ack"), Event("packet", b"g")]
    assert reader._body is None or len(reader._body) <= 16


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_junk_never_raises_and_never_buffers_past_the_limit(junk):
    reader = PacketReader(max_packet=64)
    for ev in reader.feed(junk):
        assert ev.kind in ("packet", "ack", "nak", "interrupt", "bad")
        assert len(ev.data) <= 64
    assert reader._body is None or len(reader._body) <= 64
