"""Rate-limited logging for lines a guest can trigger.

A guest controls how often it touches an unmapped port or breaks a virtqueue
rule; if each such access logged a line, a hostile guest could fill the
host's disk.  :class:`GuestLog` logs through :mod:`logging` as a library
should, but

* each distinct ``key`` (an address, an error text) is logged at its level
  (WARNING, INFO) only the first time; repeats go to DEBUG;
* at most ``burst`` such lines leave per ``interval`` seconds, whatever
  their keys; the next line that may leave says how many were held back;
* at most ``max_keys`` keys are remembered: after that every line is DEBUG,
  so memory stays bounded too.

The clock is injectable so tests need no sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable

from pykvm.log import DEBUG, INFO, WARNING, Logger


class GuestLog:
    """A logger wrapper whose WARNING lines a guest cannot multiply without bound."""

    def __init__(self, logger, *, burst: int = 20, interval: float = 1.0,
                 max_keys: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        # a name, a pykvm.log.Logger or a logging.Logger; logging is imported at the first line
        self.logger = Logger(logger) if isinstance(logger, str) else logger
        self.burst = burst
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._seen: set[Hashable] = set()
        self._window_start = clock()
        self._in_window = 0
        self._held = 0
        self._lock = threading.Lock()
        #: Lines demoted to DEBUG by the rate limit (not by repetition).
        self.suppressed = 0

    def warning(self, key: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args`` at WARNING if ``key`` is new and the rate allows; True if it was."""
        return self.log(WARNING, key, message, *args)

    def info(self, key: Hashable, message: str, *args: object) -> bool:
        """The same at INFO."""
        return self.log(INFO, key, message, *args)

    def log(self, level: int, key: Hashable, message: str, *args: object) -> bool:
        """Log at ``level`` once per ``key`` and within the rate, else at DEBUG; True if it left at ``level``."""
        if not self.logger.isEnabledFor(level):
            return False  # nobody listens: keep no state for it
        with self._lock:
            allowed = self._allowed(key)
            held = 0
            if allowed:
                held, self._held = self._held, 0
        if allowed:
            if held:
                message += f" ({held} similar line{'s' if held != 1 else ''} held back)"
            self.logger.log(level, message, *args)
            return True
        if self.logger.isEnabledFor(DEBUG):
            self.logger.debug(message, *args)
        return False

    def _allowed(self, key: Hashable) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= self.max_keys:
            self.suppressed += 1
            return False
        now = self._clock()
        if now - self._window_start >= self.interval:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self._held += 1
            self.suppressed += 1
            return False  # not remembered: it may still be logged in a later window
        self._in_window += 1
        self._seen.add(key)
        return True
