"""JSONL artifacts: strict reading with located errors, atomic writing and appending.

Every artifact is JSON Lines. A record is either fully written or absent:
``write_jsonl`` replaces the file atomically, and ``append_jsonl`` writes whole
lines followed by fsync. A final line without its newline can only be the tail
of a write that was killed; ``read_jsonl(..., partial_tail_ok=True)`` drops it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mapd.errors import MapdError


def read_jsonl_lines(path: str | Path, *, partial_tail_ok: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a bad line raises MapdError
    naming the file and line. ``partial_tail_ok`` drops a last line without its newline (a killed write)."""
    path = Path(path)
    if not path.is_file():
        raise MapdError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MapdError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = text.split("\n")
    truncated = lines[-1] != ""  # text that does not end in a newline
    if truncated and partial_tail_ok:
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MapdError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise MapdError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def read_jsonl(path: str | Path, *, partial_tail_ok: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSONL file (see :func:`read_jsonl_lines`)."""
    return [record for _, record in read_jsonl_lines(path, partial_tail_ok=partial_tail_ok)]


def read_json(path: str | Path, expected: type = dict) -> Any:
    """Read one JSON document of the ``expected`` type (dict or list); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MapdError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MapdError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, expected):
        raise MapdError(f"{path}: expected a JSON {'object' if expected is dict else 'list'}, got {type(data).__name__}")
    return data


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write all records to ``path`` atomically: readers see the old file or the new one."""
    return write_text_atomic(path, "".join(_dumps(record) + "\n" for record in records))


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append whole records to ``path`` and fsync, so a kill leaves at most one partial tail."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(_dumps(record) + "\n" for record in records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: str | Path, data: Any) -> Path:
    """Write one JSON document atomically, pretty-printed."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` while writing into ``folder`` (created if needed); a second mapd
    command on the same folder gets a MapdError at once instead of interleaving writes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise MapdError(f"{folder}: another mapd command is writing this folder; wait for it or choose another one") from None
    try:
        yield folder
    finally:
        lock.release()
