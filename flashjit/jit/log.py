"""The "flashjit" logger, visible by default.

Compiles are rare and slow, so their two lines (start, seconds taken) should be seen without any
logging setup. A handler on the "flashjit" logger prints INFO and above to stderr as long as the
application has configured no logging of its own (no handler on the root logger, none of its own
on "flashjit"); once it has, records go to the application's handlers only, so nothing prints
twice.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("flashjit")


class _DefaultHandler(logging.StreamHandler):
    """stderr handler that steps aside once the application has handlers of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers or len(logger.handlers) > 1:
            return
        self.setStream(sys.stderr)  # the current stderr (tests and tools may swap it)
        super().emit(record)


if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
    _handler = _DefaultHandler()
    _handler.setFormatter(logging.Formatter("[flashjit] %(message)s"))
    logger.addHandler(_handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
