"""Saving a paused machine to one file and restoring it, so the guest goes on as if never stopped.

What a machine's state is, and where each part comes from (QEMU's
``savevm``/``loadvm`` keep the same parts):

=================  =====================================================================
part               how it is read and written
=================  =====================================================================
guest memory       every RAM region, sparse (``pykvm.state.snapshot_format``)
each vCPU          KVM_GET/SET_REGS, XSAVE (KVM_GET_XSAVE2 where KVM_CAP_XSAVE2 says its
                   size, else KVM_GET_XSAVE; KVM_GET_FPU without XSAVE), XCRS, SREGS,
                   MSRS (every index of KVM_GET_MSR_INDEX_LIST the vCPU can read),
                   LAPIC, VCPU_EVENTS, MP_STATE, DEBUGREGS
the VM             IRQCHIP (PIC master, PIC slave, IOAPIC) and PIT2 with the in-kernel
                   irqchip; CLOCK (kvmclock)
devices            ``save_state()``/``load_state()`` of every device on the buses
                   (``pykvm.devices.check_state``), keyed by bus, address and name
=================  =====================================================================

A save happens between runs only (after ``run()`` returned for a stop
request or a timeout): the vCPU loop has by then handed back the bytes the
C loop buffered for COM1 and any coalesced writes, and an I/O instruction
a device stopped in the middle of is completed first (KVM_RUN with
``immediate_exit``, api.rst "immediate_exit"), so the registers read are
consistent.

The restore order follows QEMU's ``kvm_arch_put_registers``: registers,
XSAVE, XCRS, SREGS (the APIC base before the LAPIC's registers), MSRs, the
LAPIC, then the TSC deadline (it is armed against the LAPIC timer's mode),
VCPU_EVENTS, MP_STATE and DEBUGREGS; the VM's irqchip and PIT before the
vCPUs, the kvmclock last.

The description in the file (memory, CPUs, platform, irqchip, the test
devices, the memory regions) is checked against what the caller asks for
before a VM is created (:func:`check_expected`); a restore then builds the
machine from it (:func:`restore`) and checks the devices as their states
are loaded.  Devices added after construction (virtio consoles, COM2-4, a
moved debug-exit) must be added again by ``setup(machine)`` -- the command
line does it by rebuilding the same options, as QEMU requires.
"""

from __future__ import annotations

import time

from pykvm._native_loader import ffi, lib
from pykvm.errors import DeviceError, KvmError
from pykvm.state.snapshot_format import Snapshot, SnapshotError, load_pages, read_snapshot, write_snapshot

__all__ = ["SHAPE_KEYS", "SnapshotError", "apply_state", "capture_state", "check_expected", "describe", "load_into", "machine_shape", "restore",
           "save"]

#: The constructor arguments of a Machine that make its shape (Machine.shape holds them).
SHAPE_KEYS = ("memory", "cpus", "threads", "cores", "cpu_features", "platform", "irqchip", "pc_testdev",
              "pci_testdev")
_TSC_DEADLINE = 0x6E0  # IA32_TSC_DEADLINE: written after the LAPIC (SDM 10.5.4.1)
_CHIPS = (("pic_master", "KVM_IRQCHIP_PIC_MASTER"), ("pic_slave", "KVM_IRQCHIP_PIC_SLAVE"),
          ("ioapic", "KVM_IRQCHIP_IOAPIC"))
_readable_msrs: dict[str, list[int]] = {}


# -- structs as bytes ---------------------------------------------------------------------------------
def _raw(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def _struct(ctype: str, data: bytes):
    value = ffi.new(ctype + " *")
    if len(data) != ffi.sizeof(value[0]):
        raise SnapshotError(f"saved {ctype} is {len(data)} bytes, this host's is {ffi.sizeof(value[0])}")
    ffi.memmove(value, data, len(data))
    return value


# -- the description ----------------------------------------------------------------------------------
def _device_table(machine) -> dict:
    """``"pio:0x3f8:com1" -> device``, the first range of each device on either bus."""
    table, seen = {}, set()
    for bus in (machine.pio, machine.mmio):
        for r in bus:
            if id(r.device) not in seen:
                seen.add(id(r.device))
                table[f"{bus.kind}:{r.base:#x}:{r.name}"] = r.device
    return table


def describe(machine) -> dict:
    """The machine's description as a snapshot records it (checked on restore)."""
    return {**machine.shape, "regions": [[r.gpa, r.size] for r in machine.memory.regions],
            "devices": sorted(_device_table(machine))}


def _shape(description: dict) -> dict:
    """The constructor arguments in a file's description, checked for type (SnapshotError if not)."""
    try:
        shape = {key: description[key] for key in SHAPE_KEYS}
        ints = [shape["memory"], shape["cpus"], shape["threads"]] + ([shape["cores"]] if shape["cores"] else [])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
            raise TypeError("sizes")
        if not isinstance(shape["platform"], str) or not all(isinstance(shape[k], bool) for k in
                                                            ("irqchip", "pc_testdev", "pci_testdev")):
            raise TypeError("flags")
        shape["cpu_features"] = [(str(name), bool(on)) for name, on in shape["cpu_features"]]
        return shape
    except (KeyError, TypeError, ValueError):
        raise SnapshotError("the machine description is incomplete or malformed") from None


def machine_shape(snapshot: Snapshot) -> dict:
    """The Machine constructor arguments of a checked snapshot's description."""
    return _shape(snapshot.machine)


def check_expected(snapshot: Snapshot, expected: dict) -> None:
    """Refuse a file whose machine differs from ``expected`` (a subset of :data:`SHAPE_KEYS`)."""
    shape = _shape(snapshot.machine)
    for key, want in expected.items():
        have = shape[key]
        if key == "cpu_features":
            have, want = [tuple(f) for f in have], [tuple(f) for f in want]
        if have != want:
            raise SnapshotError(f"{snapshot.path}: wrong machine: the snapshot's {key} is {have!r}, "
                                f"this machine's is {want!r}")


# -- saving -------------------------------------------------------------------------------------------------
def _msr_indices(machine) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST, less the indices this host's vCPUs cannot read (asked once per process)."""
    path = machine.kvm.path
    if path not in _readable_msrs:
        vcpu = machine.vcpus[0]
        indices = machine.kvm.msr_index_list()
        try:
            vcpu.get_msrs(indices)
        except KvmError:
            readable = []
            for index in indices:
                try:
                    vcpu.get_msrs([index])
                    readable.append(index)
                except KvmError:
                    pass
            indices = readable
        _readable_msrs[path] = indices
    return _readable_msrs[path]


def _save_vcpu(machine, vcpu, msrs: list[int], xsave_size: int) -> dict:
    state = {"id": vcpu.id, "regs": _raw(vcpu.get_regs()), "sregs": _raw(vcpu.get_sregs()),
             "msrs": [[index, value] for index, value in vcpu.get_msrs(msrs).items()],
             "events": _raw(vcpu.get_vcpu_events()), "mp_state": vcpu.get_mp_state(),
             "debugregs": _raw(vcpu.get_debugregs())}
    if xsave_size:
        state["xsave"] = vcpu.get_xsave2(xsave_size) if _has_xsave2(machine) else _raw(vcpu.get_xsave())
    else:
        state["fpu"] = _raw(vcpu.get_fpu())
    if machine.kvm.check_extension(lib.KVM_CAP_XCRS):
        state["xcrs"] = _raw(vcpu.get_xcrs())
    if machine.irqchip:
        state["lapic"] = _raw(vcpu.get_lapic())
    return state


def _has_xsave2(machine) -> bool:
    """KVM_CAP_XSAVE2 (and a header with KVM_GET_XSAVE2): the whole area, whatever its size."""
    return (lib.PYKVM_HAVE_KVM_CAP_XSAVE2 >= 0 and lib.PYKVM_HAVE_KVM_GET_XSAVE2 >= 0
            and machine.vm.check_extension(lib.PYKVM_HAVE_KVM_CAP_XSAVE2) > 0)


def _xsave_size(machine) -> int:
    """Bytes of the XSAVE area: KVM_CAP_XSAVE2's answer, 4096 with plain KVM_CAP_XSAVE, 0 without."""
    if lib.PYKVM_HAVE_KVM_CAP_XSAVE2 >= 0 and lib.PYKVM_HAVE_KVM_GET_XSAVE2 >= 0:
        size = machine.vm.check_extension(lib.PYKVM_HAVE_KVM_CAP_XSAVE2)
        if size:
            return size
    return 4096 if machine.kvm.check_extension(lib.KVM_CAP_XSAVE) else 0


def _save_devices(machine) -> list:
    saved = []
    for key, device in _device_table(machine).items():
        save = getattr(device, "save_state", None)
        if save is None:
            raise SnapshotError(f"device {key} ({type(device).__name__}) has no save_state(): the machine "
                                "cannot be saved")
        saved.append([key, type(device).__name__, save()])
    return saved


def capture_state(machine) -> dict:
    """Everything but RAM of a paused machine: vCPUs, the VM's chips and clock, the devices (plain values)."""
    if machine.vcpu is None or machine.vcpu.closing:
        raise SnapshotError("the machine is closed: there is nothing to save")
    if any(loop.vcpu.runner is not None for loop in machine.loops):
        raise SnapshotError("the machine is running: pause it first (stop, or run() returned)")
    for loop in machine.loops:
        loop.complete_pending()  # an I/O instruction a device stopped in: finished, no further instruction run
    msrs = _msr_indices(machine)
    xsave_size = _xsave_size(machine)
    vm: dict = {"clock": machine.vm.get_clock().clock}
    if machine.irqchip:
        vm["irqchip"] = {name: _raw(machine.vm.get_irqchip(getattr(lib, const))) for name, const in _CHIPS}
        vm["pit2"] = _raw(machine.vm.get_pit2())
    return {"vcpus": [_save_vcpu(machine, vcpu, msrs, xsave_size) for vcpu in machine.vcpus], "vm": vm,
            "devices": _save_devices(machine), "loaded": (machine.loaded or {}).get("name")}


def save(machine, path: str) -> dict:
    """Write the paused machine to ``path`` (atomically); return ``{"bytes": n, "seconds": s}``.

    Raises SnapshotError if the machine is running or closed, OSError if
    the file cannot be written (no file is left behind then).
    """
    started = time.perf_counter()
    state = capture_state(machine)
    regions = [(r.gpa, machine.memory.view(r.gpa, r.size)) for r in machine.memory.regions]
    size = write_snapshot(path, describe(machine), state, regions)
    return {"bytes": size, "seconds": time.perf_counter() - started}


# -- restoring ----------------------------------------------------------------------------------------------
def _load_vcpu(vcpu, state: dict) -> None:
    vcpu.set_regs(_struct("struct kvm_regs", state["regs"]))
    if "xsave" in state:
        vcpu.set_xsave(state["xsave"])
    else:
        vcpu.set_fpu(_struct("struct kvm_fpu", state["fpu"]))
    if "xcrs" in state:
        vcpu.set_xcrs(_struct("struct kvm_xcrs", state["xcrs"]))
    vcpu.set_sregs(_struct("struct kvm_sregs", state["sregs"]))
    msrs = dict(state["msrs"])
    deadline = msrs.pop(_TSC_DEADLINE, None)
    fresh = vcpu.get_msrs(list(msrs))  # only what differs from a new vCPU's values is written: KVM refuses
    vcpu.set_msrs({i: v for i, v in msrs.items() if fresh[i] != v})  # some (a PV MSR) the CPUID hides
    if "lapic" in state:
        vcpu.set_lapic(_struct("struct kvm_lapic_state", state["lapic"]))
    if deadline is not None:
        vcpu.set_msrs({_TSC_DEADLINE: deadline})
    vcpu.set_vcpu_events(_struct("struct kvm_vcpu_events", state["events"]))
    vcpu.set_mp_state(state["mp_state"])
    vcpu.set_debugregs(_struct("struct kvm_debugregs", state["debugregs"]))


def _load_devices(machine, saved: list) -> None:
    pending = saved
    for _ in range(2):  # a device may map others (a PCI BAR): those are found on the second pass
        table, left = _device_table(machine), []
        for key, kind, state in pending:
            device = table.get(key)
            if device is None:
                left.append((key, kind, state))
                continue
            if type(device).__name__ != kind:
                raise SnapshotError(f"wrong machine: {key} is a {type(device).__name__} here, a {kind} in the "
                                    "snapshot")
            try:
                device.load_state(state)
            except (DeviceError, KeyError, TypeError, ValueError) as exc:
                raise SnapshotError(f"device {key}: cannot load its saved state: {exc}") from None
        pending = left
    if pending:
        raise SnapshotError(f"wrong machine: the snapshot has a device {pending[0][0]} that this machine lacks")
    extra = sorted(set(_device_table(machine)) - {key for key, _, _ in saved})
    if extra:
        raise SnapshotError(f"wrong machine: this machine has a device {extra[0]} that the snapshot lacks")


def load_into(machine, snapshot: Snapshot, *, fresh: bool = False) -> None:
    """Load a checked snapshot into ``machine``, paused and of the same shape (SnapshotError if it is not).

    ``fresh``: the machine was just made (its RAM is all zeros), so only the stored pages are written.
    """
    check_expected(snapshot, {key: machine.shape[key] for key in SHAPE_KEYS})
    if any(loop.vcpu.runner is not None for loop in machine.loops):
        raise SnapshotError("the machine is running: pause it first")
    regions = [[r.gpa, r.size] for r in machine.memory.regions]
    if [[base, size] for base, size, _ in snapshot.ram] != regions:
        raise SnapshotError(f"{snapshot.path}: wrong machine: its memory regions are not this machine's")
    for base, size, payload in snapshot.ram:
        load_pages(machine.memory.view(base, size), payload, zeroed=fresh)
    apply_state(machine, snapshot.state, snapshot.path)
    machine.loaded["snapshot"] = snapshot.path


def apply_state(machine, state: dict, source: str) -> None:
    """Load ``capture_state``'s dict into a paused machine of the same shape (RAM is the caller's)."""
    if len(state.get("vcpus", ())) != len(machine.vcpus):
        raise SnapshotError(f"{source}: the state has {len(state.get('vcpus', ()))} vCPUs, the machine "
                            f"{len(machine.vcpus)}")
    try:
        vm = state["vm"]
        if machine.irqchip:
            for name, const in _CHIPS:
                machine.vm.set_irqchip(_struct("struct kvm_irqchip", vm["irqchip"][name]))
            machine.vm.set_pit2(_struct("struct kvm_pit_state2", vm["pit2"]))
        for vcpu, vcpu_state in zip(machine.vcpus, state["vcpus"]):
            _load_vcpu(vcpu, vcpu_state)
        _load_devices(machine, state["devices"])
        machine.vm.set_clock(vm["clock"])
    except KvmError as exc:
        raise SnapshotError(f"{source}: this host refused the saved state: {exc}") from None
    except (KeyError, TypeError) as exc:
        raise SnapshotError(f"{source}: the state section lacks {exc}") from None
    machine.loaded = {"name": state.get("loaded") or "snapshot", "format": "snapshot"}


def restore(machine_class, path: str, *, setup=None, expect: dict | None = None, **options):
    """Read and check ``path``, build a ``machine_class`` of its shape, ``setup(machine)``, load the state.

    Every check of the file (and of ``expect``, constructor arguments the
    caller insists on) happens before the machine -- and its VM -- is
    created.  ``options`` go to the constructor too (``serial=``,
    ``strict=``, ``c_loop=``, ``kernel_stats=``).  The machine is closed
    again if anything fails after it was made.
    """
    snapshot = read_snapshot(path)
    shape = _shape(snapshot.machine)
    if expect:
        check_expected(snapshot, expect)
    machine = machine_class(**shape, **options)
    try:
        if setup is not None:
            setup(machine)
        load_into(machine, snapshot, fresh=True)
    except BaseException:
        machine.close()
        raise
    return machine
