"""The raw-C reference program (``rawbench.c``): build it, run it, read its JSON.

``rawbench.c`` ships inside this package and uses nothing but
``<linux/kvm.h>`` and libc: it sets up the same guests as pykvm and loops
KVM_RUN doing the least possible work per exit, so its per-exit time is the
physical limit of the host.  It is compiled with the system C compiler
(``$CC``, default ``gcc``) on first use into a cache directory
(``$XDG_CACHE_HOME/pykvm``, ``~/.cache/pykvm``, or a temporary directory),
keyed by a hash of the source, so an edited source is rebuilt.

``RawBench`` keeps one ``rawbench serve`` process and talks to it one line
at a time, so the benchmark can interleave raw-C runs with pykvm runs
without paying a process start per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pykvm.bench.common import BenchError

SOURCE = Path(__file__).resolve().parent / "rawbench.c"


def cache_dir() -> Path:
    """Where compiled helpers are kept: a writable per-user cache directory."""
    candidates = []
    if os.environ.get("XDG_CACHE_HOME"):
        candidates.append(Path(os.environ["XDG_CACHE_HOME"]) / "pykvm")
    candidates.append(Path.home() / ".cache" / "pykvm")
    candidates.append(Path(tempfile.gettempdir()) / f"pykvm-{os.getuid()}")
    for directory in candidates:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK | os.X_OK):
            return directory
    raise BenchError("no writable cache directory for the raw-C benchmark (set XDG_CACHE_HOME)")


def build(source: Path = SOURCE) -> Path:
    """Compile ``rawbench.c`` (once per source version) and return the executable's path."""
    if not source.is_file():
        raise BenchError(f"{source} is missing: pykvm was installed without its benchmark source")
    text = source.read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:16]
    exe = cache_dir() / f"rawbench-{digest}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BenchError(f"the raw-C reference needs a C compiler: {cc!r} was not found (set CC)")
    tmp = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")
    cmd = [cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-o", str(tmp), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr.strip()}")
    os.replace(tmp, exe)  # atomic: concurrent builders all end with a whole file
    return exe


class RawBench:
    """A ``rawbench serve`` process: one VM at a time, one command per line."""

    def __init__(self, exe: Path | None = None) -> None:
        self.exe = exe or build()
        self._proc = subprocess.Popen(
            [str(self.exe), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def _command(self, line: str) -> dict:
        proc = self._proc
        if proc.poll() is not None:
            raise BenchError(f"rawbench exited with status {proc.returncode}")
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        if not answer:
            raise BenchError(f"rawbench gave no answer to {line!r} (status {proc.poll()})")
        result = json.loads(answer)
        if not result.get("ok"):
            raise BenchError(f"rawbench {line!r}: {result.get('error') or result}")
        return result

    def setup(self, mode: str, image: Path | str, variant: str = "plain") -> None:
        """Create a VM in ``mode`` with ``image`` loaded and the I/O ``variant`` registered."""
        self._command(f"setup {mode} {image} {variant}")

    def run(self, kind: int, n: int) -> dict:
        """One timed run of the VM set up last: ``{"ns", "rax", "io_exits", ...}``."""
        return self._command(f"run {kind} {n}")

    def lifecycle(self, mode: str, image: Path | str, mem: int, reps: int) -> dict[str, list[int]]:
        """``reps`` whole VM lifecycles: nanoseconds per step, per rep."""
        return self._command(f"lifecycle {mode} {image} {mem} {reps}")["steps"]

    def close(self) -> None:
        """Stop the server process."""
        proc = self._proc
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> RawBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
