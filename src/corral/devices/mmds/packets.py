"""Ethernet, ARP, IPv4 and TCP headers for the MMDS stack: parse what the guest sent, build what
it gets back.

Parsing never trusts a length field: every slice is bounded by the bytes actually there, and a
frame that does not parse is simply not MMDS traffic (None), never an exception. Checksums of
frames the guest sends are not verified (with checksum offload negotiated they hold only the
pseudo-header sum); frames built here carry full IPv4 and TCP checksums, since the guest is told
nothing about offload for them (a zero virtio-net header).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HDR = struct.Struct(">6s6sH")
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
ARP_PKT = struct.Struct(">HHBBH6s4s6s4s")  # htype, ptype, hlen, plen, op, sha, spa, tha, tpa
ARP_REQUEST, ARP_REPLY = 1, 2
IP_HDR = struct.Struct(">BBHHHBBH4s4s")
IPPROTO_TCP = 6
TCP_HDR = struct.Struct(">HHIIBBHHH")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCP_OPT_MSS = 2


@dataclass(frozen=True, slots=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


@dataclass(frozen=True, slots=True)
class Ipv4:
    src: bytes
    dst: bytes
    proto: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Segment:
    """One TCP segment as the stack needs it."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    mss: int | None  # the MSS option of a SYN
    data: bytes


def ethertype(frame: bytes) -> tuple[bytes, bytes, int] | None:
    """(destination MAC, source MAC, ethertype) or None for a runt."""
    if len(frame) < ETH_HDR.size:
        return None
    return ETH_HDR.unpack_from(frame)


def parse_arp(payload: bytes) -> Arp | None:
    """An Ethernet/IPv4 ARP packet, or None."""
    if len(payload) < ARP_PKT.size:
        return None
    htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP_PKT.unpack_from(payload)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return None
    return Arp(op, sha, spa, tpa)


def parse_ipv4(payload: bytes) -> Ipv4 | None:
    """An unfragmented IPv4 packet, its payload cut to the header's total length (or to what is
    there, whichever is shorter), or None."""
    if len(payload) < IP_HDR.size:
        return None
    vihl, _tos, total, _ident, frag, _ttl, proto, _csum, src, dst = IP_HDR.unpack_from(payload)
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < IP_HDR.size or ihl > len(payload):
        return None
    if frag & 0x3FFF:  # more fragments, or an offset: MMDS requests are never fragmented
        return None
    # a GSO frame may carry a total length of 0; then the frame's own length counts
    end = min(total, len(payload)) if total >= ihl else len(payload)
    return Ipv4(src, dst, proto, payload[ihl:end])


def parse_tcp(payload: bytes) -> Segment | None:
    if len(payload) < TCP_HDR.size:
        return None
    sport, dport, seq, ack, off, flags, window, _csum, _urg = TCP_HDR.unpack_from(payload)
    hlen = (off >> 4) * 4
    if hlen < TCP_HDR.size or hlen > len(payload):
        return None
    mss = None
    if flags & SYN:
        mss = _mss_option(payload[TCP_HDR.size : hlen])
    return Segment(sport, dport, seq, ack, flags & 0x3F, window, mss, payload[hlen:])


def _mss_option(opts: bytes) -> int | None:
    i = 0
    while i < len(opts):  # each step moves at least one byte on
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        length = opts[i + 1]
        if kind == TCP_OPT_MSS and length == 4 and i + 4 <= len(opts):
            return int.from_bytes(opts[i + 2 : i + 4], "big")
        i += length
    return None


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def arp_reply(our_mac: bytes, our_ip: bytes, to: Arp) -> bytes:
    pkt = ARP_PKT.pack(1, ETH_P_IP, 6, 4, ARP_REPLY, our_mac, our_ip, to.sender_mac, to.sender_ip)
    return ETH_HDR.pack(to.sender_mac, our_mac, ETH_P_ARP) + pkt


def tcp_frame(
    *,
    src_mac: bytes,
    dst_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    data: bytes = b"",
    mss: int | None = None,
    ident: int = 0,
) -> bytes:
    """An Ethernet frame holding one TCP segment, checksums filled in."""
    opts = struct.pack(">BBH", TCP_OPT_MSS, 4, mss) if mss is not None else b""
    hlen = TCP_HDR.size + len(opts)
    tcp = TCP_HDR.pack(src_port, dst_port, seq, ack, (hlen // 4) << 4, flags, window, 0, 0) + opts + data
    pseudo = src_ip + dst_ip + struct.pack(">BBH", 0, IPPROTO_TCP, len(tcp))
    csum = checksum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack(">H", csum) + tcp[18:]
    total = IP_HDR.size + len(tcp)
    ip = IP_HDR.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, 64, IPPROTO_TCP, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack(">H", checksum(ip)) + ip[12:]
    return ETH_HDR.pack(dst_mac, src_mac, ETH_P_IP) + ip + tcp
