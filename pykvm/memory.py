"""Guest physical memory: host mappings registered as KVM memory slots, and their dirty log.

``GuestMemory`` owns each mapping (mmap/munmap) and the slot that exposes it
to the guest (KVM_SET_USER_MEMORY_REGION).  Every host-side access is checked
against the regions, so no bug in a device model or a hostile guest address
can make the host touch memory outside the guest's.  A mapping is anonymous
memory unless a ``pykvm.memory_backing.MemoryBacking`` says otherwise
(prealloc, hugetlbfs, THP, KSM).

The dirty log, for live migration and the like: ``start_dirty_log()``, then
``dirty_pages()`` -- the guest page numbers written since the previous call
-- as often as needed, then ``stop_dirty_log()``.
"""

from __future__ import annotations

import os

from pykvm._native_loader import ffi, lib
from pykvm.errors import GuestMemoryError, KvmError
from pykvm.values import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from pykvm.memory_backing import MemoryBacking
    from pykvm.vm import Vm

PAGE_SIZE = 4096

_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # no suffix: MiB, as QEMU's -m
MAX_SIZE = 1 << 64


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _split_size(text: str) -> tuple[str, str, str] | None:
    """``" 1.5 GiB"`` -> ``("1", "5", "G")``: whole digits, fraction digits, unit; None if it is not a size."""
    text = text.strip().upper()
    for suffix in ("IB", "B"):  # 64MiB, 64MB, 64M are the same (binary units, as QEMU)
        if text.endswith(suffix) and len(text) > len(suffix) and text[-len(suffix) - 1] in "KMGT":
            text = text[:-len(suffix)]
            break
    unit = text[-1:] if text[-1:] in ("K", "M", "G", "T") else ""
    number = text[:len(text) - len(unit)].rstrip()
    whole, dot, fraction = number.partition(".")
    if not _digits(whole) or (dot and not _digits(fraction)):
        return None
    return whole, fraction, unit


def parse_size(text: str | int) -> int:
    """Parse a QEMU-style size: ``64M``, ``1G``, ``1.5G``, ``512`` (a bare number is MiB, as QEMU's ``-m``).

    Only plain decimal numbers with an optional K/M/G/T suffix: ``inf``,
    ``nan``, ``1e400`` and negative sizes are refused with ``ValueError``,
    as is anything that is not a whole number of bytes or reaches 2**64.
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"bad size {text!r}: give bytes as an int or text like 64M")
    if isinstance(text, int):
        value = text
    else:
        parts = _split_size(text)
        if parts is None:
            raise ValueError(f"bad size {text!r}: use a number with K, M, G or T, like 64M")
        whole, fraction, unit = parts
        scaled = int(whole + fraction) * _UNITS[unit]  # exact: the fraction's digits, then divide
        value, rest = divmod(scaled, 10 ** len(fraction))
        if rest:
            raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    if not 0 < value < MAX_SIZE:
        raise ValueError(f"bad size {text!r}: must be more than 0 and less than 2**64 bytes")
    return value


class MemoryRegion(Value):
    """One KVM memory slot backed by an anonymous mapping (``_ptr``: the mapping; not shown or compared)."""

    __slots__ = ("slot", "gpa", "size", "hva", "readonly", "log_dirty", "_ptr")
    __hash__ = None  # mutable, as the dataclass was: not hashable

    def __init__(self, slot: int, gpa: int, size: int, hva: int, readonly: bool = False, log_dirty: bool = False,
                 _ptr: object = None) -> None:
        self.slot = slot
        self.gpa = gpa
        self.size = size
        self.hva = hva
        self.readonly = readonly
        self.log_dirty = log_dirty
        self._ptr = _ptr

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and size >= 0 and gpa + size <= self.end


class GuestMemory:
    """The guest-physical address space of one VM, as a set of regions.

    With ``vm=None`` the regions are plain mappings (for tests and tools that
    build page tables without KVM).
    """

    def __init__(self, vm: "Vm | None" = None) -> None:
        self.vm = vm
        self.regions: list[MemoryRegion] = []
        self._next_slot = 0
        self._dirty_logging = False  # start_dirty_log() .. stop_dirty_log(): every writable region logs
        self._manual_protect: bool | None = None  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled (None: not asked yet)

    # -- regions -------------------------------------------------------------
    def add_region(
        self, gpa: int, size: int, *, readonly: bool = False, log_dirty: bool = False, hugepages: bool = False,
        backing: "MemoryBacking | None" = None,
    ) -> MemoryRegion:
        """Map ``size`` bytes of fresh zeroed memory at guest-physical ``gpa``.

        ``backing`` (``pykvm.memory_backing.MemoryBacking``) chooses prealloc,
        hugetlbfs, THP or KSM; the default is plain anonymous memory.
        ``hugepages=True`` is the THP hint alone (MADV_HUGEPAGE).
        """
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"region {gpa:#x}+{size:#x} must be page-aligned and non-empty")
        for r in self.regions:
            if gpa < r.end and r.gpa < gpa + size:
                raise ValueError(f"region {gpa:#x}-{gpa + size - 1:#x} overlaps slot {r.slot} at {r.gpa:#x}-{r.end - 1:#x}")
        if backing is not None:
            from pykvm.memory_backing import map_memory  # only when a backing is asked for

            ptr = map_memory(size, backing)
        else:
            err = ffi.new("int *")
            ptr = lib.pykvm_mmap_anon(size, err)
            if ptr == ffi.NULL:
                raise KvmError("mmap(guest memory)", err[0], f"{size} bytes")
        if hugepages:
            lib.pykvm_madvise(ptr, size, lib.MADV_HUGEPAGE)  # a hint; THP is 'madvise' on many hosts
        log_dirty = log_dirty or (self._dirty_logging and not readonly)
        region = MemoryRegion(self._next_slot, gpa, size, int(ffi.cast("uintptr_t", ptr)), readonly, log_dirty, ptr)
        if self.vm is not None:
            try:
                self._register(region)
            except KvmError:
                lib.pykvm_munmap(ptr, size)
                raise
        self._next_slot += 1
        self.regions.append(region)
        return region

    def _register(self, region: MemoryRegion) -> None:
        """KVM_SET_USER_MEMORY_REGION for ``region`` with its current flags (also to change them)."""
        flags = (lib.KVM_MEM_READONLY if region.readonly else 0) | (lib.KVM_MEM_LOG_DIRTY_PAGES if region.log_dirty else 0)
        self.vm.set_user_memory_region(region.slot, region.gpa, region.size, region.hva, flags)

    def remove_region(self, region: MemoryRegion) -> None:
        """Delete the slot from the VM, then unmap its memory (in that order)."""
        self.regions.remove(region)
        if self.vm is not None and not self.vm.closed:
            self.vm.delete_user_memory_region(region.slot)
        lib.pykvm_munmap(region._ptr, region.size)
        region._ptr = None

    def close(self) -> None:
        """Unmap every region.  Safe to call twice."""
        for region in list(self.regions):
            self.regions.remove(region)
            lib.pykvm_munmap(region._ptr, region.size)
            region._ptr = None

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Total bytes mapped."""
        return sum(r.size for r in self.regions)

    def region_at(self, gpa: int, size: int = 1) -> MemoryRegion:
        """The region holding ``[gpa, gpa+size)``; GuestMemoryError if none holds all of it."""
        for r in self.regions:
            if r.contains(gpa, size):
                return r
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not inside guest memory")

    def is_mapped(self, gpa: int, size: int = 1) -> bool:
        return any(r.contains(gpa, size) for r in self.regions)

    # -- access ----------------------------------------------------------------
    def pointer(self, gpa: int, size: int):
        """A ``char *`` to ``size`` bytes at ``gpa``, after the bounds check."""
        r = self.region_at(gpa, size)
        return ffi.cast("char *", r._ptr) + (gpa - r.gpa)

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes out of guest memory."""
        if size == 0:
            return b""
        return ffi.unpack(self.pointer(gpa, size), size)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory (a read-only slot is writable from the host)."""
        if data:
            ffi.memmove(self.pointer(gpa, len(data)), data, len(data))

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of guest memory (valid while the region is mapped)."""
        return memoryview(ffi.buffer(self.pointer(gpa, size), size))

    def read_uint(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_uint(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, value.to_bytes(size, "little"))

    def load(self, gpa: int, image: bytes | str | os.PathLike) -> int:
        """Copy an image (bytes or a file path) to ``gpa``; returns its size."""
        if not isinstance(image, (bytes, bytearray, memoryview)):
            with open(image, "rb") as f:
                image = f.read()
        if not self.is_mapped(gpa, max(len(image), 1)):
            raise GuestMemoryError(
                f"image of {len(image)} bytes at {gpa:#x} does not fit in guest memory "
                f"({self.describe()})"
            )
        self.write(gpa, bytes(image))
        return len(image)

    def hva(self, gpa: int) -> int:
        """Host virtual address backing ``gpa``."""
        r = self.region_at(gpa)
        return r.hva + (gpa - r.gpa)

    # -- dirty-page logging (api.rst 4.8 KVM_GET_DIRTY_LOG, 4.117 KVM_CLEAR_DIRTY_LOG) ---------------
    def start_dirty_log(self) -> None:
        """Log the guest's writes to every writable region (and to regions added later) from now on.

        Each slot is registered again with KVM_MEM_LOG_DIRTY_PAGES: KVM
        write-protects its pages and sets a bit per 4 KiB page at the first
        write.  Host writes (``write()``, devices) are not logged.
        """
        self._need_vm()
        self._dirty_log_mode()
        self._dirty_logging = True
        for region in self.regions:
            if not region.readonly and not region.log_dirty:
                region.log_dirty = True
                self._register(region)

    def stop_dirty_log(self) -> None:
        """Stop logging: every slot registered again without KVM_MEM_LOG_DIRTY_PAGES."""
        self._need_vm()
        self._dirty_logging = False
        for region in self.regions:
            if region.log_dirty:
                region.log_dirty = False
                self._register(region)

    @property
    def dirty_logging(self) -> bool:
        """Between start_dirty_log() and stop_dirty_log()."""
        return self._dirty_logging

    def dirty_pages(self, region: MemoryRegion | None = None) -> set[int]:
        """Guest page numbers (GPA // 4096) the guest wrote since the last call, or since logging started.

        One region, or every region that logs.  KVM_GET_DIRTY_LOG reads each
        slot's bitmap; with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (enabled where
        KVM has it) KVM_CLEAR_DIRTY_LOG then write-protects exactly the pages
        reported, otherwise KVM_GET_DIRTY_LOG does that itself.  Either way a
        write after this returns is in the next answer: copy the pages after
        calling, never before (live migration's order).
        """
        self._need_vm()
        if region is not None and not region.log_dirty:
            raise ValueError(f"slot {region.slot} does not log dirty pages (start_dirty_log() or log_dirty=True)")
        from array import array

        pages: set[int] = set()
        for r in [region] if region is not None else [r for r in self.regions if r.log_dirty]:
            bitmap = self.vm.get_dirty_log(r.slot, r.size)
            if not bitmap.strip(b"\0"):
                continue
            if self._manual_protect:
                self.vm.clear_dirty_log(r.slot, 0, r.size // PAGE_SIZE, bitmap)
            first = r.gpa // PAGE_SIZE
            for index, word in enumerate(array("Q", bitmap)):  # 64 pages a word; most words are 0
                while word:
                    low = word & -word
                    pages.add(first + index * 64 + low.bit_length() - 1)
                    word ^= low
        return pages

    def _need_vm(self) -> None:
        if self.vm is None:
            raise ValueError("dirty logging needs guest memory of a VM (GuestMemory(vm))")

    def _dirty_log_mode(self) -> None:
        """Once per VM, before the first slot logs: KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) where KVM has it.

        Then KVM_GET_DIRTY_LOG only reads, and KVM_CLEAR_DIRTY_LOG re-protects
        the reported pages (QEMU clears them in chunks; pykvm per slot).
        """
        if self._manual_protect is None:
            caps = self.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            self._manual_protect = bool(caps & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            if self._manual_protect:
                self.vm.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)

    def describe(self) -> str:
        return ", ".join(
            f"{r.gpa:#x}-{r.end - 1:#x}{' ro' if r.readonly else ''}" for r in self.regions
        ) or "no regions"
