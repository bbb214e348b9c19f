"""Rate-limited warnings: a failure that repeats on every call is logged once a minute, with a count.

A store that stays full, or a Redis server that stays down, would otherwise log one warning per scoring
call and bury everything else in the log.
"""

from __future__ import annotations

import logging
import threading
import time


class RateLimitedWarning:
    """Log a warning of one kind at most once every ``interval`` seconds.

    The first occurrence is logged at once; later ones within the interval are counted, and the next
    message logged says how many were suppressed.

    Args:
        logger: where to log.
        interval: seconds between two messages of the same kind.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` unless a ``kind`` warning was logged less than ``interval`` seconds ago.

        Returns:
            Whether it was logged.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d similar warnings in the last %.0fs not shown)"
            args = (*args, suppressed, self.interval)
        self.logger.warning(message, *args)
        return True

    def reset(self, kind: str) -> None:
        """Forget ``kind``: its next occurrence is logged at once (e.g. after the failure has cleared)."""
        with self._lock:
            self._last.pop(kind, None)
            self._suppressed.pop(kind, None)
