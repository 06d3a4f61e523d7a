"""Notice edits of the template and locale trees, so running workers pick them up."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: (root, name of the root's entry the file is under): what changed, e.g. a merchant's folder
Place = tuple[Path, str]


class TreeWatch:
    """Tells what changed under some directories since the last look.

    A look lists the files with their sizes, modification times and inodes (a template
    tree of a hundred files costs well under a millisecond) and happens at most every
    ``interval_s``, so asking before every batch is cheap. A file added, removed,
    rewritten or renamed over (how editors and ``git checkout`` save) all count. Changes
    are reported by top-level entry of each root, so a merchant's edit can be told from
    an edit of the defaults.
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

    def _look(self) -> dict[Place, int]:
        entries: dict[Place, list[tuple[str, int, int, int]]] = {}
        for root in self.roots:
            for folder, _, files in os.walk(root):
                for name in files:
                    path = os.path.join(folder, name)
                    try:
                        st = os.stat(path)
                    except OSError:  # removed while we looked: the next look sees it gone
                        continue
                    top = Path(path).relative_to(root).parts[0]
                    entries.setdefault((root, top), []).append(
                        (path, st.st_mtime_ns, st.st_size, st.st_ino)
                    )
        return {place: hash(tuple(sorted(files))) for place, files in entries.items()}

    def changed(self) -> set[Place]:
        """What changed since the last look (empty when nothing did, or when it is not
        time to look again)."""
        now = self._clock()
        if now < self._next:
            return set()
        self._next = now + self.interval_s
        seen = self._look()
        changes = {p for p in seen.keys() | self._seen.keys() if seen.get(p) != self._seen.get(p)}
        self._seen = seen
        return changes
