"""Image loaders, common ground: ImageSource, plans and their fit, flat and ELF images, detection,
files that are never read whole, and hostile bytes that give nothing but LoaderError."""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_images import (
    GuestView, MiB, assert_placement_rules, assert_refused, make_aout_kernel, make_bzimage, make_elf,
    make_multiboot_elf, make_pvh_elf, multiboot_header, pc_memory_map, refused, source,
)
from pykvm import guests
from pykvm.errors import LoaderError
from pykvm.loaders import FORMATS, ImageSource, LoadPlan, MemoryMap, Segment, detect_format, plan_image

MAP = pc_memory_map(64 * MiB)


def make_elf64(code: bytes, paddr: int = 0x100000, vaddr: int | None = None, bss: int = 0) -> bytes:
    vaddr = paddr if vaddr is None else vaddr
    return make_elf([(paddr, vaddr, code, len(code) + bss)], entry=vaddr)


# -- ImageSource ------------------------------------------------------------------------
def test_source_reads_files_lazily_and_bounded(tmp_path):
    path = tmp_path / "k.bin"
    path.write_bytes(bytes(range(256)) * 4)
    with ImageSource.open(path) as src:
        assert (src.name, src.size) == (str(path), 1024)
        assert src.read(250, 8) == bytes([250, 251, 252, 253, 254, 255, 0, 1])
        buf = bytearray(16)
        src.readinto(512, memoryview(buf))
        assert bytes(buf) == bytes(range(16))
        with pytest.raises(LoaderError, match=r"k\.bin: bytes 0x3fc-0x404 lie beyond its end \(0x400 bytes\)"):
            src.read(1020, 8)
        with pytest.raises(LoaderError, match="beyond its end"):
            src.readinto(1020, memoryview(bytearray(8)))
    with pytest.raises(LoaderError, match="is closed"):
        src.read(0, 1)


def test_source_open_errors_are_one_line(tmp_path):
    with pytest.raises(LoaderError, match=r"^cannot read .*missing\.bin: No such file or directory$"):
        ImageSource.open(tmp_path / "missing.bin")
    with pytest.raises(LoaderError, match=r"^cannot read .*: not a regular file$"):
        ImageSource.open(tmp_path)


def test_source_from_bytes_keeps_a_copy():
    data = bytearray(b"abcdef")
    src = ImageSource.from_bytes(data, "label")
    data[0] = ord("X")
    assert (src.name, src.size, src.read(0, 3)) == ("label", 6, b"abc")
    assert ImageSource.from_bytes(b"").name == "<bytes>"


# -- Segment, MemoryMap, LoadPlan ----------------------------------------------------------
def test_segment_fill_copies_the_file_range_then_zeroes():
    src = source(b"0123456789")
    seg = Segment(0x2000, 8, src, offset=3, filesz=4, what="kernel")
    buf = bytearray(b"\xff" * 8)
    seg.fill(memoryview(buf))
    assert bytes(buf) == b"3456\0\0\0\0"
    data = Segment(0x3000, 6, data=b"hi", what="boot data")
    buf = bytearray(b"\xff" * 6)
    data.fill(memoryview(buf))
    assert bytes(buf) == b"hi\0\0\0\0"
    assert (seg.end, seg.content_size, data.content_size) == (0x2008, 4, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpa=0, memsize=2, filesz=4), "a file size without a source"),
    (dict(gpa=0, memsize=1, data=b"abc"), "exceed its size"),
    (dict(gpa=-1, memsize=1), "negative"),
    (dict(gpa=0, memsize=8, source=source(b"abc", "f"), filesz=4), r"bytes 0x0\+0x4 lie beyond the end of f"),
])
def test_inconsistent_segments_are_refused(kwargs, message):
    with pytest.raises(LoaderError, match=message):
        Segment(**kwargs, what="x")


def _plan(*segments: Segment) -> LoadPlan:
    return LoadPlan(format="flat", cpu="long", entry=0, regs={}, segments=segments)


def test_check_fits_names_the_segment_that_does_not_fit():
    mm = MemoryMap(ram=((0, 16 * MiB),), e820=((0, 16 * MiB, 1),), reserved=((0, 0x1000), (0x9F000, 0x61000)))
    good = Segment(0x100000, 0x1000, data=b"x", what="kernel")
    _plan(good).check_fits(mm)
    with pytest.raises(LoaderError, match=r"^module 2 \(m\) \(0xfff000-0x1000fff, 0x2000 bytes\) does not fit "
                                          r"in guest RAM \(0x0-0xffffff\)$"):
        _plan(good, Segment(0xFFF000, 0x2000, what="module 2 (m)")).check_fits(mm)
    with pytest.raises(LoaderError, match=r"^boot_params \(0x0-0xfff.*overlaps the reserved range 0x0-0xfff$"):
        _plan(Segment(0, 0x1000, what="boot_params")).check_fits(mm)
    with pytest.raises(LoaderError, match=r"^kernel .* and initrd .* overlap$"):
        _plan(good, Segment(0x100800, 0x1000, what="initrd")).check_fits(mm)


def test_adjacent_ram_regions_count_as_one_and_occupied_is_sorted():
    mm = MemoryMap(ram=[(0, 0x200000), (0x200000, 0x200000)])   # lists are accepted
    plan = _plan(Segment(0x300000, 0x10, what="b"), Segment(0x1FF000, 0x2000, what="a"), Segment(0x5000, 0))
    plan.check_fits(mm)
    assert plan.occupied() == [(0x1FF000, 0x201000), (0x300000, 0x300010)]
    assert isinstance(mm.ram, tuple) and hash(mm)


# -- flat images ----------------------------------------------------------------------------
def test_flat_images_use_the_mode_load_address():
    long_plan = plan_image(source(b"\xf4"), memory_map=MAP, format="flat")
    assert (long_plan.format, long_plan.cpu, long_plan.entry, long_plan.regs) == ("flat", "long", 0x100000, {})
    real = plan_image(source(b"\xf4" * 3), memory_map=MAP, mode="real")
    (seg,) = real.segments
    assert (real.cpu, real.entry, seg.gpa, seg.memsize, seg.filesz, seg.offset) == ("real", 0x8000, 0x8000, 3, 3, 0)
    custom = plan_image(source(b"\x90\xf4"), memory_map=MAP, load_addr=0x7000, entry=0x7001, mode="protected")
    assert (custom.cpu, custom.entry, custom.segments[0].gpa) == ("protected", 0x7001, 0x7000)


def test_explicit_load_address_means_flat_even_for_an_elf():
    image = make_elf64(b"\xf4")
    assert plan_image(source(image), memory_map=MAP, load_addr=0x200000).format == "flat"
    assert plan_image(source(image), memory_map=MAP, mode="long").format == "flat"
    assert plan_image(source(image), memory_map=MAP, format="elf", mode="long_user").cpu == "long_user"


def test_low_memory_is_fine_unless_the_platform_reserves_it():
    assert plan_image(source(b"\xf4"), memory_map=MAP, mode="real", load_addr=0x1000).segments[0].gpa == 0x1000
    with pytest.raises(LoaderError, match="overlaps the reserved range 0x0-0xfff"):
        plan_image(source(b"\xf4"), memory_map=MAP, mode="real", load_addr=0x800)
    tables = pc_memory_map(64 * MiB, reserved=[(0x1000, 0x7F000)])
    with pytest.raises(LoaderError, match=r"^kernel \(0x8000-0x8000, 0x1 bytes\) overlaps the reserved range"):
        plan_image(source(b"\xf4"), memory_map=tables, mode="real")


def test_flat_and_elf_refuse_boot_protocol_options():
    with pytest.raises(LoaderError, match=r"^-initrd needs a Multiboot, Linux or PVH kernel; k is loaded as a "
                                          r"flat image$"):
        plan_image(source(b"\xf4", "k"), memory_map=MAP, modules=[source(b"x")])
    with pytest.raises(LoaderError, match=r"^-append needs a Multiboot, Linux or PVH kernel; .* elf image$"):
        plan_image(source(make_elf64(b"\xf4")), memory_map=MAP, cmdline="quiet")
    with pytest.raises(LoaderError, match="load address or entry point applies to flat images"):
        plan_image(source(make_aout_kernel()), memory_map=MAP, format="multiboot", load_addr=0x100000)
    with pytest.raises(LoaderError, match="a CPU mode applies to flat and ELF images"):
        plan_image(source(make_bzimage()), memory_map=MAP, format="linux", mode="long")
    with pytest.raises(LoaderError, match="unknown CPU mode 'long64'"):
        plan_image(source(b"\xf4"), memory_map=MAP, mode="long64")
    with pytest.raises(LoaderError, match="unknown image format 'coff'"):
        plan_image(source(b"\xf4"), memory_map=MAP, format="coff")
    with pytest.raises(TypeError):
        plan_image(b"\xf4", memory_map=MAP)
    with pytest.raises(TypeError):
        plan_image(source(make_aout_kernel()), memory_map=MAP, modules=["initrd.img"])


# -- ELF --------------------------------------------------------------------------------------
def test_elf_plan_uses_physical_addresses_and_bss():
    plan = plan_image(source(make_elf64(b"\x90\xf4", paddr=0x200000, vaddr=0xFFFF_FFFF_8020_0000, bss=0x100)),
                      memory_map=MAP)
    assert (plan.format, plan.cpu, plan.entry) == ("elf64", "long", 0x200000)
    (seg,) = plan.segments
    assert (seg.gpa, seg.memsize, seg.filesz, seg.offset, seg.what) == (0x200000, 0x102, 2, 120, "kernel")
    assert GuestView(plan).read(0x200000, 4) == b"\x90\xf4\0\0"


def test_elf32_with_two_segments():
    image = make_elf([(0x300000, 0x300000, b"\xf4", 1), (0x100000, 0xC0100000, b"code", 0x10)],
                     entry=0xC0100002, bits=32)
    plan = plan_image(source(image), memory_map=MAP)
    assert (plan.format, plan.cpu, plan.entry) == ("elf32", "protected", 0x100002)
    assert [(s.gpa, s.memsize, s.what) for s in plan.segments] == [
        (0x100000, 0x10, "kernel segment 1"), (0x300000, 1, "kernel segment 0")]


BAD_ELF = [
    (b"\x7fELF" + bytes(60), "unknown ELF class 0"),
    (b"\x7fELF\x02\x02\x01" + bytes(60), "not little-endian"),
    (b"\x7fELF\x03\x01\x01" + bytes(60), "unknown ELF class 3"),
    (b"\x7fELF\x02\x01\x01" + bytes(20), "ELF64 header is truncated"),
    (make_elf64(b"\xf4")[:100], "program header table runs past the end"),
    (make_elf64(b"\xf4" * 64)[:130], r"segment 0: bytes 0x78\+0x40 run past the end of the file"),
    (make_elf([(0x100000, 0x100000, b"\xf4", 1)], entry=0x100000, machine=40), "machine 40 is not x86"),
    (make_elf([(0x100000, 0x100000, b"\xf4\xf4", 1)], entry=0x100000), "file size 0x2 exceeds memory size 0x1"),
    (make_elf([(0x100000, 0x100000, b"\xf4", 1)], entry=0x200000), "entry point 0x200000 is in no loadable"),
    (make_elf([(0x100000, 0x100000, b"ab", 2), (0x100001, 0x100001, b"c", 1)], entry=0x100000), "overlap"),
    (make_elf([(0xFFFFFFFF, 0, b"ab", 2)], entry=0, bits=32), "is out of range"),
    (make_elf([], entry=0), "bad program header table"),
]


@refused(BAD_ELF)
def test_malformed_elf_images_are_rejected(image, message):
    assert_refused(image, message, MAP)


def test_empty_image_is_rejected():
    with pytest.raises(LoaderError, match=r"^empty\.img is empty$"):
        plan_image(source(b"", "empty.img"), memory_map=MAP)


# -- detection ----------------------------------------------------------------------------------
def test_detection_follows_qemus_order():
    assert detect_format(source(guests.path("hello64").read_bytes())) == "flat"
    assert detect_format(source(guests.path("bench32").read_bytes())) == "multiboot"
    assert detect_format(source(make_elf64(b"\xf4"))) == "elf"
    assert detect_format(source(make_bzimage())) == "linux"
    assert detect_format(source(make_pvh_elf())) == "pvh"
    assert detect_format(source(make_pvh_elf(multiboot=True))) == "multiboot"   # QEMU tries Multiboot first
    no_boot_flag = bytearray(make_bzimage())
    no_boot_flag[0x1FE:0x200] = b"\0\0"
    assert detect_format(source(bytes(no_boot_flag))) == "flat"
    assert FORMATS == ("auto", "flat", "elf", "multiboot", "linux", "linux-decompressor", "pvh")


# -- files are never read whole ------------------------------------------------------------------
@pytest.fixture
def read_log(monkeypatch):
    """Every ImageSource.read/readinto during the test, as (offset, n)."""
    log = []
    real_read, real_readinto = ImageSource.read, ImageSource.readinto

    def read(self, offset, n):
        log.append((offset, n))
        return real_read(self, offset, n)

    def readinto(self, offset, view):
        log.append((offset, len(view)))
        return real_readinto(self, offset, view)

    monkeypatch.setattr(ImageSource, "read", read)
    monkeypatch.setattr(ImageSource, "readinto", readinto)
    return log


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sparse(path, size: int, head: bytes = b"") -> ImageSource:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return ImageSource.open(path)


@pytest.mark.parametrize("kind", ["flat", "linux", "initrd", "multiboot module"])
def test_a_2gib_file_is_refused_without_being_read(tmp_path, read_log, kind):
    big = 2 << 30
    rss = _rss()
    with _sparse(tmp_path / "big", big, make_bzimage() if kind == "linux" else b"") as src:
        if kind in ("flat", "linux"):
            with pytest.raises(LoaderError, match=r"kernel .* does not fit in guest RAM"):
                plan_image(src, memory_map=MAP)
        else:
            kernel = make_bzimage() if kind == "initrd" else make_aout_kernel()
            with pytest.raises(LoaderError, match=r"no room for (initrd|module 1) \(.*big\) \(0x80000000 bytes\)"):
                plan_image(source(kernel), memory_map=MAP, modules=[src])
    assert sum(n for _, n in read_log) <= 2 * 8192, read_log
    assert _rss() - rss < 8 * MiB


def test_planning_reads_only_headers(read_log):
    image = make_bzimage(payload=b"\x90" * (1 << 20))
    plan = plan_image(source(image), memory_map=MAP, modules=[source(b"I" * (1 << 20), "initrd")])
    assert sum(n for _, n in read_log) <= 8192
    assert plan.segments[0].filesz == 1 << 20


# -- hostile input ---------------------------------------------------------------------------------
PREFIXES = [b"", b"\x7fELF\x02\x01\x01", b"\x7fELF\x01\x01\x01", multiboot_header(0), multiboot_header(1 << 16)]


def _assert_sane(plan: LoadPlan) -> None:
    """Whatever was accepted fits the map it was planned against, with nothing in page 0 or overlapping."""
    assert_placement_rules(plan, MAP)
    for seg in plan.segments:
        assert seg.content_size <= seg.memsize


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=600), st.sampled_from(PREFIXES), st.sampled_from(FORMATS))
def test_hostile_images_raise_only_loader_errors(tail, prefix, format):
    try:
        plan = plan_image(source(prefix + tail), memory_map=MAP, format=format)
    except LoaderError as exc:
        assert "\n" not in str(exc)
        return
    _assert_sane(plan)


VALID = [make_aout_kernel(), make_multiboot_elf(), make_multiboot_elf(bits=64, vaddr=0x200000), make_bzimage(),
         make_bzimage(version=0x206, xloadflags=0), make_pvh_elf(), make_pvh_elf(bits=32, desc_size=4),
         make_elf64(b"\xf4" * 16, bss=0x100)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 0x2FF), st.integers(0, 255)), max_size=6),
       st.booleans(), st.integers(0, 0x3400))
def test_mutated_valid_images_raise_only_loader_errors(image, mutations, with_initrd, cut):
    mutated = bytearray(image)
    for at, value in mutations:
        if at < len(mutated):
            mutated[at] = value
    if cut:
        del mutated[len(mutated) - min(cut, len(mutated) - 1):]
    modules = [source(b"initrd" * 100, "initrd")] if with_initrd else []
    try:
        plan = plan_image(source(bytes(mutated)), memory_map=MAP, modules=modules)
    except LoaderError as exc:
        assert "\n" not in str(exc)
        return
    _assert_sane(plan)


# -- with KVM (Machine is the lead's; these check a loaded image really runs) ---------------------------
@pytest.mark.kvm
def test_elf_guest_runs():
    from pykvm import Machine

    code = guests.path("hello64").read_bytes()
    with Machine(memory="16M") as m:
        m.load_image(make_elf64(code))
        result = m.run(timeout=10)
    assert result.ended == "hlt"
    assert result.serial_text.endswith(f"checksum 0x{zlib.adler32(code):08x}\n")


@pytest.mark.kvm
def test_multiboot_kernel_runs_with_its_parameter_block():
    from pykvm import Machine

    image = guests.patch_bench_params(guests.path("bench32").read_bytes(), 1, 50)  # 50 port writes
    with Machine(memory="16M") as m:
        loaded = m.load_image(image)
        assert loaded["format"] == "multiboot"
        result = m.run(timeout=10)
    assert result.ended == "debug-exit" and result.exit_status == 1  # it wrote 0 to port 0xf4
    assert result.exits["io"]["total"] == 51
    assert result.regs["rax"] == 50


@pytest.mark.kvm
def test_segment_outside_memory_is_rejected_before_writing():
    from pykvm import Machine

    with Machine(memory="4M") as m:
        with pytest.raises(LoaderError, match="does not fit"):
            m.load_image(make_elf64(b"\xf4", paddr=0x800000))
