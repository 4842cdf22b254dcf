"""A VM file descriptor: ``Vm``.

Second fd level of the KVM API.  One method per VM ioctl; the docstring's
first line names it (Documentation/virt/kvm/api.rst, section 4).  A ``Vm``
owns its fd; vCPUs created from it own theirs.
"""

from __future__ import annotations


from pykvm._native_loader import ffi, lib
from pykvm.errors import check
from pykvm.fdowner import FdOwner

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from pykvm.stats import StatsFd
    from pykvm.vcpu import Vcpu

PAGE_SIZE = 4096


class Vm(FdOwner):
    """A KVM virtual machine.  Close it with ``close()`` or a ``with`` block.

    The kernel frees the VM when its vCPU fds are closed too.
    """

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self._fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def _ioctl(self, name: str, request: int, arg) -> int:
        if isinstance(arg, int):
            return check(name, lib.pykvm_ioctl(self.fd, request, arg))
        return check(name, lib.pykvm_ioctl_ptr(self.fd, request, arg))

    # -- capabilities --------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM's type)."""
        return self._ioctl("KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION, cap)

    # -- memory --------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory at a guest-physical range.

        ``flags`` may hold KVM_MEM_READONLY (guest writes become MMIO exits)
        and KVM_MEM_LOG_DIRTY_PAGES.  A ``memory_size`` of 0 deletes the slot.
        """
        region = ffi.new(
            "struct kvm_userspace_memory_region *",
            {
                "slot": slot,
                "flags": flags,
                "guest_phys_addr": guest_phys_addr,
                "memory_size": memory_size,
                "userspace_addr": userspace_addr,
            },
        )
        self._ioctl("KVM_SET_USER_MEMORY_REGION", lib.KVM_SET_USER_MEMORY_REGION, region)

    def delete_user_memory_region(self, slot: int) -> None:
        """KVM_SET_USER_MEMORY_REGION with size 0: remove ``slot``."""
        self.set_user_memory_region(slot, 0, 0, 0)

    def get_dirty_log(self, slot: int, memory_size: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of ``slot`` written since the last call.

        The slot must have KVM_MEM_LOG_DIRTY_PAGES.  Reading clears the log.
        """
        pages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
        nbytes = ((pages + 63) // 64) * 8
        bitmap = ffi.new("uint8_t[]", nbytes)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = bitmap
        self._ioctl("KVM_GET_DIRTY_LOG", lib.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: write-protect again the pages of ``slot`` whose bits are set in ``bitmap``.

        Only with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled (then KVM_GET_DIRTY_LOG
        neither clears nor protects).  Bit 0 of ``bitmap`` is ``first_page``, a
        multiple of 64; ``num_pages`` is a multiple of 64 or reaches the slot's end.
        """
        buffer = ffi.new("uint8_t[]", max(len(bitmap), 8))
        ffi.memmove(buffer, bitmap, len(bitmap))
        log = ffi.new("struct kvm_clear_dirty_log *", {"slot": slot, "num_pages": num_pages, "first_page": first_page})
        log.dirty_bitmap = buffer
        self._ioctl("KVM_CLEAR_DIRTY_LOG", lib.KVM_CLEAR_DIRTY_LOG, log)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM fd: turn on capability ``cap`` with up to four ``args``.

        E.g. KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
        """
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most four arguments")
        spec = ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags})
        for i, value in enumerate(args):
            spec.args[i] = value
        self._ioctl("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, spec)

    # -- x86 setup -------------------------------------------------------------
    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space KVM may use (Intel real mode)."""
        self._ioctl("KVM_SET_TSS_ADDR", lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map (Intel)."""
        value = ffi.new("uint64_t *", addr)
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", lib.KVM_SET_IDENTITY_MAP_ADDR, value)

    # -- interrupts ------------------------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a local APIC per vCPU."""
        self._ioctl("KVM_CREATE_IRQCHIP", lib.KVM_CREATE_IRQCHIP, 0)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 timer (flags: KVM_PIT_SPEAKER_DUMMY)."""
        config = ffi.new("struct kvm_pit_config *", {"flags": flags})
        self._ioctl("KVM_CREATE_PIT2", lib.KVM_CREATE_PIT2, config)

    def get_irqchip(self, chip_id: int):
        """KVM_GET_IRQCHIP: one in-kernel interrupt controller's state (``struct kvm_irqchip *``).

        ``chip_id`` is KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC; a PIC's
        8259 fields are in :meth:`pic_state`.
        """
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        self._ioctl("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip) -> None:
        """KVM_SET_IRQCHIP: load the state of the controller ``chip.chip_id`` names."""
        self._ioctl("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP, chip)

    @staticmethod
    def pic_state(chip):
        """The ``struct kvm_pic_state *`` in a PIC's ``struct kvm_irqchip`` (its union ``chip``).

        The pointer keeps ``chip`` alive (a cffi pointer into a buffer does not
        own it: a temporary chip would be freed and its memory reused).
        """
        pic = ffi.cast("struct kvm_pic_state *", ffi.cast("char *", chip) + lib.PYKVM_IRQCHIP_CHIP_OFFSET)
        return ffi.gc(pic, lambda _pic, _owner=chip: None)

    def get_pit2(self):
        """KVM_GET_PIT2: the in-kernel 8254's state (``struct kvm_pit_state2 *``: three channels, flags)."""
        state = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", lib.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state) -> None:
        """KVM_SET_PIT2: load the in-kernel 8254's state (e.g. channel 2's gate, which port 0x61 drives)."""
        self._ioctl("KVM_SET_PIT2", lib.KVM_SET_PIT2, state)

    def get_clock(self):
        """KVM_GET_CLOCK: the VM's kvmclock (``struct kvm_clock_data *``: clock in ns, flags)."""
        data = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", lib.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock: int) -> None:
        """KVM_SET_CLOCK: set the VM's kvmclock to ``clock`` ns (what KVM_GET_CLOCK read when saved)."""
        self._ioctl("KVM_SET_CLOCK", lib.KVM_SET_CLOCK, ffi.new("struct kvm_clock_data *", {"clock": clock}))

    def reinject_control(self, reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the in-kernel PIT re-injects ticks the guest missed.

        QEMU's ``-global kvm-pit.lost_tick_policy=delay`` is re-injection (KVM's
        default), ``discard`` turns it off.
        """
        control = ffi.new("struct kvm_reinject_control *", {"pit_reinject": int(reinject)})
        self._ioctl("KVM_REINJECT_CONTROL", lib.KVM_REINJECT_CONTROL, control)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive GSI ``irq`` of the in-kernel irqchip high (1) or low (0)."""
        line = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        self._ioctl("KVM_IRQ_LINE", lib.KVM_IRQ_LINE, line)

    def irqfd(self, fd: int, gsi: int, *, resamplefd: int | None = None, deassign: bool = False) -> None:
        """KVM_IRQFD: writing the eventfd ``fd`` raises ``gsi`` without a syscall to this process."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        spec = {"fd": fd, "gsi": gsi, "flags": flags}
        if resamplefd is not None:
            spec["flags"] |= lib.KVM_IRQFD_FLAG_RESAMPLE
            spec["resamplefd"] = resamplefd
        self._ioctl("KVM_IRQFD", lib.KVM_IRQFD, ffi.new("struct kvm_irqfd *", spec))

    # -- I/O handled in the kernel ---------------------------------------------
    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd`` instead of exiting.

        ``length`` 0 matches any access size (KVM_CAP_IOEVENTFD_ANY_LENGTH).
        """
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        spec = ffi.new(
            "struct kvm_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        self._ioctl("KVM_IOEVENTFD", lib.KVM_IOEVENTFD, spec)

    def register_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: buffer writes to a zone in a ring instead of exiting.

        With ``pio=True`` the zone is a port range (KVM_CAP_COALESCED_PIO).
        The ring is read with ``Vcpu.drain_coalesced()``.
        """
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_REGISTER_COALESCED_MMIO", lib.KVM_REGISTER_COALESCED_MMIO, zone)

    def unregister_coalesced_mmio(self, addr: int, size: int, *, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: remove a zone registered before."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", lib.KVM_UNREGISTER_COALESCED_MMIO, zone)

    # -- vCPUs and statistics ----------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        """KVM_CREATE_VCPU: a vCPU with APIC ID ``vcpu_id``; it owns its fd and kvm_run mapping."""
        from pykvm.vcpu import Vcpu

        fd = self._ioctl("KVM_CREATE_VCPU", lib.KVM_CREATE_VCPU, vcpu_id)
        return Vcpu(fd, vcpu_id, self.vcpu_mmap_size)

    def stats_fd(self) -> "StatsFd":
        """KVM_GET_STATS_FD: the VM's binary statistics (a ``StatsFd`` that owns the fd)."""
        from pykvm.stats import StatsFd

        return StatsFd(self._ioctl("KVM_GET_STATS_FD", lib.KVM_GET_STATS_FD, 0), "vm")
