"""The x86-64 register file as gdb sees it: a target description (XML) and the codec between
gdb's register numbers and KVM's regs, sregs and FPU state.

The numbering is the XML's order: gdb's own amd64 core and SSE features first (gdb checks
their register names), then fs/gs base, then corral's system registers (control registers and
EFER). A guest in 32-bit or real mode is shown through the same 64-bit registers: the upper
halves are zero there, and gdb's `set architecture i386` reads them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.kvm import structs as S


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""

    @property
    def size(self) -> int:
        return self.bits // 8


_CORE, _SSE, _SEG, _SYS = (
    "org.gnu.gdb.i386.core",
    "org.gnu.gdb.i386.sse",
    "org.gnu.gdb.i386.segments",
    "org.corral.x86.sys",
)
GPRS = "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15".split()
SEGMENTS = "cs ss ds es fs gs".split()
FPU_CONTROL = "fctrl fstat ftag fiseg fioff foseg fooff fop".split()
SYSTEM = "cr0 cr2 cr3 cr4 cr8 efer".split()

REGS: list[Reg] = [
    *(Reg(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", _CORE) for n in GPRS),
    Reg("rip", 64, "code_ptr", _CORE),
    Reg("eflags", 32, "i386_eflags", _CORE),
    *(Reg(n, 32, "int32", _CORE) for n in SEGMENTS),
    *(Reg(f"st{i}", 80, "i387_ext", _CORE) for i in range(8)),
    *(Reg(n, 32, "int", _CORE, "float") for n in FPU_CONTROL),
    *(Reg(f"xmm{i}", 128, "vec128", _SSE) for i in range(16)),
    Reg("mxcsr", 32, "i386_mxcsr", _SSE, "vector"),
    Reg("fs_base", 64, "int", _SEG),
    Reg("gs_base", 64, "int", _SEG),
    *(Reg(n, 64, "int", _SYS, "system") for n in SYSTEM),
]
REG_INDEX = {r.name: i for i, r in enumerate(REGS)}
G_SIZE = sum(r.size for r in REGS)  # bytes of a 'g' reply

_EFLAGS = [
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
]  # fmt: skip
_MXCSR = [
    ("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
    ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15),
]  # fmt: skip


def _types(feature: str) -> list[str]:
    if feature == _CORE:
        return [
            '<flags id="i386_eflags" size="4">',
            *(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS),
            "</flags>",
        ]
    if feature == _SSE:
        vectors = [
            ("v4f", "ieee_single", 4),
            ("v2d", "ieee_double", 2),
            ("v16i8", "int8", 16),
            ("v8i16", "int16", 8),
            ("v4i32", "int32", 4),
            ("v2i64", "int64", 2),
        ]
        return [
            *(f'<vector id="{i}" type="{t}" count="{n}"/>' for i, t, n in vectors),
            '<union id="vec128">',
            '<field name="v4_float" type="v4f"/>',
            '<field name="v2_double" type="v2d"/>',
            '<field name="v16_int8" type="v16i8"/>',
            '<field name="v8_int16" type="v8i16"/>',
            '<field name="v4_int32" type="v4i32"/>',
            '<field name="v2_int64" type="v2i64"/>',
            '<field name="uint128" type="uint128"/>',
            "</union>",
            '<flags id="i386_mxcsr" size="4">',
            *(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _MXCSR),
            "</flags>",
        ]
    return []


def target_xml() -> bytes:
    """The target description gdb reads through qXfer:features:read:target.xml."""
    lines = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
        '<target version="1.0">',
        "<architecture>i386:x86-64</architecture>",
    ]
    feature = ""
    for num, r in enumerate(REGS):
        if r.feature != feature:
            if feature:
                lines.append("</feature>")
            feature = r.feature
            lines.append(f'<feature name="{feature}">')
            lines += _types(feature)
        group = f' group="{r.group}"' if r.group else ""
        lines.append(f'<reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{num}"{group}/>')
    lines += ["</feature>", "</target>"]
    return "\n".join(lines).encode()


@dataclass
class RegisterFile:
    """One vCPU's registers as KVM holds them; `values` and `set` speak gdb's numbering."""

    regs: S.KvmRegs
    sregs: S.KvmSregs
    fpu: S.KvmFpu

    def get(self, num: int) -> bytes:
        r = REGS[num]
        return self._int(r.name).to_bytes(r.size, "little")

    def _int(self, name: str) -> int:
        regs, sregs, fpu = self.regs, self.sregs, self.fpu
        if name in GPRS or name == "rip":
            return int(getattr(regs, name))
        if name == "eflags":
            return regs.rflags & 0xFFFF_FFFF
        if name in SEGMENTS:
            return int(getattr(sregs, name).selector)
        if name.startswith("st"):
            i = int(name[2:])
            return int.from_bytes(bytes(fpu.fpr[16 * i : 16 * i + 10]), "little")
        if name.startswith("xmm"):
            i = int(name[3:])
            return int.from_bytes(bytes(fpu.xmm[16 * i : 16 * i + 16]), "little")
        fpu_values = {
            "fctrl": fpu.fcw,
            "fstat": fpu.fsw,
            "ftag": _full_tag(fpu.ftwx),
            "fiseg": 0,
            "fioff": fpu.last_ip & 0xFFFF_FFFF,
            "foseg": 0,
            "fooff": fpu.last_dp & 0xFFFF_FFFF,
            "fop": fpu.last_opcode,
            "mxcsr": fpu.mxcsr,
            "fs_base": sregs.fs.base,
            "gs_base": sregs.gs.base,
        }
        if name in fpu_values:
            return int(fpu_values[name])
        return int(getattr(sregs, name))  # cr0..cr8, efer

    def all(self) -> bytes:
        return b"".join(self.get(i) for i in range(len(REGS)))

    def set(self, num: int, data: bytes) -> str:
        """Put gdb's bytes for register `num` in; returns which KVM state changed ("regs",
        "sregs" or "fpu"). A selector write changes the selector only (not the hidden
        descriptor: gdb cannot describe one)."""
        r = REGS[num]
        if len(data) != r.size:
            raise ValueError(f"register {r.name} takes {r.size} bytes, not {len(data)}")
        v = int.from_bytes(data, "little")
        name = r.name
        regs, sregs, fpu = self.regs, self.sregs, self.fpu
        if name in GPRS or name == "rip":
            setattr(regs, name, v)
            return "regs"
        if name == "eflags":
            regs.rflags = (regs.rflags & ~0xFFFF_FFFF) | v | 0x2  # bit 1 is always set
            return "regs"
        if name in SEGMENTS:
            getattr(sregs, name).selector = v & 0xFFFF
            return "sregs"
        if name.startswith("st"):
            i = int(name[2:])
            fpu.fpr[16 * i : 16 * i + 10] = list(data)
            return "fpu"
        if name.startswith("xmm"):
            i = int(name[3:])
            fpu.xmm[16 * i : 16 * i + 16] = list(data)
            return "fpu"
        if name in ("fs_base", "gs_base"):
            getattr(sregs, name[:2]).base = v
            return "sregs"
        simple_fpu = {"fctrl": "fcw", "fstat": "fsw", "fop": "last_opcode", "mxcsr": "mxcsr"}
        if name in simple_fpu:
            setattr(fpu, simple_fpu[name], v)
            return "fpu"
        if name == "ftag":
            fpu.ftwx = _abridged_tag(v)
            return "fpu"
        if name in ("fioff", "fooff"):
            field = "last_ip" if name == "fioff" else "last_dp"
            setattr(fpu, field, (getattr(fpu, field) & ~0xFFFF_FFFF) | v)
            return "fpu"
        if name in ("fiseg", "foseg"):
            return "fpu"  # not kept by KVM_GET_FPU in 64-bit format
        setattr(sregs, name, v)
        return "sregs"


def _full_tag(abridged: int) -> int:
    """The FXSAVE abridged tag (1 bit per register: in use) as the i387 tag word gdb shows
    (2 bits per register: 0 valid, 3 empty)."""
    return sum((0 if abridged >> i & 1 else 3) << (2 * i) for i in range(8))


def _abridged_tag(full: int) -> int:
    return sum(1 << i for i in range(8) if (full >> (2 * i)) & 3 != 3)
