"""Lab 1: the smallest VM, one ioctl at a time.

Run:  python docs/labs/01_smallest_vm.py

Every step below is one system call on a KVM file descriptor, made through
pykvm's raw layer (``Kvm`` -> ``Vm`` -> ``Vcpu``, one method per ioctl).
The guest is nine bytes of real-mode code: it computes 2 + 2, writes the
digit to the serial port, reads a byte from port 0x60 and halts.
"""

from __future__ import annotations

from pykvm import GuestMemory, Kvm, exits
from pykvm._native_loader import lib
from pykvm.x86.state import cpu_mode_name, decode_cr0

MEMORY_SIZE = 0x10000  # 64 KiB of guest RAM at guest-physical 0
CODE_GPA = 0x1000
ANSWER = 0x2A  # what the "keyboard controller" at port 0x60 answers

# Real-mode (16-bit) machine code, assembled by hand:
GUEST_CODE = bytes([
    0xB0, 0x02,        # mov al, 2
    0x04, 0x02,        # add al, 2
    0x04, 0x30,        # add al, '0'      -> al = '4'
    0xBA, 0xF8, 0x03,  # mov dx, 0x3f8    (COM1)
    0xEE,              # out dx, al       -> KVM_EXIT_IO (out)
    0xE4, 0x60,        # in al, 0x60      -> KVM_EXIT_IO (in)
    0xF4,              # hlt              -> KVM_EXIT_HLT
])


def exit_name(reason: int) -> str:
    return "KVM_EXIT_" + exits.REASON_NAMES.get(reason, str(reason)).upper()


def step(n: int | str, call: str, result: str = "", arrow: str = "->") -> None:
    """One line: the step number, the call, and what it returned (->) or was given (<-)."""
    label = f"step {n}" if isinstance(n, int) else ""
    print(f"{label:<8}{call:<44}{arrow + ' ' + result if result else ''}".rstrip())


def main() -> None:
    print("Lab 1: the smallest VM, one ioctl at a time\n")

    kvm = Kvm()
    step(1, 'open("/dev/kvm", O_RDWR)', f"fd {kvm.fd} (the system fd)")
    step(2, "KVM_GET_API_VERSION", f"{kvm.api_version()}")
    step(3, "KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)", f"{kvm.check_extension(lib.KVM_CAP_USER_MEMORY)}")
    step("", "KVM_CHECK_EXTENSION(KVM_CAP_NR_MEMSLOTS)", f"{kvm.check_extension(lib.KVM_CAP_NR_MEMSLOTS)} (memory slots per VM)")

    vm = kvm.create_vm()
    step(4, "KVM_CREATE_VM", f"fd {vm.fd} (the VM fd)")

    memory = GuestMemory(vm)
    region = memory.add_region(0, MEMORY_SIZE)
    step(5, f"mmap({MEMORY_SIZE >> 10} KiB, anonymous)", f"host address {region.hva:#x}")
    step("", f"KVM_SET_USER_MEMORY_REGION(slot {region.slot})",
         f"guest-physical {region.gpa:#x}-{region.end - 1:#x} = host {region.hva:#x}")

    memory.write(CODE_GPA, GUEST_CODE)
    step(6, f"copy the code to guest-physical {CODE_GPA:#x}", GUEST_CODE.hex(" "), "<-")

    step(7, "KVM_GET_VCPU_MMAP_SIZE", f"{kvm.vcpu_mmap_size()} bytes (struct kvm_run and the pages after it)")
    vcpu = vm.create_vcpu(0)
    step(8, "KVM_CREATE_VCPU(0)", f"fd {vcpu.fd} (the vCPU fd)")
    step("", "mmap(vCPU fd)", f"struct kvm_run at host address {_address(vcpu.kvm_run):#x}")

    sregs = vcpu.get_sregs()
    regs = vcpu.get_regs()
    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db))
    step(9, "KVM_GET_SREGS (the state after reset)",
         f"cs selector {sregs.cs.selector:#x} base {sregs.cs.base:#x}; "
         f"cr0 {sregs.cr0:#x} ({' '.join(decode_cr0(sregs.cr0))}): {mode} mode")
    step("", "KVM_GET_REGS", f"rip {regs.rip:#x}, rflags {regs.rflags:#x} "
         f"(first instruction at cs.base + rip = {sregs.cs.base + regs.rip:#x})")

    sregs.cs.selector = 0
    sregs.cs.base = 0
    vcpu.set_sregs(sregs)
    step(10, "KVM_SET_SREGS", "cs selector 0, base 0", "<-")
    regs.rip = CODE_GPA
    regs.rflags = 0x2  # bit 1 of RFLAGS is reserved and must be 1
    vcpu.set_regs(regs)
    step("", "KVM_SET_REGS", f"rip {regs.rip:#x}, rflags {regs.rflags:#x}", "<-")

    n = 11
    while True:
        exit = vcpu.run()
        reason = vcpu.kvm_run.exit_reason
        step(n, "KVM_RUN", f"kvm_run.exit_reason = {reason} ({exit_name(reason)})")
        n += 1
        if isinstance(exit, exits.IoOut):
            step("", "  kvm_run.io (direction out)", f"port {exit.port:#x}, size {exit.size}, data {exit.data!r}")
        elif isinstance(exit, exits.IoIn):
            vcpu.complete_io_in(bytes([ANSWER]))
            step("", "  kvm_run.io (direction in)", f"port {exit.port:#x}, size {exit.size}")
            step("", "  answer written into kvm_run", f"{ANSWER:#x} (KVM copies it into AL on the next KVM_RUN)", "<-")
        elif isinstance(exit, exits.Hlt):
            step("", "  HLT came back to user space", "no in-kernel irqchip to wait on: we stop")
            break
        else:
            step("", "  unexpected exit", f"{exit}")
            break

    regs = vcpu.get_regs()
    step(n, "KVM_GET_REGS", f"rax {regs.rax:#x} (the answer the guest read), rip {regs.rip:#x} (after the hlt)")

    fds = f"vCPU fd {vcpu.fd}, VM fd {vm.fd}, system fd {kvm.fd}"
    vcpu.close()   # munmap(kvm_run) + close(vCPU fd)
    memory.close()  # munmap the guest RAM
    vm.close()
    kvm.close()
    step(n + 1, "close", fds + ", guest memory unmapped")

    print()
    ok = regs.rax & 0xFF == ANSWER
    print(f"result: the guest wrote '4' and read {regs.rax & 0xFF:#x}: {'ok' if ok else 'WRONG'}")


def _address(cdata) -> int:
    from pykvm._native_loader import ffi

    return int(ffi.cast("uintptr_t", cdata))


if __name__ == "__main__":
    main()
