"""An ATA disk on the PC's primary IDE channel: the fully emulated disk, wired into a machine.

:func:`attach_ide_disk` puts :class:`pykvm.devices.ata.AtaChannel` on a
machine at QEMU's ``-drive if=ide,index=0`` place (``pykvm.platform.layout``):
the command block at ports 0x1f0-0x1f7, the control block at 0x3f6, the
interrupt on ISA IRQ 14 (KVM_IRQ_LINE; without an irqchip the line is not
wired and a driver polls, as ``guests/ata.c`` does).  The image is a
``pykvm.block.BlockImage`` the caller owns and closes after the machine.

Every data-port access is an exit that reaches Python: the C loop's rows
answer constants and count or buffer writes, and a data port streams a
sector buffer, so it has none (``docs/architecture.md``, "A device owns its
fast path").  A driver using ``rep insw``/``rep outsw`` (Linux's
ata_sff_data_xfer) costs one exit per sector, KVM batching the string
I/O up to a page; one using ``inw``/``outw`` costs one exit per 2 bytes.
"""

from __future__ import annotations

from pykvm.devices.ata import AtaChannel
from pykvm.platform import layout

__all__ = ["attach_ide_disk"]


def attach_ide_disk(machine, image, *, serial: str = "PYKVM0001", model: str = "PYKVM HARDDISK",
                    firmware: str = "1.0") -> AtaChannel:
    """Put an ATA disk on ``image`` on ``machine``'s primary IDE channel (device 0); return the channel."""
    channel = AtaChannel(image, machine.irq_line(layout.IDE_PRIMARY_IRQ), serial=serial, model=model,
                         firmware=firmware)
    machine.add_device(channel, port=layout.IDE_PRIMARY_PORT, length=AtaChannel.length, name="ide0")
    try:
        machine.add_device(channel.control, port=layout.IDE_PRIMARY_CONTROL_PORT, length=1, name="ide0-control")
    except BaseException:
        machine.remove_device(channel)
        raise
    return channel
