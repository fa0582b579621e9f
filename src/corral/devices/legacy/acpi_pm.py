"""The ACPI PM1 register block and PM timer (what the FADT's PM1a_EVT/PM1a_CNT/PM_TMR point at).

Offsets from the base port (layout.PM_BASE_PORT, 12 ports):

    0-1   PM1_STS   status, write 1 to clear
    2-3   PM1_EN    enables
    4-5   PM1_CNT   control: SCI_EN (bit 0), BM_RLD (1), GBL_RLS (2), SLP_TYP (10-12), SLP_EN (13)
    6-7   (unused: read 0xFF, writes ignored)
    8-11  PM_TMR    24-bit free-running counter at 3.579545 MHz (read-only; TMR_VAL_EXT = 0)

Any access of 1, 2 or 4 bytes at any offset works on the bytes it covers, little-endian, as one
operation (a 4-byte write at offset 2 sets PM1_EN and PM1_CNT together; a byte write at offset 5
sets SLP_TYP and SLP_EN, which is how some code enters a sleep state).

* SCI_EN always reads 1: the machine is always in ACPI mode (the FADT has no SMI_CMD).
* Writing SLP_EN with SLP_TYP == layout.S5_SLP_TYP calls `ctl.request_poweroff()`; with
  layout.S3_SLP_TYP it clears WAK_STS and calls `ctl.request_suspend()` (the machine stops its
  vCPUs until the host wakes it, and `wake()` then sets WAK_STS, as the hardware does on a
  resume). Other sleep types are not supported (the DSDT advertises only S3 and S5): the
  request does nothing except set WAK_STS at once, so a guest that tries (and spins until
  WAK_STS) wakes immediately. SLP_EN and GBL_RLS read 0.
* `press_power_button()` (from the host) sets PWRBTN_STS; with PWRBTN_EN set the SCI is raised,
  and ACPI guests shut down cleanly.
* The SCI (`sci`, optional) is a level: high while (PM1_STS & PM1_EN) has a PWRBTN, SLPBTN,
  RTC, GBL or TMR bit set. TMR_STS (timer overflow) and the other event sources are never set.
* The timer is `clock()` (nanoseconds, default time.monotonic_ns) scaled to 3.579545 MHz; a
  restored state continues from the saved count.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar

from corral.arch.x86 import layout
from corral.devices.base import U32, DeviceState, IrqLine, VmControl
from corral.devices.legacy._common import Word
from corral.lazymodel import Field

PM_TIMER_HZ = 3_579_545
TIMER_MASK = 0xFFFFFF
SPAN = 12

# PM1_STS / PM1_EN
TMR_STS = 0x0001
GBL_STS = 0x0020
PWRBTN_STS = 0x0100
SLPBTN_STS = 0x0200
RTC_STS = 0x0400
WAK_STS = 0x8000
STS_MASK = 0xC731
EN_MASK = 0x4721
SCI_EVENTS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS
# PM1_CNT
SCI_EN = 0x0001
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7
SLP_EN = 0x2000
CNT_STORED = 0x1C03  # SCI_EN, BM_RLD, SLP_TYP


class AcpiPmState(DeviceState):
    sts: Word = Field(default=0, description="PM1_STS: event status bits (write 1 to clear)")
    en: Word = Field(default=0, description="PM1_EN: which status bits raise the SCI")
    cnt: Word = Field(default=SCI_EN, description="PM1_CNT: SCI_EN, BM_RLD, SLP_TYP")
    timer: U32 = Field(default=0, description="PM timer count (24 bits) at the time of the save")


class AcpiPm:
    """ACPI PM1 event/control block and PM timer; ports PM_BASE_PORT..+11 (12 ports), SCI 9."""

    state_model: ClassVar[type[AcpiPmState]] = AcpiPmState
    # set by _load (their meaning: AcpiPmState)
    _en: int
    _cnt: int

    def __init__(
        self, ctl: VmControl, sci: IrqLine | None = None, clock: Callable[[], int] = time.monotonic_ns
    ) -> None:
        self._ctl = ctl
        self._sci = sci
        self._clock = clock
        self._lock = threading.Lock()
        self._sci_level = False
        self._load(AcpiPmState())

    # -- bus interface ------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        if offset == 8 and size == 4:
            return self.timer()  # the hot case; needs no lock
        with self._lock:
            value = 0
            tmr = -1
            for i in range(size):
                off = offset + i
                if off < 2:
                    b = self._sts >> (8 * off)
                elif off < 4:
                    b = self._en >> (8 * (off - 2))
                elif off < 6:
                    b = (self._cnt | SCI_EN) >> (8 * (off - 4))
                elif 8 <= off < 12:
                    if tmr < 0:
                        tmr = self.timer()
                    b = tmr >> (8 * (off - 8))
                else:
                    b = 0xFF
                value |= (b & 0xFF) << (8 * i)
        return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        poweroff = suspend = False
        with self._lock:
            clear, en, cnt, cnt_written = 0, self._en, self._cnt, False
            for i in range(size):
                off, b = offset + i, (value >> (8 * i)) & 0xFF
                if off < 2:
                    clear |= b << (8 * off)
                elif off < 4:
                    sh = 8 * (off - 2)
                    en = (en & ~(0xFF << sh)) | (b << sh)
                elif off < 6:
                    sh = 8 * (off - 4)
                    cnt = (cnt & ~(0xFF << sh)) | (b << sh)
                    cnt_written = True
            self._sts &= ~clear
            self._en = en & EN_MASK
            if cnt_written:
                if cnt & SLP_EN:
                    slp_typ = (cnt >> SLP_TYP_SHIFT) & SLP_TYP_MASK
                    if slp_typ == layout.S5_SLP_TYP:
                        poweroff = True
                    elif slp_typ == layout.S3_SLP_TYP:
                        suspend = True
                        self._sts &= ~WAK_STS
                    else:
                        self._sts |= WAK_STS  # unsupported sleep state: wake at once
                self._cnt = (cnt & CNT_STORED) | SCI_EN
            self._update_sci()
        if poweroff:
            self._ctl.request_poweroff()
        elif suspend:
            self._ctl.request_suspend()

    # -- host side ----------------------------------------------------------------------------
    def timer(self) -> int:
        """The PM timer's current count."""
        base_ns, base_ticks = self._tbase
        return (base_ticks + (self._clock() - base_ns) * PM_TIMER_HZ // 1_000_000_000) & TIMER_MASK

    def press_power_button(self) -> None:
        """Signal a power-button press (the guest's ACPI code decides what to do)."""
        with self._lock:
            self._sts |= PWRBTN_STS
            self._update_sci()

    def wake(self) -> None:
        """The machine resumes from S3: set WAK_STS (the OS's resume path reads and clears it)."""
        with self._lock:
            self._sts |= WAK_STS
            self._update_sci()

    def _update_sci(self, force: bool = False) -> None:
        if self._sci is None:
            return
        level = bool(self._sts & self._en & SCI_EVENTS)
        if level != self._sci_level or force:
            self._sci_level = level
            self._sci.set_level(level)

    # -- state --------------------------------------------------------------------------------
    def save_state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(sts=self._sts, en=self._en, cnt=self._cnt, timer=self.timer())

    def load_state(self, state: AcpiPmState) -> None:
        with self._lock:
            self._load(state)
            self._update_sci(force=True)

    def _load(self, st: AcpiPmState) -> None:
        self._sts = st.sts & STS_MASK
        self._en = st.en & EN_MASK
        self._cnt = (st.cnt & CNT_STORED) | SCI_EN
        self._tbase = (self._clock(), st.timer & TIMER_MASK)
