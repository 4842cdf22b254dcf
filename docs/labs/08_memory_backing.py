"""Lab 8: backing guest RAM -- -mem-prealloc, huge pages (THP, hugetlbfs) and KSM, measured.

Run:  python docs/labs/08_memory_backing.py      (as root for the KSM and hugetlbfs parts)

One guest, memtouch64u (CPL 3, native), writes its own address into the
first quadword of every 4 KiB page of a buffer: one access per page, the
worst case for the TLB and the simplest content for KSM to compare.

Part 1 times start-up (the mapping, and with prealloc every page faulted
in) and the guest's first pass over the buffer.  Part 2 times later passes
over the same buffer with 4 KiB and 2 MiB pages behind it.  Part 3 runs two
identical guests with their RAM marked mergeable and watches ksmd merge
them.  What this host cannot do is said, not hidden; as root the lab turns
KSM on and reserves huge pages for its measurement, and puts both back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time

from pykvm import Machine, host
from pykvm.memory_backing import MemoryBacking, smaps

RAM = 256 << 20
BUFFER, BUFFER_GPA = 128 << 20, 16 << 20        # 32768 pages at 16 MiB
PAGES = BUFFER // 4096
PASSES = 2
ROUNDS = 15                                       # Part 2: short runs, many times: the best is unpreempted
KSM_RAM, KSM_PAGES = 64 << 20, 8192               # Part 3: two guests, 32 MiB written in each
HUGE = 2 << 20
POOL = f"{host.HUGEPAGES_DIR}/hugepages-2048kB/nr_hugepages"


def kib(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def rollup() -> dict[str, int]:
    """This process's memory, in bytes (/proc/self/smaps_rollup): Rss, AnonHugePages, Private_Hugetlb, ..."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = kib(value) << 10
    return out


def touch(m: Machine, first: int, pages: int, passes: int = 1) -> tuple[float, int]:
    """Run memtouch64u: (seconds inside KVM_RUN, exits KVM took, in the kernel or not).  Checks its count."""
    m.load_guest("memtouch64u", args=(first, pages | (passes << 32)))
    result = m.run(timeout=60)
    if result.ended != "reset" or result.regs["rax"] != pages * passes:
        raise SystemExit(f"FAILED: memtouch64u ended {result.ended}, RAX {result.regs['rax']} (want {pages * passes})")
    return result.split.seconds_in_run, result.split.kvm_exits


class Reserved:
    """As root: huge pages reserved and hugetlbfs mounted for the measurement, undone on exit."""

    def __init__(self, pages: int) -> None:
        self.pages, self.point, self.before, self.why = pages, None, None, ""

    def __enter__(self) -> "Reserved":
        for point, page in host.hugetlbfs_mounts():
            if page == HUGE and host.hugepage_pools().get(HUGE, (0, 0))[1] >= self.pages:
                self.point = point
                return self
        if os.geteuid() != 0 or not os.path.exists(POOL):
            self.why = "no hugetlbfs mount with free 2 MiB pages, and reserving some needs root"
            return self
        with open(POOL) as f:
            self.before = int(f.read())
        with open(POOL, "w") as f:
            f.write(str(self.before + self.pages))
        free = host.hugepage_pools()[HUGE][1]
        if free < self.pages:
            self.why = f"the kernel reserved only {free} of {self.pages} 2 MiB pages"
            return self
        point = tempfile.mkdtemp(prefix="pykvm-lab8-")
        proc = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", point],
                              capture_output=True, text=True)
        if proc.returncode:
            os.rmdir(point)
            self.why = f"mount -t hugetlbfs failed: {proc.stderr.strip()}"
            return self
        self.point, self.mounted = point, True
        return self

    def __exit__(self, *exc) -> None:
        if getattr(self, "mounted", False):
            subprocess.run(["umount", self.point], check=True)
            os.rmdir(self.point)
        if self.before is not None:
            with open(POOL, "w") as f:
                f.write(str(self.before))


def part1_and_2(hugetlbfs: str | None) -> list[dict]:
    backings = [
        ("anonymous, 4 KiB", MemoryBacking(thp=False)),
        ("prealloc, 4 KiB", MemoryBacking(thp=False, prealloc=True)),
        ("anonymous, THP", MemoryBacking(thp=True)),
        ("prealloc, THP", MemoryBacking(thp=True, prealloc=True)),
    ]
    if hugetlbfs:
        backings.append(("hugetlbfs (-mem-path)", MemoryBacking(mem_path=hugetlbfs, prealloc=True)))
    with Machine(memory=RAM) as m:  # warm up: the first Machine of a process pays for imports
        touch(m, BUFFER_GPA, 1)
    rows = []
    with contextlib.ExitStack() as machines:
        for label, backing in backings:  # Part 1, one machine at a time
            # What this machine adds to the process (its mapping may join a neighbour's VMA in smaps).
            before = rollup()
            start = time.perf_counter()
            m = machines.enter_context(Machine(memory=RAM, memory_backing=backing))
            startup = time.perf_counter() - start
            at_start = rollup()
            first, exits = touch(m, BUFFER_GPA, PAGES)
            after = rollup()
            rss = sum(at_start.get(k, 0) - before.get(k, 0) for k in ("Rss", "Private_Hugetlb", "Shared_Hugetlb"))
            huge = sum(after.get(k, 0) - before.get(k, 0) for k in ("AnonHugePages", "Private_Hugetlb", "Shared_Hugetlb"))
            rows.append({"label": label, "backing": backing, "machine": m, "startup": startup, "rss": rss,
                         "first": first, "exits": exits, "huge": huge, "later": float("inf")})
        for _ in range(ROUNDS):  # Part 2: every machine in turn, again and again; the best time of each
            for r in rows:
                r["later"] = min(r["later"], touch(r["machine"], BUFFER_GPA, PAGES, PASSES)[0])
        for r in rows:
            m = r.pop("machine")
            r["ok"] = all(m.memory.read_uint(BUFFER_GPA + n * 4096, 8) == BUFFER_GPA + n * 4096
                          for n in range(0, PAGES, 97))
    return rows


def part3() -> tuple[str, dict, dict, dict, bool]:
    """Two identical guests with mergeable RAM, and a third without: what ksmd merges."""
    run = host.ksm_run()
    if run is None:
        return "this kernel has no KSM", {}, {}, {}, True
    names = ("run", "pages_to_scan", "sleep_millisecs")
    saved = {n: host.ksm_counters().get(n, run) for n in names}
    saved["run"] = run
    merged = MemoryBacking(merge=True)
    with Machine(memory=KSM_RAM, memory_backing=merged) as a, Machine(memory=KSM_RAM, memory_backing=merged) as b, \
            Machine(memory=KSM_RAM) as c:
        for m in (a, b, c):
            touch(m, BUFFER_GPA, KSM_PAGES)
        flags = ["mg" in smaps(m.memory.regions[0].hva)["VmFlags"].split() for m in (a, b, c)]
        before = host.ksm_counters()
        how = f"KSM was {'on' if run == 1 else 'off'} (run = {run})"
        if run != 1:
            try:
                for name, value in (("pages_to_scan", 20000), ("sleep_millisecs", 10), ("run", 1)):
                    with open(f"{host.KSM_DIR}/{name}", "w") as f:
                        f.write(str(value))
                how += "; the lab turned it on (run = 1, pages_to_scan 20000, sleep_millisecs 10) for the measurement"
            except OSError as exc:
                return (how + f" and cannot be turned on here ({exc.strerror}): nothing merges", before, before,
                        host.ksm_process_stat(), flags == [True, True, False])
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # ksmd needs two full scans to merge a page: wait for three
                after = host.ksm_counters()
                if after.get("full_scans", 0) - before.get("full_scans", 0) >= 3:
                    break
                time.sleep(0.05)
            after = host.ksm_counters()
            mine = host.ksm_process_stat()  # while A, B and C are alive
        finally:
            if run != 1:
                for name in ("run", "pages_to_scan", "sleep_millisecs"):
                    with open(f"{host.KSM_DIR}/{name}", "w") as f:
                        f.write(str(saved[name]))
                how += f", then put back (run = {host.ksm_run()})"
        same = all(a.memory.read(BUFFER_GPA + n * 4096, 4096) == b.memory.read(BUFFER_GPA + n * 4096, 4096)
                   for n in range(0, KSM_PAGES, 61))
    return how, before, after, mine, flags == [True, True, False] and same


def main() -> None:
    print("Lab 8: backing guest RAM -- prealloc, huge pages, KSM\n")
    pools = ", ".join(f"{s >> 20} MiB: {free} free of {total}" for s, (total, free) in host.hugepage_pools().items())
    print(f"host: THP {host.thp_mode()}, KSM run = {host.ksm_run()}, hugetlbfs mounts "
          f"{[p for p, _ in host.hugetlbfs_mounts()] or 'none'}, huge page pools {pools or 'none'}")

    with Reserved(RAM // HUGE) as reserved:
        if reserved.point and reserved.before is not None:
            print(f"hugetlbfs: reserved {RAM // HUGE} 2 MiB pages ({POOL}) and mounted them at {reserved.point} "
                  "for Parts 1-2; both undone at the end")
        elif not reserved.point:
            print(f"hugetlbfs: not measured: {reserved.why}")
        rows = part1_and_2(reserved.point)
    if reserved.before is not None:
        print(f"hugetlbfs: unmounted; {POOL} back to {open(POOL).read().strip()}")

    print(f"\nPart 1: start-up and the first touch (RAM {RAM >> 20} MiB; the guest's first pass writes "
          f"{PAGES} pages = {BUFFER >> 20} MiB)")
    print(f"  {'backing':<22}{'start-up':>10}{'RSS at start':>14}{'first pass':>12}{'per page':>11}{'KVM exits':>11}")
    for r in rows:
        print(f"  {r['label']:<22}{r['startup'] * 1e3:>7.1f} ms{r['rss'] >> 20:>10} MiB{r['first'] * 1e3:>9.1f} ms"
              f"{r['first'] / PAGES * 1e6:>8.2f} us{r['exits']:>11}")

    base = rows[1]["later"]  # prealloc, 4 KiB
    print(f"\nPart 2: the TLB: {PASSES} more passes over the same {PAGES} pages (4 KiB stride), timed in KVM_RUN"
          f" (the best of {ROUNDS}, interleaved)")
    print(f"  {'backing':<22}{'huge pages':>12}{'per access':>12}{'vs 4 KiB':>10}")
    for r in rows:
        per = r["later"] / (PAGES * PASSES)
        print(f"  {r['label']:<22}{r['huge'] >> 20:>8} MiB{per * 1e9:>9.1f} ns{base / r['later']:>9.2f}x")

    how, before, after, mine, ksm_ok = part3()
    print(f"\nPart 3: KSM: guests A and B (RAM marked mergeable) and C (not), each writing the same "
          f"{KSM_PAGES} pages")
    print(f"  {how}")
    if before:
        for name in ("pages_shared", "pages_sharing", "full_scans"):
            print(f"  {name:<14} before {before.get(name, 0):>6}   after {after.get(name, 0):>6}")
        merging = mine.get("ksm_merging_pages")
        if merging is not None:
            print(f"  this process (/proc/self/ksm_stat): ksm_merging_pages {merging} = A's and B's pages that now "
                  f"share one copy each; {merging // 2 * 4096 >> 20} MiB saved (C's identical pages, not marked, "
                  "stay its own)")

    prealloc_ok = all(r["rss"] >= RAM for r in rows if r["backing"].prealloc) and \
        all(r["rss"] < RAM // 4 for r in rows if not r["backing"].prealloc)
    thp = {r["label"]: r["huge"] for r in rows}
    thp_ok = host.thp_mode() not in ("always", "madvise") or (thp["prealloc, THP"] > 0 and thp["prealloc, 4 KiB"] == 0)
    merged = mine.get("ksm_merging_pages") if before else None
    ksm_ran = bool(before) and "cannot be turned on" not in how and merged is not None
    merge_ok = ksm_ok and (not ksm_ran or 2 * KSM_PAGES <= merged < 3 * KSM_PAGES)  # C merged too would be 3x
    print(f"\ncheck: the guests' writes read back: {'ok' if all(r['ok'] for r in rows) else 'FAILED'}; "
          f"prealloc RSS = RAM: {'ok' if prealloc_ok else 'FAILED'}; THP where asked: {'ok' if thp_ok else 'FAILED'}; "
          f"KSM merged A with B, not C: {('ok' if merge_ok else 'FAILED') if ksm_ran else 'not measured'}")
    print(f"result: {'ok' if all(r['ok'] for r in rows) and prealloc_ok and thp_ok and merge_ok else 'FAILED'}")


if __name__ == "__main__":
    main()
