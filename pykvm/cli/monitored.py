"""A run under the monitor: the guest on the monitor's worker thread, the terminal and sockets served here.

Reached when a monitor is: the terminal shared by console and monitor
(``mon:stdio``, the default: Ctrl-a c switches, Ctrl-a x quits), ``-monitor
stdio``, a ``-monitor`` socket or pty (a line per command, answers back),
``--monitor-script FILE`` (commands from the file, answers on stdout; the
guest starts stopped, as with ``-S``).

The session ends when the guest stops by itself (debug-exit, reset, a
crash: its exit status is the process's), on ``quit`` or Ctrl-a x (status
0), at ``--timeout`` (124), or on SIGTERM (143).
"""

from __future__ import annotations

import sys
import threading
import time

from pykvm import timeline
from pykvm.cli.status import EXIT_OK, exit_status, stderr, stop_line
from pykvm.errors import UsageError

_OWN_PAUSES = ("monitor", "paused")


class SocketMonitor:
    """The monitor on a socket or pty backend: a line in, the answer and a prompt out."""

    def __init__(self, monitor, backend, on_quit) -> None:
        from pykvm.inspect.monitor import PROMPT

        self.monitor, self.backend, self.on_quit = monitor, backend, on_quit
        self.prompt = PROMPT
        self._line = bytearray()
        self._lock = threading.Lock()
        backend.start(self._input)
        backend.write(b"pykvm monitor - type 'help' for more information\n" + PROMPT.encode())

    def _input(self, data: bytes) -> None:
        for byte in data:
            if byte in (0x0A, 0x0D):
                if byte == 0x0D and not self._line:
                    continue
                line = self._line.decode("utf-8", "replace")
                self._line.clear()
                with self._lock:
                    answer = self.monitor.execute(line)
                out = (answer.rstrip("\n") + "\n" if answer else "") + self.prompt
                self.backend.write(out.encode())
                if self.monitor.quit_requested:
                    self.on_quit()
            elif len(self._line) < 4096:
                self._line.append(byte)

    def notify(self, line: str) -> None:
        self.backend.write(f"\n{line}\n{self.prompt}".encode())


def run_monitored(session) -> int:
    from pykvm.inspect.console_mux import ConsoleMux
    from pykvm.inspect.monitor import PROMPT, Monitor
    from pykvm.inspect.trace_format import format_stop

    c, m, terminal = session.config, session.machine, session.terminal
    finished = threading.Event()
    lines = None
    if c.monitor_script is not None:
        try:
            with open(c.monitor_script, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise UsageError(f"--monitor-script {c.monitor_script}: {exc.strerror}") from None
    monitor = Monitor(m)
    monitor.name = c.name

    def stop(reason: str) -> None:  # SIGTERM/SIGHUP: end the session (the guest is paused on the way out)
        session._stop_reason = reason
        finished.set()

    session.on_stop = stop
    notices = []

    def notify(line: str) -> None:
        stop = monitor.last_stop
        if stop is not None and stop.reason in ("breakpoint", "debug", "step"):
            for sink in notices:  # the user set it up: say so, and the session goes on
                sink(line)
            if not input_ended.is_set() or commands_elsewhere:
                return  # (unless no one is left to type cont)
        finished.set()  # the guest ended by itself (debug-exit, reset, a crash): so does the session

    monitor.notify = notify
    input_ended = threading.Event()
    commands_elsewhere = session.monitor_endpoint is not None  # a monitor socket can still say cont

    def end_of_input(to_guest) -> None:
        """The terminal's input ended: the guest's line hangs up; with the guest stopped, nothing can resume it."""
        input_ended.set()
        if to_guest is not None:
            session._end_of_input()
        if not monitor.running and not commands_elsewhere:
            finished.set()

    mux = None
    on_terminal = session.serial.kind == "mux" or c.monitor == "stdio"
    how = "end of input"
    try:
        with monitor:
            if lines is None and not c.freeze:
                # first, as QEMU starts its vCPUs before serving the monitor: a command that comes at once
                # (or an input that ends at once) finds the guest running
                monitor.start()
            if session.monitor_endpoint is not None:
                sock = SocketMonitor(monitor, session.monitor_endpoint.backend, finished.set)
                notices.append(sock.notify)
            if c.input is not None:
                session.feed(c.input)  # typed for the guest: the terminal's input is not read
            elif on_terminal and lines is None:
                to_guest = session.feed if session.serial.kind == "mux" or session.virtio_on_terminal else None
                mux = ConsoleMux(monitor, to_guest, terminal.write,
                                 start_in_monitor=c.monitor == "stdio" or to_guest is None)
                notices.append(lambda line: terminal.write(f"\n{line}\n" + (PROMPT if mux.in_monitor else "")))

                def from_terminal(data: bytes) -> None:
                    mux.feed(data)
                    if mux.quit:
                        finished.set()

                terminal.enter_raw()
                terminal.start_reader(from_terminal, lambda: end_of_input(to_guest))
            if lines is not None:
                out = sys.stdout

                def write(text: str) -> None:
                    out.write(text)
                    out.flush()

                monitor.run_script(lines, write)  # a script starts stopped, as with -S
                how = "end of script"
                if monitor.quit_requested:
                    finished.set()
                elif not monitor.running:
                    finished.set()  # the script left the guest stopped: nothing more will happen
            deadline = None if c.timeout is None else time.monotonic() + c.timeout
            try:
                while not finished.wait(0.05 if deadline is None
                                        else max(0.0, min(0.05, deadline - time.monotonic()))):
                    if deadline is not None and time.monotonic() >= deadline:
                        monitor._pause(reason="paused")
                        session._stop_reason = "timeout"
                        break
                    if lines is not None and not monitor.running:
                        break
            except KeyboardInterrupt:  # SIGINT while the terminal is not ours (a pipe, -monitor socket)
                session._stop_reason = "interrupted"
            if monitor.quit_requested or (mux is not None and mux.quit):
                how = "quit"
            elif session._stop_reason is not None:
                how = session._stop_reason
                monitor._pause(reason="paused")
            else:
                monitor._join()
    finally:
        terminal.restore()
    timeline.mark("ran")
    stop = monitor.last_stop
    result = monitor.tracer.last_result
    if how == "end of input" and not (stop is not None and result is not None and stop.reason == result.ended):
        # the guest did not end by itself: it was stopped (-S, stop, a breakpoint) when input ran out
        state = format_stop(stop) if stop is not None else "not started (-S)"
        stderr(f"pykvm: end of input with the guest stopped, {state}: nothing can continue it")
        return EXIT_OK
    if how in ("quit", "end of script"):
        if sys.stderr.isatty() or c.summary:
            state = format_stop(stop) if stop is not None else "not run"
            stderr(f"pykvm: monitor session ended ({how}); guest: {state}")
        if how == "quit" or stop is None:
            return EXIT_OK
        return exit_status(stop.reason, stop.status) if stop.reason not in ("breakpoint", "step") else EXIT_OK
    if how in ("timeout", "terminated", "interrupted"):
        stderr(stop_line(how, timeout=c.timeout, signo=session.stop_signal))
        return exit_status(how, None)
    if result is not None and stop is not None and stop.reason == result.ended:
        return session.report(result)
    if stop is None:
        return EXIT_OK
    return exit_status(stop.reason, stop.status)
