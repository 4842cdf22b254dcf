"""The kernel inside a bzImage, unpacked on the host: the payload (boot.rst, protocol 2.08+) as a vmlinux ELF.

A bzImage's protected-mode part is a small decompressor followed by the
real kernel, compressed: ``payload_offset`` (0x248, from the start of the
protected-mode code) and ``payload_length`` (0x24C) locate it, and its
first bytes name the codec (gzip, xz, lzma, bzip2, zstd, lz4, lzo).
Decompressed, it is ``vmlinux``: an ELF whose PT_LOADs carry their
physical load addresses and whose ``e_entry`` is the physical address of
the kernel proper's ``startup_64`` (arch/x86/kernel/vmlinux.lds.S,
``ENTRY(phys_startup_64)``), which takes the 64-bit boot protocol's state
and RSI = boot_params -- the path Firecracker boots a vmlinux by.

Why a VMM would do the decompressor's work: it is ring-0 code, and on a host
that emulates ring 0 an instruction at a time (nested kvm_pvm: ~1 us per
instruction; docs/linux.md) xz-decompressing 60 MiB takes the better part of
an hour, where Python's ``lzma`` takes half a second.  What is lost is what
the decompressor does besides: KASLR (the kernel runs at its link address)
and the relocation of a kernel loaded elsewhere (not needed at the link
address).  The relocations appended to the payload are ignored.

Python's standard library decodes gzip, xz, lzma and bzip2 (zstd from 3.14);
for other codecs :func:`unpack_payload` says why it cannot, and the loader
falls back to the kernel's own decompressor.
"""

from __future__ import annotations

import struct

from pykvm.errors import LoaderError
from pykvm.loaders.elf import ElfImage, is_elf, read_elf
from pykvm.loaders.source import ImageSource

HDR_PAYLOAD = 0x248             # payload_offset, payload_length (u32 each)
#: How the payload's first bytes name its codec (the magic numbers of each format, as the kernel's
#: decompressors check them: lib/decompress.c).
CODECS = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"), (b"BZh", "bzip2"),
          (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x02\x21\x4c\x18", "lz4"), (b"\x89LZO", "lzo"))
DEFAULT_LIMIT = 256 << 20       # the largest vmlinux accepted when the header has no init_size


def payload_codec(data: bytes) -> str | None:
    """The codec whose magic number ``data`` starts with, or None."""
    return next((name for magic, name in CODECS if data.startswith(magic)), None)


def _decompressor(codec: str):
    """``(decompressor, the error it raises for bad data)`` for ``codec``, or ``(None, None)``.

    Each decompressor streams (``decompress(data, max_length)``, ``eof``), so
    a payload can be bounded without inflating all of it first.
    """
    if codec == "gzip":
        import zlib

        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), zlib.error
    if codec in ("xz", "lzma"):
        import lzma

        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ if codec == "xz" else lzma.FORMAT_ALONE), lzma.LZMAError
    if codec == "bzip2":
        import bz2

        return bz2.BZ2Decompressor(), OSError
    if codec == "zstd":
        try:
            from compression import zstd  # Python 3.14
        except ImportError:
            return None, None
        return zstd.ZstdDecompressor(), zstd.ZstdError
    return None, None


def unpack_payload(source: ImageSource, head: bytes, setup_size: int, limit: int) -> tuple[ElfImage | None, str]:
    """``(vmlinux, note)``: the payload decompressed and read as an ELF, or ``(None, why it cannot be)``.

    ``head``: the file's first bytes (the setup header); ``setup_size``:
    bytes before the protected-mode code; ``limit``: the most bytes the
    vmlinux may have (the header's init_size: the kernel's own decompressor
    has no more room).  Only 64-bit kernels are unpacked, so the protocol is
    2.12 or newer (xloadflags) and has the payload fields (2.08).  A payload
    in a known codec that does not decompress, or is no 64-bit ELF, is a
    damaged kernel: LoaderError.
    """
    name = source.name
    offset, length = struct.unpack_from("<II", head, HDR_PAYLOAD)
    start = setup_size + offset
    if length == 0 or start + length > source.size:
        return None, f"no payload in the file (payload_offset {offset:#x}, payload_length {length:#x})"
    magic = source.read(start, min(length, 8))
    codec = payload_codec(magic)
    if codec is None:
        return None, f"the payload's codec is unknown (it starts {magic[:6].hex()})"
    decompressor, error = _decompressor(codec)
    if decompressor is None:
        return None, f"this Python cannot decompress {codec}"
    data = source.read(start, length)
    try:
        vmlinux = decompressor.decompress(data, limit + 1)
    except (error, EOFError, ValueError) as exc:
        raise LoaderError(f"{name}: the {codec} payload does not decompress: {exc}") from None
    if len(vmlinux) > limit:
        raise LoaderError(f"{name}: the {codec} payload unpacks to more than {limit:#x} bytes (init_size)")
    if not getattr(decompressor, "eof", True):
        raise LoaderError(f"{name}: the {codec} payload is truncated")
    if not is_elf(vmlinux[:64]):
        raise LoaderError(f"{name}: the {codec} payload is not an ELF (a vmlinux) but starts {vmlinux[:4].hex()}")
    elf = read_elf(ImageSource.from_bytes(vmlinux, f"{name} (unpacked {codec} payload)"))
    if elf.bits != 64:  # read_elf has checked the machine: x86-64 for ELF64
        raise LoaderError(f"{name}: the unpacked payload is an ELF32, not a 64-bit vmlinux")
    if not any(ph.paddr <= elf.entry < ph.paddr + ph.filesz for ph in elf.loads):
        raise LoaderError(f"{name}: the vmlinux entry {elf.entry:#x} (a physical address) is in no loaded segment")
    return elf, f"{codec} payload unpacked by pykvm ({length:#x} -> {len(vmlinux):#x} bytes)"
