"""Dirty-page logging over a machine's memory slots, for live migration's pre-copy rounds.

KVM_MEM_LOG_DIRTY_PAGES on a slot (set again with KVM_SET_USER_MEMORY_REGION,
same slot, address and mapping: only the flags change) makes KVM note each
page the guest writes; KVM_GET_DIRTY_LOG hands over the bitmap and clears
it (api.rst 4.8, 4.35).  Only the guest's own writes are logged: a write by
the host (a device's DMA, ``GuestMemory.write``) is not, which is why
migration checks every page once more while the guest is paused.

Functions only, added beside ``pykvm.memory`` (whose user-facing dirty-log
API is another piece of work): they keep no state of their own.
"""

from __future__ import annotations

from pykvm._native_loader import lib

__all__ = ["PAGE_SIZE", "dirty_pages", "start_logging", "stop_logging"]

PAGE_SIZE = 4096


def _set_flags(memory, region, log: bool) -> None:
    flags = (lib.KVM_MEM_READONLY if region.readonly else 0) | (lib.KVM_MEM_LOG_DIRTY_PAGES if log else 0)
    memory.vm.set_user_memory_region(region.slot, region.gpa, region.size, region.hva, flags)


def start_logging(memory) -> None:
    """KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES on every slot of ``memory``."""
    for region in memory.regions:
        if not region.log_dirty:
            _set_flags(memory, region, True)


def stop_logging(memory) -> None:
    """The slots as they were: logging off where ``start_logging`` turned it on."""
    if memory.vm is None or memory.vm.closed:
        return
    for region in memory.regions:
        if not region.log_dirty:
            _set_flags(memory, region, False)


def dirty_pages(memory) -> list[int]:
    """KVM_GET_DIRTY_LOG of every slot: the guest-physical pages written since the last call, ascending."""
    pages = []
    for region in memory.regions:
        bits = int.from_bytes(memory.vm.get_dirty_log(region.slot, region.size), "little")
        while bits:
            low = bits & -bits
            pages.append(region.gpa + (low.bit_length() - 1) * PAGE_SIZE)
            bits ^= low
    return pages
