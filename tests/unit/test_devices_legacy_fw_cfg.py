"""fw_cfg (corral.devices.legacy.fw_cfg): the port protocol, DMA, the directory, hostile DMA."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.arch.x86 import acpi_loader, layout
from corral.devices.legacy import fw_cfg as F
from corral.memory import GuestMemory

MiB = layout.MiB
E820 = layout.e820_map(32 * MiB)


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(32 * MiB) as m:
        yield m


@pytest.fixture
def dev(mem):
    d = F.machine_fw_cfg(mem, cpus=3, e820=E820, bootorder=["/pci@i0cf8/scsi@1/disk@0,0"])
    F.add_kernel_items(d, lambda: KERNEL, lambda: b"INITRD" * 100, "console=ttyS0 hello")
    F.add_firmware_tables(d, cpus=3, mem_size=mem.size)  # the fuzz below reads them too
    return d


# a fake bzImage: "HdrS" at 0x202, setup_sects 2 -> 3 sectors of setup
KERNEL = bytearray(4096)
KERNEL[0x1F1] = 2
KERNEL[0x202:0x206] = b"HdrS"
KERNEL[1536:] = b"K" * (4096 - 1536)
KERNEL = bytes(KERNEL)


def select(d, key):
    d.pio_write(F.SELECTOR_OFFSET, 2, key)


def read_ports(d, key, n):
    select(d, key)
    return bytes(d.pio_read(F.DATA_OFFSET, 1) for _ in range(n))


def dma(d, mem, control, length, target, at=0x10000):
    mem.write(at, struct.pack(">IIQ", control, length, target))
    d.pio_write(F.DMA_OFFSET, 4, int.from_bytes((at >> 32).to_bytes(4, "big"), "little"))
    d.pio_write(F.DMA_OFFSET + 4, 4, int.from_bytes((at & 0xFFFFFFFF).to_bytes(4, "big"), "little"))
    return struct.unpack(">I", mem.read(at, 4))[0]


def directory(d):
    select(d, F.FILE_DIR)
    count = int.from_bytes(read_ports(d, F.FILE_DIR, 4), "big")
    raw = read_ports(d, F.FILE_DIR, 4 + 64 * count)[4:]
    out = {}
    for i in range(count):
        size, key, _, name = struct.unpack_from(">IHH56s", raw, 64 * i)
        out[name.rstrip(b"\0").decode()] = (key, size)
    return out


def test_signature_id_and_machine_items_through_the_ports(dev, mem):
    assert read_ports(dev, F.SIGNATURE, 4) == b"QEMU"
    assert int.from_bytes(read_ports(dev, F.ID, 4), "little") == 3  # traditional + DMA
    assert int.from_bytes(read_ports(dev, F.RAM_SIZE, 8), "little") == mem.size
    assert int.from_bytes(read_ports(dev, F.NB_CPUS, 2), "little") == 3
    assert int.from_bytes(read_ports(dev, F.MAX_CPUS, 2), "little") == 3


def test_reads_past_the_end_and_unknown_keys_read_zero(dev):
    assert read_ports(dev, F.SIGNATURE, 6) == b"QEMU\0\0"
    assert read_ports(dev, 0x1234, 4) == bytes(4)
    assert read_ports(dev, F.ARCH_LOCAL | 3, 4) == bytes(4)  # the arch table holds nothing


def test_selecting_rewinds_and_the_write_channel_bit_is_ignored(dev):
    select(dev, F.SIGNATURE)
    assert dev.pio_read(F.DATA_OFFSET, 1) == ord("Q")
    assert read_ports(dev, F.SIGNATURE | F.WRITE_CHANNEL, 2) == b"QE"
    dev.pio_write(F.DATA_OFFSET, 1, 0x55)  # data writes are ignored
    assert dev.pio_read(F.DATA_OFFSET, 1) == ord("M")


def test_dma_port_reads_its_signature(dev):
    sig = b"".join(dev.pio_read(F.DMA_OFFSET + i, 1).to_bytes(1, "little") for i in range(8))
    assert sig == b"QEMU CFG"
    assert dev.pio_read(F.DMA_OFFSET, 4).to_bytes(4, "little") == b"QEMU"


def test_directory_lists_the_files_sorted_with_sizes(dev):
    files = directory(dev)
    assert (
        list(files)
        == sorted(files)
        == [
            "bootorder",
            "etc/acpi/rsdp",
            "etc/acpi/tables",
            "etc/e820",
            "etc/sercon-port",
            "etc/smbios/smbios-anchor",
            "etc/smbios/smbios-tables",
            "etc/table-loader",
        ]
    )
    assert [k for k, _ in files.values()] == list(range(0x20, 0x28))
    assert files["etc/e820"][1] == 20 * len(E820)
    assert dev.files() == {n: k for n, (k, _) in files.items()}


def test_e820_bootorder_and_sercon_contents(dev):
    files = directory(dev)
    key, size = files["etc/e820"]
    raw = read_ports(dev, key, size)
    assert [struct.unpack_from("<QQI", raw, i) for i in range(0, size, 20)] == E820
    key, size = files["bootorder"]
    assert read_ports(dev, key, size) == b"/pci@i0cf8/scsi@1/disk@0,0\0"
    key, size = files["etc/sercon-port"]
    assert int.from_bytes(read_ports(dev, key, size), "little") == 0x3F8


def test_firmware_tables_read_over_dma_run_as_a_firmware_runs_them(dev, mem):
    """What SeaBIOS does with them: the loader script and its files read through DMA, run,
    and the RSDP it leaves points at an XSDT whose tables all check out; the SMBIOS anchor
    counts the structures file."""
    files = directory(dev)
    got = {}
    for name, (key, size) in files.items():
        assert dma(dev, mem, (key << 16) | F.DMA_SELECT | F.DMA_READ, size, 0x40000) == 0
        got[name] = mem.read(0x40000, size)
    cmds = acpi_loader.decode(got["etc/table-loader"])
    high = iter([0x100000])
    loaded = acpi_loader.run(cmds, got, lambda n, size, align, zone: 0xF0000 if zone == 2 else next(high))
    rsdp = loaded["etc/acpi/rsdp"].data
    tables = loaded["etc/acpi/tables"]
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp) & 0xFF == 0
    xsdt_at = struct.unpack_from("<Q", rsdp, 24)[0] - tables.addr
    xsdt = tables.data[xsdt_at : xsdt_at + struct.unpack_from("<I", tables.data, xsdt_at + 4)[0]]
    assert xsdt[:4] == b"XSDT" and sum(xsdt) & 0xFF == 0
    for (ptr,) in struct.iter_unpack("<Q", xsdt[36:]):
        at = ptr - tables.addr
        length = struct.unpack_from("<I", tables.data, at + 4)[0]
        assert sum(tables.data[at : at + length]) & 0xFF == 0
    anchor = got["etc/smbios/smbios-anchor"]
    assert anchor[:4] == b"_SM_" and struct.unpack_from("<H", anchor, 22)[0] == len(
        got["etc/smbios/smbios-tables"]
    )


def test_kernel_items_split_a_bzimage_and_are_read_lazily(mem):
    reads = []

    def kernel():
        reads.append("k")
        return KERNEL

    d = F.machine_fw_cfg(mem, cpus=1, e820=E820)
    F.add_kernel_items(d, kernel, None, "x=1")
    assert reads == []  # direct boot pays nothing
    assert int.from_bytes(read_ports(d, F.SETUP_SIZE, 4), "little") == 1536
    assert int.from_bytes(read_ports(d, F.KERNEL_SIZE, 4), "little") == 4096 - 1536
    assert read_ports(d, F.KERNEL_DATA, 4) == b"KKKK"
    assert read_ports(d, F.SETUP_DATA, 0x206)[0x202:] == b"HdrS"
    assert int.from_bytes(read_ports(d, F.INITRD_SIZE, 4), "little") == 0
    assert read_ports(d, F.CMDLINE_DATA, 4) == b"x=1\0"
    assert int.from_bytes(read_ports(d, F.CMDLINE_SIZE, 4), "little") == 4
    assert reads == ["k"]


def test_a_kernel_file_that_fails_to_read_gives_an_empty_item(mem):
    def gone():
        raise OSError(2, "No such file or directory")

    d = F.FwCfg(mem)
    F.add_kernel_items(d, gone, None, "")
    assert read_ports(d, F.KERNEL_SIZE, 4) == bytes(4)


def test_dma_read_select_skip(dev, mem):
    mem.write(0x20000, b"\xaa" * 16)
    assert dma(dev, mem, F.DMA_SELECT | F.DMA_READ | (F.SIGNATURE << 16), 6, 0x20000) == 0
    assert mem.read(0x20000, 8) == b"QEMU\0\0\xaa\xaa"  # zeros past the item's end
    assert dma(dev, mem, F.DMA_SELECT | F.DMA_SKIP | (F.RAM_SIZE << 16), 2, 0) == 0
    assert dma(dev, mem, F.DMA_READ, 6, 0x20000) == 0
    assert mem.read(0x20000, 6) == mem.size.to_bytes(8, "little")[2:]
    # DMA and port reads share the offset
    select(dev, F.NB_CPUS)
    assert dev.pio_read(F.DATA_OFFSET, 1) == 3
    assert dma(dev, mem, F.DMA_READ, 1, 0x20000) == 0 and mem.read(0x20000, 1) == b"\0"


def test_dma_write_only_into_writable_items_and_never_past_their_end(mem):
    d = F.FwCfg(mem)
    d.add_file("etc/w", b"\0" * 8, writable=True)
    d.add_file("etc/r", b"\0" * 8)
    files = d.files()
    mem.write(0x20000, b"12345678XX")
    w = F.DMA_SELECT | F.DMA_WRITE
    assert dma(d, mem, w | (files["etc/r"] << 16), 4, 0x20000) == F.DMA_ERROR
    assert dma(d, mem, w | (files["etc/w"] << 16), 9, 0x20000) == F.DMA_ERROR
    assert dma(d, mem, w | (files["etc/w"] << 16), 8, 0x20000) == 0
    assert read_ports(d, files["etc/w"], 8) == b"12345678"
    assert read_ports(d, files["etc/r"], 8) == bytes(8)


@pytest.mark.parametrize(
    "control,length,target",
    [
        (F.DMA_SELECT | F.DMA_READ, 16, 64 * MiB),  # past RAM
        (F.DMA_SELECT | F.DMA_READ, 0xFFFF_FFFF, 0x1000),  # longer than RAM
        (F.DMA_SELECT | F.DMA_READ, 8, (1 << 64) - 4),  # wraps
        (F.DMA_SELECT | F.DMA_READ, 16, layout.MMIO_HOLE_START),
        (F.DMA_SELECT | F.DMA_WRITE, 4, 0x1000),  # nothing writable
    ],
)
def test_hostile_dma_fails_with_the_error_bit(dev, mem, control, length, target):
    assert dma(dev, mem, control, length, target) == F.DMA_ERROR


def test_a_descriptor_outside_ram_is_ignored(dev):
    for addr in (64 * MiB, (1 << 64) - 8, layout.MMIO_HOLE_START - 8):
        dev.pio_write(F.DMA_OFFSET, 4, int.from_bytes((addr >> 32).to_bytes(4, "big"), "little"))
        dev.pio_write(F.DMA_OFFSET + 4, 4, int.from_bytes((addr & 0xFFFFFFFF).to_bytes(4, "big"), "little"))
    assert read_ports(dev, F.SIGNATURE, 4) == b"QEMU"


def test_state_round_trip_keeps_the_read_position(dev, mem):
    select(dev, F.SIGNATURE)
    dev.pio_read(F.DATA_OFFSET, 1)
    dev.pio_write(F.DMA_OFFSET, 4, 0x01000000)
    saved = F.FwCfgState.model_validate_json(dev.save_state().model_dump_json())
    fresh = F.machine_fw_cfg(mem, cpus=3, e820=E820)
    fresh.load_state(saved)
    assert fresh.pio_read(F.DATA_OFFSET, 1) == ord("E")
    assert saved.dma_high == 1


def test_bad_file_names_are_refused(mem):
    d = F.FwCfg(mem)
    for name in ("", "x" * 56, "a\0b"):
        with pytest.raises(ValueError):
            d.add_file(name, b"")
    d.add_file("a", b"")
    with pytest.raises(ValueError):
        d.add_file("a", b"")


# -- fuzz: random port I/O and DMA descriptors never raise, never touch memory outside a target -------

_ops = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 15), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("r"), st.integers(0, 15), st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(
        st.just("dma"),
        st.integers(0, 0xFFFF_FFFF),
        st.one_of(st.integers(0, 64), st.integers(0, 0xFFFF_FFFF)),
        st.one_of(st.integers(0x30000, 0x30100), st.integers(0, (1 << 64) - 1)),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_ops, max_size=30))
def test_fuzz_port_io_and_dma(dev, mem, ops):
    guard = 0x3F000
    mem.write(guard, b"\x5a" * 64)
    for op in ops:
        if op[0] == "w":
            _, off, size, value = op
            dev.pio_write(off, size, value & ((1 << (8 * size)) - 1))
        elif op[0] == "r":
            _, off, size, _ = op
            assert 0 <= dev.pio_read(off, size) < 1 << (8 * size)
        else:
            _, control, length, target = op
            if target < mem.size:  # inside RAM: aim into the scratch area, clear of the guard
                target = 0x30000 + target % 0x100
                length = min(length, 0x100)
            assert dma(dev, mem, control, length, target, at=0x2F000) in (0, F.DMA_ERROR)
    assert mem.read(guard, 64) == b"\x5a" * 64
    dev.load_state(F.FwCfgState.model_validate(dev.save_state().model_dump()))
