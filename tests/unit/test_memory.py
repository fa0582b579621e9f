import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.hostile import fifo

from corral.arch.x86 import layout
from corral.errors import ConfigError, GuestMemoryError
from corral.memory import GuestMemory

M = layout.MiB


def test_small_guest_has_one_slot():
    with GuestMemory(64 * M) as mem:
        assert [(s.gpa, s.size) for s in mem.slots] == [(0, 64 * M)]


def test_large_guest_skips_the_hole():
    with GuestMemory(4 * layout.GiB) as mem:
        assert [(s.gpa, s.size) for s in mem.slots] == [
            (0, layout.MMIO_HOLE_START),
            (1 << 32, 4 * layout.GiB - layout.MMIO_HOLE_START),
        ]
        mem.write(1 << 32, b"hi")
        assert mem.read(1 << 32, 2) == b"hi"
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_HOLE_START, 1)
        with pytest.raises(GuestMemoryError):
            mem.read(layout.MMIO_HOLE_START - 1, 2)  # straddles into the hole


def test_e820_matches_slots():
    e = layout.e820_map(4 * layout.GiB)
    ram = [(a, s) for a, s, t in e if t == 1]
    assert ram == [
        (0, layout.EBDA_START),
        (layout.HIMEM_START, layout.MMIO_HOLE_START - layout.HIMEM_START),
        (1 << 32, 4 * layout.GiB - layout.MMIO_HOLE_START),
    ]


@pytest.mark.parametrize("size", [0, 1, 15 * M, 2 * layout.MAX_MEMORY, 16 * M + 1])
def test_bad_sizes(size):
    with pytest.raises(ConfigError):
        GuestMemory(size)


@given(st.integers(-(1 << 40), 1 << 40), st.integers(-10, 1 << 30))
def test_checked_access_never_escapes(gpa, length):
    with GuestMemory(16 * M) as mem:
        inside = 0 <= gpa and length >= 0 and gpa + length <= 16 * M
        if inside:
            assert len(mem.read(gpa, min(length, 4096) if gpa + min(length, 4096) <= 16 * M else 0)) >= 0
        else:
            with pytest.raises(GuestMemoryError):
                mem.view(gpa, length)


def test_memory_is_a_shared_memfd():
    import mmap
    import os

    with GuestMemory(16 * M) as mem:
        mem.write_u64(0x1000, 0xDEADBEEF_CAFEF00D)
        other = mmap.mmap(mem.fd, 16 * M, mmap.MAP_SHARED, mmap.PROT_READ)
        assert int.from_bytes(other[0x1000:0x1008], "little") == 0xDEADBEEF_CAFEF00D
        other.close()
        assert os.fstat(mem.fd).st_size == 16 * M


def test_read_cstr_stops_at_nul_limit_and_ram_edge():
    with GuestMemory(16 * M) as mem:
        mem.write(0x2000, b"corral\0junk")
        assert mem.read_cstr(0x2000, 64) == b"corral"
        assert mem.read_cstr(0x2000, 3) == b"cor"
        mem.write(16 * M - 4, b"abcd")
        assert mem.read_cstr(16 * M - 4, 64) == b"abcd"  # truncated at the end of RAM
        assert mem.read_cstr(32 * M, 8) == b""  # outside RAM


def _poll_u16(fd: int, size: int, offset: int, seconds: float, result) -> None:
    """In another process (another CPU): read the u16 at `offset` with single loads and count
    the zeros seen after the first non-zero value."""
    import mmap
    import time

    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    v = memoryview(m).cast("H")
    started = zeros = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(10000):
            if v[offset >> 1]:
                started = 1
            elif started:
                zeros += 1
    result.put((started, zeros))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a second CPU to read concurrently")
def test_store_u16_is_never_seen_half_written():
    """A virtqueue's used index is polled by the guest on another CPU while the device bumps it.
    struct.pack_into zeroes its target before writing, which a guest saw as the index going back
    to 0 (the probe counted completions the device never made). store_u16 is one store: a reader
    racing it for half a second must never see 0 among values that are never 0."""
    import multiprocessing
    import time

    size, at = 16 * M, 0x1002
    with GuestMemory(size) as mem:
        result = multiprocessing.get_context("fork").Queue()
        reader = multiprocessing.get_context("fork").Process(
            target=_poll_u16, args=(mem.fd, size, at, 0.5, result)
        )
        reader.start()
        value, end = 1, time.monotonic() + 0.6
        while time.monotonic() < end:
            for _ in range(10000):
                value = value % 0xFFFF + 1  # 1..65535, never 0
                mem.store_u16(at, value)
        started, zeros = result.get(timeout=10)
        reader.join(timeout=10)
    assert started, "the reader never saw the writes"
    assert zeros == 0, f"a concurrent reader saw the u16 half-written (0) {zeros} times"


def test_store_u16_checks_alignment_range_and_marks_the_page_dirty():
    with GuestMemory(16 * M) as mem:
        mem.vmm_dirty = set()
        mem.store_u16(0x3006, 0xBEEF)
        assert mem.read(0x3006, 2) == b"\xef\xbe"
        assert mem.vmm_dirty == {3}
        with pytest.raises(GuestMemoryError):
            mem.store_u16(0x3007, 1)
        with pytest.raises(GuestMemoryError):
            mem.store_u16(16 * M, 1)


# -- guest RAM stays the guest's --------------------------------------------------------------


def vm_flags(addr: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `addr` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def test_guest_ram_is_left_out_of_core_dumps(tmp_path):
    with GuestMemory(16 * M) as mem:
        assert "dd" in vm_flags(mem.slots[0].host_addr)
    snap = tmp_path / "memory.bin"
    snap.write_bytes(bytes(16 * M))
    with GuestMemory(16 * M, backing=snap) as restored:
        assert "dd" in vm_flags(restored.slots[0].host_addr)


def test_a_memory_file_is_its_own_regular_file(tmp_path):
    real = tmp_path / "real.bin"
    real.write_bytes(bytes(16 * M))
    link = tmp_path / "memory.bin"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match=f"^guest memory file {link} is a symbolic link"):
        GuestMemory(16 * M, backing=link)
    with fifo(tmp_path / "pipe") as pipe, pytest.raises(ConfigError, match="is not a regular file"):
        GuestMemory(16 * M, backing=pipe)
    with pytest.raises(ConfigError, match="is 16777216 bytes, not 33554432"):
        GuestMemory(32 * M, backing=real)


def test_a_memory_file_that_shrinks_after_mapping_is_caught_before_the_guest_runs(tmp_path):
    snap = tmp_path / "memory.bin"
    snap.write_bytes(bytes(16 * M))
    with GuestMemory(16 * M, backing=snap) as mem:
        mem.check_backing()
        os.truncate(snap, 1 * M)
        with pytest.raises(ConfigError, match="is 1048576 bytes, not 16777216: it is truncated"):
            mem.check_backing()


def test_ksm_is_opt_in_and_marks_a_private_mapping_mergeable():
    with GuestMemory(16 * M) as plain:
        assert "mg" not in vm_flags(plain.slots[0].host_addr)
        assert plain.ksm_merged_bytes() == 0
    with GuestMemory(16 * M, ksm=True) as mem:
        flags = vm_flags(mem.slots[0].host_addr)
        # KSM merges only private pages: a shared memfd mapping would be marked in vain
        assert "mg" in flags and "sh" not in flags
        mem.write(0x1000, b"guest")  # the guest's own writes still land and read back
        assert mem.read(0x1000, 5) == b"guest"
        assert mem.ksm_merged_bytes() >= 0


@pytest.fixture(scope="module")
def filled_snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero") / "memory.bin"
    path.write_bytes(b"\xa5" * (16 * M))
    return path


@given(gpa=st.integers(0, 3 * 4096 + 7), length=st.integers(0, 5 * 4096 + 9), backed=st.booleans())
def test_zero_clears_exactly_its_range(filled_snapshot, gpa, length, backed):
    """Whole memfd pages are freed, the partial ones written; a snapshot's private mapping,
    which would read its file back where freed, is written throughout."""
    with GuestMemory(16 * M, backing=filled_snapshot if backed else None) as mem:
        if not backed:
            mem.write(0, b"\xa5" * (10 * 4096))
        mem.zero(gpa, length)
        got = mem.read(0, 10 * 4096)
        assert got[gpa : gpa + length] == bytes(length)
        assert got[:gpa] == b"\xa5" * gpa and got[gpa + length :] == b"\xa5" * (10 * 4096 - gpa - length)


def test_zero_touches_no_whole_page_of_fresh_ram():
    """A kernel's BSS on fresh RAM stays unallocated: zeroing it frees, never writes."""
    with GuestMemory(64 * M) as mem:
        before = mem.resident_bytes()
        mem.zero(M + 100, 32 * M)
        assert mem.resident_bytes() - before <= 2 * 4096  # the two partial pages at the ends
        with pytest.raises(GuestMemoryError):
            mem.zero(60 * M, 8 * M)
