"""Guest RAM backings (pykvm.memory_backing) and the dirty-log API (GuestMemory.start_dirty_log ...).

What the kernel says about each mapping is read back from /proc/self/smaps:
``Rss`` after prealloc, ``VmFlags`` ``hg``/``nh`` (MADV_HUGEPAGE /
MADV_NOHUGEPAGE), ``mg`` (MADV_MERGEABLE), ``ht`` and ``KernelPageSize``
for hugetlbfs.  The hugetlbfs tests need root: they reserve a few 2 MiB
pages and mount hugetlbfs in a temporary directory, and undo both.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pykvm import host
from pykvm._native_loader import lib
from pykvm.errors import MemoryBackingError
from pykvm.memory import GuestMemory
from pykvm.memory_backing import MemoryBacking, hugepages_backing, smaps

MiB = 1 << 20
SIZE = 8 * MiB
HUGE = 2 * MiB
POOL = f"{host.HUGEPAGES_DIR}/hugepages-2048kB"


def kb(value: str) -> int:
    return int(value.split()[0])


def mapping(backing: MemoryBacking | None, size: int = SIZE):
    memory = GuestMemory()
    region = memory.add_region(0, size, backing=backing)
    return memory, region


# -- prealloc, THP, KSM: what the kernel shows for the mapping ---------------------------------------
def test_anonymous_memory_is_allocated_when_touched_and_prealloc_allocates_it_all_at_once():
    memory, region = mapping(MemoryBacking(thp=False))
    with memory:
        assert kb(smaps(region.hva)["Rss"]) == 0
        memory.write(3 * 4096, b"x")
        assert kb(smaps(region.hva)["Rss"]) == 4
    memory, region = mapping(MemoryBacking(prealloc=True, thp=False))
    with memory:
        assert kb(smaps(region.hva)["Rss"]) == SIZE >> 10  # every page, before anything touched one
        assert memory.read(0, 16) == bytes(16)  # and still zero


def test_touching_each_page_populates_as_madvise_does():
    from pykvm.memory_backing import touch_each_page

    memory, region = mapping(MemoryBacking(thp=False))
    with memory:
        memory.write(4096, b"kept")
        touch_each_page(region._ptr, region.size)  # the fallback for kernels without MADV_POPULATE_WRITE
        assert kb(smaps(region.hva)["Rss"]) == SIZE >> 10 and memory.read(4096, 4) == b"kept"


@pytest.mark.skipif(host.thp_mode() not in ("always", "madvise"),
                    reason=f"transparent huge pages are {host.thp_mode()} on this host")
def test_thp_marks_the_mapping_and_prealloc_then_gets_huge_pages():
    memory, region = mapping(MemoryBacking(thp=True, prealloc=True), 16 * MiB)
    with memory:
        entry = smaps(region.hva)
        assert "hg" in entry["VmFlags"].split() and entry["THPeligible"] == "1"
        assert kb(entry["AnonHugePages"]) >= 2048  # at least one 2 MiB page fits in a 16 MiB mapping
    memory, region = mapping(MemoryBacking(thp=False, prealloc=True), 16 * MiB)
    with memory:
        entry = smaps(region.hva)
        assert "nh" in entry["VmFlags"].split() and kb(entry["AnonHugePages"]) == 0


@pytest.mark.skipif(host.ksm_run() is None, reason="this kernel has no KSM (/sys/kernel/mm/ksm)")
def test_mem_merge_marks_the_mapping_mergeable():
    memory, region = mapping(MemoryBacking(merge=True))
    with memory:
        assert "mg" in smaps(region.hva)["VmFlags"].split()
    memory, region = mapping(None)
    with memory:
        assert "mg" not in smaps(region.hva)["VmFlags"].split()


def test_check_notes_what_the_host_will_not_do(monkeypatch):
    monkeypatch.setattr(host, "ksm_run", lambda: 0)
    assert MemoryBacking(merge=True).check(SIZE) == [
        "KSM is off on this host (/sys/kernel/mm/ksm/run = 0): pages are marked mergeable but nothing merges"]
    monkeypatch.setattr(host, "ksm_run", lambda: 1)
    assert MemoryBacking(merge=True).check(SIZE) == []
    monkeypatch.setattr(host, "thp_mode", lambda: "never")
    assert "guest RAM stays in 4 KiB pages" in MemoryBacking(thp=True).check(SIZE)[0]
    monkeypatch.setattr(host, "hugetlbfs_mounts", lambda: [])
    backing, note = hugepages_backing(SIZE)
    assert backing.thp is None and backing.mem_path is None and backing.check(SIZE) == []  # said once
    assert note == "--hugepages: no hugetlbfs is mounted; using 4 KiB pages: transparent huge pages are never too"
    monkeypatch.setattr(host, "thp_mode", lambda: "madvise")
    backing, note = hugepages_backing(SIZE)
    assert backing.thp and note.endswith("using transparent huge pages (MADV_HUGEPAGE) instead")


def test_mem_path_must_be_hugetlbfs(tmp_path):
    with pytest.raises(MemoryBackingError, match=r"is not on hugetlbfs \(statfs f_type 0x\w+, hugetlbfs is 0x958458f6\)"):
        MemoryBacking(mem_path=str(tmp_path)).check(SIZE)
    with pytest.raises(MemoryBackingError, match="No such file or directory"):
        MemoryBacking(mem_path=str(tmp_path / "none")).check(SIZE)
    assert os.listdir(tmp_path) == []  # nothing created


# -- hugetlbfs --------------------------------------------------------------------------------------
@pytest.fixture
def hugetlbfs(tmp_path):
    """A hugetlbfs mount of 2 MiB pages with at least 16 free: an existing one, or one made here and undone."""
    need = 16
    for point, page in host.hugetlbfs_mounts():
        if page == HUGE and host.hugepage_pools().get(HUGE, (0, 0))[1] >= need and os.access(point, os.W_OK):
            yield point
            return
    if os.geteuid() != 0 or not os.path.isdir(POOL):
        pytest.skip("no hugetlbfs mount with 16 free 2 MiB pages, and reserving some needs root")
    with open(f"{POOL}/nr_hugepages") as f:
        before = int(f.read())
    point = tmp_path / "huge"
    point.mkdir()
    mounted = False
    try:
        with open(f"{POOL}/nr_hugepages", "w") as f:
            f.write(str(before + need))
        if host.hugepage_pools()[HUGE][1] < need:
            pytest.skip(f"the kernel reserved fewer than {need} free 2 MiB pages (memory too fragmented)")
        proc = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(point)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount hugetlbfs here: {proc.stderr.strip()}")
        mounted = True
        yield str(point)
    finally:
        if mounted:
            subprocess.run(["umount", str(point)], check=True)
        with open(f"{POOL}/nr_hugepages", "w") as f:
            f.write(str(before))


def test_mem_path_maps_an_unlinked_hugetlbfs_file(hugetlbfs):
    free = host.hugepage_pools()[HUGE][1]
    memory, region = mapping(MemoryBacking(mem_path=hugetlbfs, prealloc=True))
    with memory:
        entry = smaps(region.hva)
        assert kb(entry["KernelPageSize"]) == 2048 and "ht" in entry["VmFlags"].split()
        assert host.hugepage_pools()[HUGE][1] == free - SIZE // HUGE  # prealloc took them from the pool
        assert os.listdir(hugetlbfs) == []  # unlinked at once: nothing is left behind
        memory.write(SIZE - 5, b"edge!")
        assert memory.read(SIZE - 5, 5) == b"edge!"
    assert host.hugepage_pools()[HUGE][1] == free  # munmap gave them back


def test_mem_path_refuses_sizes_the_pool_cannot_hold(hugetlbfs):
    with pytest.raises(MemoryBackingError, match="is not a multiple of its 2 MiB huge pages"):
        MemoryBacking(mem_path=hugetlbfs).check(3 * MiB)
    free = host.hugepage_pools()[HUGE][1]
    with pytest.raises(MemoryBackingError, match=f"needs {free + 1} free 2 MiB huge pages, the pool has {free}"):
        MemoryBacking(mem_path=hugetlbfs).check((free + 1) * HUGE)


@pytest.mark.kvm
def test_a_guest_runs_in_hugetlbfs_memory(hugetlbfs):
    from pykvm import Machine

    with Machine(memory="16M", memory_backing=MemoryBacking(mem_path=hugetlbfs)) as m:
        m.load_guest("memtouch64u", args=(0x400000, 64))
        result = m.run(timeout=30)
        assert result.ended == "reset" and result.regs["rax"] == 64
        assert all(m.memory.read_uint(0x400000 + n * 4096, 8) == 0x400000 + n * 4096 for n in range(64))
        assert kb(smaps(m.memory.regions[0].hva)["KernelPageSize"]) == 2048


# -- the dirty log ---------------------------------------------------------------------------------
def table_pages(m, addresses) -> set[int]:
    """Page numbers of the page tables the MMU walks for ``addresses`` (where it sets Accessed/Dirty bits)."""
    from pykvm.x86.paging import walk

    cr3 = m.vcpu.get_sregs().cr3
    return {step.table // 4096 for a in addresses for step in walk(m.memory.read, cr3, a, "4level").levels}


def touch(m, first: int, pages: int) -> tuple[object, set[int]]:
    """Run memtouch64u over ``pages`` pages from ``first``; (result, the page numbers it wrote)."""
    m.load_guest("memtouch64u", args=(first, pages))
    result = m.run(timeout=30)
    assert result.ended == "reset" and result.regs["rax"] == pages
    return result, {first // 4096 + n for n in range(pages)}


@pytest.mark.kvm
@pytest.mark.parametrize("backing", [None, MemoryBacking(thp=True, prealloc=True), MemoryBacking(merge=True)],
                         ids=["anonymous", "thp-prealloc", "mergeable"])
def test_dirty_pages_are_exactly_the_pages_the_guest_wrote_and_its_page_tables(backing):
    from pykvm import Machine

    with Machine(memory="32M", memory_backing=backing) as m:
        m.memory.start_dirty_log()
        assert m.memory.dirty_logging and all(r.log_dirty for r in m.memory.regions)
        m.memory.write(0x900000, b"host")  # host writes are not logged
        assert m.memory.dirty_pages() == set()
        # 5 pages at 4 MiB, then 3 pages across the 6 MiB boundary (two 2 MiB entries of the identity map)
        _, first = touch(m, 0x400000, 5)
        tables = table_pages(m, [0x100000, 0x400000])
        dirty = m.memory.dirty_pages()
        # The tables were written by the host with Accessed/Dirty clear; the walks set them: each level is written.
        assert dirty == first | tables, (sorted(dirty), sorted(first), sorted(tables))
        assert m.memory.dirty_pages() == set()  # since the last call: nothing (the bits were cleared)
        assert m.memory._manual_protect == bool(
            m.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))  # KVM_CLEAR_DIRTY_LOG where KVM has it
        _, second = touch(m, 0x5FE000, 3)  # load_guest rewrote the tables from the host: A/D bits clear again
        tables = table_pages(m, [0x100000, 0x5FE000, 0x600000])
        dirty = m.memory.dirty_pages()
        assert dirty == second | tables  # the first run's pages were not written again
        touch(m, 0x400000, 5)  # written again after being reported: logged again (the pages were re-protected)
        assert m.memory.dirty_pages() == first | table_pages(m, [0x100000, 0x400000])
        m.memory.stop_dirty_log()
        assert not m.memory.dirty_logging and not any(r.log_dirty for r in m.memory.regions)
        assert m.memory.dirty_pages() == set()  # no slot logs


@pytest.mark.kvm
def test_dirty_pages_of_one_region_and_regions_added_while_logging():
    from pykvm import Machine

    with Machine(memory="16M") as m:
        m.memory.start_dirty_log()
        extra = m.memory.add_region(0x2000000, 16 * 4096)  # added while logging: it logs too
        ro = m.memory.add_region(0x3000000, 4096, readonly=True)  # read-only: the guest cannot dirty it
        assert extra.log_dirty and not ro.log_dirty
        m.load_guest("memtouch64u", args=(0x2000000 + 2 * 4096, 3))
        assert m.run(timeout=30).ended == "reset"
        assert m.memory.dirty_pages(extra) == {0x2002, 0x2003, 0x2004}
        with pytest.raises(ValueError, match="does not log dirty pages"):
            m.memory.dirty_pages(ro)


@pytest.mark.kvm
def test_dirty_pages_without_manual_protect_as_on_older_kvm():
    from pykvm import Machine

    with Machine(memory="16M") as m:
        m.memory._manual_protect = False  # as where KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET clears
        m.memory.start_dirty_log()
        _, pages = touch(m, 0x400000, 4)
        assert m.memory.dirty_pages() == pages | table_pages(m, [0x100000, 0x400000])
        assert m.memory.dirty_pages() == set()
        touch(m, 0x400000, 4)
        assert m.memory.dirty_pages() >= pages


def test_dirty_logging_needs_a_vm():
    with GuestMemory() as memory, pytest.raises(ValueError, match="needs guest memory of a VM"):
        memory.start_dirty_log()


# -- the command line --------------------------------------------------------------------------------
def pykvm(*args):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


RUN = ("run", "--guest", "hello64", "-serial", "null")


@pytest.mark.parametrize("args, message", [
    (("-mem-path", "/notahugetlbfs"), "-mem-path: /notahugetlbfs: No such file or directory"),
    (("-mem-path", "/"), "-mem-path: / is not on hugetlbfs"),
    (("-machine", "mem-merge=maybe"), "-machine mem-merge: 'maybe' is neither on nor off"),
    (("-mem-prealloc", "yes"), "unexpected argument 'yes'"),
])
def test_bad_memory_options_are_one_line_and_exit_2(args, message):
    proc = pykvm(*RUN, *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.kvm
def test_mem_path_too_small_a_pool_is_one_line(hugetlbfs):
    free = host.hugepage_pools()[HUGE][1]
    proc = pykvm(*RUN, "-mem-path", hugetlbfs, "-m", f"{(free + 1) * 2}M")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert f"needs {free + 1} free 2 MiB huge pages, the pool has {free}" in proc.stderr
    proc = pykvm(*RUN, "-mem-path", hugetlbfs, "-m", "16M", "-mem-prealloc")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.kvm
@pytest.mark.parametrize("spelling", [("--mem-merge",), ("-machine", "mem-merge=on")])
def test_mem_merge_says_when_ksm_is_off_and_runs(spelling):
    proc = pykvm(*RUN, *spelling)
    assert proc.returncode == 0, proc.stderr
    run = host.ksm_run()
    if run not in (None, 1):
        assert proc.stderr.splitlines() == [f"pykvm: warning: KSM is off on this host (/sys/kernel/mm/ksm/run = {run}): "
                                            "pages are marked mergeable but nothing merges"]
    else:
        assert "KSM is off" not in proc.stderr
    assert pykvm(*RUN, "-machine", "mem-merge=off").stderr == ""


@pytest.mark.kvm
def test_hugepages_without_a_hugetlbfs_mount_falls_back_to_thp_and_says_so():
    if host.hugetlbfs_mounts():
        pytest.skip("this host has a hugetlbfs mount: --hugepages may use it")
    proc = pykvm(*RUN, "--hugepages", "-mem-prealloc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("pykvm: warning: --hugepages: no hugetlbfs is mounted; using ")


@pytest.mark.kvm
def test_check_reports_ksm_thp_and_hugetlbfs_as_sysfs_says():
    text = pykvm("check").stdout
    run = host.ksm_run()
    assert f"KSM: {({0: 'off', 1: 'running', 2: 'unmerging'}[run]) if run is not None else 'not in'}" in text
    assert f"transparent huge pages: {host.thp_mode() or 'absent'}" in text
    assert "hugetlbfs: " in text
    for size, (total, free) in host.hugepage_pools().items():
        label = f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
        assert f"{label}: {free} free of {total}" in text
