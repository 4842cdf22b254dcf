"""fw_cfg: the port interface byte by byte, the file directory, DMA against a fake memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import fw_cfg as fc
from pykvm.devices.fw_cfg import FwCfg
from pykvm.errors import DeviceError, GuestMemoryError

MiB = 1 << 20
GiB = 1 << 30


class FakeMemory:
    """Sparse guest memory made of ``(base, size)`` regions; it records every access.

    An access outside the regions raises GuestMemoryError (as GuestMemory does)
    and is also remembered in ``violations``: the device must never make one.
    """

    def __init__(self, *regions: tuple[int, int]) -> None:
        self.regions = regions
        self.bytes: dict[int, int] = {}
        self.violations: list[tuple[str, int, int]] = []
        self.writes: list[tuple[int, int]] = []

    def is_mapped(self, gpa: int, size: int = 1) -> bool:
        return any(base <= gpa and gpa + size <= base + length for base, length in self.regions)

    def read(self, gpa: int, size: int) -> bytes:
        if not self.is_mapped(gpa, size):
            self.violations.append(("read", gpa, size))
            raise GuestMemoryError(f"{gpa:#x}+{size:#x}")
        return bytes(self.bytes.get(gpa + i, 0) for i in range(size))

    def write(self, gpa: int, data: bytes) -> None:
        if not self.is_mapped(gpa, len(data)):
            self.violations.append(("write", gpa, len(data)))
            raise GuestMemoryError(f"{gpa:#x}+{len(data):#x}")
        self.writes.append((gpa, len(data)))
        for i, value in enumerate(data):
            self.bytes[gpa + i] = value


# -- what a guest driver does --------------------------------------------------------


def select(device: FwCfg, key: int) -> None:
    device.write(fc.SELECTOR_OFFSET, key.to_bytes(2, "little"))  # outw 0x510


def read_data(device: FwCfg, count: int) -> bytes:
    return b"".join(device.read(fc.DATA_OFFSET, 1) for _ in range(count))  # inb 0x511


def read_item(device: FwCfg, key: int, count: int) -> bytes:
    select(device, key)
    return read_data(device, count)


def start_dma(device: FwCfg, access_address: int) -> None:
    """Linux's qemu_fw_cfg: iowrite32be(high) at 0x514, iowrite32be(low) at 0x518."""
    device.write(fc.DMA_OFFSET, (access_address >> 32).to_bytes(4, "big"))
    device.write(fc.DMA_OFFSET + 4, (access_address & 0xFFFFFFFF).to_bytes(4, "big"))


def put_access(memory: FakeMemory, at: int, control: int, length: int, address: int) -> None:
    memory.write(at, struct.pack(">IIQ", control, length, address))


def control_word(memory: FakeMemory, at: int) -> int:
    return struct.unpack(">I", memory.read(at, 4))[0]


def parse_directory(device: FwCfg) -> list[tuple[int, int, str]]:
    select(device, fc.FILE_DIR)
    (count,) = struct.unpack(">I", read_data(device, 4))
    entries = []
    for _ in range(count):
        size, key, reserved, name = struct.unpack(">IHH56s", read_data(device, 64))
        assert reserved == 0
        entries.append((size, key, name.rstrip(b"\0").decode()))
    return entries


# -- the traditional interface ---------------------------------------------------------


def test_signature_byte_by_byte_then_zero_past_the_end():
    device = FwCfg()
    assert read_item(device, fc.SIGNATURE, 6) == b"QEMU\0\0"


def test_signature_is_selected_after_construction_and_reset():
    device = FwCfg()
    assert read_data(device, 4) == b"QEMU"
    select(device, fc.ID)
    device.reset()
    assert read_data(device, 2) == b"QE"


@pytest.mark.parametrize("memory, features", [(None, 0x1), (FakeMemory((0, 0x1000)), 0x3)])
def test_id_says_traditional_and_dma_when_there_is_memory(memory, features):
    device = FwCfg(memory)
    assert read_item(device, fc.ID, 4) == struct.pack("<I", features)
    assert device.dma_enabled is (memory is not None)


def test_port_0x510_byte_reads_the_data_as_qemus_combined_region_does():
    device = FwCfg()
    select(device, fc.SIGNATURE)
    assert device.read(fc.SELECTOR_OFFSET, 1) + device.read(fc.DATA_OFFSET, 1) == b"QE"


def test_selector_switch_restarts_the_offset():
    device = FwCfg.for_pc(64 * MiB)
    select(device, fc.SIGNATURE)
    assert read_data(device, 2) == b"QE"
    select(device, fc.NB_CPUS)
    assert read_data(device, 2) == b"\x01\x00"
    select(device, fc.SIGNATURE)
    assert read_data(device, 4) == b"QEMU"


def test_byte_and_wide_writes_to_the_data_port_are_ignored():
    device = FwCfg()
    select(device, fc.SIGNATURE)
    device.write(fc.SELECTOR_OFFSET, b"\x01")  # outb 0x510: a data write, not a selection
    device.write(fc.DATA_OFFSET, b"X")
    assert read_data(device, 4) == b"QEMU"
    assert device.item_data(fc.SIGNATURE) == b"QEMU"
    assert device.ignored_accesses == 2


def test_wide_reads_of_the_data_port_do_not_advance():
    device = FwCfg()
    select(device, fc.SIGNATURE)
    assert device.read(fc.SELECTOR_OFFSET, 2) == b"\0\0"
    assert read_data(device, 1) == b"Q"


def test_pc_items_have_qemus_encodings():
    device = FwCfg.for_pc(6 * GiB, 2, max_cpus=4, nographic=True, boot_menu=True)
    assert read_item(device, fc.RAM_SIZE, 8) == struct.pack("<Q", 6 * GiB)
    assert read_item(device, fc.NB_CPUS, 2) == b"\x02\x00"
    assert read_item(device, fc.MAX_CPUS, 2) == b"\x04\x00"
    assert read_item(device, fc.NOGRAPHIC, 2) == b"\x01\x00"
    assert read_item(device, fc.BOOT_MENU, 2) == b"\x01\x00"
    assert read_item(device, fc.UUID, 17) == bytes(17)
    assert read_item(device, fc.IRQ0_OVERRIDE, 4) == b"\x01\0\0\0"  # an x86 (bit 15) key
    assert device.item_data(fc.NUMA) == bytes(8 * 5)  # node count 0, then one word per APIC ID


def test_ram_size_reads_back_byte_by_byte():
    device = FwCfg.for_pc(0x1_2345_6000)
    assert read_item(device, fc.RAM_SIZE, 8) == bytes([0x00, 0x60, 0x45, 0x23, 0x01, 0, 0, 0])


def test_the_write_channel_bit_reads_the_same_item():
    device = FwCfg()
    assert read_item(device, fc.WRITE_CHANNEL | fc.SIGNATURE, 4) == b"QEMU"


def test_keys_without_items_and_beyond_the_file_slots_read_zeros():
    device = FwCfg()
    assert read_item(device, fc.MACHINE_ID, 4) == bytes(4)
    assert read_item(device, fc.FILE_FIRST + fc.FILE_SLOTS, 4) == bytes(4)
    assert read_item(device, 0xFFFF, 4) == bytes(4)


def test_kernel_items_exist_only_with_a_kernel():
    bare = FwCfg.for_pc(64 * MiB)
    assert read_item(bare, fc.CMDLINE_SIZE, 4) == bytes(4)
    with pytest.raises(DeviceError):
        bare.item_data(fc.KERNEL_SIZE)
    device = FwCfg.for_pc(64 * MiB, kernel=b"K" * 300, setup=b"S" * 0x400, cmdline="console=ttyS0",
                          initrd=b"I" * 5, initrd_addr=0x3FF_F000)
    assert read_item(device, fc.KERNEL_ADDR, 4) == struct.pack("<I", 0x100000)
    assert read_item(device, fc.KERNEL_SIZE, 4) == struct.pack("<I", 300)
    assert device.item_data(fc.KERNEL_DATA) == b"K" * 300
    assert read_item(device, fc.SETUP_ADDR, 4) == struct.pack("<I", 0x10000)
    assert read_item(device, fc.SETUP_SIZE, 4) == struct.pack("<I", 0x400)
    assert read_item(device, fc.CMDLINE_ADDR, 4) == struct.pack("<I", 0x20000)
    assert read_item(device, fc.CMDLINE_SIZE, 4) == struct.pack("<I", 14)  # with the NUL
    assert read_item(device, fc.CMDLINE_DATA, 15) == b"console=ttyS0\0\0"
    assert read_item(device, fc.INITRD_ADDR, 4) == struct.pack("<I", 0x3FF_F000)
    assert read_item(device, fc.INITRD_SIZE, 4) == struct.pack("<I", 5)
    assert device.item_data(fc.INITRD_DATA) == b"IIIII"


def test_a_kernel_without_a_command_line_gets_an_empty_one():
    device = FwCfg.for_pc(64 * MiB, kernel=b"K")
    assert device.item_data(fc.CMDLINE_SIZE) == struct.pack("<I", 1)
    assert device.item_data(fc.CMDLINE_DATA) == b"\0"


# -- files ------------------------------------------------------------------------------


def test_file_directory_is_sorted_by_name_and_keys_follow():
    device = FwCfg()
    assert device.add_file("opt/zz", b"z" * 3) == 0x20
    assert device.add_file("etc/b", b"bb") == 0x20  # sorts first: opt/zz moves to 0x21
    assert device.add_file("etc/a", b"a") == 0x20
    assert parse_directory(device) == [(1, 0x20, "etc/a"), (2, 0x21, "etc/b"), (3, 0x22, "opt/zz")]
    assert device.file_key("opt/zz") == 0x22
    assert read_item(device, 0x22, 4) == b"zzz\0"
    assert read_item(device, 0x21, 2) == b"bb"


def test_file_directory_layout_and_size():
    device = FwCfg()
    device.add_file("etc/x", b"12345")
    directory = device.item_data(fc.FILE_DIR)
    assert len(directory) == 4 + 64 * fc.FILE_SLOTS  # room for every slot, as QEMU allocates it
    assert directory[:4] == b"\0\0\0\x01"  # big-endian count
    assert directory[4:12] == b"\0\0\0\x05\0\x20\0\0"  # be32 size, be16 select, be16 reserved
    assert directory[12:68] == b"etc/x".ljust(56, b"\0")
    assert directory[68:] == bytes(64 * (fc.FILE_SLOTS - 1))


def test_pc_files_boot_fail_wait_and_e820():
    device = FwCfg.for_pc(6 * GiB)
    names = [name for _, _, name in parse_directory(device)]
    assert names == ["etc/boot-fail-wait", "etc/e820"]
    assert read_item(device, device.file_key("etc/boot-fail-wait"), 4) == b"\xff\xff\xff\xff"
    e820 = device.item_data(device.file_key("etc/e820"))
    assert [struct.unpack_from("<QQI", e820, i) for i in range(0, len(e820), 20)] == [
        (0, 3 * GiB, 1), (4 * GiB, 3 * GiB, 1)]  # RAM below the 3 GiB hole, and above 4 GiB


def test_host_errors():
    device = FwCfg()
    with pytest.raises(DeviceError):
        device.add_item(fc.SIGNATURE, b"XXXX")  # already set
    with pytest.raises(DeviceError):
        device.add_item(0x20, b"")  # file keys belong to add_file
    with pytest.raises(DeviceError):
        device.add_item(fc.WRITE_CHANNEL | fc.UUID, b"")
    with pytest.raises(DeviceError):
        device.add_file("x" * 56, b"")  # 55 characters and the NUL fit
    with pytest.raises(DeviceError):
        device.add_file("caf\u00e9", b"")
    device.add_file("x" * 55, b"")
    with pytest.raises(DeviceError):
        device.add_file("x" * 55, b"")
    with pytest.raises(DeviceError):
        device.file_key("nothing")
    with pytest.raises(DeviceError):
        device.read(0, 0)
    with pytest.raises(DeviceError):
        device.write(10, b"\0\0\0\0")
    with pytest.raises(DeviceError):
        FwCfg.for_pc(64 * MiB, initrd=b"x")  # an initrd needs a kernel
    with pytest.raises(DeviceError):
        FwCfg.for_pc(64 * MiB, kernel=b"k", initrd=b"x")  # ... and an address
    with pytest.raises(DeviceError):
        FwCfg.for_pc(64 * MiB, 2, max_cpus=1)


def test_file_slots_run_out():
    device = FwCfg(file_slots=0x10)
    for i in range(0x10):
        device.add_file(f"f{i:02}", b"")
    with pytest.raises(DeviceError):
        device.add_file("one-too-many", b"")


# -- DMA --------------------------------------------------------------------------------

ACCESS = 0x1000  # where the tests put FWCfgDmaAccess
BUFFER = 0x2000


@pytest.fixture
def memory():
    return FakeMemory((0, 0x10000))


def test_dma_address_register_reads_the_signature(memory):
    device = FwCfg(memory)
    assert device.read(fc.DMA_OFFSET, 4) + device.read(fc.DMA_OFFSET + 4, 4) == b"QEMU CFG"
    assert device.read(fc.DMA_OFFSET + 7, 1) == b"G"
    assert device.read(2, 4) == b"\xff\xffQE"
    assert FwCfg().read(fc.DMA_OFFSET, 4) == b"\xff" * 4  # no DMA: nothing there


def test_dma_select_and_read(memory):
    device = FwCfg.for_pc(64 * MiB, memory=memory)
    put_access(memory, ACCESS, fc.RAM_SIZE << 16 | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 8, BUFFER)
    start_dma(device, ACCESS)
    assert memory.read(BUFFER, 8) == struct.pack("<Q", 64 * MiB)
    assert control_word(memory, ACCESS) == 0
    assert (device.dma_transfers, device.dma_errors) == (1, 0)


def test_dma_read_past_the_end_fills_zeros(memory):
    device = FwCfg(memory)
    memory.write(BUFFER, b"\xaa" * 8)
    put_access(memory, ACCESS, fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 7, BUFFER)  # key 0: "QEMU"
    start_dma(device, ACCESS)
    assert memory.read(BUFFER, 8) == b"QEMU\0\0\0\xaa"
    assert control_word(memory, ACCESS) == 0


def test_dma_skip_then_read_continues_from_the_offset(memory):
    device = FwCfg(memory)
    put_access(memory, ACCESS, fc.DMA_CTL_SELECT | fc.DMA_CTL_SKIP, 2, 0)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == 0
    put_access(memory, ACCESS, fc.DMA_CTL_READ, 2, BUFFER)  # no SELECT: same item, offset 2
    start_dma(device, ACCESS)
    assert memory.read(BUFFER, 2) == b"MU"
    assert read_data(device, 1) == b"\0"  # the port interface shares the offset: past the end


def test_dma_select_alone_acts_as_the_selector_register(memory):
    device = FwCfg(memory)
    put_access(memory, ACCESS, fc.ID << 16 | fc.DMA_CTL_SELECT, 100, BUFFER)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == 0
    assert read_data(device, 4) == b"\x03\0\0\0"
    assert memory.read(BUFFER, 4) == bytes(4)  # no operation: nothing copied


def test_one_64_bit_write_starts_a_transfer_and_the_address_resets(memory):
    device = FwCfg(memory)
    put_access(memory, ACCESS, fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 4, BUFFER)
    device.write(fc.DMA_OFFSET, ACCESS.to_bytes(8, "big"))
    assert memory.read(BUFFER, 4) == b"QEMU"
    # After a transfer the register is 0 again: a lone low-half write means high half 0.
    put_access(memory, ACCESS + 0x100, fc.ID << 16 | fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 4, BUFFER + 8)
    device.write(fc.DMA_OFFSET + 4, (ACCESS + 0x100).to_bytes(4, "big"))
    assert memory.read(BUFFER + 8, 4) == b"\x03\0\0\0"
    assert device.dma_transfers == 2


def test_dma_register_ignores_other_widths_and_offsets(memory):
    device = FwCfg(memory)
    device.write(fc.DMA_OFFSET + 2, b"\0\0")
    device.write(fc.DMA_OFFSET + 4, b"\0")
    assert device.dma_transfers == 0
    assert device.ignored_accesses == 2


def test_dma_access_structure_outside_memory_is_an_error_not_an_exception(memory):
    device = FwCfg(memory)
    start_dma(device, 0xFFFF_FFFF_0000)
    assert (device.dma_transfers, device.dma_errors) == (1, 1)
    assert memory.writes == [] and memory.violations == []
    # Half of the structure mapped: the control word can still carry the error.
    start_dma(device, 0x10000 - 8)
    assert control_word(memory, 0x10000 - 8) == fc.DMA_CTL_ERROR
    assert memory.violations == []


def test_dma_to_an_unmapped_buffer_sets_the_error_bit(memory):
    device = FwCfg(memory)
    put_access(memory, ACCESS, fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 4, 0x10000 - 2)  # straddles the end
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == fc.DMA_CTL_ERROR
    assert memory.violations == []
    assert memory.read(0x10000 - 2, 2) == b"\0\0"  # nothing partial was written
    assert read_data(device, 1) == b"\0"  # QEMU advances the offset even so


def test_dma_zero_fill_outside_memory_is_an_error(memory):
    device = FwCfg(memory)
    put_access(memory, ACCESS, fc.DMA_CTL_SELECT | fc.DMA_CTL_READ, 0xFFFF_FFFF, BUFFER)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == fc.DMA_CTL_ERROR
    assert memory.read(BUFFER, 4) == b"QEMU"  # the item itself fitted
    assert memory.violations == []


def test_dma_write_changes_only_writable_files_and_never_grows_them(memory):
    device = FwCfg(memory)
    device.add_file("etc/writable", b"\0" * 4, writable=True)
    device.add_file("etc/read-only", b"\0" * 4)  # sorts first: the writable file moves to 0x21
    key = device.file_key("etc/writable")
    assert key == 0x21
    memory.write(BUFFER, b"abcdef")
    put_access(memory, ACCESS, key << 16 | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 4, BUFFER)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == 0
    assert device.item_data(key) == b"abcd"
    put_access(memory, ACCESS, key << 16 | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 5, BUFFER + 1)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == fc.DMA_CTL_ERROR  # would run past the end
    assert device.item_data(key) == b"abcd"
    read_only = device.file_key("etc/read-only")
    put_access(memory, ACCESS, read_only << 16 | fc.DMA_CTL_SELECT | fc.DMA_CTL_WRITE, 2, BUFFER)
    start_dma(device, ACCESS)
    assert control_word(memory, ACCESS) == fc.DMA_CTL_ERROR
    assert device.item_data(read_only) == b"\0" * 4
    assert device.item_data(fc.SIGNATURE) == b"QEMU"


def test_dma_read_wins_over_write_and_skip(memory):
    device = FwCfg(memory)
    control = fc.DMA_CTL_SELECT | fc.DMA_CTL_READ | fc.DMA_CTL_WRITE | fc.DMA_CTL_SKIP
    put_access(memory, ACCESS, control, 4, BUFFER)
    start_dma(device, ACCESS)
    assert memory.read(BUFFER, 4) == b"QEMU"
    assert device.item_data(fc.SIGNATURE) == b"QEMU"


# -- fuzzing ----------------------------------------------------------------------------

register_writes = st.lists(
    st.tuples(st.integers(0, 11), st.binary(min_size=1, max_size=8)).filter(lambda w: w[0] + len(w[1]) <= 12),
    max_size=30,
)
dma_structures = st.lists(
    st.tuples(
        st.integers(0, 0x3FFF),  # where the structure goes (may straddle the end of memory)
        st.integers(0, 0xFFFFFFFF),  # control
        st.one_of(st.integers(0, 0x300), st.integers(0, 0xFFFFFFFF)),  # length
        st.one_of(st.integers(0, 0x4000), st.integers(0, (1 << 64) - 1)),  # target address
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(register_writes, dma_structures)
def test_fuzzed_registers_and_dma_never_raise_nor_touch_unmapped_memory(writes, accesses):
    memory = FakeMemory((0, 0x3000), (0x3800, 0x800))  # with a hole
    device = FwCfg.for_pc(64 * MiB, memory=memory, kernel=b"k" * 40)
    device.add_file("etc/scratch", bytes(16), writable=True)
    directory = device.item_data(fc.FILE_DIR)
    for at, control, length, target in accesses:
        if memory.is_mapped(at, 16):
            put_access(memory, at, control, length, target)
        start_dma(device, at)
        control_after = struct.unpack(">I", memory.read(at, 4))[0] if memory.is_mapped(at, 4) else None
        assert control_after in (None, 0, fc.DMA_CTL_ERROR)
    for offset, data in writes:
        device.write(offset, data)
        assert len(device.read(offset, len(data))) == len(data)
    assert memory.violations == []
    assert device.item_data(fc.FILE_DIR) == directory
    assert device.item_data(fc.SIGNATURE) == b"QEMU"
    assert device.item_data(fc.KERNEL_DATA) == b"k" * 40
