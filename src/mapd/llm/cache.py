"""The teacher call cache: one SQLite file (WAL), one row per call, committed as each call ends.

The key is a hash of what decides a reply (provider, model, messages, sampling settings,
sample index), never of the endpoint URL or the key. Only successful replies are hits: a
recorded failure stays in the file for inspection and is retried by the next run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mapd.config import TeacherConfig
from mapd.errors import MapdError
from mapd.llm.base import Call, CallResult

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS mapd_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    text TEXT,
    error TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    attempts INTEGER NOT NULL,
    created REAL NOT NULL,
    finish_reason TEXT,
    cost_usd REAL
);
"""
_COLUMNS = "text, error, input_tokens, output_tokens, latency_s, attempts, finish_reason"
_ADDED = {"finish_reason": "TEXT", "cost_usd": "REAL"}  # columns a version-1 file made before them lacks


def cache_key(teacher: TeacherConfig, call: Call) -> str:
    """sha256 of a canonical JSON of everything that decides the reply (no URL, no key)."""
    identity = {
        "provider": teacher.provider,
        "model": teacher.model,
        "gguf_file": teacher.gguf_file,
        "messages": call.messages,
        "temperature": teacher.temperature,
        "top_p": teacher.top_p,
        "max_tokens": teacher.max_tokens,
        "extra_body": teacher.extra_body,
        "sample": call.key.sample,
    }
    canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CallCache:
    """A SQLite call cache at ``path``, shared by the event loop and one worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)  # autocommit
        try:
            with self._access():
                self._check_schema()  # before anything writes: a foreign file is left byte for byte
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        except MapdError:
            self._db.close()
            raise

    @contextmanager
    def _access(self) -> Iterator[None]:
        """Serialize access; a damaged file becomes a MapdError naming it (the file is left alone)."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                raise MapdError(
                    f"{self.path}: not a readable mapd call cache ({exc}); move it away or set cache_path"
                ) from None

    def _check_schema(self) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT INTO mapd_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        if "mapd_meta" not in tables:
            raise MapdError(f"{self.path}: an SQLite file that is not a mapd call cache (no mapd_meta table); "
                            "move it away or set cache_path")
        row = self._db.execute("SELECT value FROM mapd_meta WHERE name='schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            found = row[0] if row else "none"
            raise MapdError(f"{self.path}: call cache schema version {found}, this mapd reads version "
                            f"{SCHEMA_VERSION}; move it away or set cache_path")
        present = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        for column, kind in _ADDED.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE calls ADD COLUMN {column} {kind}")

    def get(self, key: str) -> CallResult | None:
        """The cached successful result for ``key`` (``cached=True``, no call key yet), else None."""
        with self._access():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM calls WHERE key=? AND text IS NOT NULL", (key,)).fetchone()
        if row is None:
            return None
        text, error, input_tokens, output_tokens, latency_s, attempts, finish_reason = row
        return CallResult(None, text, error, input_tokens, output_tokens, latency_s, cached=True, attempts=attempts,
                          finish_reason=finish_reason)

    def put(self, key: str, result: CallResult, teacher: str = "", cost_usd: float = 0.0) -> None:
        """Record ``result`` (and what it cost) and commit now; a failure never replaces a stored success."""
        values = (key, teacher, result.text, result.error, result.input_tokens, result.output_tokens,
                  result.latency_s, result.attempts, result.finish_reason, time.time(), cost_usd)
        with self._access():
            self._db.execute(
                f"INSERT INTO calls (key, teacher, {_COLUMNS}, created, cost_usd) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET teacher=excluded.teacher, text=excluded.text, error=excluded.error, "
                "input_tokens=excluded.input_tokens, output_tokens=excluded.output_tokens, "
                "latency_s=excluded.latency_s, attempts=excluded.attempts, finish_reason=excluded.finish_reason, "
                "created=excluded.created, cost_usd=excluded.cost_usd WHERE calls.text IS NULL",
                values,
            )

    def close(self) -> None:
        """Close the database (also checkpoints the WAL)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "CallCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
