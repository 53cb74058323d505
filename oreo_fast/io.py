"""Safe JSONL and JSON files.

Reading: every problem is reported as a :class:`~oreo_fast.errors.DataError` that names the file, the 1-based
line and, where it applies, the field, so a bad record in a 100k-line file is found at once.
Writing: everything goes to a temporary file in the destination folder and is moved into
place with ``os.replace`` only when complete, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from oreo_fast.errors import DataError


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; every record must be an object.

    Any content, arbitrary bytes included, either parses or raises a :class:`DataError`: bad
    UTF-8, malformed or too deeply nested JSON, integers too long to convert, lone surrogates.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror})", path) from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not valid UTF-8 (byte {e.start + 1})", path, lineno) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path,
                                lineno) from None
            except (ValueError, RecursionError) as e:  # e.g. a 5000-digit integer, [[[[...
                reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
                raise DataError(f"malformed JSON ({reason})", path, lineno) from None
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {type(record).__name__}", path,
                                lineno)
            yield lineno, record


def require(record: dict, field: str, types: type | tuple[type, ...], path, lineno: int,
            allow_empty: bool = False) -> Any:
    """Return ``record[field]`` after checking that it exists, has a right type and (for strings)
    is not empty; raise a :class:`DataError` pointing at the line otherwise."""
    if field not in record:
        raise DataError("missing", path, lineno, field)
    value = record[field]
    # bool is an int subclass: a reward of `true` is accepted only where bool is asked for
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise DataError(f"expected {names}, got {type(value).__name__}", path, lineno, field)
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise DataError("empty", path, lineno, field)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError("not valid Unicode (a lone surrogate escape)", path, lineno,
                            field) from None
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def process_umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by
    setting it, which for an instant leaves the process (all threads) with a umask of 0."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it is
    deleted and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            # mkstemp makes the file 0600 whatever the umask; the output gets what open() gives
            os.fchmod(f.fileno(), 0o666 & ~process_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` atomically, one compact JSON object per line; return how many."""
    n = 0
    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (new, renamed or removed names) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (and root itself), deepest first."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to ``path``; on success its files and folders are
    fsynced and it replaces ``path`` by a rename (an existing folder there is removed only
    then), on error it is deleted. A crash at any point leaves either the old folder or the
    new one complete, never a mix; left-over temporary folders start with a dot."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        # mkdtemp makes the folder 0700 whatever the umask; the output gets what mkdir() gives
        os.chmod(tmp, 0o777 & ~process_umask())
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
