"""Notice edits of the template and locale trees, so running workers pick them up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path


class TreeWatch:
    """Tells whether anything under some directories changed since the last look.

    A look lists the files with their sizes and modification times (a template tree of
    a hundred files costs well under a millisecond) and happens at most every
    ``interval_s``, so asking before every batch is cheap. A file added, removed,
    rewritten or renamed over (how editors and ``git checkout`` save) all count.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.roots = list(roots)
        self.interval_s = interval_s
        self._clock = clock
        self._next = clock() + interval_s
        self._seen = self._look()

    def _look(self) -> int:
        entries = []
        for root in self.roots:
            for folder, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(folder, name)
                    try:
                        st = os.stat(path)
                    except OSError:  # removed while we looked: the next look sees it gone
                        continue
                    entries.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        return hash(tuple(sorted(entries)))

    def changed(self) -> bool:
        """True once after each change (looked for at most every ``interval_s``)."""
        now = self._clock()
        if now < self._next:
            return False
        self._next = now + self.interval_s
        seen = self._look()
        if seen == self._seen:
            return False
        self._seen = seen
        return True
