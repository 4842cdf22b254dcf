"""Lab 3: where exits go -- kernel, user space, or deferred in the kernel.

Run:  python docs/labs/03_where_exits_go.py

The bench guests run a loop of N iterations of one instruction.  Each run
below changes only what that instruction is (CPUID or OUT to port 0x700) and
how the host set up port 0x700, then splits the exits with KVM's own
counter (the vCPU's binary stats fd, KVM_GET_STATS_FD) and pykvm's count
of what KVM_RUN returned:

  kernel exits = KVM's 'exits' - exits that returned to user space
"""

from __future__ import annotations

import os

from pykvm import Machine
from pykvm._native_loader import ffi, lib
from pykvm.host import nested_kvm_module
from pykvm.guests import BENCH_KINDS
from pykvm.platform.cloop import PIO, READ_CONST, WRITE_DROP, FastRange
from pykvm.inspect.split import format_split
from pykvm.platform.layout import BENCH_PORT

N = 2000
# Entries in the coalesced ring: one page minus its header (first, last), in 24-byte records.
RING_ENTRIES = (4096 - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // ffi.sizeof("struct kvm_coalesced_mmio")


class Port700:
    """A Python device on port 0x700 that counts writes (and may drain the coalesced ring first)."""

    name = "port700"
    length = 1

    def __init__(self, vcpu=None) -> None:
        self.vcpu = vcpu        # set for the coalesced run
        self.writes = 0         # writes that reached this handler as exits
        self.drained = 0        # writes found in the coalesced ring

    def drain(self) -> None:
        if self.vcpu is not None:
            self.drained += len(self.vcpu.drain_coalesced())

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        # An exit to user space for a coalesced zone means the ring is full:
        # the writes in the ring happened *before* this one, so drain first.
        self.drain()
        self.writes += 1


def run(guest: str, kind: str, how: str) -> dict:
    """One run of ``guest`` with N iterations of ``kind``; ``how`` sets up port 0x700."""
    with Machine(memory="16M") as m:
        m.load_guest(guest, args=(BENCH_KINDS[kind], N))
        delivered = None
        device = eventfd = None
        if how == "user":
            # Every OUT returns from KVM_RUN; pykvm's C loop drops the byte and re-enters.
            m.extra_fast_ranges = [FastRange(PIO, BENCH_PORT, 1, READ_CONST, WRITE_DROP, 0, "port700")]
        elif how == "coalesced":
            m.vm.register_coalesced_mmio(BENCH_PORT, 1, pio=True)   # KVM_REGISTER_COALESCED_MMIO, pio=1
            device = Port700(m.vcpu)
            m.add_device(device, port=BENCH_PORT)
        elif how == "ioeventfd":
            eventfd = os.eventfd(0, os.EFD_NONBLOCK)
            m.vm.ioeventfd(eventfd, BENCH_PORT, 1, pio=True)         # KVM_IOEVENTFD, flag PIO
        result = m.run(timeout=30)
        split = result.split
        if how == "user":
            delivered = result.c_hits.get("port700", 0)
        elif how == "coalesced":
            device.drain()  # what is left in the ring when the guest stopped
            delivered = device.drained + device.writes
        elif how == "ioeventfd":
            delivered = int.from_bytes(os.read(eventfd, 8), "little")  # the eventfd counter: one per write
            os.close(eventfd)
        handler_s = split.seconds_in_c + split.seconds_in_python
        return {
            "guest": guest, "kind": kind, "how": how, "ok": result.clean and result.regs["rax"] == N,
            "kvm": split.kvm_exits, "kernel": split.kernel_exits, "user": split.user_exits,
            "c": split.handled_in_c, "python": split.handled_in_python,
            "io_exits": split.kernel_counters.get("io_exits"), "emulated": split.insn_emulation,
            "us_run": split.seconds_in_run / N * 1e6, "us_handlers": handler_s / N * 1e6,
            "delivered": delivered, "fallbacks": device.writes if device else None,
            "split": split,
        }


RUNS = [
    ("empty loop", "empty", None),
    ("cpuid", "cpuid", None),
    ("out -> user space", "out", "user"),
    ("out, coalesced PIO", "out", "coalesced"),
    ("out, ioeventfd", "out", "ioeventfd"),
]


def table(guest: str, title: str) -> list[dict]:
    print(f"\n{title}")
    print(f"{'run':<20} {'KVM exits':>9} {'kernel':>7} {'user':>6} {'C':>6} {'Python':>6}"
          f" {'emulated':>9} {'us/iter':>8} {'handlers':>8} {'delivered':>10}")
    rows = []
    for label, kind, how in RUNS:
        r = run(guest, kind, how)
        r["label"] = label
        rows.append(r)
        delivered = "-" if r["delivered"] is None else str(r["delivered"])
        print(f"{label:<20} {r['kvm']:>9} {r['kernel']:>7} {r['user']:>6} {r['c']:>6} {r['python']:>6}"
              f" {r['emulated']:>9} {r['us_run']:>8.2f} {r['us_handlers']:>8.2f} {delivered:>10}")
    base = rows[0]["us_run"]
    print("cost of one iteration minus the empty loop's (KVM_RUN + handlers):")
    for r in rows[1:]:
        print(f"  {r['label']:<20} {r['us_run'] + r['us_handlers'] - base:>7.2f} us")
    for r in rows:
        assert_ok(r)
    return rows


def assert_ok(r: dict) -> None:
    checks = [r["ok"], r["kernel"] + r["user"] == r["kvm"]]
    if r["delivered"] is not None:
        checks.append(r["delivered"] == N)
    status = "ok" if all(checks) else "FAILED"
    print(f"check {r['guest']:<8} {r['label']:<20} kernel + user == KVM exits: {r['kernel'] + r['user']} == {r['kvm']}"
          + (f"; writes delivered == N: {r['delivered']} == {N}" if r["delivered"] is not None else "")
          + f" -> {status}")


def main() -> None:
    print("Lab 3: where exits go")
    print(f"N = {N} iterations per run; 'us/iter' is time inside KVM_RUN per iteration,")
    print("'handlers' the time in pykvm's C loop and Python handlers per iteration.")
    nested = nested_kvm_module()
    print(f"host: {'nested KVM (' + nested + ')' if nested else 'KVM (not nested)'}")

    user = table("bench64u", "bench64u: long mode, CPL 3 (runs natively; every exit is a real exit)")
    table("bench64", "bench64: long mode, CPL 0 (on kvm_pvm every instruction is emulated)")

    coal = next(r for r in user if r["how"] == "coalesced")
    print(f"\ncoalesced PIO at CPL 3: the ring (page {lib.KVM_COALESCED_MMIO_PAGE_OFFSET} of the vCPU mapping,"
          f" {RING_ENTRIES} entries) took the writes; {coal['fallbacks']} times it was full and KVM returned the"
          " write to user space instead, where the handler drained the ring first.")
    cpuid = next(r for r in user if r["kind"] == "cpuid")
    if cpuid["kvm"] < N:
        print(f"cpuid at CPL 3: {N} CPUIDs trapped to KVM, but the 'exits' stat grew by only {cpuid['kvm']}: "
              "this host answers CPUID without counting it (see the time per iteration instead).")
    io_stat = sum(r["io_exits"] or 0 for r in user)
    if io_stat == 0:
        print("KVM's 'io_exits' stat stayed 0 in every run, although port writes reached user space: "
              "this host does not count them; pykvm's own count is the one to trust.")

    print("\nThe full split of the 'out -> user space' run at CPL 3 (what `pykvm run --stats` prints):")
    print(format_split(next(r for r in user if r["how"] == "user")["split"]))


if __name__ == "__main__":
    main()
