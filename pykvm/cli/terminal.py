"""The process's terminal as a guest's console: raw mode for the run, restored on every way out.

As QEMU's stdio character device sets it (chardev/char-stdio.c): no echo,
no line editing, no input translation, output post-processing kept (a
guest's ``\\n`` still returns the carriage); with ``signals`` Ctrl-C stays
a signal (QEMU's ``-serial stdio``), without them it is a byte for the
guest (``mon:stdio``, where Ctrl-a x quits instead).

:class:`Terminal` saves the terminal's settings before changing them and
puts them back in :meth:`restore`, which the command calls in a ``finally``
and which also runs at interpreter exit and on SIGTERM/SIGHUP, so a crash
of the guest, a host error, Ctrl-C or a kill leave the user's shell as it
was.  When stdin is not a terminal (a pipe, a file) nothing is changed.

The reader thread hands every chunk of input to a callable and calls
``on_eof`` at end of input: on a pipe that ends the input stream the guest
sees (its UART hangs up), not the run.
"""

from __future__ import annotations

import atexit
import os
import select
import threading
from collections.abc import Callable

from pykvm.stop_signals import block_stop_signals

_READ_SIZE = 4096


class Terminal:
    """stdin and stdout, as the guest's (and maybe the monitor's) console."""

    def __init__(self, *, signals: bool, stdin: int = 0, stdout: int = 1) -> None:
        self.stdin, self.stdout = stdin, stdout
        self.signals = signals
        self.is_tty = os.isatty(stdin)
        self._saved = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._closed = False
        self.eof = threading.Event()

    # -- the terminal's mode ------------------------------------------------------
    def enter_raw(self) -> None:
        """Raw mode as QEMU's stdio sets it (see the module docstring); nothing for a pipe."""
        if not self.is_tty or self._saved is not None:
            return
        import termios

        self._saved = termios.tcgetattr(self.stdin)
        mode = termios.tcgetattr(self.stdin)
        iflag, oflag, lflag = 0, 1, 3  # termios attribute list indices
        mode[iflag] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                         | termios.IGNCR | termios.ICRNL | termios.IXON)
        mode[oflag] |= termios.OPOST
        mode[lflag] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN)
        if not self.signals:
            mode[lflag] &= ~termios.ISIG
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.stdin, termios.TCSANOW, mode)
        atexit.register(self.restore)

    def restore(self) -> None:
        """Put the terminal back as it was (safe twice, from a signal handler too)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            import termios

            try:
                termios.tcsetattr(self.stdin, termios.TCSADRAIN, saved)
            except OSError:
                pass  # the terminal is gone (a hang-up): nothing to restore

    # -- output -----------------------------------------------------------------------
    def write(self, data: bytes | str) -> None:
        """Write to stdout at once (unbuffered: the guest's bytes, prompts, answers)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "replace")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.stdout, view):]
            except InterruptedError:
                continue
            except BlockingIOError:
                select.select([], [self.stdout], [])

    # -- input ------------------------------------------------------------------------
    def start_reader(self, handle: Callable[[bytes], None], on_eof: Callable[[], None] | None = None) -> None:
        """Read stdin on a thread; ``handle(data)`` for each chunk, ``on_eof()`` at the end."""

        def read() -> None:
            block_stop_signals()  # Ctrl-C is for the thread running the guest (or the main thread)
            while not self._stopping:
                ready, _, _ = select.select([self.stdin, self._wake_r], [], [])
                if self._wake_r in ready or self._stopping:
                    return
                try:
                    data = os.read(self.stdin, _READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.eof.set()
                    if on_eof is not None:
                        on_eof()
                    return
                handle(data)

        self._thread = threading.Thread(target=read, name="pykvm-terminal", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the reader, restore the terminal, close the wake-up pipe.  Safe twice."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        os.write(self._wake_w, b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.restore()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
