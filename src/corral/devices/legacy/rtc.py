"""The MC146818 real-time clock and its 128 bytes of CMOS RAM.

Two ports: offset 0 (0x70) selects a CMOS index (bit 7, the NMI mask, is stored and otherwise
ignored; the port reads 0xFF as it is write-only), offset 1 (0x71) reads and writes the selected
byte.

* Clock registers (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday),
  0x07 day of month, 0x08 month, 0x09 year, 0x32 century) are computed on each read from
  `clock()` (UTC seconds, default `time.time`) plus a guest offset, in BCD or binary per
  register B's DM bit (0x04) and in 24- or 12-hour form per register B bit 1 (12-hour: bit 7 of
  the hour is PM).
* Setting the time: writes to the clock registers change the guest's offset from host time
  (whole seconds), so `hwclock --systohc` works and the clock keeps running from the new time.
  While register B's SET bit (0x80) is on, the clock is frozen: reads return the frozen time,
  writes edit it, and clearing SET starts the clock from it (the usual MC146818 protocol; a
  write with SET off takes effect at once). Out-of-range values are clamped to a valid date.
  The day-of-week register is derived from the date; writes to it are ignored.
* Register A: bit 7 (UIP, update in progress) reads 1 during the last 244 us of each second
  (as on the real part, so readers that wait for UIP to drop, like Linux, get a consistent
  time), never while SET is on; bits 0-6 are stored (0x26 at reset: 32.768 kHz, 1024 Hz).
  Register B: stored, 0x02 at reset (24-hour, BCD); setting SET clears UIE. Register C: reads
  0 (no interrupt flags: see below) and is read-only. Register D: reads 0x80 (valid RAM and
  time, battery good), read-only.
* Not implemented: periodic, alarm and update-ended interrupts (`irq8` is accepted and never
  raised) — Linux keeps time with the HPET/LAPIC/kvmclock and only reads and sets the RTC.
  The alarm registers (0x01, 0x03, 0x05) are plain RAM.
* `mem_size` (bytes of guest RAM) fills the memory-size bytes some firmware and guests read:
  0x15/0x16 base memory in KiB (640), 0x17/0x18 and 0x30/0x31 memory between 1 MiB and 64 MiB in
  KiB, 0x34/0x35 memory between 16 MiB and the 32-bit hole in 64 KiB units, 0x5B-0x5D memory
  above 4 GiB in 64 KiB units (all little-endian, saturated).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import date
from typing import ClassVar

from corral.arch.x86 import layout
from corral.devices.base import DeviceState, IrqLine
from corral.devices.legacy._common import Byte, Word
from corral.lazymodel import Field

CMOS_SIZE = 128
REG_SEC, REG_MIN, REG_HOUR, REG_DOW = 0x00, 0x02, 0x04, 0x06
REG_DOM, REG_MONTH, REG_YEAR = 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
_TIME_REGS = frozenset([REG_SEC, REG_MIN, REG_HOUR, REG_DOW, REG_DOM, REG_MONTH, REG_YEAR, REG_CENTURY])

A_UIP = 0x80
A_DEFAULT = 0x26
B_SET = 0x80
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H
D_VRT = 0x80
UIP_WINDOW = 244e-6  # seconds before each update during which UIP reads 1

MIN_YEAR, MAX_YEAR = 1, 9999

# fields of a broken-down time, all binary: index into a 6-list
_Y, _MO, _D, _H, _MI, _S = range(6)


class RtcTime(DeviceState):
    """A broken-down time as the guest wrote it while SET was on (not yet made a valid date)."""

    year: Word = Field(description="full year (century included)")
    month: Word = Field(description="month, 1-12 when valid")
    day: Word = Field(description="day of the month, 1-31 when valid")
    hour: Word = Field(description="hour, 0-23 when valid (24-hour, binary)")
    minute: Word = Field(description="minute, 0-59 when valid")
    second: Word = Field(description="second, 0-59 when valid")


class RtcState(DeviceState):
    index: Byte = Field(default=0, description="CMOS register selected through port 0x70")
    nmi_disabled: bool = Field(default=False, description="bit 7 of the last index write (NMI mask)")
    offset: int = Field(default=0, description="guest time = floor(host time) + offset, in seconds")
    frozen: RtcTime | None = Field(
        default=None, description="the time held while register B's SET bit is on; None while the clock runs"
    )
    cmos: list[Byte] = Field(
        default_factory=lambda: [0] * CMOS_SIZE,
        min_length=CMOS_SIZE,
        max_length=CMOS_SIZE,
        description="the 128 CMOS bytes, clock registers included",
    )


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


def _clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


def _fields_of(t: int) -> list[int]:
    try:
        tm = time.gmtime(t)
    except (OverflowError, OSError, ValueError):
        return [MAX_YEAR if t > 0 else MIN_YEAR, 1, 1, 0, 0, 0]
    return [tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec]


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_EPOCH_ORDINAL = 719163  # date(1970, 1, 1).toordinal()


def _days_in(year: int, month: int) -> int:
    """Days in `month` of `year` (Gregorian; what calendar.monthrange gives, without importing
    calendar and the locale machinery it pulls in on every launch)."""
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    return _MONTH_DAYS[month - 1] + leap


def _epoch_of(f: list[int]) -> int:
    year = _clamp(f[_Y], MIN_YEAR, MAX_YEAR)
    month = _clamp(f[_MO], 1, 12)
    day = _clamp(f[_D], 1, _days_in(year, month))
    days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    return days * 86400 + _clamp(f[_H], 0, 23) * 3600 + _clamp(f[_MI], 0, 59) * 60 + _clamp(f[_S], 0, 59)


class CmosRtc:
    """MC146818 RTC + CMOS RAM; ports 0x70-0x71 (2 ports), IRQ 8 (never raised)."""

    state_model: ClassVar[type[RtcState]] = RtcState
    # set by _load (their meaning: RtcState)
    _cmos: list[int]
    _frozen: list[int] | None  # the time fields while SET holds the clock
    _offset: int  # guest time minus host time, in whole seconds

    def __init__(
        self, irq8: IrqLine | None = None, clock: Callable[[], float] = time.time, mem_size: int = 0
    ) -> None:
        self._irq = irq8
        self._clock = clock
        self._lock = threading.Lock()
        cmos = [0] * CMOS_SIZE
        cmos[REG_A] = A_DEFAULT
        cmos[REG_B] = B_DEFAULT
        cmos[REG_D] = D_VRT
        if mem_size:
            _fill_memory_size(cmos, mem_size)
        self._load(RtcState(cmos=cmos))

    # -- bus interface ------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            value = 0
            for i in range(size):
                off = offset + i
                b = self._read_data() if off == 1 else 0xFF
                value |= b << (8 * i)
        return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                off, b = offset + i, (value >> (8 * i)) & 0xFF
                if off == 0:
                    self._index = b & 0x7F
                    self._nmi_disabled = bool(b & 0x80)
                elif off == 1:
                    self._write_data(b)

    # -- CMOS ---------------------------------------------------------------------------------
    def _read_data(self) -> int:
        idx = self._index
        if idx in _TIME_REGS:
            return self._read_time(idx)
        if idx == REG_A:
            a = self._cmos[REG_A]
            if self._frozen is None:
                now = self._clock()
                if now - math.floor(now) >= 1.0 - UIP_WINDOW:
                    a |= A_UIP
            return a
        return self._cmos[idx]

    def _write_data(self, v: int) -> None:
        idx = self._index
        if idx in _TIME_REGS:
            self._write_time(idx, v)
        elif idx == REG_A:
            self._cmos[REG_A] = v & 0x7F
        elif idx == REG_B:
            old = self._cmos[REG_B]
            if v & B_SET:
                v &= ~B_UIE
                if not old & B_SET:
                    self._frozen = self._now_fields()
            elif old & B_SET and self._frozen is not None:
                self._offset = _epoch_of(self._frozen) - self._host_seconds()
                self._frozen = None
            self._cmos[REG_B] = v
        elif idx in (REG_C, REG_D):
            pass
        else:
            self._cmos[idx] = v

    def _host_seconds(self) -> int:
        return math.floor(self._clock())

    def _now_fields(self) -> list[int]:
        return _fields_of(self._host_seconds() + self._offset)

    def _read_time(self, idx: int) -> int:
        f = self._frozen if self._frozen is not None else self._now_fields()
        b = self._cmos[REG_B]
        if idx == REG_SEC:
            v = f[_S]
        elif idx == REG_MIN:
            v = f[_MI]
        elif idx == REG_HOUR:
            h = f[_H]
            if not b & B_24H:
                pm = 0x80 if h >= 12 else 0
                h = h % 12 or 12
                return ((h if b & B_DM_BINARY else _bcd(h)) | pm) & 0xFF
            v = h
        elif idx == REG_DOW:
            y, m, d = _clamp(f[_Y], MIN_YEAR, MAX_YEAR), _clamp(f[_MO], 1, 12), f[_D]
            d = _clamp(d, 1, _days_in(y, m))
            v = (date(y, m, d).weekday() + 1) % 7 + 1  # Monday=0 -> 2, Sunday=6 -> 1
        elif idx == REG_DOM:
            v = f[_D]
        elif idx == REG_MONTH:
            v = f[_MO]
        elif idx == REG_YEAR:
            v = f[_Y] % 100
        else:  # century
            v = f[_Y] // 100
        return (v if b & B_DM_BINARY else _bcd(v)) & 0xFF

    def _write_time(self, idx: int, raw: int) -> None:
        if idx == REG_DOW:
            return
        b = self._cmos[REG_B]
        if idx == REG_HOUR and not b & B_24H:
            h = raw & 0x7F
            h = h if b & B_DM_BINARY else _from_bcd(h)
            v = h % 12 + (12 if raw & 0x80 else 0)
        else:
            v = raw if b & B_DM_BINARY else _from_bcd(raw)
        held = self._frozen
        frozen = held is not None
        f = held if held is not None else self._now_fields()
        if idx == REG_SEC:
            f[_S] = v
        elif idx == REG_MIN:
            f[_MI] = v
        elif idx == REG_HOUR:
            f[_H] = v
        elif idx == REG_DOM:
            f[_D] = v
        elif idx == REG_MONTH:
            f[_MO] = v
        elif idx == REG_YEAR:
            f[_Y] = f[_Y] // 100 * 100 + v % 100
        else:  # century
            f[_Y] = v * 100 + f[_Y] % 100
        # while frozen the fields hold what was written (as the chip's registers do); they are
        # made a valid date when the clock starts
        if not frozen:
            self._offset = _epoch_of(f) - self._host_seconds()

    # -- state --------------------------------------------------------------------------------
    def save_state(self) -> RtcState:
        with self._lock:
            f = self._frozen
            held = (
                None
                if f is None
                else RtcTime(year=f[_Y], month=f[_MO], day=f[_D], hour=f[_H], minute=f[_MI], second=f[_S])
            )
            return RtcState(
                index=self._index,
                nmi_disabled=self._nmi_disabled,
                offset=self._offset,
                frozen=held,
                cmos=list(self._cmos),
            )

    def load_state(self, state: RtcState) -> None:
        with self._lock:
            self._load(state)

    def _load(self, st: RtcState) -> None:
        self._index = st.index & 0x7F
        self._nmi_disabled = st.nmi_disabled
        self._offset = st.offset
        self._cmos = list(st.cmos)
        t = st.frozen
        if t is not None:
            self._frozen = [t.year, t.month, t.day, t.hour, t.minute, t.second]
        elif self._cmos[REG_B] & B_SET:
            self._frozen = self._now_fields()
        else:
            self._frozen = None
        if self._frozen is not None:
            self._cmos[REG_B] |= B_SET


def _fill_memory_size(cmos: list[int], mem_size: int) -> None:
    def put(index: int, value: int, nbytes: int) -> None:
        value = min(value, (1 << (8 * nbytes)) - 1)
        for i in range(nbytes):
            cmos[index + i] = (value >> (8 * i)) & 0xFF

    below_4g = min(mem_size, layout.MMIO_HOLE_START)
    put(0x15, 640, 2)
    ext_kib = max(0, min(below_4g, 64 * layout.MiB) - layout.MiB) // layout.KiB
    put(0x17, ext_kib, 2)
    put(0x30, ext_kib, 2)
    put(0x34, max(0, below_4g - 16 * layout.MiB) // (64 * layout.KiB), 2)
    put(0x5B, max(0, mem_size - layout.MMIO_HOLE_START) // (64 * layout.KiB), 3)
