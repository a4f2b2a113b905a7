"""Atomic file writes: write to a temporary file beside the target, fsync, rename into place.

A reader (or a resumed run) therefore sees either the old file or the whole new one, never a
half-written one, whenever the writer is killed. A writer killed with ``kill -9`` leaves its
temporary behind (``.NAME.PID-HOST.XXXXXXXX.tmp``, HOST a hash of the machine's name); :func:`remove_stale_temporaries`
deletes those whose process is gone, so the next run cleans up after it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_TEMP = re.compile(r"^\..+?\.(?:(\d+)(?:-([0-9a-f]{8}))?\.)?[A-Za-z0-9_]{8}\.tmp(?:-journal|-wal|-shm)?$")
LEGACY_TEMP_AGE = 600.0
"""Seconds after which a temporary without a writer's pid in its name, or one of a writer on another machine, counts
as abandoned."""
HOST = hashlib.blake2b(socket.gethostname().encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()
"""This machine in the names of the temporaries it writes: in a run directory that several machines share (``n2g
run`` on each), a pid says nothing of a writer on another machine, whose temporaries are left to it."""


def is_temporary(name: str) -> bool:
    """Whether a file name is one n2g writes under before renaming it into place (``.NAME.PID-HOST.XXXXXXXX.tmp``,
    or a sqlite sidecar of one)."""
    return _TEMP.match(name) is not None


def writer_tag() -> str:
    """``PID-HOST``: this process on this machine, in the name of what it writes under a temporary name."""
    return f"{os.getpid()}-{HOST}"


def writer_gone(tag: str, path: str | os.PathLike) -> bool:
    """Whether the writer a temporary's ``tag`` names (``PID-HOST``, or ``PID`` in older names) is gone: a process of
    this machine that no longer runs; another machine's writer (whose pid means nothing here, in a folder machines
    share) once ``path`` is older than :data:`LEGACY_TEMP_AGE`. False for a tag that names no writer."""
    m = re.fullmatch(r"(\d+)(?:-([0-9a-f]{8}))?", tag)
    if m is None:
        return False
    if m.group(2) not in (None, HOST):
        try:
            return time.time() - os.lstat(path).st_mtime > LEGACY_TEMP_AGE
        except OSError:
            return False
    return int(m.group(1)) != os.getpid() and not alive(int(m.group(1)))


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{writer_tag()}."


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
"""Mode of every file n2g writes: what ``open()`` would give under the user's umask (read once, at import).

``mkstemp`` makes its temporaries 0600 whatever the umask, which would leave every report, page and
table of a run readable by its writer alone; a shared run directory or a web server needs the
usual mode."""


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The file ends up with the mode ``open()`` would give it under the user's umask (:data:`FILE_MODE`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, sync: bool = True) -> Path:
    """``data`` into ``path``, whole or not at all; ``sync=False`` skips the fsync (a file that may be lost
    in a crash, such as a claim of a process that a crash ends anyway)."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def create_json(path: str | os.PathLike, data) -> bool:
    """Write ``data`` to ``path`` only if no file is there, whole or not at all (the file is written under
    a temporary name and linked into place, which fails if another process made it first); False then."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, json.dumps(data, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """``value`` safe for a CSV cell a spreadsheet opens: text that starts like a formula (``=``,
    ``+``, ``-``, ``@``, tab, carriage return) gets a leading ``'`` so it is shown, never evaluated;
    numbers and None pass unchanged (None as an empty cell)."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, ensure_ascii=False, allow_nan=False))


MAX_READ_BYTES = 64 << 20
"""Largest run file (a result, graph or run.json) n2g reads; a run folder may not be the user's own. The
largest n2g writes are a few MB; parsed JSON takes about 25 times its bytes in memory."""


class UnreadableFile(OSError):
    """A run file that is not a regular file, or is larger than :data:`MAX_READ_BYTES`."""


def read_bytes(path: str | os.PathLike, limit: int = MAX_READ_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    A pipe, device or socket where a run file belongs is refused, not read: opening one would
    block (a FIFO) or never end (``/dev/zero``). So is a file larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):  # opens fine on Linux, reading it fails with EISDIR
            raise UnreadableFile(f"{path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(f"{path} is not a regular file (a pipe, device or socket)")
        if st.st_size > limit:
            raise UnreadableFile(f"{path} is {st.st_size:,} bytes, more than the {limit:,} n2g reads")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while being read
            raise UnreadableFile(f"{path} is more than the {limit:,} bytes n2g reads")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, limit: int = MAX_READ_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8 (UnicodeDecodeError, a ValueError, when it is not)."""
    return read_bytes(path, limit).decode("utf-8")


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_json(data: bytes | str):
    """``json.loads`` of UTF-8 (n2g writes no other encoding), refusing text that holds a lone surrogate
    (``"\\ud800"``: valid JSON, but no UTF-8 page, SQLite row or file name can hold it) with a ValueError.
    n2g writes no such escapes, so the check costs a second pass only where one appears."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data  # not JSON's UTF-16/32 guess: the
    d = json.loads(text)  # check below reads the escapes as written
    if _ESCAPED_SURROGATE.search(text):
        try:
            json.dumps(d, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("it holds text with a lone surrogate (\\ud800-\\udfff), which is not Unicode text") from None
    return d


MAX_JSON_DEPTH = 32
"""Deepest nesting of lists and objects :func:`nested_deeper` lets through (n2g's files nest a handful)."""


def nested_deeper(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON ``value`` nests lists and objects more than ``limit`` deep, checked without recursion:
    JSON nested hundreds deep parses, and then a recursive walk of it (``str``, ``json.dumps``) runs out of stack."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        for child in v.values() if isinstance(v, dict) else v if isinstance(v, list) else ():
            if isinstance(child, (list, dict)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def read_json(path: str | os.PathLike, limit: int = MAX_READ_BYTES):
    """A run file's JSON (:func:`read_bytes`, then :func:`loads_json`)."""
    return loads_json(read_bytes(path, limit))


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host); True where we may not ask."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or a pid we cannot ask about: leave its file alone
    return True


def remove_dead_copies(target: str | os.PathLike) -> None:
    """Delete the half-written folders ``.NAME.PID-HOST.XXXX`` beside ``target`` (``NAME`` its name) left by
    writers that were killed (:func:`writer_gone`); a copy whose writer still runs, or a name without a pid, is left
    alone."""
    import shutil

    target = Path(target)
    for old in target.parent.glob(f".{target.name}.*"):
        tag = old.name[len(target.name) + 2:].split(".", 1)[0]
        if old.is_dir() and not old.is_symlink() and writer_gone(tag, old):
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete the temporaries of killed writers under ``root``; returns how many were removed.

    A temporary is stale when the process named in it no longer exists on this machine (or, for a name
    without a pid or with another machine's :data:`HOST`, when it is older than ``LEGACY_TEMP_AGE``); a
    live writer's temporaries are kept, so a concurrent run on the same directory, from this machine or
    another that shares it, is never disturbed. Errors (a read-only run) are ignored.
    """
    removed = 0
    now = time.time()
    for folder, dirs, files in os.walk(root):
        for name in files:
            m = _TEMP.match(name)
            if not m:
                continue
            path = os.path.join(folder, name)
            try:
                if m.group(1) is not None and m.group(2) in (None, HOST):
                    stale = int(m.group(1)) != os.getpid() and not alive(int(m.group(1)))
                else:
                    stale = now - os.lstat(path).st_mtime > LEGACY_TEMP_AGE
                if stale:
                    os.unlink(path)
                    removed += 1
            except OSError:
                continue
    return removed


def inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether ``path`` (links followed, existing or not) lies inside the directory ``root``; False for a link loop."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):
        return False
