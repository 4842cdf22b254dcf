"""pykvm's loggers, with :mod:`logging` imported when the first line is logged.

pykvm logs through :mod:`logging`, as a library should: the application
decides what reaches the terminal (``pykvm run`` shows warnings, tagged,
when stderr is watched).  Importing :mod:`logging` costs a few milliseconds
and most runs never log a line, so each module holds a :class:`Logger`
(``log = get_logger(__name__)``) that finds its :class:`logging.Logger` at
its first use.  That first use also gives the ``pykvm`` logger a
:class:`logging.NullHandler`: without a handler of its own, Python's
last-resort handler would print pykvm's warnings to stderr.
"""

from __future__ import annotations

# logging's level numbers (logging.DEBUG ... logging.ERROR), so that callers need not import it
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_ready = False


def logging_logger(name: str):
    """``logging.getLogger(name)``, importing logging (and adding pykvm's NullHandler) the first time."""
    global _ready
    import logging

    if not _ready:
        logging.getLogger("pykvm").addHandler(logging.NullHandler())
        _ready = True
    return logging.getLogger(name)


class Logger:
    """A named logger that becomes ``logging.getLogger(name)`` when first used (any Logger method)."""

    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = None

    def resolve(self):
        """The :class:`logging.Logger` itself."""
        if self._logger is None:
            self._logger = logging_logger(self.name)
        return self._logger

    def __getattr__(self, attr: str):  # debug, info, warning, error, exception, isEnabledFor, ...
        return getattr(self.resolve(), attr)


def get_logger(name: str) -> Logger:
    """The logger of module ``name`` (``log = get_logger(__name__)``), resolved at its first line."""
    return Logger(name)
