"""Seeing inside a running guest: the tracer, the monitor, address translation, dumps and reports.

Above the platform (``pykvm.platform``), which never imports this package.
Nothing is imported here, so a run that does not look inside loads none of it:

* ``tracer``        single-step, breakpoints, exit tracing (``Tracer``);
* ``trace_format``  printing steps, exits and stops;
* ``debug_support`` what KVM_SET_GUEST_DEBUG does on this host, measured;
* ``monitor``       QEMU's monitor commands (``Monitor``); ``console_mux``: one terminal for console and monitor;
* ``registers``     ``info registers``'s dump;
* ``translate``     GVA -> GPA -> HVA -> HPA chains, ``info mem``'s mappings;
* ``split``         the guest / kernel / user split of a run, printed;
* ``check``         ``pykvm check``: can this host run guests, and how.
"""
