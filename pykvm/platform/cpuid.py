"""The CPUID table each vCPU sees: KVM's supported CPUID, the topology filled in, what pykvm does not back masked.

KVM_GET_SUPPORTED_CPUID lists what KVM *can* expose; a VMM makes each
vCPU's table from it (api.rst, KVM_SET_CPUID2), as QEMU does for ``-cpu
host``:

* **the topology** (SDM vol. 2A, CPUID leaves 01H, 04H, 0BH, 1FH): each
  vCPU's initial APIC ID in leaf 1 EBX[31:24] and in EDX of every
  sub-leaf of 0BH/1FH; the logical processors per package in leaf 1
  EBX[23:16] with EDX.HTT; the cores per package in leaf 4 EAX[31:26];
  0BH/1FH's SMT and core levels (their ``x2APIC ID`` shift widths).  APIC
  IDs are the vCPU indices, so the topology's widths round up to powers of
  two, as on hardware;
* **features pykvm does not back** are cleared: KVM's asynchronous page
  faults (leaf 0x40000001 bits 4, 10, 14) need a VMM that services them;
* **``-cpu host,+feature,-feature``** sets or clears named bits
  (:data:`FEATURES`, QEMU's names); a feature this host's KVM does not
  offer cannot be turned on.

A table is a list of :class:`Leaf` values (pure data: testable without
KVM); :func:`to_kvm` makes the ``struct kvm_cpuid2`` for KVM_SET_CPUID2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pykvm.values import Value

__all__ = ["FEATURES", "Leaf", "from_kvm", "to_kvm", "vcpu_table", "CpuidError"]

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # api.rst: the entry depends on ECX (the sub-leaf)

#: QEMU's feature names (target/i386/cpu.c) -> (leaf, sub-leaf, register, bit).
FEATURES: dict[str, tuple[int, int, str, int]] = {
    # leaf 1 EDX
    "fpu": (1, 0, "edx", 0), "vme": (1, 0, "edx", 1), "de": (1, 0, "edx", 2), "pse": (1, 0, "edx", 3),
    "tsc": (1, 0, "edx", 4), "msr": (1, 0, "edx", 5), "pae": (1, 0, "edx", 6), "mce": (1, 0, "edx", 7),
    "cx8": (1, 0, "edx", 8), "apic": (1, 0, "edx", 9), "sep": (1, 0, "edx", 11), "mtrr": (1, 0, "edx", 12),
    "pge": (1, 0, "edx", 13), "mca": (1, 0, "edx", 14), "cmov": (1, 0, "edx", 15), "pat": (1, 0, "edx", 16),
    "pse36": (1, 0, "edx", 17), "clflush": (1, 0, "edx", 19), "mmx": (1, 0, "edx", 23), "fxsr": (1, 0, "edx", 24),
    "sse": (1, 0, "edx", 25), "sse2": (1, 0, "edx", 26), "ss": (1, 0, "edx", 27), "ht": (1, 0, "edx", 28),
    # leaf 1 ECX
    "pni": (1, 0, "ecx", 0), "pclmulqdq": (1, 0, "ecx", 1), "monitor": (1, 0, "ecx", 3), "vmx": (1, 0, "ecx", 5),
    "ssse3": (1, 0, "ecx", 9), "fma": (1, 0, "ecx", 12), "cx16": (1, 0, "ecx", 13), "pcid": (1, 0, "ecx", 17),
    "sse4.1": (1, 0, "ecx", 19), "sse4.2": (1, 0, "ecx", 20), "x2apic": (1, 0, "ecx", 21),
    "movbe": (1, 0, "ecx", 22), "popcnt": (1, 0, "ecx", 23), "tsc-deadline": (1, 0, "ecx", 24),
    "aes": (1, 0, "ecx", 25), "xsave": (1, 0, "ecx", 26), "avx": (1, 0, "ecx", 28), "f16c": (1, 0, "ecx", 29),
    "rdrand": (1, 0, "ecx", 30), "hypervisor": (1, 0, "ecx", 31),
    # leaf 7 EBX / ECX / EDX
    "fsgsbase": (7, 0, "ebx", 0), "bmi1": (7, 0, "ebx", 3), "hle": (7, 0, "ebx", 4), "avx2": (7, 0, "ebx", 5),
    "smep": (7, 0, "ebx", 7), "bmi2": (7, 0, "ebx", 8), "erms": (7, 0, "ebx", 9), "invpcid": (7, 0, "ebx", 10),
    "rtm": (7, 0, "ebx", 11), "avx512f": (7, 0, "ebx", 16), "rdseed": (7, 0, "ebx", 18), "adx": (7, 0, "ebx", 19),
    "smap": (7, 0, "ebx", 20), "clflushopt": (7, 0, "ebx", 23), "sha-ni": (7, 0, "ebx", 29),
    "umip": (7, 0, "ecx", 2), "pku": (7, 0, "ecx", 3), "la57": (7, 0, "ecx", 16), "rdpid": (7, 0, "ecx", 22),
    "md-clear": (7, 0, "edx", 10), "spec-ctrl": (7, 0, "edx", 26), "arch-capabilities": (7, 0, "edx", 29),
    # extended leaves
    "lahf-lm": (0x80000001, 0, "ecx", 0), "svm": (0x80000001, 0, "ecx", 2), "abm": (0x80000001, 0, "ecx", 5),
    "syscall": (0x80000001, 0, "edx", 11), "nx": (0x80000001, 0, "edx", 20), "pdpe1gb": (0x80000001, 0, "edx", 26),
    "rdtscp": (0x80000001, 0, "edx", 27), "lm": (0x80000001, 0, "edx", 29),
    "invtsc": (0x80000007, 0, "edx", 8),
    # KVM's paravirtual leaf (Documentation/virt/kvm/x86/cpuid.rst)
    "kvmclock": (0x40000001, 0, "eax", 0), "kvm-nopiodelay": (0x40000001, 0, "eax", 1),
    "kvmclock2": (0x40000001, 0, "eax", 3), "kvm-asyncpf": (0x40000001, 0, "eax", 4),
    "kvm-steal-time": (0x40000001, 0, "eax", 5), "kvm-pv-eoi": (0x40000001, 0, "eax", 6),
    "kvm-pv-unhalt": (0x40000001, 0, "eax", 7), "kvm-pv-tlb-flush": (0x40000001, 0, "eax", 9),
    "kvm-asyncpf-vmexit": (0x40000001, 0, "eax", 10), "kvm-pv-ipi": (0x40000001, 0, "eax", 11),
    "kvm-poll-control": (0x40000001, 0, "eax", 12), "kvm-pv-sched-yield": (0x40000001, 0, "eax", 13),
    "kvm-asyncpf-int": (0x40000001, 0, "eax", 14), "kvmclock-stable-bit": (0x40000001, 0, "eax", 24),
}

#: Features KVM offers whose other half is the VMM's work, which pykvm does not do: never advertised.
UNBACKED = ("kvm-asyncpf", "kvm-asyncpf-vmexit", "kvm-asyncpf-int")

REGISTERS = ("eax", "ebx", "ecx", "edx")


class CpuidError(ValueError):
    """A ``-cpu`` edit this host cannot honour (an unknown name, a feature KVM does not offer)."""


class Leaf(Value):
    """One CPUID entry: ``function`` (EAX in), ``index`` (ECX in, when ``flags`` says it counts), the outputs."""

    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

    def __init__(self, function: int, index: int, flags: int, eax: int, ebx: int, ecx: int, edx: int) -> None:
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx


def from_kvm(cpuid) -> list[Leaf]:
    """A ``struct kvm_cpuid2 *`` (KVM_GET_SUPPORTED_CPUID's answer) as a list of :class:`Leaf`."""
    return [Leaf(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (cpuid.entries[i] for i in range(cpuid.nent))]


def to_kvm(table: Sequence[Leaf]):
    """The ``struct kvm_cpuid2 *`` for KVM_SET_CPUID2."""
    from pykvm._native_loader import ffi

    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(table), "entries": len(table)})
    for entry, leaf in zip((cpuid.entries[i] for i in range(len(table))), table):
        entry.function, entry.index, entry.flags = leaf.function, leaf.index, leaf.flags
        entry.eax, entry.ebx, entry.ecx, entry.edx = leaf.eax, leaf.ebx, leaf.ecx, leaf.edx
    return cpuid


def _width(count: int) -> int:
    """Bits an x2APIC ID field needs for ``count`` items (0 for one)."""
    return max(count - 1, 0).bit_length()


def _find(table: list[Leaf], function: int, index: int = 0) -> Leaf | None:
    for leaf in table:
        if leaf.function == function and (leaf.index == index or not leaf.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return leaf
    return None


def _set_bit(leaf: Leaf, register: str, bit: int, on: bool) -> None:
    value = getattr(leaf, register)
    setattr(leaf, register, value | (1 << bit) if on else value & ~(1 << bit))


def vcpu_table(supported: Iterable[Leaf], *, apic_id: int, threads: int = 1, cores: int = 1,
               edits: Sequence[tuple[str, bool]] = ()) -> list[Leaf]:
    """The table for the vCPU whose APIC ID is ``apic_id`` (see the module docstring).

    ``threads`` per core and ``cores`` per package give the topology;
    ``edits`` are ``-cpu``'s ``(feature, on)`` pairs.  Raises
    :class:`CpuidError` for an edit this host cannot honour.
    """
    base = [leaf.replace() for leaf in supported]  # copies: the supported table is shared
    table = [leaf for leaf in base if leaf.function not in (0xB, 0x1F)]
    smt_width, core_width = _width(threads), _width(threads) + _width(cores)
    per_package = 1 << core_width
    leaf1 = _find(table, 1)
    if leaf1 is not None:
        leaf1.ebx = (leaf1.ebx & 0x0000FFFF) | (apic_id & 0xFF) << 24 | (per_package & 0xFF) << 16
        _set_bit(leaf1, "edx", 28, per_package > 1)  # HTT: EBX[23:16] is valid
    for leaf in table:
        if leaf.function == 4 and leaf.eax & 0x1F:  # a cache level: EAX[31:26] = cores per package - 1
            leaf.eax = (leaf.eax & 0x03FFFFFF) | (((1 << _width(cores)) - 1) & 0x3F) << 26
    for function in (0xB, 0x1F):
        if any(leaf.function == function for leaf in base):
            levels = [(smt_width, threads, 1), (core_width, threads * cores, 2)]  # (shift, count, level type)
            for index, (shift, count, kind) in enumerate(levels):
                table.append(Leaf(function, index, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, shift, count & 0xFFFF,
                                  index | kind << 8, apic_id))
            table.append(Leaf(function, len(levels), KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0, 0, len(levels), apic_id))
    offered = {name: _bit_of(base, name) for name in FEATURES}
    for name in UNBACKED:
        _apply(table, name, False)
    for name, on in edits:
        if name not in FEATURES:
            raise CpuidError(f"unknown CPU feature {name!r} (known: {', '.join(sorted(FEATURES))})")
        if on and not offered[name]:
            raise CpuidError(f"this host's KVM does not offer CPU feature {name!r}")
        _apply(table, name, on)
    return table


def _bit_of(table: Sequence[Leaf], name: str) -> bool:
    function, index, register, bit = FEATURES[name]
    leaf = _find(list(table), function, index)
    return leaf is not None and bool(getattr(leaf, register) >> bit & 1)


def _apply(table: list[Leaf], name: str, on: bool) -> None:
    function, index, register, bit = FEATURES[name]
    leaf = _find(table, function, index)
    if leaf is not None:
        _set_bit(leaf, register, bit, on)
