"""What makes a machine: buses, the per-vCPU run loop (binding csrc/), the I/O
thread, the watchdog, the PC layout and its devices, virtio wiring, Machine.

Nothing is imported here, so ``pykvm.platform.layout`` (pure data) can be
read by the layers beneath without pulling in the rest.
"""
