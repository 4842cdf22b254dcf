"""Lab 6: the hot path -- the same exit handled in Python and in C.

Run:  python docs/labs/06_hot_path.py

The guest writes a byte to port 0x700 N times (bench kind 1).  Each write
is a KVM_EXIT_IO that returns from KVM_RUN to this process.  Three ways to
answer it, slowest first:

  raw Python     vcpu.run() in a Python loop: one KVM_RUN ioctl per exit,
                 kvm_run decoded into an exit value (exits.IoOut)
  Machine/Python Machine(c_loop=False): pykvm's C loop calls KVM_RUN, returns
                 every exit to Python packed in an int; a Python device counts it
  Machine/C      the default Machine with a FastRange for port 0x700 in
                 m.extra_fast_ranges: the C loop drops the byte and re-enters
                 KVM_RUN without returning to Python at all
"""

from __future__ import annotations

import time

from pykvm import Machine, exits
from pykvm.guests import BENCH_KINDS
from pykvm.platform.cloop import PIO, READ_CONST, WRITE_DROP, FastRange
from pykvm.platform.layout import BENCH_PORT

N = 2000


class Counter:
    """The Python handler: a device that counts the writes it is given."""

    name = "port700"
    length = 1

    def __init__(self) -> None:
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


def raw_python(guest: str) -> dict:
    with Machine(memory="16M") as m:
        m.load_guest(guest, args=(BENCH_KINDS["out"], N))
        vcpu, handled = m.vcpu, 0
        start = time.perf_counter()
        while True:
            exit = vcpu.run()                      # KVM_RUN + decode kvm_run
            if isinstance(exit, exits.IoOut) and exit.port == BENCH_PORT:
                handled += 1
                continue
            break                                  # the guest's final HLT / reset write
        seconds = time.perf_counter() - start
        return {"how": "raw Python", "handled": handled, "in_python": handled, "in_c": 0,
                "us_total": seconds / N * 1e6, "us_run": None, "us_handler": None,
                "rax": vcpu.get_regs().rax}


def machine(guest: str, c_loop: bool) -> dict:
    with Machine(memory="16M", c_loop=c_loop) as m:
        m.load_guest(guest, args=(BENCH_KINDS["out"], N))
        counter = Counter()
        if c_loop:
            m.extra_fast_ranges = [FastRange(PIO, BENCH_PORT, 1, READ_CONST, WRITE_DROP, 0, "port700")]
        else:
            m.add_device(counter, port=BENCH_PORT)
        result = m.run(timeout=30)
        s = result.split
        in_c = result.c_hits.get("port700", 0)
        return {"how": "Machine/C" if c_loop else "Machine/Python", "handled": in_c + counter.writes,
                "in_python": counter.writes, "in_c": in_c,
                "us_total": (s.seconds_in_run + s.seconds_in_c + s.seconds_in_python) / N * 1e6,
                "us_run": s.seconds_in_run / N * 1e6,
                "us_handler": (s.seconds_in_c + s.seconds_in_python) / N * 1e6,
                "rax": result.regs["rax"]}


def measure(guest: str, title: str) -> list[dict]:
    print(f"\n{title}")
    print(f"{'handler':<16} {'handled':>8} {'in C':>6} {'in Python':>9} {'us/exit':>8} {'in KVM_RUN':>10} {'handler':>8}")
    rows = [raw_python(guest), machine(guest, c_loop=False), machine(guest, c_loop=True)]
    for r in rows:
        run = "-" if r["us_run"] is None else f"{r['us_run']:.2f}"
        handler = "-" if r["us_handler"] is None else f"{r['us_handler']:.2f}"
        print(f"{r['how']:<16} {r['handled']:>8} {r['in_c']:>6} {r['in_python']:>9} {r['us_total']:>8.2f}"
              f" {run:>10} {handler:>8}")
    raw, py, c = rows
    print(f"ratio raw Python / C loop: {raw['us_total'] / c['us_total']:.2f}x;"
          f" Machine/Python / C loop: {py['us_total'] / c['us_total']:.2f}x;"
          f" handler alone, Python / C: {py['us_handler'] / max(c['us_handler'], 1e-9):.0f}x")
    ok = all(r["handled"] == N and r["rax"] == N for r in rows) and py["in_c"] == 0 and c["in_python"] == 0
    print(f"check {guest}: every variant handled {N} exits, guest counted {N}: {'ok' if ok else 'FAILED'}")
    return rows


def main() -> None:
    print("Lab 6: the hot path, the same exit handled in Python and in C")
    print(f"N = {N} OUTs to port {BENCH_PORT:#x}; us/exit = (time in KVM_RUN + handlers) / N")
    measure("bench64", "bench64 (CPL 0): an OUT exit costs the least here")
    measure("bench64u", "bench64u (CPL 3): the same exit from native ring-3 code")


if __name__ == "__main__":
    main()
