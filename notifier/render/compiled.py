"""Compiled templates, shared by every environment of a process built alike, and kept on disk
for the next process to start.

Compiling the default templates was a quarter of a cold worker's start-up (about 0.15 s of
0.6 on the dev machine: the start-up check renders every milestone). A process that finds
them compiled by one before it loads the code instead (a few milliseconds).

On disk (``keep_in``): one file per template source and environment kind, in a folder only
this user can write, on a path no one else can swap (code is loaded from it: a folder others
can write to, or one under a folder others can write to without the sticky bit, is refused),
under a subfolder named by what the code depends on besides the source (the Python, Jinja2
and notifier versions and every file of this package, which sets up the environments and
generates their code), so an upgrade never loads code an older version compiled. Each file
holds its source's checksum, and the digest of its code, checked before the code is loaded:
a damaged file is compiled again and replaced, never loaded. Anything that fails on disk
leaves the templates compiled in memory, as without it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import os
import re
import shutil
import stat
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

import notifier

log = logging.getLogger("notifier.render")

#: what starts every file: the format, then Python's bytecode magic (``marshal`` data of one
#: Python version does not load in another)
HEADER = b"notifier-compiled-template/1\n" + importlib.util.MAGIC_NUMBER + b"\n"
#: a folder of an older version (another subfolder) untouched this long is removed
STALE_S = 7 * 86_400
#: the most files a version's folder keeps (the oldest go first): edited templates leave
#: the files of their earlier sources behind
MAX_FILES = 4096
#: how a version's folder is named (``fingerprint``): the only folders ever removed
_VERSION_FOLDER = re.compile(r"[0-9a-f]{16}")
#: what a version's folder holds: only such a folder is removed
_OURS = re.compile(r"[0-9a-f]{32}\.code|\.tmp-.*")


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
    """What compiled code depends on besides a template's source: the Python, Jinja2 and
    notifier versions, and every module of this package (the environments, their sandbox,
    limits and code generators)."""
    digest = hashlib.sha256(HEADER + f"{jinja2.__version__}|{notifier.__version__}".encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes() + b"\0")
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
        #: False once the folder refused a file: still read, no longer written
        self.writable = True

    # -- where ---------------------------------------------------------------------------
    def keep_in(self, base: Path | None) -> str | None:
        """Keep compiled templates on disk under ``base`` from now on (None: in memory only).
        Returns why not, when the folder cannot be used (then in memory only)."""
        with self._lock:
            self.folder, self.writable = None, True
        if base is None:
            return None
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            base = base.resolve()  # what is checked is what is used: no link to follow later
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
            _remove_oldest(folder, MAX_FILES)
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
            code = _read(_path(folder, bucket.key, bucket.checksum), bucket.checksum)
            if code is not None:
                bucket.code = code
                self._remember(bucket.key, bucket.checksum, code)

    def dump_bytecode(self, bucket: Bucket) -> None:
        if bucket.code is None:
            return
        self._remember(bucket.key, bucket.checksum, bucket.code)
        folder = self.folder
        if folder is not None and self.writable and not self._write(folder, bucket):
            with self._lock:
                self.writable = False  # one warning, not one per template; still read

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
            code = marshal.dumps(bucket.code)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_head(bucket.checksum, code) + code)
                os.replace(tmp, _path(folder, bucket.key, bucket.checksum))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning(
                "compiled templates are no longer written to %s (%s): the ones there are "
                "still read, the others compiled in memory as this process needs them",
                folder,
                exc.strerror or exc,
            )
            return False
        return True


def _path(folder: Path, key: str, checksum: str) -> Path:
    """A template's file: one per environment kind, template and source (two merchants'
    published templates of one name, which have no file name, never take turns in one)."""
    return folder / (hashlib.sha256(f"{key}\0{checksum}".encode()).hexdigest()[:32] + ".code")


def _head(checksum: str, code: bytes) -> bytes:
    """What a file holds before its code: the format, the source's checksum, the code's
    digest."""
    return HEADER + checksum.encode() + b"\n" + hashlib.sha256(code).hexdigest().encode() + b"\n"


def _read(path: Path, checksum: str) -> CodeType | None:
    """A file's code, when it holds the whole code of this source (None: missing, another
    source's, or damaged: the template is compiled again and the file replaced). The code's
    digest is checked before it is loaded: ``marshal`` must never read damaged data (a
    flipped byte can crash the interpreter)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    start = HEADER + checksum.encode() + b"\n"
    digest_end = len(start) + 65  # 64 hex digits and a newline
    if not data.startswith(start) or len(data) < digest_end:
        return None
    code = data[digest_end:]
    if data[len(start) : digest_end] != hashlib.sha256(code).hexdigest().encode() + b"\n":
        return None
    try:
        loaded = marshal.loads(code)
    except Exception:  # any failure to load is a miss: compile it again
        return None
    return loaded if isinstance(loaded, CodeType) else None


def _unsafe(folder: Path) -> str | None:
    """Why code must not be loaded from ``folder`` (a path without links), or None: it must
    be a folder of this user's that no one else can write to, and no one else may be able to
    put another folder in its place: every folder above it is this user's or root's, and one
    others can write to has the sticky bit (as /tmp: no one removes or renames what is not
    theirs)."""
    st = folder.stat()
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder}: not a folder"
    uid = os.getuid()
    if st.st_uid != uid:
        return f"{folder}: owned by another user"
    if st.st_mode & 0o022:
        return f"{folder}: others can write to it (chmod go-w, or another folder)"
    for above in folder.parents:
        st = above.stat()
        if st.st_uid not in (uid, 0):
            return f"{above}: a folder above it is owned by another user"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"{above}: others can write to a folder above it"
    return None


def _remove_stale(base: Path, keep: str) -> None:
    """Remove the folders of other versions that no process used for ``STALE_S``: only
    folders named and filled as ``keep_in`` makes them, whatever else ``base`` holds."""
    now = time.time()
    for other in base.iterdir():
        if other.name == keep or not _VERSION_FOLDER.fullmatch(other.name):
            continue
        try:
            if other.is_symlink() or not other.is_dir():
                continue
            if now - other.stat().st_mtime <= STALE_S:
                continue
            if all(_OURS.fullmatch(f.name) and f.is_file() for f in other.iterdir()):
                shutil.rmtree(other, ignore_errors=True)
        except OSError:
            continue


def _remove_oldest(folder: Path, keep: int) -> None:
    """Keep at most ``keep`` files in a version's folder: the most recently written (never
    another process's file being written)."""
    files = [f for f in folder.iterdir() if f.suffix == ".code" and _OURS.fullmatch(f.name)]
    if len(files) <= keep:
        return
    for old in sorted(files, key=lambda f: f.stat().st_mtime)[: len(files) - keep]:
        old.unlink(missing_ok=True)


#: the process's compiled templates (every ``TemplateStore``'s environments use it)
COMPILED = Compiled()
