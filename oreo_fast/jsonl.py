"""Safe JSONL and JSON files.

Reading: every problem is reported as a :class:`DataError` that names the file, the 1-based
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


class DataError(ValueError):
    """Bad input data. ``path``, ``line`` (1-based) and ``field`` say where, when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if self.path is not None:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{what}{message}")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; every record must be an object."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", path)
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", path,
                                lineno) from None
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
    if isinstance(value, str) and not allow_empty and not value.strip():
        raise DataError("empty", path, lineno, field)
    return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file next to ``path``; on success it replaces ``path``, on error it is
    deleted and ``path`` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (an existing
    folder there is removed only then), on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
