"""Compiled templates, shared by every environment of a process built alike, and kept on disk
for the next process to start.

Compiling the default templates was a quarter of a cold worker's start-up (about 0.15 s of
0.6 on the dev machine: the start-up check renders every milestone). A process that finds
them compiled by one before it loads the code instead (a few milliseconds).

On disk (``keep_in``): one file per template and environment kind, in a folder only this
user can write (code is loaded from it: a folder others can write to is refused), under a
subfolder named by what the code depends on besides the source (the Python version, Jinja2's
version, the files that set up the environments and their code generator), so an upgrade
never loads code an older version compiled. Each file holds its source's checksum: an
edited template compiles anew and replaces its file. A file that does not read is ignored,
and anything that fails on disk leaves the templates compiled in memory, as without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import CodeType
from typing import Any

import jinja2
from jinja2 import BytecodeCache
from jinja2.bccache import Bucket

log = logging.getLogger("notifier.render")

#: what starts every file: the format, then Python's bytecode magic (``marshal`` data of one
#: Python version does not load in another)
HEADER = b"notifier-compiled-template/1\n" + importlib.util.MAGIC_NUMBER + b"\n"
#: a folder of an older version (another subfolder) untouched this long is removed
STALE_S = 7 * 86_400
#: the modules whose code decides what a template compiles to, besides its source
_CODEGEN = ("environment.py", "sandbox.py", "skeleton.py", "compiled.py")


def default_folder() -> Path | None:
    """The user's cache folder for notifier's compiled templates (XDG's, else ~/.cache);
    None without a home folder."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no entry in the password database
            return None
    return Path(base) / "notifier" / "templates"


def fingerprint() -> str:
    """What compiled code depends on besides a template's source: the Python and Jinja2
    versions and the files that build the environments and generate their code."""
    digest = hashlib.sha256(HEADER + jinja2.__version__.encode())
    here = Path(__file__).parent
    for name in _CODEGEN:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


class Compiled(BytecodeCache):
    """Compiled templates: in memory for every environment of the process built alike (the
    start-up check, the worker's renderer, a merchant's search path and a refresh after an
    edit compile a template's source once, not once each), and on disk once ``keep_in``
    names a folder. Keyed by the environment's kind and limits, the template's name and file,
    and its source's checksum. In memory: code objects, the most recent ``MAX`` (the defaults
    are about 50 with the skeletons' tracing twins; a few MB in all)."""

    MAX = 512

    def __init__(self) -> None:
        self._code: OrderedDict[tuple[str, str], CodeType] = OrderedDict()
        self._lock = threading.Lock()
        #: where compiled templates are kept on disk (None: in memory only)
        self.folder: Path | None = None

    # -- where ---------------------------------------------------------------------------
    def keep_in(self, base: Path | None) -> str | None:
        """Keep compiled templates on disk under ``base`` from now on (None: in memory only).
        Returns why not, when the folder cannot be used (then in memory only)."""
        with self._lock:
            self.folder = None
        if base is None:
            return None
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            refused = _unsafe(base)
            if refused:
                return refused
            folder = base / fingerprint()
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            return f"{base}: {exc.strerror or exc}"
        try:  # a read-only folder (compiled into an image) is still read
            os.utime(folder)  # in use: not stale for another version's clean-up
            _remove_stale(base, keep=folder.name)
        except OSError:
            pass
        with self._lock:
            self.folder = folder
        return None

    # -- jinja2's BytecodeCache ----------------------------------------------------------
    def get_bucket(self, environment: Any, name: str, filename: str | None, source: str) -> Bucket:
        kind = f"{type(environment).__qualname__}/{environment.code_generator_class.__qualname__}"
        key = f"{kind}|{getattr(environment, 'limits', None)!r}|{name}|{filename}"
        bucket = Bucket(environment, key, self.get_source_checksum(source))
        self.load_bytecode(bucket)
        return bucket

    def load_bytecode(self, bucket: Bucket) -> None:
        with self._lock:
            code = self._code.get((bucket.key, bucket.checksum))
            if code is not None:
                self._code.move_to_end((bucket.key, bucket.checksum))
                bucket.code = code
                return
            folder = self.folder
        if folder is not None:
            code = _read(_path(folder, bucket.key), bucket.checksum)
            if code is not None:
                bucket.code = code
                self._remember(bucket.key, bucket.checksum, code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        if bucket.code is None:
            return
        self._remember(bucket.key, bucket.checksum, bucket.code)
        folder = self.folder
        if folder is not None and not self._write(folder, bucket):
            with self._lock:
                self.folder = None  # one warning, not one per template

    def _remember(self, key: str, checksum: str, code: CodeType) -> None:
        with self._lock:
            self._code[(key, checksum)] = code
            while len(self._code) > self.MAX:
                self._code.popitem(last=False)

    def _write(self, folder: Path, bucket: Bucket) -> bool:
        """Write a template's code (a new file renamed over the old: a process reading it
        meanwhile sees the one or the other). False when the disk refused."""
        try:
            folder.mkdir(mode=0o700, exist_ok=True)  # removed meanwhile by a clean-up
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(HEADER + bucket.checksum.encode() + b"\n")
                    marshal.dump(bucket.code, f)
                os.replace(tmp, _path(folder, bucket.key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning(
                "compiled templates are no longer kept in %s (%s); they are compiled in "
                "memory as each process needs them",
                folder,
                exc.strerror or exc,
            )
            return False
        return True


def _path(folder: Path, key: str) -> Path:
    return folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".code")


def _read(path: Path, checksum: str) -> CodeType | None:
    """A file's code, when it holds the code of this source (None: missing, another
    source's, or damaged: the template is compiled again)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    head = HEADER + checksum.encode() + b"\n"
    if not data.startswith(head):
        return None
    try:
        code = marshal.loads(data[len(head) :])
    except (EOFError, ValueError, TypeError):
        return None
    return code if isinstance(code, CodeType) else None


def _unsafe(folder: Path) -> str | None:
    """Why code must not be loaded from ``folder``, or None: it must be a folder of this
    user's that no one else can write to."""
    st = folder.stat()
    if not folder.is_dir():
        return f"{folder}: not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{folder}: owned by another user"
    if st.st_mode & 0o022:
        return f"{folder}: others can write to it (chmod go-w, or another folder)"
    return None


def _remove_stale(base: Path, keep: str) -> None:
    """Remove the folders of other versions that no process used for ``STALE_S``."""
    now = time.time()
    for other in base.iterdir():
        if other.name == keep or not other.is_dir() or other.is_symlink():
            continue
        try:
            stale = now - other.stat().st_mtime > STALE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(other, ignore_errors=True)


#: the process's compiled templates (every ``TemplateStore``'s environments use it)
COMPILED = Compiled()
