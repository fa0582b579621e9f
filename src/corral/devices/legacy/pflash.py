"""A CFI parallel flash bank with the Intel/Sharp command set: where OVMF keeps UEFI variables.

Why: OVMF finds its variable store in flash at the top of 4 GiB and writes it with flash
commands, as QEMU's pflash_cfi01 takes them (OVMF's QemuFlash driver). The bank is 8 bits
wide, erased in 4 KiB blocks. Reads in "read array" mode return the contents; every command
below moves the bank into a mode where reads return something else, until "read array":

  0xFF read array          0x70 read status      0x50 clear status
  0x90 read identifier     0x98 CFI query        0x20 + 0xD0 block erase
  0x10 / 0x40 + data       program (byte or word: the access's bytes, as QEMU stores them)
  0x60 + 0x01/0xD0/0x2F    block lock setup/clear (accepted, no effect: nothing is locked)

Status register: 0x80 ready (set by a finished program or erase), 0x20 erase/sequence error,
0x10 program error. It reads 0x00 at power-on and after "clear status", as QEMU's does: OVMF
tells flash from RAM and ROM by exactly that (clear status, read status, expect 0x00).
The builder maps the contents as a read-only KVM slot while the bank reads as an array (reads
then never leave the guest; writes exit here as MMIO) and unmaps it while another mode holds,
through `on_mode`. A read-only bank (OVMF's code) takes no command: its writes are dropped and
it always reads as an array. Every change to the contents goes to `store` (the vars file).
A bad command or an access past the bank is refused (an error status, or dropped), never more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

BLOCK = 4096  # erase block (sector) size, as QEMU's PC flash has it
READ_ARRAY, READ_ARRAY_ALT = 0xFF, 0x00
READ_STATUS, CLEAR_STATUS = 0x70, 0x50
READ_ID, CFI_QUERY = 0x90, 0x98
BLOCK_ERASE, CONFIRM = 0x20, 0xD0
PROGRAM, PROGRAM_ALT = 0x40, 0x10
LOCK_SETUP, LOCK_BITS = 0x60, (0x01, 0xD0, 0x2F)

SR_READY, SR_ERASE_ERROR, SR_PROGRAM_ERROR = 0x80, 0x20, 0x10
SR_SEQUENCE_ERROR = SR_ERASE_ERROR | SR_PROGRAM_ERROR
MANUFACTURER, DEVICE = 0x89, 0x18  # Intel, as QEMU's pflash_cfi01 answers by default

# modes: what a read returns, or what the next write means
ARRAY, STATUS, IDENT, QUERY, ERASE_SETUP, PROGRAM_SETUP, LOCK = range(7)


def cfi_table(size: int) -> bytes:
    """The CFI query structure (byte addresses 0x10.., x8 device) of a bank of `size` bytes
    in BLOCK-sized erase blocks: "QRY", Intel's command set, one erase region."""
    t = bytearray(0x40)
    t[0x10:0x13] = b"QRY"
    t[0x13:0x15] = (0x0001).to_bytes(2, "little")  # primary command set: Intel/Sharp extended
    t[0x15:0x17] = (0x0031).to_bytes(2, "little")  # its extended table
    t[0x1B], t[0x1C] = 0x45, 0x55  # Vcc 4.5 V to 5.5 V
    t[0x1F] = 0x07  # typical byte program: 2^7 us
    t[0x21] = 0x0A  # typical block erase: 2^10 ms
    t[0x23] = 0x04  # maximum program: 2^4 x typical
    t[0x25] = 0x04  # maximum erase: 2^4 x typical
    t[0x27] = max(size - 1, 1).bit_length()  # device size: 2^n bytes
    t[0x28:0x2A] = (0x0000).to_bytes(2, "little")  # interface: x8 only
    t[0x2C] = 1  # one erase block region
    t[0x2D:0x2F] = (size // BLOCK - 1).to_bytes(2, "little")  # its blocks, less one
    t[0x2F:0x31] = (BLOCK // 256).to_bytes(2, "little")  # block size in 256-byte units
    t[0x31:0x36] = b"PRI10"  # primary extended query, version 1.0
    return bytes(t)


class Pflash:
    """One flash bank: `data` is its contents (the buffer KVM maps); `store(offset, bytes)`
    keeps a change; `on_mode(array)` says whether reads may come from the mapped buffer."""

    def __init__(
        self,
        data: bytearray | memoryview,
        *,
        readonly: bool = False,
        store: Callable[[int, bytes], None] | None = None,
        on_mode: Callable[[bool], None] | None = None,
    ) -> None:
        if not data or len(data) % BLOCK or len(data) // BLOCK > 0x10000:
            raise ValueError(f"a flash bank is 1 to 65536 blocks of {BLOCK} bytes")
        self.data = memoryview(data).cast("B")
        self.size = len(self.data)
        self.readonly = readonly
        self.store = store
        self.on_mode = on_mode
        self.mode = ARRAY
        self.status = 0
        self.cfi = cfi_table(self.size)

    # -- reads --------------------------------------------------------------------------------
    def _byte(self, offset: int) -> int:
        if self.mode == IDENT:
            return (MANUFACTURER, DEVICE)[offset & 1] if offset & 0xFF < 2 else 0
        if self.mode == QUERY:
            i = offset & 0xFF
            return self.cfi[i] if i < len(self.cfi) else 0
        if self.mode == ARRAY:
            return self.data[offset]
        return self.status  # status and the setup modes read the status register

    def mmio_read(self, offset: int, size: int) -> int:
        if offset < 0 or size < 1 or offset + size > self.size:
            return (1 << (8 * max(size, 0))) - 1
        if self.mode == ARRAY:
            return int.from_bytes(self.data[offset : offset + size], "little")
        return int.from_bytes(bytes(self._byte(offset + i) for i in range(size)), "little")

    # -- writes -------------------------------------------------------------------------------
    def mmio_write(self, offset: int, size: int, value: int) -> None:
        if self.readonly or offset < 0 or size < 1 or offset + size > self.size:
            return
        cmd = value & 0xFF
        mode = self.mode
        if mode == PROGRAM_SETUP:
            self._program(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            self._set_mode(STATUS)
        elif mode == ERASE_SETUP:
            if cmd == CONFIRM:
                self._erase(offset - offset % BLOCK)
            else:
                self.status |= SR_SEQUENCE_ERROR
            self._set_mode(STATUS)
        elif mode == LOCK:
            if cmd not in LOCK_BITS:
                self.status |= SR_SEQUENCE_ERROR
            self._set_mode(STATUS)
        else:
            self._command(cmd)

    def _command(self, cmd: int) -> None:
        nxt = {
            READ_ARRAY: ARRAY,
            READ_ARRAY_ALT: ARRAY,
            READ_STATUS: STATUS,
            READ_ID: IDENT,
            CFI_QUERY: QUERY,
            BLOCK_ERASE: ERASE_SETUP,
            PROGRAM: PROGRAM_SETUP,
            PROGRAM_ALT: PROGRAM_SETUP,
            LOCK_SETUP: LOCK,
        }.get(cmd)
        if cmd == CLEAR_STATUS:
            self.status = 0
            return  # the mode stays
        if nxt is None:
            log.debug("pflash: unknown command %#x refused", cmd)
            self.status |= SR_SEQUENCE_ERROR
            nxt = STATUS
        self._set_mode(nxt)

    def _set_mode(self, mode: int) -> None:
        was_array = self.mode == ARRAY
        self.mode = mode
        if was_array != (mode == ARRAY) and self.on_mode is not None:
            self.on_mode(mode == ARRAY)

    def _program(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self.status |= SR_READY
        self._keep(offset, data)

    def _erase(self, start: int) -> None:
        blank = b"\xff" * BLOCK
        self.data[start : start + BLOCK] = blank
        self.status |= SR_READY
        self._keep(start, blank)

    def _keep(self, offset: int, data: bytes) -> None:
        if self.store is None:
            return
        try:
            self.store(offset, data)
        except OSError as exc:  # the host file failed: the guest sees a failed operation
            log.warning("pflash: the variables file could not be written (%s)", exc.strerror)
            self.status |= SR_PROGRAM_ERROR

    def reset(self) -> None:
        """Power-on: read array, status clear."""
        self.status = 0
        self._set_mode(ARRAY)


__all__ = ["BLOCK", "Pflash", "cfi_table"]
