"""A stock Linux to boot on pykvm: Debian's kernel and a busybox initramfs, cached outside the tree.

``make linux`` (``python3 -m pykvm.guests.linux_image``) makes two files in
``${PYKVM_CACHE:-~/.cache/pykvm}/linux/`` (:func:`kernel_path`,
:func:`initrd_path`; tests and the boot benchmark look for them there):

``vmlinuz``
    The bzImage of Debian's ``linux-image-amd64``: the metapackage's
    dependency (``apt-cache depends``: ``linux-image-6.1.0-NN-amd64`` on
    Debian 12) is fetched with ``apt-get download`` and only
    ``/boot/vmlinuz-*`` is taken out of its data archive (``dpkg-deb
    --fsys-tarfile``; the modules are not needed).  ``SOURCE`` beside it
    names the package and version.
``initrd.cpio.gz``
    A newc cpio archive (the initramfs format, Documentation/
    driver-api/early-userspace/buffer-format.rst), gzip-compressed, made
    here byte for byte (no cpio tool needed; the same inputs make the
    same bytes): a static ``/bin/busybox`` (Debian's ``busybox-static``,
    installed with apt-get when missing), ``/dev/console``, and
    :data:`INIT`, which mounts /proc and /sys, prints
    ``pykvm-initramfs: up`` and powers the machine off -- or runs a shell
    when the command line has ``pykvm.shell``.

Both steps are skipped when their output is already there and current, so
a second ``make linux`` takes milliseconds.  Without apt-get (or network)
the step fails with one line and exit status 1; tests that need the files
then report themselves skipped, naming :func:`missing`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile

__all__ = ["INIT", "MARKER", "cache_dir", "initrd_path", "kernel_path", "make", "missing", "newc_archive"]

META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = "/bin/busybox"
MARKER = "pykvm-initramfs: up"

#: The initramfs's /init (run by the kernel as PID 1).
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "{MARKER}"
echo "pykvm-initramfs: $(/bin/busybox uname -sr), $(/bin/busybox nproc) CPU(s)"
case " $(/bin/busybox cat /proc/cmdline) " in
*" pykvm.shell "*) exec /bin/busybox sh ;;
esac
echo "pykvm-initramfs: powering off"
exec /bin/busybox poweroff -f
"""


def cache_dir() -> str:
    """``${PYKVM_CACHE:-~/.cache/pykvm}/linux``."""
    root = os.environ.get("PYKVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pykvm")
    return os.path.join(root, "linux")


def kernel_path() -> str:
    return os.path.join(cache_dir(), "vmlinuz")


def initrd_path() -> str:
    return os.path.join(cache_dir(), "initrd.cpio.gz")


def missing() -> str | None:
    """Why the kernel or initramfs cannot be used (a reason for a skip), or None when both are there."""
    for path in (kernel_path(), initrd_path()):
        if not os.path.isfile(path):
            return f"{path} is missing (make linux fetches Debian's kernel and builds the initramfs)"
    return None


class ImageError(Exception):
    """A step of ``make linux`` failed; the message is the one line to print."""


def _run(*argv: str, cwd: str | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ImageError(f"{argv[0]}: {exc.strerror}") from None
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ImageError(f"{' '.join(argv)} failed (status {done.returncode}): {last}")
    return done.stdout


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise ImageError(f"{tool} not found: fetching Debian's kernel needs apt-get, apt-cache and dpkg-deb")


def kernel_package() -> str:
    """The real package behind ``linux-image-amd64`` (``apt-cache depends``: its first linux-image dependency)."""
    _need("apt-cache")
    for line in _run("apt-cache", "depends", META_PACKAGE).splitlines():
        kind, _, name = line.strip().partition(":")
        name = name.strip()
        if kind.endswith("Depends") and name.startswith("linux-image-"):
            return name
    raise ImageError(f"apt-cache depends {META_PACKAGE}: no linux-image-* dependency")


def fetch_kernel(directory: str, log) -> str:
    """``directory/vmlinuz`` from Debian's package (kept when already there)."""
    out = os.path.join(directory, "vmlinuz")
    if os.path.isfile(out):
        return out
    for tool in ("apt-get", "dpkg-deb"):
        _need(tool)
    package = kernel_package()
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as work:
        log(f"linux: apt-get download {package}")
        _run("apt-get", "download", "-q", package, cwd=work)
        debs = [name for name in os.listdir(work) if name.endswith(".deb")]
        if len(debs) != 1:
            raise ImageError(f"apt-get download {package} left {len(debs)} .deb files")
        deb = os.path.join(work, debs[0])
        version = _run("dpkg-deb", "-f", deb, "Version").strip()
        partial = os.path.join(work, "vmlinuz")
        _extract_vmlinuz(deb, partial)
        os.replace(partial, out)
    with open(os.path.join(directory, "SOURCE"), "w") as f:
        f.write(f"{package} {version}\n")
    log(f"linux: {out} ({package} {version})")
    return out


def _extract_vmlinuz(deb: str, out: str) -> None:
    """Stream the package's data archive (``dpkg-deb --fsys-tarfile``) and keep ``./boot/vmlinuz-*`` only."""
    proc = subprocess.Popen(("dpkg-deb", "--fsys-tarfile", deb), stdout=subprocess.PIPE)
    found = False
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and os.path.dirname(member.name).lstrip("./") == "boot" \
                        and os.path.basename(member.name).startswith("vmlinuz-"):
                    with tar.extractfile(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found = True
                    break
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    if not found:
        raise ImageError(f"{os.path.basename(deb)} holds no /boot/vmlinuz-*")


def _is_static_elf(path: str) -> bool:
    """An ELF executable without a PT_INTERP program header (so it needs no dynamic loader)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:5] != b"\x7fELF\x02":
                return False
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    PT_INTERP = 3
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != PT_INTERP for i in range(phnum))


def static_busybox(log) -> str:
    """A static busybox: /bin/busybox, after ``apt-get install busybox-static`` if it is missing or dynamic."""
    if _is_static_elf(BUSYBOX):
        return BUSYBOX
    if shutil.which("apt-get") is None:
        raise ImageError(f"{BUSYBOX} is not a static busybox and there is no apt-get to install {BUSYBOX_PACKAGE}")
    log(f"linux: apt-get install {BUSYBOX_PACKAGE}")
    _run("apt-get", "install", "-y", "-q", "--no-install-recommends", BUSYBOX_PACKAGE)
    if not _is_static_elf(BUSYBOX):
        raise ImageError(f"{BUSYBOX_PACKAGE} is installed but {BUSYBOX} is not a static ELF")
    return BUSYBOX


# -- the initramfs: newc cpio ---------------------------------------------------------------
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def _newc_entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc record: "070701", 13 fields of 8 hex digits, the name (NUL, pad to 4), the data (pad to 4)."""
    encoded = name.encode() + b"\0"
    nlink = 2 if mode & 0o170000 == S_IFDIR else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    record = header + encoded
    record += b"\0" * (-len(record) % 4)
    return record + data + b"\0" * (-len(data) % 4)


def newc_archive(entries) -> bytes:
    """A newc cpio archive of ``(name, mode, data, rdev)`` entries (mtime 0, uid/gid 0), with its trailer."""
    out = [_newc_entry(ino, name, mode, data, rdev) for ino, (name, mode, data, rdev) in enumerate(entries, 1)]
    out.append(_newc_entry(0, "TRAILER!!!", 0))
    return b"".join(out)


def initramfs(busybox: bytes) -> bytes:
    """The gzip-compressed initramfs (deterministic: gzip's mtime is 0)."""
    entries = [(d, S_IFDIR | 0o755, b"", (0, 0)) for d in ("bin", "dev", "proc", "sys", "tmp")]
    entries += [
        ("bin/busybox", S_IFREG | 0o755, busybox, (0, 0)),
        ("bin/sh", S_IFLNK | 0o777, b"busybox", (0, 0)),
        ("dev/console", S_IFCHR | 0o600, b"", (5, 1)),   # the kernel opens it for PID 1's stdin/out
        ("init", S_IFREG | 0o755, INIT.encode(), (0, 0)),
    ]
    return gzip.compress(newc_archive(entries), compresslevel=6, mtime=0)


def build_initrd(directory: str, log) -> str:
    """``directory/initrd.cpio.gz``, rebuilt only when busybox or :data:`INIT` changed (a stamp beside it)."""
    out = os.path.join(directory, "initrd.cpio.gz")
    stamp_path = out + ".stamp"
    busybox = static_busybox(log)
    st = os.stat(busybox)
    stamp = hashlib.sha256(f"{st.st_size} {st.st_mtime_ns}\n{INIT}".encode()).hexdigest()
    if os.path.isfile(out) and os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if f.read().strip() == stamp:
                return out
    with open(busybox, "rb") as f:
        image = initramfs(f.read())
    with open(out + ".part", "wb") as f:
        f.write(image)
    os.replace(out + ".part", out)
    with open(stamp_path, "w") as f:
        f.write(stamp + "\n")
    log(f"linux: {out} ({len(image)} bytes: busybox from {busybox}, /init)")
    return out


def make(log=print) -> tuple[str, str]:
    """Fetch the kernel and build the initramfs if needed; ``(kernel, initrd)``.  ImageError says what failed."""
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    return fetch_kernel(directory, log), build_initrd(directory, log)


def main() -> int:
    try:
        kernel, initrd = make()
    except ImageError as exc:
        print(f"make linux: {exc}", file=sys.stderr)
        return 1
    print(f"linux: {kernel}\nlinux: {initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
