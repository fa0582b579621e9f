"""A 16550A UART (the PC's COM1): the guest's serial console.

Register map (offset from the base port, 8 ports):

    0  RBR (read) / THR (write)        DLL when LCR.DLAB = 1
    1  IER                             DLM when LCR.DLAB = 1
    2  IIR (read) / FCR (write)
    3  LCR          4  MCR          5  LSR          6  MSR          7  SCR

Behaviour choices:

* Transmission is instantaneous: a THR write hands the byte to `out` at once (or, in loopback
  mode, to the receive FIFO), so THR and the transmitter are always empty (LSR.THRE and LSR.TEMT
  always read 1) and the THR-empty interrupt becomes pending again right after each write.
* The THR-empty interrupt is pending when (a) a byte was just written to THR, or (b) IER.ETBEI
  goes from 0 to 1 (THR being empty), which Linux's 8250 driver tests for at start-up. It is
  cleared by an IIR read that reports it, by clearing IER.ETBEI, and by a THR write (which
  raises it again at once, as above).
* Receive: the guest sees a 16-byte FIFO (1 byte, the RBR, with FIFOs disabled). Host input
  given to `feed()` that does not fit in the FIFO waits in a host-side buffer of `RX_BUFFER`
  (4 KiB) bytes and moves into the FIFO as the guest drains it: host input never overruns the
  FIFO (as if the line had flow control). Input that fits in neither is dropped: `feed` returns
  how many bytes it took (`input_room` says how many it would take, for callers that prefer
  to wait), and LSR.OE is set so the guest knows data was lost. Loopback bytes go straight
  into the FIFO and overrun it as on the real chip (FIFO mode: the new byte is lost; 16450 mode:
  the RBR is overwritten); in loopback the receiver is disconnected from host input, whose bytes
  wait until loopback ends.
* The receive-data interrupt is pending whenever the FIFO holds data (FIFO trigger levels and
  the character-timeout interrupt are not modelled; IIR reports 0x04, which drivers accept).
* Interrupt priority: line status (overrun, IER.ELSI) > received data (IER.ERBFI) > THR empty
  (IER.ETBEI) > modem status (IER.EDSSI).
* The IRQ line is driven with `set_level`: high while an interrupt is pending and MCR.OUT2 is
  set. OUT2 gates the interrupt as on a PC board (Linux's 8250 driver sets OUT2 when it uses
  the IRQ); the gate follows the OUT2 register bit in loopback mode too.
* Modem lines: CTS, DSR and DCD are asserted and RI is not, so drivers that honour flow control
  send. In loopback mode MSR reflects MCR (RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD) and changes
  set the delta bits, which the modem-status interrupt reports.
* Baud rate, word length, parity and stop bits are stored and otherwise ignored.
* Multi-byte accesses are split into byte accesses to consecutive registers (as an ISA bus
  would); ports past the 8 registers read 0xFF.

`out` is called with the device lock held (so bytes from several vCPUs keep their order); it
must not call back into the device.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from corral.devices.base import DeviceState, IrqLine
from corral.devices.legacy._common import Byte, read_bytewise, write_bytewise
from corral.lazymodel import Field

# IER
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # THR empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
# IIR interrupt identification
IIR_NONE = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO = 0xC0
# FCR
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_STORED = 0xC9  # enable, DMA mode, trigger level
# LCR
LCR_DLAB = 0x80
# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F
# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = 0x1E  # OE, PE, FE, BI: cleared by reading LSR
# MSR
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_IDLE = MSR_CTS | MSR_DSR | MSR_DCD  # lines seen outside loopback

FIFO_SIZE = 16
RX_BUFFER = 4096
DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock


class SerialState(DeviceState):
    ier: Byte = Field(default=0, description="interrupt enable register")
    fcr: Byte = Field(default=0, description="FIFO control (enable, DMA mode, trigger level)")
    lcr: Byte = Field(default=0, description="line control register (DLAB in bit 7)")
    mcr: Byte = Field(default=0, description="modem control register")
    lsr_errors: Byte = Field(default=0, description="line status error bits not yet read")
    msr_delta: Byte = Field(default=0, description="modem status change bits not yet read")
    scr: Byte = Field(default=0, description="scratch register")
    dll: Byte = Field(default=DEFAULT_DIVISOR, description="divisor latch, low byte")
    dlm: Byte = Field(default=0, description="divisor latch, high byte")
    thr_pending: bool = Field(default=False, description="a THR-empty interrupt is pending")
    rx_fifo: list[Byte] = Field(
        default_factory=list, max_length=FIFO_SIZE, description="received bytes in the FIFO, oldest first"
    )
    rx_pending: list[Byte] = Field(
        default_factory=list,
        max_length=RX_BUFFER,
        description="received bytes waiting for FIFO room, oldest first",
    )


class Serial16550:
    """16550A UART; register it on the port bus at COM1 (0x3F8, 8 ports, IRQ 4)."""

    state_model: ClassVar[type[SerialState]] = SerialState
    # registers, set by _load (their meaning: SerialState)
    _ier: int
    _fcr: int
    _lcr: int
    _mcr: int
    _lsr_errors: int
    _msr_delta: int
    _scr: int
    _dll: int
    _dlm: int

    RX_BUFFER = RX_BUFFER
    FIFO_SIZE = FIFO_SIZE

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None]) -> None:
        self._irq = irq
        self._out = out
        self._lock = threading.Lock()
        self._irq_level = False
        self._rx: deque[int] = deque()  # the FIFO the guest reads
        self._pending: deque[int] = deque()  # host input not yet in the FIFO
        self._load(SerialState())

    # -- bus interface ------------------------------------------------------------------------
    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            if size == 1:
                value = self._read(offset)
            else:
                value = read_bytewise(self._read, offset, size)
            self._update_irq()
        return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if size == 1:
                self._write(offset, value & 0xFF)
            else:
                write_bytewise(self._write, offset, size, value)
            self._update_irq()

    # -- host side ----------------------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken (the rest is lost)."""
        with self._lock:
            n = len(data)
            room = self._room()
            if n > room:
                self._lsr_errors |= LSR_OE
                n = room
            if n:
                self._pending.extend(memoryview(data)[:n] if n < len(data) else data)
                self._refill()
            self._update_irq()
        return n

    @property
    def input_room(self) -> int:
        """Bytes `feed` would take now."""
        with self._lock:
            return self._room()

    def _room(self) -> int:
        room = RX_BUFFER - len(self._pending)
        if not self._mcr & MCR_LOOP:
            room += self._capacity() - len(self._rx)
        return room

    # -- registers ----------------------------------------------------------------------------
    def _read(self, off: int) -> int:
        if off == 0:
            if self._lcr & LCR_DLAB:
                return self._dll
            if not self._rx:
                return 0
            b = self._rx.popleft()
            self._refill()
            return b
        if off == 1:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if off == 2:
            iid = self._iir_id()
            if iid == IIR_THRI:
                self._thr_pending = False
            return iid | (IIR_FIFO if self._fcr & FCR_ENABLE else 0)
        if off == 3:
            return self._lcr
        if off == 4:
            return self._mcr
        if off == 5:
            v = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
            self._lsr_errors = 0
            return v
        if off == 6:
            v = self._msr_lines() | self._msr_delta
            self._msr_delta = 0
            return v
        if off == 7:
            return self._scr
        return 0xFF

    def _write(self, off: int, v: int) -> None:
        if off == 0:
            if self._lcr & LCR_DLAB:
                self._dll = v
            else:
                if self._mcr & MCR_LOOP:
                    self._loop_receive(v)
                else:
                    self._out(bytes((v,)))
                self._thr_pending = True  # the byte left at once: THR is empty again
        elif off == 1:
            if self._lcr & LCR_DLAB:
                self._dlm = v
            else:
                old = self._ier
                self._ier = v & 0x0F
                if not v & IER_ETBEI:
                    self._thr_pending = False
                elif not old & IER_ETBEI:
                    self._thr_pending = True  # ETBEI enabled while THR is empty
        elif off == 2:
            enable = v & FCR_ENABLE
            if enable != self._fcr & FCR_ENABLE or v & FCR_CLEAR_RX:
                self._rx.clear()  # FIFO mode change or explicit clear
            self._fcr = v & FCR_STORED if enable else 0
            self._refill()
        elif off == 3:
            self._lcr = v
        elif off == 4:
            old_lines = self._msr_lines()
            self._mcr = v & MCR_MASK
            new_lines = self._msr_lines()
            changed = old_lines ^ new_lines
            if changed:
                delta = (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
                if old_lines & MSR_RI and not new_lines & MSR_RI:
                    delta |= MSR_TERI
                self._msr_delta |= delta
            self._refill()
        elif off == 7:
            self._scr = v
        # 5 (LSR) and 6 (MSR) are read-only here: factory-test writes are ignored

    def _msr_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_IDLE
        return (
            ((mcr & MCR_RTS) << 3)
            | ((mcr & MCR_DTR) << 5)
            | ((mcr & MCR_OUT1) << 4)
            | ((mcr & MCR_OUT2) << 4)
        )

    def _capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _loop_receive(self, b: int) -> None:
        if len(self._rx) < self._capacity():
            self._rx.append(b)
        else:
            self._lsr_errors |= LSR_OE
            if not self._fcr & FCR_ENABLE:
                self._rx[-1] = b  # 16450 mode: the RBR is overwritten

    def _refill(self) -> None:
        if self._pending and not self._mcr & MCR_LOOP:
            cap = self._capacity()
            rx, pending = self._rx, self._pending
            while len(rx) < cap and pending:
                rx.append(pending.popleft())

    def _iir_id(self) -> int:
        ier = self._ier
        if ier & IER_ELSI and self._lsr_errors:
            return IIR_RLSI
        if ier & IER_ERBFI and self._rx:
            return IIR_RDI
        if ier & IER_ETBEI and self._thr_pending:
            return IIR_THRI
        if ier & IER_EDSSI and self._msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self, force: bool = False) -> None:
        level = bool(self._mcr & MCR_OUT2) and self._iir_id() != IIR_NONE
        if level != self._irq_level or force:
            self._irq_level = level
            self._irq.set_level(level)

    # -- state --------------------------------------------------------------------------------
    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(
                ier=self._ier,
                fcr=self._fcr,
                lcr=self._lcr,
                mcr=self._mcr,
                lsr_errors=self._lsr_errors,
                msr_delta=self._msr_delta,
                scr=self._scr,
                dll=self._dll,
                dlm=self._dlm,
                thr_pending=self._thr_pending,
                rx_fifo=list(self._rx),
                rx_pending=list(self._pending),
            )

    def load_state(self, state: SerialState) -> None:
        with self._lock:
            self._load(state)
            self._update_irq(force=True)

    def _load(self, st: SerialState) -> None:
        self._ier = st.ier & 0x0F
        self._fcr = st.fcr & FCR_STORED if st.fcr & FCR_ENABLE else 0
        self._lcr = st.lcr
        self._mcr = st.mcr & MCR_MASK
        self._lsr_errors = st.lsr_errors & LSR_ERRORS
        self._msr_delta = st.msr_delta & 0x0F
        self._scr = st.scr
        self._dll = st.dll
        self._dlm = st.dlm
        self._thr_pending = st.thr_pending
        self._rx = deque(st.rx_fifo[: self._capacity()])
        self._pending = deque(st.rx_pending)
        self._refill()
