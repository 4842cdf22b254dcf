"""Disk throughput through virtio-blk: pykvm's device against QEMU microvm's, on the same guest and image.

The guest is ``blk`` (guests/blk.c, a Multiboot kernel both VMMs boot)
in one of its benchmark modes: ``n`` requests of 4 KiB each
(``spb=8`` sectors), ``depth=8`` in flight, sequential over the image or
at random 4 KiB-aligned places in it, polling the used ring (no
interrupts).  Nothing is computed on the data.

Timing: **the guest's own TSC**, from its first submission to its last
completion (``bench: ... tsc=C``), divided by the host TSC rate
(``pykvm.platform.cloop.tsc_hz``; KVM does not scale the guest's TSC
here).  Boot, device set-up and the process's start and end are outside
the measured span, so the two VMMs are compared on the I/O path alone.

Both use a raw image of :data:`IMAGE_MIB` MiB filled with a pattern (so
reads hit allocated blocks), ``cache=writeback`` (QEMU's default, with its
default ``aio=threads``).  pykvm's device is wired as ``-drive if=virtio``
wires it: ioeventfd doorbell, requests served on the I/O thread.

``exits_per_mb``: pykvm's count of every VM exit of the run (KVM's
``exits`` statistic, ``--stats-json``: the doorbells KVM takes as
ioeventfds, the guest's serial report and set-up included) per MB moved;
None for QEMU, which does not report it.

On the kvm_pvm development host the guest's ring-0 code is emulated
instruction by instruction (about 1 us each), so a few hundred guest
instructions per request bound both VMMs; the ratio between them, measured
in the same invocation, is the figure to read.

``rows(quick)`` is what ``pykvm.bench.disk_models`` collects.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from pykvm.bench.common import BenchError, child_env, ensure_median

__all__ = ["WORKLOADS", "rows"]

#: workload -> the guest's mode= (guests/blk.c).
WORKLOADS = {"seq-read": 2, "seq-write": 3, "rand-read": 4, "rand-write": 5}
IMAGE_MIB = 64
BLOCK = 4096
DEPTH = 8
TIMEOUT = 300
MODELS = {"pykvm": "virtio-blk (pykvm)", "qemu": "virtio-blk (QEMU microvm)"}


def _guest() -> str:
    from pykvm import guests

    return str(guests.path("blk"))


def _make_image(path: str) -> None:
    chunk = bytes(range(256)) * (1 << 12)  # 1 MiB of a pattern
    with open(path, "wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(chunk)


def _append(workload: str, requests: int) -> str:
    span = IMAGE_MIB * (1 << 20) // BLOCK
    return f"mode={WORKLOADS[workload]} n={requests} spb={BLOCK // 512} depth={DEPTH} span={span} seed=7"


def _command(model: str, image: str, append: str, stats: str) -> list[str]:
    common = ["-m", "64M", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
              "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", _guest(), "-append", append]
    if model == "qemu":
        return [shutil.which("qemu-system-x86_64"), "-M", "microvm", "-enable-kvm",
                "-global", "virtio-mmio.force-legacy=false", "-device", "virtio-blk-device,drive=d0",
                "-drive", f"id=d0,if=none,file={image},format=raw,cache=writeback", *common]
    return [sys.executable, "-m", "pykvm", "run", "-drive", f"file={image},if=virtio,format=raw,cache=writeback",
            "--stats-json", stats, *common]


def _run_once(model: str, image: str, workload: str, requests: int, tmp: str) -> tuple[float, float | None]:
    """(MB/s as the guest timed it, exits per MB or None)."""
    from pykvm.guests.reports import parse_report, qemu_exit_status
    from pykvm.platform.cloop import tsc_hz

    stats = os.path.join(tmp, "stats.json")
    proc = subprocess.run(_command(model, image, _append(workload, requests), stats), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=TIMEOUT, env=child_env())
    text = proc.stdout.decode("latin-1")
    if proc.returncode != qemu_exit_status(0):
        raise BenchError(f"{model} {workload}: exit status {proc.returncode}: {text[-300:]!r} "
                         f"{proc.stderr.decode()[-300:]!r}")
    bench = parse_report(text)["bench"]
    seconds = bench["tsc"] / tsc_hz()
    megabytes = bench["bytes"] / 1e6
    exits = None
    if model == "pykvm":
        with open(stats) as f:
            exits = json.load(f)["kvm_exits"] / megabytes
    return megabytes / seconds, exits


def rows(quick: bool) -> list[dict]:
    """One row per (model, workload): MB/s (median of runs), exits per MB, notes."""
    requests, repeats = (1024, 1) if quick else (4096, 3)
    models = ["pykvm"] + (["qemu"] if shutil.which("qemu-system-x86_64") else [])
    out = []
    with tempfile.TemporaryDirectory(prefix="pykvm-disk-") as tmp:
        image = os.path.join(tmp, "disk.raw")
        _make_image(image)
        for model in models:
            for workload in WORKLOADS:
                samples = [_run_once(model, image, workload, requests, tmp) for _ in range(repeats)]
                rates = [s[0] for s in samples]
                exits = [s[1] for s in samples if s[1] is not None]
                out.append({
                    "model": MODELS[model],
                    "workload": workload,
                    "mb_per_s": round(ensure_median(rates), 2),
                    "exits_per_mb": round(ensure_median(exits), 1) if exits else None,
                    "notes": (f"guest-timed (TSC, first submission to last completion); {requests} x 4 KiB, "
                              f"depth {DEPTH}, {IMAGE_MIB} MiB raw image, cache=writeback, polling driver at "
                              f"CPL 0; median of {repeats}"
                              + ("; exits: all KVM exits of the run (ioeventfd doorbells, set-up, the "
                                 "report) per MB" if model == "pykvm" else "; QEMU reports no exit count")
                              + ("" if "qemu" in models else "; QEMU not measured: not installed")),
                })
    return out


if __name__ == "__main__":
    for row in rows("--quick" in sys.argv):
        print(json.dumps(row))
