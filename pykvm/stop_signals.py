"""The signals that end a run (Ctrl-C, kill, a closed terminal), and which thread takes them.

Python runs signal handlers on the main thread, between bytecodes.  A
vCPU thread is mostly inside KVM_RUN, where only a signal *to that thread*
makes it return; so the thread running a guest blocks these signals
outside KVM_RUN and has KVM unblock them inside it (KVM_SET_SIGNAL_MASK,
``pykvm.platform.vcpu_loop``): one that comes just before KVM_RUN stays
pending and makes KVM_RUN return at once, instead of waiting for the
guest's next exit.  pykvm's helper threads block them for good
(:func:`block_stop_signals`): a process-directed signal goes to some thread
that does not block it, and a helper taking Ctrl-C would leave the vCPU
thread in KVM_RUN.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def block_stop_signals() -> None:
    """Call first in pykvm's own threads (watchdog, I/O, terminal, backends): the stop signals are not theirs."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
