"""Segments, GDT descriptors, the GDT itself and task-state segments.

A :class:`Segment` holds exactly the fields of KVM's ``struct kvm_segment``:
the *hidden part* of a segment register (base, limit, attributes) plus its
visible selector.  In protected and long mode the CPU fills the hidden part
from an 8-byte *descriptor* in the GDT when a selector is loaded; with KVM
the host sets both sides directly through ``KVM_SET_SREGS``, so the two must
agree.  This module builds both from one value.

Descriptor layout (Intel SDM Vol. 3A §3.4.5 "Segment Descriptors",
Figure 3-8), as one little-endian 64-bit number::

    bits   63-56       55  54   53  52   51-48        47  46-45  44  43-40  39-16      15-0
    field  base 31:24  G   D/B  L   AVL  limit 19:16  P   DPL    S   type   base 23:0  limit 15:0

Like KVM, :attr:`Segment.limit` is the limit in *bytes*: with G=1 the
descriptor stores ``limit >> 12`` and the low 12 bits must be all ones.

In IA-32e (long) mode, system descriptors (LDT, TSS, gates) are 16 bytes:
the upper 8 bytes hold base bits 63:32 (Intel SDM Vol. 3A, chapter "Task
Management", "TSS Descriptor in 64-bit mode"; AMD APM Vol. 2 §4.8.3 "System
Descriptors").
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pykvm.values import Value

from . import bits
from .state import check_mode, describe_segment_type, format_table

__all__ = [
    "Segment",
    "Gdt",
    "FlatGdt",
    "flat_gdt",
    "real_mode_segment",
    "real_mode_tr",
    "real_mode_ldt",
    "tss32",
    "tss64",
    "tss_size",
    "USER_IO_PORTS",
    "KERNEL_CS",
    "KERNEL_DS",
    "USER_DS",
    "USER_CS",
]

#: The fields of ``struct kvm_segment`` in declaration order (without padding).
KVM_SEGMENT_FIELDS = (
    "base", "limit", "selector", "type", "present", "dpl",
    "db", "s", "l", "g", "avl", "unusable",
)


class Segment(Value):
    """One segment register as KVM sees it (``struct kvm_segment``).

    Attributes:
        base: linear base address (64-bit; only FS/GS/system segments use
            the upper half).
        limit: last valid offset, in bytes (already scaled by *g*).
        selector: the visible selector (index << 3 | TI << 2 | RPL).
        type: the 4-bit type field (see :mod:`pykvm.x86.bits` ``SEG_TYPE_*``
            and ``SYS_TYPE_*``).
        present: P, the segment is present.
        dpl: descriptor privilege level, 0-3.
        db: D/B, 32-bit default operand size (code) / big stack (data).
        s: 1 for code/data, 0 for system segments (TSS, LDT).
        l: 64-bit code segment (long mode only).
        g: granularity, the descriptor's limit counts 4 KiB units.
        avl: the bit left to software.
        unusable: KVM's flag for a segment register holding a null selector;
            not stored in a descriptor (decoding sets it to ``not present``).
    """

    __slots__ = KVM_SEGMENT_FIELDS

    def __init__(self, base: int = 0, limit: int = 0, selector: int = 0, type: int = 0, present: bool = False,
                 dpl: int = 0, db: bool = False, s: bool = False, l: bool = False,  # noqa: E741 - KVM's name
                 g: bool = False, avl: bool = False, unusable: bool = False) -> None:
        self.base = base
        self.limit = limit
        self.selector = selector
        self.type = type
        self.present = bool(present)
        self.dpl = dpl
        self.db = bool(db)
        self.s = bool(s)
        self.l = bool(l)
        self.g = bool(g)
        self.avl = bool(avl)
        self.unusable = bool(unusable)
        _check_range("base", self.base, 64)
        _check_range("limit", self.limit, 32)
        _check_range("selector", self.selector, 16)
        _check_range("type", self.type, 4)
        _check_range("dpl", self.dpl, 2)

    # --- constructors -------------------------------------------------------

    @classmethod
    def null(cls) -> Segment:
        """The null segment: selector 0, marked unusable."""
        return cls(unusable=True)

    @classmethod
    def from_descriptor(cls, data: bytes | int, selector: int = 0) -> Segment:
        """Decode an 8-byte descriptor, or a 16-byte IA-32e system descriptor.

        *data* is the raw bytes (or, for 8 bytes, the little-endian value).
        The limit is scaled back to bytes when G=1.  *selector* is copied
        into the result (a descriptor does not contain its own selector);
        ``unusable`` is set when the descriptor is not present.
        """
        high = 0
        if isinstance(data, int):
            low = data
        elif len(data) == 8:
            (low,) = struct.unpack("<Q", data)
        elif len(data) == 16:
            low, high = struct.unpack("<QQ", data)
            if low & bits.DESC_S:
                raise ValueError("a 16-byte descriptor must be a system descriptor (S=0)")
        else:
            raise ValueError(f"a descriptor is 8 or 16 bytes, not {len(data)}")
        _check_range("descriptor", low, 64)
        raw_limit = (low & bits.DESC_LIMIT_LOW_MASK) | (((low >> bits.DESC_LIMIT_HIGH_SHIFT) & 0xF) << 16)
        g = bool(low & bits.DESC_G)
        base = ((low >> bits.DESC_BASE_LOW_SHIFT) & 0xFFFFFF) | (((low >> bits.DESC_BASE_HIGH_SHIFT) & 0xFF) << 24)
        base |= (high & 0xFFFFFFFF) << 32
        present = bool(low & bits.DESC_P)
        return cls(
            base=base,
            limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
            selector=selector,
            type=(low >> bits.DESC_TYPE_SHIFT) & 0xF,
            present=present,
            dpl=(low >> bits.DESC_DPL_SHIFT) & 3,
            db=bool(low & bits.DESC_DB),
            s=bool(low & bits.DESC_S),
            l=bool(low & bits.DESC_L),
            g=g,
            avl=bool(low & bits.DESC_AVL),
            unusable=not present,
        )

    @classmethod
    def from_kvm(cls, obj: object) -> Segment:
        """Read a ``struct kvm_segment``-like object (e.g. ``sregs.cs``)."""
        return cls(**{name: getattr(obj, name) for name in KVM_SEGMENT_FIELDS})

    # --- conversions --------------------------------------------------------

    def to_kvm(self, obj: object) -> object:
        """Copy every field into a ``struct kvm_segment``-like *obj*; return it.

        Booleans are stored as 0/1, as the C structure holds ``__u8``.
        """
        for name in KVM_SEGMENT_FIELDS:
            setattr(obj, name, int(getattr(self, name)))
        return obj

    def descriptor_value(self) -> int:
        """The 8-byte descriptor as a 64-bit integer (base must fit 32 bits)."""
        if self.base >> 32:
            raise ValueError(
                f"base {self.base:#x} does not fit an 8-byte descriptor; "
                "use system_descriptor64() for a 64-bit TSS/LDT"
            )
        if self.g:
            if self.limit & 0xFFF != 0xFFF:
                raise ValueError(f"limit {self.limit:#x} with G=1 must end in 0xfff (4 KiB units)")
            raw_limit = self.limit >> 12
        else:
            if self.limit > 0xFFFFF:
                raise ValueError(f"limit {self.limit:#x} needs G=1 (byte limits stop at 0xfffff)")
            raw_limit = self.limit
        value = raw_limit & bits.DESC_LIMIT_LOW_MASK
        value |= (raw_limit >> 16) << bits.DESC_LIMIT_HIGH_SHIFT
        value |= (self.base & 0xFFFFFF) << bits.DESC_BASE_LOW_SHIFT
        value |= (self.base >> 24) << bits.DESC_BASE_HIGH_SHIFT
        value |= self.type << bits.DESC_TYPE_SHIFT
        value |= self.dpl << bits.DESC_DPL_SHIFT
        for flag, bit in (
            (self.s, bits.DESC_S),
            (self.present, bits.DESC_P),
            (self.avl, bits.DESC_AVL),
            (self.l, bits.DESC_L),
            (self.db, bits.DESC_DB),
            (self.g, bits.DESC_G),
        ):
            if flag:
                value |= bit
        return value

    def descriptor(self) -> bytes:
        """The 8-byte GDT/LDT descriptor."""
        return struct.pack("<Q", self.descriptor_value())

    def system_descriptor64(self) -> bytes:
        """The 16-byte IA-32e system descriptor (64-bit TSS or LDT).

        Bytes 0-7 are the legacy descriptor with base bits 31:0, bytes 8-11
        hold base bits 63:32, bytes 12-15 are reserved (zero).
        """
        if self.s:
            raise ValueError("only system segments (S=0) have 16-byte descriptors")
        low = self.replace(base=self.base & 0xFFFFFFFF).descriptor_value()
        return struct.pack("<QQ", low, self.base >> 32)

    # --- helpers ------------------------------------------------------------

    def with_selector(self, selector: int) -> Segment:
        """A copy of this segment with another selector."""
        return self.replace(selector=selector)

    @property
    def is_code(self) -> bool:
        """True for a code segment (S=1 and type bit 3 set)."""
        return self.s and bool(self.type & bits.SEG_TYPE_CODE)

    @property
    def rpl(self) -> int:
        """The requested privilege level in the selector."""
        return self.selector & bits.SELECTOR_RPL_MASK

    @property
    def is_null(self) -> bool:
        """True if the descriptor would be all zeros (``unusable`` aside)."""
        return self.replace(selector=0, unusable=False) == Segment()

    def describe(self, long_mode: bool = False) -> str:
        """The type in words, e.g. ``"code 64-bit DPL3 RX"``, or ``"null"``.

        *long_mode* gives system types their IA-32e meaning (64-bit TSS).
        """
        if self.is_null:
            return "null"
        return describe_segment_type(self.type, self.s, self.dpl, self.l, self.db, long_mode)

    def flags(self) -> str:
        """The set attribute bits as short names: ``P S DB L G AVL A``."""
        names = [
            label
            for flag, label in (
                (self.present, "P"),
                (self.s, "S"),
                (self.db, "DB"),
                (self.l, "L"),
                (self.g, "G"),
                (self.avl, "AVL"),
            )
            if flag
        ]
        if self.s and self.type & bits.SEG_TYPE_ACCESSED:
            names.append("A")
        if self.unusable:
            names.append("unusable")
        return " ".join(names)

    def __str__(self) -> str:
        return (
            f"selector {self.selector:#06x} base {self.base:#010x} limit {self.limit:#010x} "
            f"{self.describe()} [{self.flags()}]"
        )


def _check_range(name: str, value: int, nbits: int) -> None:
    if not 0 <= value < (1 << nbits):
        raise ValueError(f"{name} {value:#x} does not fit in {nbits} bits")


# ---------------------------------------------------------------------------
# The GDT
# ---------------------------------------------------------------------------


class Gdt:
    """A Global Descriptor Table being built.

    Slot 0 is the null descriptor.  :meth:`add` appends a descriptor and
    returns its index; in a *long_mode* GDT, system segments (TSS, LDT) take
    two slots because their descriptors are 16 bytes.

    >>> gdt = Gdt(long_mode=True)
    >>> code = gdt.add(Segment(limit=0xFFFFFFFF, type=0xB, present=True, s=True, l=True, g=True))
    >>> hex(gdt.selector(code)), hex(gdt.limit)
    ('0x8', '0xf')
    """

    def __init__(self, long_mode: bool = False) -> None:
        self.long_mode = long_mode
        self._slots: list[Segment | None] = [Segment.null()]  # None = upper half

    @staticmethod
    def _is_wide(segment: Segment, long_mode: bool) -> bool:
        return long_mode and not segment.s and not segment.is_null

    def add(self, segment: Segment) -> int:
        """Append *segment*'s descriptor; return its index (slot number).

        The segment's own selector is ignored: use :meth:`selector`.
        """
        index = len(self._slots)
        self._slots.append(segment)
        if self._is_wide(segment, self.long_mode):
            self._slots.append(None)
        return index

    def selector(self, index: int, rpl: int = 0) -> int:
        """The selector of GDT entry *index* with requested privilege *rpl*."""
        self._entry(index)
        if not 0 <= rpl <= 3:
            raise ValueError(f"RPL must be 0-3, not {rpl}")
        return (index << bits.SELECTOR_INDEX_SHIFT) | rpl

    def segment(self, selector: int) -> Segment:
        """The segment register value that loading *selector* would give."""
        if selector & bits.SELECTOR_TI:
            raise ValueError(f"selector {selector:#x} refers to the LDT")
        return self._entry(selector >> bits.SELECTOR_INDEX_SHIFT).with_selector(selector)

    def _entry(self, index: int) -> Segment:
        if not 0 <= index < len(self._slots):
            raise IndexError(f"GDT index {index} out of range (0..{len(self._slots) - 1})")
        entry = self._slots[index]
        if entry is None:
            raise IndexError(f"GDT index {index} is the upper half of a 16-byte descriptor")
        return entry

    def entries(self) -> Iterator[tuple[int, Segment]]:
        """Yield ``(index, segment)`` for every descriptor, null included."""
        for index, entry in enumerate(self._slots):
            if entry is not None:
                yield index, entry

    def __len__(self) -> int:
        """Number of 8-byte slots."""
        return len(self._slots)

    @property
    def limit(self) -> int:
        """The GDTR limit: size in bytes minus one."""
        return 8 * len(self._slots) - 1

    def __bytes__(self) -> bytes:
        out = bytearray()
        for _, entry in self.entries():
            if self._is_wide(entry, self.long_mode):
                out += entry.system_descriptor64()
            else:
                out += entry.descriptor()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes, long_mode: bool = False) -> Gdt:
        """Decode a GDT image (e.g. read back from guest memory)."""
        if len(data) % 8:
            raise ValueError(f"a GDT is a whole number of 8-byte slots, not {len(data)} bytes")
        gdt = cls(long_mode)
        gdt._slots = []
        offset = 0
        while offset < len(data):
            segment = Segment.from_descriptor(data[offset : offset + 8])
            if cls._is_wide(segment, long_mode):
                if offset + 16 > len(data):
                    raise ValueError(f"16-byte system descriptor at {offset:#x} is cut short")
                segment = Segment.from_descriptor(data[offset : offset + 16])
                gdt._slots += [segment, None]
                offset += 16
            else:
                gdt._slots.append(segment)
                offset += 8
        return gdt

    def __str__(self) -> str:
        kind = "IA-32e" if self.long_mode else "legacy"
        header = f"GDT ({kind}, {len(self._slots)} slots, limit {self.limit:#x})"
        rows = []
        for index, entry in self.entries():
            selector = f"{index << 3:#06x}"
            if entry.is_null:
                rows.append([index, selector, "-", "-", "null", ""])
                continue
            flags = entry.flags()
            if self._is_wide(entry, self.long_mode):
                flags += " (16 bytes)"
            rows.append(
                [index, selector, f"{entry.base:#010x}", f"{entry.limit:#010x}",
                 entry.describe(self.long_mode), flags]
            )
        return header + "\n" + format_table(["index", "selector", "base", "limit", "type", "flags"], rows)

    def __repr__(self) -> str:
        return f"<Gdt long_mode={self.long_mode} slots={len(self._slots)}>"


# ---------------------------------------------------------------------------
# Task-state segments
# ---------------------------------------------------------------------------


def _io_bitmap(io_ports: int) -> bytes:
    """An I/O permission bitmap allowing ports ``0 .. io_ports-1``, with its
    terminating 0xff byte (Intel SDM Vol. 1, chapter "Input/Output", "I/O
    Permission Bit Map").  Empty for 0 ports."""
    if not 0 <= io_ports <= 0x10000 or io_ports % 8:
        raise ValueError(f"io_ports must be a multiple of 8 up to 0x10000, not {io_ports:#x}")
    if not io_ports:
        return b""
    return bytes(io_ports // 8) + b"\xff"  # a 0 bit allows the port


def tss64(
    rsp0: int, rsp1: int = 0, rsp2: int = 0, ist: tuple[int, ...] = (), io_ports: int = 0
) -> bytes:
    """A 64-bit TSS (Intel SDM Vol. 3A, "64-Bit TSS Format").

    *rsp0* is the stack the CPU switches to on an interrupt or call from
    CPL 3 to CPL 0.  The I/O-map base is 104, right after the fixed part.
    With *io_ports* = 0 the TSS is 104 bytes and has no I/O permission
    bitmap (the map base is past the limit); otherwise a bitmap allowing
    ports ``0 .. io_ports-1`` follows (plus its 0xff end byte), and the TSS
    descriptor's limit must be ``len(tss) - 1``.
    """
    if len(ist) > 7:
        raise ValueError("there are at most 7 IST entries")
    ists = list(ist) + [0] * (7 - len(ist))
    # offset 0 reserved, 4 RSP0-2, 28 reserved, 36 IST1-7, 92 reserved,
    # 100 reserved, 102 I/O map base.
    fixed = struct.pack("<I3QQ7QQHH", 0, rsp0, rsp1, rsp2, 0, *ists, 0, 0, bits.TSS64_SIZE)
    return fixed + _io_bitmap(io_ports)


def tss32(esp0: int, ss0: int, io_ports: int = 0) -> bytes:
    """A 32-bit TSS (Intel SDM Vol. 3A, "32-Bit Task-State Segment").

    Only ESP0/SS0 (the ring-0 stack) and the I/O-map base (104) are set;
    the rest is zero.  *io_ports* adds an I/O permission bitmap as in
    :func:`tss64`.
    """
    tss = bytearray(bits.TSS32_SIZE)
    struct.pack_into("<I", tss, 4, esp0)
    struct.pack_into("<H", tss, 8, ss0)
    struct.pack_into("<H", tss, 102, bits.TSS32_SIZE)
    return bytes(tss) + _io_bitmap(io_ports)


# ---------------------------------------------------------------------------
# Standard segments for the five modes
# ---------------------------------------------------------------------------

#: Ports a long_user (CPL 3) guest may use: 0x0000-0x3fff, through the TSS's
#: I/O permission bitmap (2 KiB; the TSS still ends below the IDT at 0x3000).
#: Architecturally RFLAGS.IOPL=3 alone lets CPL 3 use every port, and the
#: bitmap is then never read; but KVM on kvm_pvm nested hosts does not honour
#: IOPL for CPL-3 port I/O (the guest gets #GP), while it does honour the
#: bitmap.  Setting both works everywhere.
USER_IO_PORTS = 0x4000

#: Selectors of the long_user GDT, in the order SYSCALL/SYSRET expect:
#: STAR[47:32] = KERNEL_CS, STAR[63:48] = KERNEL_DS (SYSRET adds 8 for SS, 16 for CS).
KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS = 0x18 | 3
USER_CS = 0x20 | 3


def real_mode_segment(selector: int = 0, code: bool = False) -> Segment:
    """A real-mode segment register: base = selector * 16, limit 0xffff.

    Type 0xb (execute/read, accessed) for CS, 3 (read/write, accessed) for
    data segments -- the values a real CPU holds after reset or after a
    real-mode segment load.
    """
    _check_range("selector", selector, 16)
    return Segment(
        base=selector << 4,
        limit=0xFFFF,
        selector=selector,
        type=bits.SEG_TYPE_CODE_RX if code else bits.SEG_TYPE_DATA_RW,
        present=True,
        s=True,
    )


def real_mode_tr() -> Segment:
    """TR as after reset: base 0, limit 0xffff, a busy 32-bit TSS type."""
    return Segment(limit=0xFFFF, type=bits.SYS_TYPE_TSS_BUSY, present=True)


def real_mode_ldt() -> Segment:
    """LDTR as after reset: base 0, limit 0xffff, type LDT, present."""
    return Segment(limit=0xFFFF, type=bits.SYS_TYPE_LDT, present=True)


def _flat(code: bool, dpl: int = 0, long: bool = False) -> Segment:
    """A flat 4 GiB segment (base 0, limit 0xffffffff, G=1)."""
    return Segment(
        limit=0xFFFFFFFF,
        type=bits.SEG_TYPE_CODE_RX if code else bits.SEG_TYPE_DATA_RW,
        present=True,
        dpl=dpl,
        db=not (code and long),  # L=1 requires D=0
        s=True,
        l=code and long,
        g=True,
    )


def tss_size(mode: str) -> int:
    """Size in bytes of the TSS :func:`flat_gdt` describes for *mode*
    (104, plus the I/O bitmap and its end byte in ``long_user``)."""
    check_mode(mode)
    if mode == "long_user":
        return bits.TSS64_SIZE + USER_IO_PORTS // 8 + 1
    return bits.TSS64_SIZE  # 32- and 64-bit TSSs are both 104 bytes


def _tss_segment(base: int, size: int) -> Segment:
    # Busy, as LTR would leave it; KVM (VMX) requires a busy TSS in TR.
    return Segment(base=base, limit=size - 1, type=bits.SYS_TYPE_TSS_BUSY, present=True)


class FlatGdt(Value):
    """The GDT of a mode and the segment registers to load from it.

    ``cs``, ``ds``, ``ss`` and ``tr`` carry their selectors; ``ds`` is also
    what ES, FS and GS get.  ``ldt`` is the LDTR value.
    """

    __slots__ = ("mode", "gdt", "cs", "ds", "ss", "tr", "ldt")

    def __init__(self, mode: str, gdt: Gdt, cs: Segment, ds: Segment, ss: Segment, tr: Segment, ldt: Segment) -> None:
        self.mode = mode
        self.gdt = gdt
        self.cs = cs
        self.ds = ds
        self.ss = ss
        self.tr = tr
        self.ldt = ldt

    def __str__(self) -> str:
        rows = [
            [name, f"{seg.selector:#06x}", seg.describe(self.gdt.long_mode)]
            for name, seg in (("cs", self.cs), ("ds", self.ds), ("ss", self.ss), ("tr", self.tr), ("ldt", self.ldt))
        ]
        return f"{self.gdt}\n\n" + format_table(["reg", "selector", "loads"], rows)


def flat_gdt(mode: str, tss_base: int) -> FlatGdt:
    """The standard flat GDT for *mode* and the segments to load.

    ``real``: no descriptors (only null); real-mode CS/DS/SS with selector 0.
    ``protected`` / ``paged32``: null, code32 (0x08), data32 (0x10),
    32-bit TSS (0x18).
    ``long``: null, code64 (0x08), data (0x10), 64-bit TSS (0x18, 16 bytes).
    ``long_user``: null, kernel code64 (0x08), kernel data (0x10), user data
    (0x18, used with RPL 3 as 0x1b), user code64 (0x20 -> 0x23), 64-bit TSS
    (0x28) -- the order SYSRET needs.  CS/DS/SS are the user ones, and the
    TSS limit covers an I/O bitmap for :data:`USER_IO_PORTS` ports.
    """
    check_mode(mode)
    if mode == "real":
        return FlatGdt(
            mode=mode,
            gdt=Gdt(),
            cs=real_mode_segment(0, code=True),
            ds=real_mode_segment(0),
            ss=real_mode_segment(0),
            tr=real_mode_tr(),
            ldt=real_mode_ldt(),
        )
    long = mode in ("long", "long_user")
    gdt = Gdt(long_mode=long)
    kernel_code = gdt.add(_flat(code=True, long=long))
    kernel_data = gdt.add(_flat(code=False))
    if mode == "long_user":
        user_data = gdt.add(_flat(code=False, dpl=3))
        user_code = gdt.add(_flat(code=True, dpl=3, long=True))
        cs_sel, ds_sel = gdt.selector(user_code, 3), gdt.selector(user_data, 3)
    else:
        cs_sel, ds_sel = gdt.selector(kernel_code), gdt.selector(kernel_data)
    tss = gdt.add(_tss_segment(tss_base, tss_size(mode)))
    return FlatGdt(
        mode=mode,
        gdt=gdt,
        cs=gdt.segment(cs_sel),
        ds=gdt.segment(ds_sel),
        ss=gdt.segment(ds_sel),
        tr=gdt.segment(gdt.selector(tss)),
        ldt=Segment.null(),
    )
