"""How guest RAM is backed: anonymous pages, preallocated, hugetlbfs files, transparent huge pages, KSM.

A :class:`MemoryBacking` is the policy one set of options chooses (QEMU's
``-mem-prealloc``, ``-mem-path DIR``, ``-machine mem-merge=on``; pykvm's
``--hugepages``); :func:`map_memory` makes one mapping by it.  The mapping
is returned to ``GuestMemory``, which owns it (munmap on close) like any
other region.

* **anonymous** (the default): ``mmap(MAP_PRIVATE | MAP_ANONYMOUS |
  MAP_NORESERVE)``; a page is allocated when the guest (or the host) first
  touches it.
* **prealloc**: every page is faulted in before the guest starts
  (``madvise(MADV_POPULATE_WRITE)``, Linux 5.14; touching each page where
  the kernel is older), so the guest never waits for the host to allocate.
* **hugetlbfs** (``mem_path``): an unlinked file in a hugetlbfs mount,
  ``ftruncate``'d to the size and mapped ``MAP_SHARED``: 2 MiB (or 1 GiB)
  pages from the pool the administrator reserved
  (``/sys/kernel/mm/hugepages``), taken when the file is mapped.
* **THP** (``thp=True``): ``madvise(MADV_HUGEPAGE)``; the kernel backs the
  range with 2 MiB pages where it can, if ``transparent_hugepage/enabled``
  is ``always`` or ``madvise``.  ``thp=False`` asks for 4 KiB pages
  (``MADV_NOHUGEPAGE``), ``None`` leaves the host's default.
* **KSM** (``merge=True``): ``madvise(MADV_MERGEABLE)``; ksmd merges pages
  with equal contents, in this VM and across VMs, when ``/sys/kernel/mm/ksm/run``
  is 1.  Private anonymous memory only: KSM never merges hugetlbfs pages.

:meth:`MemoryBacking.check` says, before anything is mapped, what the host
cannot do: an error for what cannot work, a note for what will work less
than asked.
"""

from __future__ import annotations

import errno
import os

from pykvm import host
from pykvm._native_loader import ffi, lib
from pykvm.errors import KvmError, MemoryBackingError
from pykvm.values import Value

PAGE_SIZE = 4096
MiB = 1 << 20


def _size_text(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 and not size % (1 << 30) else f"{size >> 20} MiB" \
        if size >= MiB and not size % MiB else f"{size >> 10} KiB"


def hugetlbfs_page_size(path: str) -> int:
    """The huge page size of the hugetlbfs mount at ``path``; MemoryBackingError if it is not one.

    statfs(2)'s ``f_type`` is HUGETLBFS_MAGIC (``<linux/magic.h>``) on hugetlbfs,
    and its ``f_bsize`` the mount's page size.
    """
    kind = lib.pykvm_statfs_type(os.fsencode(path))
    if kind < 0:
        raise MemoryBackingError(f"{path}: {os.strerror(-kind)}")
    if not os.path.isdir(path):
        raise MemoryBackingError(f"{path}: not a directory")
    if kind != lib.HUGETLBFS_MAGIC:
        mounts = ", ".join(point for point, _ in host.hugetlbfs_mounts()) or "none on this host"
        raise MemoryBackingError(f"{path} is not on hugetlbfs (statfs f_type {kind:#x}, hugetlbfs is "
                                 f"{lib.HUGETLBFS_MAGIC:#x}); hugetlbfs mounts: {mounts}")
    return os.statvfs(path).f_bsize


def free_huge_pages(page_size: int) -> int:
    """Free pages in the pool of ``page_size`` (``/sys/kernel/mm/hugepages/hugepages-<N>kB/free_hugepages``)."""
    return host.hugepage_pools().get(page_size, (0, 0))[1]


def _pool_path(page_size: int) -> str:
    return f"{host.HUGEPAGES_DIR}/hugepages-{page_size >> 10}kB/free_hugepages"


class MemoryBacking(Value):
    """How to map guest RAM: ``prealloc``, ``mem_path`` (a hugetlbfs directory), ``thp``, ``merge``."""

    __slots__ = ("prealloc", "mem_path", "thp", "merge")

    def __init__(self, prealloc: bool = False, mem_path: str | None = None, thp: bool | None = None,
                 merge: bool = False) -> None:
        self.prealloc = prealloc
        self.mem_path = mem_path
        self.thp = thp
        self.merge = merge

    def check(self, size: int) -> list[str]:
        """Refuse what cannot work for ``size`` bytes (MemoryBackingError); notes on what will work less.

        Nothing is mapped or created.  A ``mem_path`` must be a hugetlbfs mount
        whose pool has ``size`` bytes of free pages, and ``size`` a multiple of
        its page size.
        """
        notes = []
        if self.mem_path is not None:
            page = hugetlbfs_page_size(self.mem_path)
            if size % page:
                raise MemoryBackingError(f"{self.mem_path}: {_size_text(size)} of RAM is not a multiple of its "
                                         f"{_size_text(page)} huge pages")
            free, need = free_huge_pages(page), size // page
            if free < need:
                raise MemoryBackingError(f"{self.mem_path}: {_size_text(size)} needs {need} free {_size_text(page)} "
                                         f"huge pages, the pool has {free} ({_pool_path(page)})")
            if self.merge:
                notes.append("KSM does not merge hugetlbfs pages: mem-merge has no effect on RAM in hugetlbfs")
        elif self.thp:
            mode = host.thp_mode()
            if mode not in ("always", "madvise"):
                notes.append(f"transparent huge pages are {mode or 'absent'} on this host ({host.THP_ENABLED}): "
                             "guest RAM stays in 4 KiB pages")
        if self.merge and self.mem_path is None:
            run = host.ksm_run()
            if run is None:
                notes.append("this kernel has no KSM (/sys/kernel/mm/ksm): pages are not marked mergeable")
            elif run != 1:
                notes.append(f"KSM is off on this host ({host.KSM_DIR}/run = {run}): pages are marked mergeable "
                             "but nothing merges")
        return notes


def hugepages_backing(size: int, prealloc: bool = False, merge: bool = False) -> tuple[MemoryBacking, str | None]:
    """``--hugepages``: a hugetlbfs mount with enough free pages for ``size`` if there is one, else THP.

    Returns the backing and a note saying what was chosen when it is not hugetlbfs.
    """
    pools = host.hugepage_pools()
    for point, page in host.hugetlbfs_mounts():
        if not size % page and pools.get(page, (0, 0))[1] >= size // page and os.access(point, os.W_OK):
            return MemoryBacking(prealloc=prealloc, mem_path=point, merge=merge), None
    mounts = host.hugetlbfs_mounts()
    why = (f"no hugetlbfs mount has {_size_text(size)} of free huge pages ("
           + ", ".join(f"{point}: {pools.get(page, (0, 0))[1]} free {_size_text(page)}" for point, page in mounts)
           + ")") if mounts else "no hugetlbfs is mounted"
    mode = host.thp_mode()
    thp = mode in ("always", "madvise")
    then = "transparent huge pages (MADV_HUGEPAGE) instead" if thp else \
        f"4 KiB pages: transparent huge pages are {mode or 'absent'} too"
    return MemoryBacking(prealloc=prealloc, thp=thp or None, merge=merge), f"--hugepages: {why}; using {then}"


def _hugetlbfs_file(directory: str, size: int) -> int:
    """An unlinked file of ``size`` bytes in ``directory`` (a hugetlbfs mount); the caller closes the fd."""
    for attempt in range(100):
        name = os.path.join(directory, f"pykvm-ram-{os.getpid()}-{id(directory):x}-{attempt}")
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise MemoryBackingError(f"-mem-path {directory}: cannot create a file there: {exc.strerror}") from None
        os.unlink(name)  # the mapping keeps the pages; nothing is left behind
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            raise MemoryBackingError(f"-mem-path {directory}: ftruncate to {_size_text(size)}: {exc.strerror}") from None
        return fd
    raise MemoryBackingError(f"-mem-path {directory}: no free file name")


def _advise(ptr, size: int, advice: int, what: str) -> None:
    rc = lib.pykvm_madvise(ptr, size, advice)
    if rc < 0:
        raise KvmError(f"madvise({what})", -rc, f"{size} bytes")


def populate(ptr, size: int) -> None:
    """Fault in every page of a mapping for writing: MADV_POPULATE_WRITE, or a write to each page."""
    rc = lib.pykvm_madvise(ptr, size, lib.MADV_POPULATE_WRITE)
    if rc == 0:
        return
    if rc != -errno.EINVAL:  # EINVAL: a kernel older than 5.14; anything else (ENOMEM, EFAULT) is real
        raise KvmError("madvise(MADV_POPULATE_WRITE)", -rc, f"{size} bytes")
    touch_each_page(ptr, size)


def touch_each_page(ptr, size: int) -> None:
    """Write each page once (what MADV_POPULATE_WRITE does in one call): a write fault allocates it."""
    pages = ffi.cast("volatile char *", ptr)
    for offset in range(0, size, PAGE_SIZE):
        pages[offset] = pages[offset]  # the byte keeps its value


def map_memory(size: int, backing: MemoryBacking | None) -> object:
    """A new read/write mapping of ``size`` bytes backed as ``backing`` says (a ``void *``; munmap it)."""
    backing = backing or MemoryBacking()
    err = ffi.new("int *")
    if backing.mem_path is not None:
        fd = _hugetlbfs_file(backing.mem_path, size)
        try:
            ptr = lib.pykvm_mmap_fd(fd, size, err)  # MAP_SHARED: hugetlbfs reserves the pages now
        finally:
            os.close(fd)  # the mapping holds the file
        if ptr == ffi.NULL:
            raise MemoryBackingError(f"-mem-path {backing.mem_path}: mmap of {_size_text(size)}: "
                                     f"{os.strerror(err[0])} (free huge pages: see {host.HUGEPAGES_DIR})")
    else:
        ptr = lib.pykvm_mmap_anon(size, err)
        if ptr == ffi.NULL:
            raise KvmError("mmap(guest memory)", err[0], f"{size} bytes")
    try:
        if backing.mem_path is None:
            if backing.thp is not None and host.thp_mode() is not None:
                _advise(ptr, size, lib.MADV_HUGEPAGE if backing.thp else lib.MADV_NOHUGEPAGE, "MADV_HUGEPAGE")
            if backing.merge and host.ksm_run() is not None:
                _advise(ptr, size, lib.MADV_MERGEABLE, "MADV_MERGEABLE")
        if backing.prealloc:
            populate(ptr, size)  # after the advice: THP then allocates 2 MiB pages
    except BaseException:
        lib.pykvm_munmap(ptr, size)
        raise
    return ptr


def smaps(hva: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping (VMA) holding ``hva``: Size, Rss, AnonHugePages, VmFlags, ...

    Values as the kernel writes them (``"4096 kB"``, ``"rd wr mr mw me ac mg"``);
    empty if nothing is mapped there.  The kernel merges neighbouring
    mappings with the same flags into one VMA, so ``Size`` may be more than
    one region; hugetlbfs pages count in ``Private_Hugetlb``/``Shared_Hugetlb``,
    not ``Rss``.
    """
    entry: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= hva < end
                continue
            if inside:
                key, _, value = line.partition(":")
                entry[key] = value.strip()
    return entry
