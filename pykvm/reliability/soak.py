"""Soak runs: many VMs, long streams, runs stopped at random moments -- nothing leaks, nothing is lost.

``make soak`` (``python -m pykvm.reliability.soak``) runs three soaks and
writes their figures into docs/reliability.md (between its ``soak`` markers):

* **lifecycle**: N machines created, loaded, run and closed in one process;
  the process's open fds, threads and RSS before and after (RSS after a
  warm-up, so the allocator's first growth is not counted);
* **stream**: virtio-console streaming for M minutes both ways with
  iobench64u, every transfer checksummed at both ends (Adler-32 of what the
  guest sent against what the host received, and the reverse);
* **stops**: runs stopped at a random moment by each way a run can be
  stopped -- its timeout, ``request_stop()`` and ``close()`` from another
  thread, SIGINT -- none may crash, hang or end any other way.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
import zlib

BOUND = 30.0  # seconds: a run that takes longer than this to stop has hung


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def soak_lifecycle(machines: int = 10_000, warmup: int = 200) -> dict:
    """Create, load, run and close ``machines`` VMs; what the process holds before and after."""
    from pykvm.platform.machine import Machine

    def one() -> None:
        with Machine(memory="2M") as m:
            m.load_guest("hello64")
            result = m.run(timeout=BOUND)
            if result.ended != "hlt":
                raise RuntimeError(f"hello64 ended {result.ended}: {result.message}")

    for _ in range(warmup):
        one()
    fds0, threads0, rss0 = _fds(), threading.active_count(), _rss_kib()
    started = time.monotonic()
    for _ in range(machines):
        one()
    seconds = time.monotonic() - started
    return {"machines": machines, "seconds": round(seconds, 1), "fds_before": fds0, "fds_after": _fds(),
            "threads_before": threads0, "threads_after": threading.active_count(),
            "rss_kib_before": rss0, "rss_kib_after": _rss_kib(),
            "rss_growth_kib": _rss_kib() - rss0}


def soak_stream(minutes: float = 10.0, chunk: int = 8 << 20) -> dict:
    """virtio-console both ways for ``minutes``: bytes moved, transfers, checksum mismatches."""
    from pykvm.platform.machine import Machine
    from pykvm.virtio.backends import MemoryBackend

    deadline = time.monotonic() + minutes * 60
    moved = transfers = mismatches = 0
    failed: dict[str, int] = {}  # runs that did not end in the guest's reset, by how they ended
    rng = random.Random(1)
    while time.monotonic() < deadline:
        kind = rng.choice((3, 4))  # 3: guest -> host, 4: host -> guest
        backend = MemoryBackend()
        with Machine(memory="64M") as m:
            # the whole chunk is queued before the guest runs: the console must be allowed to hold it
            _console, _transport = m.add_virtio_console(backend, notify="ioeventfd", max_pending_input=chunk)
            if kind == 4:
                data = rng.randbytes(chunk)
                backend.feed(data)
            m.load_guest("iobench64u", args=(kind, chunk))
            result = m.run(timeout=120)
            if result.ended != "reset":
                failed[result.ended] = failed.get(result.ended, 0) + 1
                continue
            seen = bytes(backend.output) if kind == 3 else data
            if result.regs["rax"] != zlib.adler32(seen) or result.regs["rbx"] != chunk:
                mismatches += 1
            moved += chunk
            transfers += 1
    return {"minutes": minutes, "transfers": transfers, "bytes": moved, "mismatches": mismatches,
            "failed_runs": failed}


def soak_stops(runs: int = 1000, seed: int = 1) -> dict:
    """Runs stopped at random moments by timeout, request_stop, close() and SIGINT: how each ended."""
    from pykvm.platform.machine import Machine

    rng = random.Random(seed)
    counts = {"timeout": 0, "request_stop": 0, "close": 0, "sigint": 0}
    unexpected: list[str] = []
    hangs = 0
    main = threading.main_thread().ident
    for i in range(runs):
        how = rng.choice(list(counts))
        delay = rng.uniform(0.0, 0.02)
        guest = rng.choice(("spin64u", "spin64", "primes64u"))
        m = Machine(memory="16M")
        m.load_guest(guest, args=(50_000_000, 0))  # primes: far longer than the stop comes
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["result"] = m.run(timeout=delay if how == "timeout" else BOUND)
            except BaseException as exc:  # reported below as unexpected
                outcome["error"] = exc

        if how == "sigint":
            timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            run()  # on this (the main) thread: SIGINT is Python's KeyboardInterrupt here
            timer.join()
            expected = "interrupted"
        else:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            time.sleep(delay)
            if how == "request_stop":
                m.request_stop("paused")
                expected = "paused"
            elif how == "close":
                m.close()
                expected = "closed"
            else:
                expected = "timeout"
            worker.join(BOUND)
            if worker.is_alive():
                hangs += 1
                unexpected.append(f"run {i}: {how} after {delay * 1e3:.1f} ms: still running after {BOUND} s")
                continue
        m.close()
        counts[how] += 1
        if "error" in outcome:
            unexpected.append(f"run {i}: {how}: {type(outcome['error']).__name__}: {outcome['error']}")
        elif outcome["result"].ended not in (expected, "reset"):  # primes may finish first: fine
            unexpected.append(f"run {i}: {how}: ended {outcome['result'].ended}")
    return {"runs": runs, "by_method": counts, "hangs": hangs, "unexpected": unexpected[:20],
            "unexpected_count": len(unexpected)}


def write_figures(path: str, section: str, text: str) -> None:
    """Replace the ``<!-- section: begin -->`` .. ``end`` block of the doc with ``text``."""
    begin, end = f"<!-- {section}: begin -->", f"<!-- {section}: end -->"
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} lacks the {section} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def format_figures(life: dict, stream: dict, stops: dict, when: str) -> str:
    """The table docs/reliability.md shows: every cell is a measured count (the process survived to write it)."""
    stream_hangs = stream["failed_runs"].get("timeout", 0)
    stream_failed = sum(stream["failed_runs"].values()) - stream_hangs
    return "\n".join([
        f"Measured {when} on the development host (`python -m pykvm.reliability.soak`).",
        "",
        "| soak | cases | hangs | failed or wrong | leaks |",
        "|---|---:|---:|---:|---|",
        f"| lifecycle | {life['machines']:,} machines in {life['seconds']} s | 0 of {life['machines']:,} | – | "
        f"fds {life['fds_before']} → {life['fds_after']}, threads {life['threads_before']} → "
        f"{life['threads_after']}, RSS +{life['rss_growth_kib']} KiB |",
        f"| virtio stream | {stream['transfers']:,} transfers, {stream['bytes'] / 2**30:.1f} GiB in "
        f"{stream['minutes']:g} min | {stream_hangs} | {stream_failed} failed runs, {stream['mismatches']} checksum "
        f"mismatches | – |",
        f"| random stops | {stops['runs']:,} runs ({', '.join(f'{k} {v}' for k, v in stops['by_method'].items())}) "
        f"| {stops['hangs']} | {stops['unexpected_count']} unexpected endings | – |",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.reliability.soak")
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--doc", default=None, help="docs/reliability.md to update with the figures")
    args = parser.parse_args(argv)
    life = soak_lifecycle(args.machines)
    print("lifecycle:", life, flush=True)
    stream = soak_stream(args.minutes)
    print("stream:", stream, flush=True)
    stops = soak_stops(args.runs)
    print("stops:", stops, flush=True)
    ok = (life["fds_after"] == life["fds_before"] and life["threads_after"] == life["threads_before"]
          and life["rss_growth_kib"] < 1024 and stream["mismatches"] == 0 and not stream["failed_runs"]
          and stops["hangs"] == 0
          and stops["unexpected_count"] == 0)
    if args.doc:
        write_figures(args.doc, "soak", format_figures(life, stream, stops, time.strftime("%Y-%m-%d")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
