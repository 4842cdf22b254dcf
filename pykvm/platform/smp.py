"""Running every vCPU of a machine: the boot CPU on the caller's thread, each application processor on its own.

A multiprocessor guest is N vCPUs running at once, one host thread each
(KVM_RUN blocks its thread while the vCPU runs).  The boot processor (vCPU
0) runs on the thread that called ``Machine.run``, so Ctrl-C and the
monitor see it as before; vCPU *i* runs on ``pykvm-vcpu<i>``.  With the
in-kernel irqchip the application processors start in KVM's
wait-for-SIPI state (KVM_MP_STATE_UNINITIALIZED): their KVM_RUN sleeps in
the kernel until the guest's INIT-SIPI-SIPI through the LAPIC wakes them.

**One stop stops all.**  Whichever vCPU ends first (debug-exit, a triple
fault, a timeout, Ctrl-C, a stop request) is the run's stop; the others are
then asked to stop with :data:`SIBLING` and every thread is joined before
:func:`run_vcpus` returns.  A request that arrives after a vCPU has already
stopped for its own reason is forgotten then, so the next run starts clean.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from pykvm.platform.vcpu_loop import VcpuLoop, VcpuStop

__all__ = ["SIBLING", "run_vcpus"]

#: The reason a vCPU stops when another one ended the run.
SIBLING = "sibling"


def run_vcpus(loops: Sequence[VcpuLoop], run_one: Callable[[int], VcpuStop]) -> tuple[int, VcpuStop]:
    """Run ``run_one(i)`` for every vCPU, 0 on this thread, the others on their own; ``(index, stop)`` of the first.

    ``run_one(i)`` runs vCPU *i*'s loop and returns its stop (it handles
    Ctrl-C itself); a host error in a thread becomes that vCPU's stop
    (``error``), so the other vCPUs are stopped and joined either way.
    """
    lock = threading.Lock()
    first: list[tuple[int, VcpuStop]] = []

    def ended(index: int, stop: VcpuStop) -> None:
        with lock:
            if stop.reason != SIBLING and not first:
                first.append((index, stop))
            elif stop.reason == SIBLING and not first:
                return  # asked by a run that is itself ending: the real stop comes from elsewhere
        for i, loop in enumerate(loops):
            if i != index:
                loop.request_stop(SIBLING)

    def thread_main(index: int) -> None:
        try:
            stop = run_one(index)
        except BaseException as exc:  # a host error: report it as this vCPU's stop, never leave the others running
            stop = VcpuStop("error", None, f"vCPU {index}: {type(exc).__name__}: {exc}")
        ended(index, stop)

    threads = [threading.Thread(target=thread_main, args=(i,), name=f"pykvm-vcpu{i}", daemon=True)
               for i in range(1, len(loops))]
    for thread in threads:
        thread.start()
    try:
        stop0 = run_one(0)
        ended(0, stop0)
    finally:
        for loop in loops[1:]:
            loop.request_stop(SIBLING)  # (again, if vCPU 0 raised: the threads must end)
        for thread in threads:
            thread.join()
        for loop in loops:
            loop.cancel_stop()  # a request that came after its vCPU had stopped: not for the next run
    return first[0] if first else (0, stop0)
