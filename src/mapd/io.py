"""JSONL artifacts: strict reading with located errors, atomic writing and appending.

Every artifact is JSON Lines. A record is either fully written or absent:
``write_jsonl`` replaces the file atomically, and ``append_jsonl`` writes whole
lines followed by fsync. A final line without its newline can only be the tail
of a write that was killed; ``read_jsonl(..., partial_tail_ok=True)`` drops it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from mapd.errors import MapdError
from mapd.log import to_file


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped); MapdError naming the file (and the line of
    a byte that is not UTF-8) when it is missing, a folder, unreadable or not UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise MapdError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise MapdError(f"{path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MapdError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise MapdError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"field '{repeated}' appears twice in one object")
    return record


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def lone_surrogate(value: Any, at: str = "") -> str | None:
    """The dotted field path of the first text in ``value`` (keys included) holding a lone UTF-16 surrogate
    (from an escape such as ``\\ud800``: it reads, but no file can store it), else None."""
    stack, seen = [(at, value)], set()
    while stack:
        where, item = stack.pop()
        if isinstance(item, (dict, list)):
            if id(item) in seen:  # a YAML alias: already walked (and no endless walk of a cycle)
                continue
            seen.add(id(item))
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where or "(value)"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                name = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and lone_surrogate(key) is not None:
                    return name
                stack.append((name, child))
        elif isinstance(item, list):
            stack.extend((f"{where}.{index}" if where else str(index), child)
                         for index, child in reversed(list(enumerate(item))))
    return None


def parse_json(text: str, where: str) -> Any:
    """One JSON value, strictly: an error names ``where`` (file or file:line) and what is wrong, also for
    what ``json.loads`` accepts but no later step can use (a key twice in one object, a lone surrogate
    escape) or turns into another exception (nesting deeper than Python recurses, a number of more than
    4300 digits)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:  # a document of several lines: name the line too
        raise MapdError(f"{where}{f':{exc.lineno}' if chr(10) in text else ''}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise MapdError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # a repeated key, or an integer past Python's int-digits limit
        if "appears twice" in str(exc):
            raise MapdError(f"{where}: {exc}") from None
        field = re.search(r'"((?:[^"\\]|\\.)*)"\s*:\s*-?\d{4000,}', text)
        raise MapdError(f"{where}: {f'field {field[1]!r}: ' if field else ''}a number too long to read "
                        f"({str(exc).split(':')[0]})") from None
    if _SURROGATE_ESCAPE.search(text):
        field = lone_surrogate(value)
        if field is not None:
            raise MapdError(f"{where}: field '{field}': a lone surrogate escape (\\ud800-\\udfff) is not text")
    return value


def read_jsonl_lines(path: str | Path, *, partial_tail_ok: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; a bad line raises MapdError
    naming the file and line. ``partial_tail_ok`` drops a last line without its newline (a killed write)."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    truncated = lines[-1] != ""  # text that does not end in a newline
    if truncated and partial_tail_ok:
        lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"{path}:{number}")
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
    data = parse_json(read_text(path), str(path))
    if not isinstance(data, expected):
        raise MapdError(f"{path}: expected a JSON {'object' if expected is dict else 'list'}, got {type(data).__name__}")
    return data


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename; a path that cannot be
    written (a folder in the way, a file where a folder should be, a full disk) is a MapdError naming it."""
    path = Path(path)
    if path.is_dir():
        raise MapdError(f"{path}: is a folder, expected a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise MapdError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise MapdError(f"{path}: cannot write it ({exc.strerror or exc})") from None
        if isinstance(exc, UnicodeEncodeError):
            raise MapdError(f"{path}: cannot write it: a text holds a lone surrogate ({exc.reason})") from None
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


def check_folder(folder: str | Path, outputs: Iterable[str | Path] = ()) -> Path:
    """``folder`` as a folder mapd may write: MapdError when it is a file, another mapd command holds its
    lock, or one of the ``outputs`` it will write is a folder. Creates nothing: a command calls it before
    reading its inputs, and takes :func:`folder_lock` only once they are valid."""
    folder = _not_a_file(folder)
    for output in outputs:
        if Path(output).is_dir():
            raise MapdError(f"{output}: is a folder, expected a file (an output of this command)")
    if (folder / ".lock").is_file():  # only a holder leaves the file; probing it then makes nothing
        probe = FileLock(str(folder / ".lock"))
        try:
            probe.acquire(timeout=0)
        except Timeout:
            raise MapdError(_busy(folder)) from None
        probe.release()
    return folder


def _not_a_file(folder: str | Path) -> Path:
    """``folder``, unless it (or the first existing folder above it) is a file: then a MapdError."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise MapdError(f"{folder}: {'is' if path == folder else f'{path} is'} a file, not a folder")
            break
    return folder


def _busy(folder: Path) -> str:
    return f"{folder}: another mapd command is writing this folder; wait for it or choose another one"


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` while writing into ``folder`` (created if needed); a second mapd
    command on the same folder gets a MapdError at once instead of interleaving writes. What mapd
    logs meanwhile also goes to ``folder/mapd.log``."""
    folder = _not_a_file(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MapdError(f"{folder}: cannot make the folder ({exc.strerror or exc})") from None
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise MapdError(_busy(folder)) from None
    try:
        with to_file(folder):
            yield folder
    finally:
        lock.release()
