"""The PC keyboard controller (i8042) with a keyboard that never types, and no mouse port.

The device answers at offset 0 (port 0x60, data) and offset 4 (port 0x64, status on read,
command on write); it is registered as two one-port windows (see `Machine`), so other offsets
read 0xFF and ignore writes. Its main job is the reset line: command 0xFE (any of 0xF0-0xFF
with bit 0 clear pulses the reset output) and a write to the output port (0xD1) with bit 0
clear call `ctl.request_reset()`; Linux's "reboot=kbd" path writes 0xFE to port 0x64.

Enough of the controller for Linux's i8042 and atkbd drivers to probe quickly, with no timeouts:

* Status: OBF when a byte waits, SYS (mirrors command-byte bit 2), CMD/DATA (last write went
  to port 0x64), KEYLOCK = 1 (not inhibited); the input buffer is never full (commands are
  processed at once) and AUXDATA, timeout and parity bits are never set. Idle: 0x14 / 0x1C.
* Controller commands: 0x20 read command byte, 0x21-0x3F read RAM (0), 0x60 write command byte,
  0x61-0x7F write RAM (ignored), 0xA7/0xA8 disable/enable AUX (command-byte bit 5),
  0xA9 AUX interface test -> 0x01, 0xAA self test -> 0x55, 0xAB keyboard interface test -> 0x00,
  0xAD/0xAE disable/enable keyboard (bit 4), 0xD0 read output port, 0xD1 write output port,
  0xD2 write keyboard output buffer, 0xD3 write AUX output buffer, 0xD4 write to AUX device,
  0xE0 read test inputs -> 0x00, 0xF0-0xFF pulse output lines. Others are ignored. A command
  that answers replaces whatever was waiting in the output buffer.
* No AUX port: 0xD3 echoes its byte *without* AUXDATA in the status, so Linux's AUX loop test
  fails at once ("auxerr") instead of timing out, and 0xA9 answers 0x01 ("clock line stuck
  low"), so Linux concludes there is no AUX port. Bytes sent to the AUX device (0xD4) vanish.
* The keyboard answers the commands atkbd sends: 0xFF reset -> FA AA, 0xF2 identify -> FA AB
  83 (AB 41 with translation on), 0xEE echo -> EE, 0xED/0xF3/0xF0 take a parameter (0xF0 00
  reports the scan-code set), everything else -> FA. It never produces key codes.
* IRQ 1 (`irq1`, optional) is a level: high while the output buffer holds a byte and the
  command byte enables the keyboard interrupt (bit 0).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import ClassVar

from corral.devices.base import DeviceState, IrqLine, VmControl
from corral.devices.legacy._common import Byte, read_bytewise, write_bytewise
from corral.lazymodel import Field

DATA = 0
CMD = 4

# status register
STR_OBF = 0x01
STR_SYS = 0x04
STR_CMDDAT = 0x08
STR_KEYLOCK = 0x10
# command byte (CTR)
CTR_KBDINT = 0x01
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
DEFAULT_CTR = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT  # what a BIOS leaves: 0x65
DEFAULT_OUTPORT = 0x03  # reset line high (not in reset), A20 enabled

ACK = 0xFA
OUT_QUEUE = 16  # bytes the controller buffers toward the guest

# controller commands that take a data byte
_PARAM_CMDS = frozenset([0xD1, 0xD2, 0xD3, 0xD4, *range(0x60, 0x80)])
# keyboard commands that take a parameter byte
_KBD_PARAM_CMDS = frozenset([0xED, 0xF0, 0xF3])


class I8042State(DeviceState):
    ctr: Byte = Field(default=DEFAULT_CTR, description="controller configuration byte")
    outport: Byte = Field(default=DEFAULT_OUTPORT, description="output port (A20, reset line)")
    cmd_flag: bool = Field(default=False, description="status bit 3: the last write was a command")
    pending_cmd: Byte = Field(default=0, description="controller command awaiting its parameter")
    kbd_param_cmd: Byte = Field(default=0, description="keyboard command awaiting its parameter")
    scan_set: Byte = Field(default=2, description="keyboard scan code set")
    scanning: bool = Field(default=True, description="keyboard scanning enabled")
    last: Byte = Field(default=0, description="last byte read from the data port (re-read when empty)")
    out: list[Byte] = Field(
        default_factory=list, max_length=OUT_QUEUE, description="bytes queued toward the guest, oldest first"
    )


class I8042:
    """8042 keyboard controller; ports 0x60 (offset 0) and 0x64 (offset 4), IRQ 1."""

    state_model: ClassVar[type[I8042State]] = I8042State
    # set by _load (their meaning: I8042State)
    _kbd_param_cmd: int
    _scan_set: int

    def __init__(self, ctl: VmControl, irq1: IrqLine | None = None) -> None:
        self._ctl = ctl
        self._irq = irq1
        self._lock = threading.Lock()
        self._irq_level = False
        self._out: deque[int] = deque()
        self._load(I8042State())

    # -- bus interface ------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            value = read_bytewise(self._read, offset, size)
            self._update_irq()
        return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            reset = any(write_bytewise(self._write, offset, size, value))
            self._update_irq()
        if reset:
            self._ctl.request_reset()

    # -- registers ----------------------------------------------------------------------------
    def _read(self, off: int) -> int:
        if off == DATA:
            if self._out:
                self._last = self._out.popleft()
            return self._last
        if off == CMD:
            return (
                STR_KEYLOCK
                | (STR_OBF if self._out else 0)
                | (self._ctr & CTR_SYS)
                | (STR_CMDDAT if self._cmd_flag else 0)
            )
        return 0xFF

    def _write(self, off: int, v: int) -> bool:
        """Handle one byte; True when the guest asked for a reset."""
        if off == CMD:
            self._cmd_flag = True
            self._pending_cmd = 0
            return self._command(v)
        if off == DATA:
            self._cmd_flag = False
            cmd = self._pending_cmd
            if cmd:
                self._pending_cmd = 0
                return self._command_param(cmd, v)
            self._keyboard(v)
        return False

    def _command(self, c: int) -> bool:
        if c in _PARAM_CMDS:
            self._pending_cmd = c
        elif c == 0x20:
            self._reply(self._ctr)
        elif 0x21 <= c <= 0x3F or c in (0xAB, 0xE0):
            self._reply(0x00)
        elif c == 0xA7:
            self._ctr |= CTR_AUXDIS
        elif c == 0xA8:
            self._ctr &= ~CTR_AUXDIS
        elif c == 0xA9:
            self._reply(0x01)
        elif c == 0xAA:
            self._ctr |= CTR_SYS
            self._reply(0x55)
        elif c == 0xAD:
            self._ctr |= CTR_KBDDIS
        elif c == 0xAE:
            self._ctr &= ~CTR_KBDDIS
        elif c == 0xD0:
            self._reply(self._outport)
        elif c >= 0xF0:
            return not c & 0x01  # pulse output lines; bit 0 is the reset line
        return False

    def _command_param(self, c: int, v: int) -> bool:
        if c == 0x60:
            self._ctr = v & 0x7F
        elif c == 0xD1:
            self._outport = v
            return not v & 0x01
        elif c in (0xD2, 0xD3):
            self._reply(v)  # D3 too: no AUXDATA, so no AUX port (see top)
        # 0x61-0x7F (controller RAM) and 0xD4 (to the absent AUX device): dropped
        return False

    def _keyboard(self, v: int) -> None:
        cmd = self._kbd_param_cmd
        if cmd:
            self._kbd_param_cmd = 0
            if cmd == 0xF0:
                if v == 0:
                    self._kbd_reply(ACK, self._scan_set)
                    return
                if v in (1, 2, 3):
                    self._scan_set = v
            self._kbd_reply(ACK)
            return
        if v in _KBD_PARAM_CMDS:
            self._kbd_param_cmd = v
            self._kbd_reply(ACK)
        elif v == 0xFF:
            self._scan_set = 2
            self._scanning = True
            self._kbd_reply(ACK, 0xAA)
        elif v == 0xF2:
            self._kbd_reply(ACK, 0xAB, 0x41 if self._ctr & CTR_XLATE else 0x83)
        elif v == 0xEE:
            self._kbd_reply(0xEE)
        elif v == 0xF4:
            self._scanning = True
            self._kbd_reply(ACK)
        elif v in (0xF5, 0xF6):
            self._scanning = v == 0xF6
            self._kbd_reply(ACK)
        else:
            self._kbd_reply(ACK)

    def _reply(self, b: int) -> None:
        self._out.clear()
        self._out.append(b)

    def _kbd_reply(self, *data: int) -> None:
        out = self._out
        for b in data:
            if len(out) < OUT_QUEUE:
                out.append(b)

    def _update_irq(self, force: bool = False) -> None:
        if self._irq is None:
            return
        level = bool(self._out) and bool(self._ctr & CTR_KBDINT)
        if level != self._irq_level or force:
            self._irq_level = level
            self._irq.set_level(level)

    # -- state --------------------------------------------------------------------------------
    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(
                ctr=self._ctr,
                outport=self._outport,
                cmd_flag=self._cmd_flag,
                pending_cmd=self._pending_cmd,
                kbd_param_cmd=self._kbd_param_cmd,
                scan_set=self._scan_set,
                scanning=self._scanning,
                last=self._last,
                out=list(self._out),
            )

    def load_state(self, state: I8042State) -> None:
        with self._lock:
            self._load(state)
            self._update_irq(force=True)

    def _load(self, st: I8042State) -> None:
        self._ctr = st.ctr
        self._outport = st.outport
        self._cmd_flag = st.cmd_flag
        self._pending_cmd = st.pending_cmd if st.pending_cmd in _PARAM_CMDS else 0
        self._kbd_param_cmd = st.kbd_param_cmd if st.kbd_param_cmd in _KBD_PARAM_CMDS else 0
        self._scan_set = st.scan_set
        self._scanning = st.scanning
        self._last = st.last
        self._out = deque(st.out)
