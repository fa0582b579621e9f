import threading

import pytest
from support.fakes import FakeIrqLine

from corral.devices.legacy.uart import Serial16550, SerialState

RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Uart:
    def __init__(self):
        self.line = FakeIrqLine(level_only=True)
        self.sent = []
        self.dev = Serial16550(self.line, self.sent.append)

    def r(self, off):
        return self.dev.pio_read(off, 1)

    def w(self, off, v):
        self.dev.pio_write(off, 1, v)

    @property
    def output(self):
        return b"".join(self.sent)


@pytest.fixture
def u():
    return Uart()


def test_thr_writes_go_out_one_byte_at_a_time(u):
    for b in b"hi\n":
        u.w(THR, b)
    assert u.sent == [b"h", b"i", b"\n"]
    assert u.r(LSR) & 0x60 == 0x60  # THRE and TEMT: always ready


def test_reset_values(u):
    assert u.r(IER) == 0
    assert u.r(IIR) == 0x01
    assert u.r(LCR) == 0
    assert u.r(MCR) == 0
    assert u.r(LSR) == 0x60
    assert u.r(MSR) == 0xB0  # CTS, DSR, DCD asserted
    assert u.line.levels in ([], [False])


def test_divisor_latch(u):
    u.w(LCR, 0x83)
    u.w(DLL, 0x01)
    u.w(DLM, 0x02)
    assert (u.r(DLL), u.r(DLM)) == (0x01, 0x02)
    assert u.sent == []  # DLL write is not a THR write
    u.w(LCR, 0x03)
    assert u.r(IER) == 0  # DLM write did not touch IER
    u.w(IER, 0x05)
    u.w(LCR, 0x83)
    assert u.r(DLM) == 0x02
    u.w(LCR, 0x03)
    assert u.r(IER) == 0x05


def test_ier_keeps_low_four_bits(u):
    u.w(IER, 0xFF)
    assert u.r(IER) == 0x0F


def test_scratch_register(u):
    u.w(SCR, 0xA5)
    assert u.r(SCR) == 0xA5


def test_loopback_routes_tx_to_rx_and_reflects_mcr(u):
    u.w(MCR, 0x10 | 0x0A)  # Linux's probe: LOOP | RTS | OUT2
    assert u.r(MSR) & 0xF0 == 0x90
    u.w(THR, 0x42)
    assert u.sent == []
    assert u.r(LSR) & 0x01
    assert u.r(RBR) == 0x42
    assert not u.r(LSR) & 0x01
    u.w(MCR, 0x10 | 0x05)  # DTR -> DSR, OUT1 -> RI
    assert u.r(MSR) & 0xF0 == 0x60
    u.w(MCR, 0x00)
    assert u.r(MSR) & 0xF0 == 0xB0


def test_loopback_msr_deltas(u):
    u.w(MCR, 0x10 | 0x0F)
    u.r(MSR)
    u.w(MCR, 0x10)  # all lines drop
    assert u.r(MSR) == 0x0B | 0x04  # DCTS, DDSR, DDCD, TERI (RI trailing edge)
    assert u.r(MSR) == 0x00  # deltas clear on read


def test_fifo_enabled_bits_in_iir(u):
    assert u.r(IIR) & 0xC0 == 0
    u.w(FCR, 0x01)
    assert u.r(IIR) & 0xC0 == 0xC0
    u.w(FCR, 0x00)
    assert u.r(IIR) & 0xC0 == 0
    # no 64-byte FIFO bit, no bit 4, even with DLAB set (Linux's type probing)
    u.w(LCR, 0x80)
    u.w(FCR, 0x21)
    assert u.r(IIR) & 0x30 == 0
    u.w(LCR, 0)
    u.w(FCR, 0x21)
    assert u.r(IIR) & 0x30 == 0


def test_thre_interrupt_on_enabling_etbei_and_cleared_by_iir_read(u):
    u.w(MCR, 0x08)  # OUT2
    assert not u.line.high
    u.w(IER, 0x02)
    assert u.line.high
    assert u.r(IIR) & 0x0F == 0x02
    assert not u.line.high  # reading IIR cleared the THRE source
    assert u.r(IIR) & 0x0F == 0x01
    # Linux's UART_BUG_THRE test: disable, re-enable: THRE must be reasserted
    u.w(IER, 0x00)
    u.w(IER, 0x02)
    assert u.r(IIR) & 0x0F == 0x02


def test_thr_write_reraises_thre(u):
    u.w(MCR, 0x08)
    u.w(IER, 0x02)
    u.r(IIR)
    assert not u.line.high
    u.w(THR, ord("x"))
    assert u.line.high
    assert u.r(IIR) & 0x0F == 0x02


def test_disabling_etbei_drops_thre(u):
    u.w(MCR, 0x08)
    u.w(IER, 0x02)
    u.w(IER, 0x00)
    assert not u.line.high
    assert u.r(IIR) == 0x01


def test_out2_gates_the_irq_line(u):
    u.w(IER, 0x02)
    assert not u.line.high  # pending, but OUT2 is clear
    assert u.r(IIR) & 0x0F == 0x02  # ... the source is still reported
    u.w(IER, 0x00)
    u.w(IER, 0x02)
    u.w(MCR, 0x08)
    assert u.line.high
    u.w(MCR, 0x00)
    assert not u.line.high


def test_feed_sets_dr_and_raises_rx_interrupt(u):
    u.w(MCR, 0x08)
    u.w(FCR, 0x01)
    u.w(IER, 0x01)
    assert not u.line.high
    assert u.dev.feed(b"ab") == 2
    assert u.line.high
    assert u.r(LSR) & 0x01
    assert u.r(IIR) == 0xC4
    assert u.r(RBR) == ord("a")
    assert u.line.high
    assert u.r(RBR) == ord("b")
    assert not u.line.high
    assert not u.r(LSR) & 0x01
    assert u.r(IIR) == 0xC1


def test_iir_priority_order(u):
    u.w(MCR, 0x18 | 0x02)  # loopback, OUT2, RTS
    u.w(FCR, 0x01)
    u.w(MCR, 0x18)  # RTS drops: DCTS pending
    u.w(IER, 0x0F)
    for _ in range(17):  # 16 fill the FIFO, the 17th overruns
        u.w(THR, 0x55)
    assert u.r(IIR) & 0x0F == 0x06  # line status (overrun) first
    lsr = u.r(LSR)
    assert lsr & 0x03 == 0x03  # DR + OE
    assert not u.r(LSR) & 0x02  # OE clears on read
    assert u.r(IIR) & 0x0F == 0x04  # then received data
    for _ in range(16):
        u.r(RBR)
    assert u.r(IIR) & 0x0F == 0x02  # then THR empty (cleared by this read)
    assert u.r(IIR) & 0x0F == 0x00  # then modem status
    u.r(MSR)
    assert u.r(IIR) & 0x0F == 0x01
    assert not u.line.high


def test_loopback_overrun_without_fifo_overwrites_rbr(u):
    u.w(MCR, 0x10)
    u.w(THR, 1)
    u.w(THR, 2)
    assert u.r(LSR) & 0x03 == 0x03
    assert u.r(RBR) == 2


def test_host_input_is_buffered_behind_the_fifo_and_bounded(u):
    u.w(FCR, 0x01)
    data = bytes(i & 0xFF for i in range(Serial16550.RX_BUFFER + 100))
    taken = u.dev.feed(data)
    # the FIFO took 16 at once, the host buffer the next 4 KiB, the rest was lost
    assert taken == Serial16550.RX_BUFFER + 16
    assert u.r(LSR) & 0x02  # the loss shows as an overrun
    got = bytes(u.r(RBR) for _ in range(taken))
    assert got == data[:taken]
    assert not u.r(LSR) & 0x01
    assert u.dev.feed(b"more") == 4


def test_host_input_never_overruns_the_fifo(u):
    u.w(FCR, 0x01)
    for _ in range(100):
        u.dev.feed(b"0123456789")
    assert not u.r(LSR) & 0x02
    assert bytes(u.r(RBR) for _ in range(1000)) == b"0123456789" * 100


def test_fifo_disabled_holds_one_byte_and_fcr_clear(u):
    u.dev.feed(b"xyz")
    assert u.r(RBR) == ord("x")
    u.w(FCR, 0x01)  # enabling the FIFO clears it (y is lost) ...
    assert u.r(RBR) == ord("z")  # ... and host input refills it
    u.dev.feed(b"pq")
    u.w(FCR, 0x03)  # explicit RX clear drops the FIFO's bytes
    assert not u.r(LSR) & 0x01


def test_loopback_holds_host_input_back(u):
    u.w(MCR, 0x10)
    u.dev.feed(b"k")
    assert not u.r(LSR) & 0x01
    u.w(MCR, 0x00)
    assert u.r(RBR) == ord("k")


def test_rx_interrupt_needs_erbfi(u):
    u.w(MCR, 0x08)
    u.dev.feed(b"a")
    assert not u.line.high
    u.w(IER, 0x01)
    assert u.line.high


def test_multibyte_access_is_split(u):
    u.dev.pio_write(SCR, 2, 0xBBAA)  # SCR then port 8 (nothing there)
    assert u.r(SCR) == 0xAA
    assert u.dev.pio_read(SCR, 2) == 0xFFAA
    u.dev.pio_write(THR, 2, 0x0F41)  # THR 'A' then IER 0x0F
    assert u.sent == [b"A"]
    assert u.r(IER) == 0x0F


def test_state_round_trip(u):
    u.w(LCR, 0x83)
    u.w(DLL, 3)
    u.w(LCR, 0x03)
    u.w(FCR, 0x01)
    u.w(MCR, 0x0B)
    u.w(IER, 0x03)
    u.w(SCR, 0x77)
    u.dev.feed(bytes(range(40)))
    st = u.dev.save_state()
    assert isinstance(st, SerialState)
    restored = SerialState.model_validate_json(st.model_dump_json())
    v = Uart()
    v.dev.load_state(restored)
    assert v.dev.save_state() == st
    assert v.line.high  # the line is re-driven from the state
    assert bytes(v.r(RBR) for _ in range(40)) == bytes(range(40))
    assert (v.r(LCR), v.r(MCR), v.r(IER), v.r(SCR)) == (0x03, 0x0B, 0x03, 0x77)


def test_concurrent_writers_and_feeder_lose_nothing(u):
    u.w(FCR, 0x01)

    def writer(ch):
        for _ in range(500):
            u.w(THR, ch)

    def feeder():
        for _ in range(200):
            while not u.dev.feed(b"z"):
                pass

    received = []

    def reader():
        while len(received) < 200:
            if u.r(LSR) & 1:
                received.append(u.r(RBR))

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"abcd"]
    threads += [threading.Thread(target=feeder), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(u.output) == sorted(b"abcd" * 500)
    assert bytes(received) == b"z" * 200
