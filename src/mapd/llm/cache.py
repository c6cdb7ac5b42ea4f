"""The teacher call cache: one SQLite file (WAL), one row per call, committed as each call ends.

The key is a hash of what decides a reply (provider, model, messages, sampling settings,
sample index, and the teacher's name when it samples), never of the endpoint URL or the key.
Only successful replies are hits: a recorded failure stays in the file for inspection and is retried
by the next run.

Each row keeps what its call cost, so the budget is a total over every run and process that
shares the file. Processes sharing it claim a call before making it (a lease, renewed while the
process lives), so two processes never pay for the same call twice; a dead process's claims expire, at once
when it ran on this machine (a rerun after kill -9 waits for nothing).
Batch API work is recorded here too (docs/batch.md): each uploaded input file and its requests, which
stay pending (reserved against the budget, never claimed again) until their batch answered or gave up.

The cache is the ledger of paid work: a reply is never dropped because the file cannot take it right now.
A write waits up to CACHE_WAIT_S for another process's lock; a write that still fails (locked longer, a
read-only file, a full disk) keeps its reply in memory (``unwritten``), retried with every later write, and
raises CacheUnavailable (exit 3: the stage stops incomplete, naming the condition and what to do). A file
removed while open is written back from the open copy. Only a file that is really not a cache is to be
moved away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from mapd.config import EndpointConfig
from mapd.errors import IncompleteStage, MapdError
from mapd.llm.base import Call, CallResult

log = logging.getLogger("mapd.llm")
SCHEMA_VERSION = 1
CACHE_WAIT_S = 120.0  # how long a write waits for another process's write lock before the cache is unavailable
TROUBLE_WAIT_S = 1.0  # ... once a write has failed: the calls in flight then keep their replies without a long wait
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
# A call being made: by which process, until when (renewed while it lives), with the budget it holds.
_CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL,
    reserved_usd REAL NOT NULL
);
"""
# Batch API work (docs/batch.md): one row per uploaded input file, recorded as soon as the upload returns and
# before its batch is created, then updated with the batch's state at every poll; and one row per request in
# it. A request is pending while unsettled: its batch may still answer it, so it is never submitted again.
# Settled: its answer is in calls, or it was given up (failed, expired, cancelled: resubmitted or failed).
_BATCHES = """
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY,
    teacher TEXT NOT NULL,
    batch_id TEXT,
    status TEXT NOT NULL,
    requests INTEGER NOT NULL,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    key TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    call TEXT NOT NULL,
    reserved_usd REAL NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, input_file_id)
);
CREATE INDEX IF NOT EXISTS batch_requests_by_file ON batch_requests (input_file_id);
"""
BATCH_RESERVE_S = 48 * 3600.0  # an unsettled request's reservation outlives its 24 h window by a day, then lapses
_COLUMNS = "text, error, input_tokens, output_tokens, latency_s, attempts, finish_reason"
_ADDED = {"finish_reason": "TEXT", "cost_usd": "REAL"}  # columns a version-1 file made before them lacks


def _finite(column: str) -> str:
    """SQL for ``column`` where it is finite, else 0: an Infinity that an earlier mapd stored (a price of .inf) never
    poisons the budget of every later run on the file."""
    return f"(CASE WHEN abs({column}) < 1e300 THEN {column} ELSE 0 END)"


def _pid_namespace() -> str:
    """This process's PID namespace (a container has its own), so a process id is compared only within it."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return "-"


def process_owner() -> str:
    """A name for this process's claims: ``host:pid namespace:pid:random``."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str) -> bool:
    """Whether ``owner`` (a :func:`process_owner`) is a process on this machine, in this PID namespace, that has
    ended. An owner elsewhere, or one whose process id is alive (even reused), is not known to be gone."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[:2] != [socket.gethostname(), _pid_namespace()] or not parts[2].isdigit():
        return False
    import psutil

    return not psutil.pid_exists(int(parts[2]))


def cache_key(teacher: EndpointConfig, call: Call, identity: str | None = None) -> str:
    """sha256 of a canonical JSON of everything that decides the reply (no URL, no key). ``identity`` names
    the weights behind a served model (a checkpoint's fingerprint), so a trained student is never answered
    from its base model's calls. A sampling teacher's name is part of it: two teachers on one model at
    temperature > 0 are two samples, not one reply shared; at temperature 0 they share the reply."""
    fields = {
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
    if identity is not None:
        fields["identity"] = identity
    if teacher.temperature > 0:
        fields["teacher"] = teacher.name
    if teacher.dtype != "auto":  # a local teacher's weights in another type write other texts
        fields["dtype"] = teacher.dtype
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_cache_path(path: str | Path) -> Path:
    """``path`` as a call cache file, checked without creating anything: a folder, a file where a folder
    should be, or an existing file that is not SQLite is a MapdError naming it."""
    path = Path(path)
    if path.is_dir():
        raise MapdError(f"{path}: cache_path is a folder; name a file, e.g. {path / 'cache.sqlite'}")
    if path.exists() and not path.is_file():
        raise MapdError(f"{path}: cache_path is not a regular file (a device, pipe or socket); name a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MapdError(f"{path}: cannot make the call cache there: {parent} is a file")
            break
    if path.is_file() and path.stat().st_size:
        try:
            with open(path, "rb") as handle:
                header = handle.read(16)
        except OSError as exc:
            raise MapdError(f"{path}: cannot read the call cache ({exc.strerror or exc})") from None
        if header != b"SQLite format 3\x00":
            raise MapdError(f"{path}: not a readable mapd call cache (not an SQLite file); move it away or "
                            "set cache_path")
        _check_read_only(path)
    return path


def _check_read_only(path: Path) -> None:
    """CallCache._check_schema's refusals that need no write (another program's SQLite file, another
    version's cache), made before any folder or lock is: on an immutable read that leaves no -wal or -shm
    file behind, and only while no process has the file open (no -wal file). Anything else (a damaged
    file, a race) is left to the constructor's own check."""
    if path.with_name(path.name + "-wal").exists():
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            row = (db.execute("SELECT value FROM mapd_meta WHERE name='schema_version'").fetchone()
                   if "mapd_meta" in tables else None)
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return
    if tables and (error := _schema_error(path, tables, row[0] if row else None)) is not None:
        raise error


def _schema_error(path: Path, tables: set[str], version: str | None) -> MapdError | None:
    """Why the SQLite file at ``path`` with these ``tables`` (not none) and mapd_meta's ``schema_version``
    (None: not there) is no call cache this mapd reads; None when it is one."""
    if "mapd_meta" not in tables:
        return MapdError(f"{path}: an SQLite file that is not a mapd call cache (no mapd_meta table); "
                         "move it away or set cache_path")
    if version != str(SCHEMA_VERSION):
        return MapdError(f"{path}: call cache schema version {'none' if version is None else version}, this mapd "
                         f"reads version {SCHEMA_VERSION}; move it away or set cache_path")
    return None


class CacheUnavailable(IncompleteStage):
    """The call cache cannot be written now (``condition``: locked, read-only, disk full): paid replies are
    kept in memory, no new call is made, and the stage stops incomplete, saying what to do."""

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.condition = condition


def _unavailable(path: Path, exc: sqlite3.DatabaseError) -> MapdError:
    """What a SQLite error on the cache at ``path`` means: CacheUnavailable for a file that is busy, read-only or
    on a full disk; a MapdError for a refused record; else the file is not a readable cache."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return CacheUnavailable(
            f"{path}: the call cache stayed locked by another process for more than {CACHE_WAIT_S:g} s ({exc}); "
            f"let that process finish or stop it (`fuser {path}` names it), then rerun: the replies already "
            "paid are kept", "locked")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return CacheUnavailable(
            f"{path}: the call cache cannot be written ({exc}); make the file and its folder writable, or set "
            "cache_path to a writable copy of it, then rerun", "read-only")
    if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        return CacheUnavailable(
            f"{path}: the call cache cannot be written ({exc}: disk full?); free space on its disk, then rerun",
            "disk full")
    if isinstance(exc, sqlite3.IntegrityError):  # a record mapd should not have made: never the file's fault
        return MapdError(f"{path}: the call cache refused a record ({exc}); the file is fine, please report this")
    return MapdError(f"{path}: not a readable mapd call cache ({exc}); move it away or set cache_path")


class CallCache:
    """A SQLite call cache at ``path``, shared by the event loop and one worker thread. ``unwritten`` holds
    the replies (with their cost) that the file could not take yet, by cache key; every write retries them."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_cache_path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MapdError(f"{self.path}: cannot make the call cache's folder ({exc.strerror or exc})") from None
        self._lock = threading.Lock()
        self.unwritten: dict[str, tuple[tuple, str, str | None]] = {}
        self._connect()
        try:
            with self._access():
                self._check_schema()  # before anything writes: a foreign file is left byte for byte
                self._set_journal()
        except MapdError:
            self._db.close()
            raise

    def _connect(self) -> None:
        """Open the file (autocommit; a writer waits up to CACHE_WAIT_S for another process's transaction instead
        of failing), and note which file it is."""
        try:
            self._db = sqlite3.connect(self.path, timeout=CACHE_WAIT_S, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError as exc:  # e.g. a folder nobody may write in
            raise _unavailable(self.path, exc) from None
        self._wait_s = CACHE_WAIT_S  # TROUBLE_WAIT_S after a failed write, until one succeeds
        stat = os.stat(self.path)  # (SQLite has made the file)
        self._file = (stat.st_dev, stat.st_ino)

    def _set_journal(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed

    def _same_file(self) -> None:
        """Before a write: the path still names the file this cache has open. A removed file is written back
        from the open one (``VACUUM INTO``: no paid reply is lost with it); another file in its place is
        CacheUnavailable (its replies are kept in memory)."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        if stat is not None and (stat.st_dev, stat.st_ino) == self._file:
            return
        if stat is not None:
            raise CacheUnavailable(f"{self.path}: another file took the call cache's place while this process had "
                                   "it open; move one of them away, then rerun: the replies already paid are kept "
                                   "until then", "replaced")
        self._db.execute("VACUUM INTO ?", (str(self.path),))
        self._db.close()
        self._connect()
        self._set_journal()
        log.warning("%s: the call cache was removed while in use; it was written back from the open copy", self.path)

    @contextmanager
    def _access(self) -> Iterator[None]:
        """Serialize access; a SQLite error becomes a MapdError naming the file and the condition (the file is
        left alone)."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as exc:
                problem = _unavailable(self.path, exc)
                if isinstance(problem, CacheUnavailable):
                    self._set_wait(TROUBLE_WAIT_S)
                raise problem from None

    def _set_wait(self, seconds: float) -> None:
        """How long the next writes wait for another process's write lock."""
        if seconds != self._wait_s:
            self._db.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")
            self._wait_s = seconds

    def _check_schema(self) -> None:
        """Make the tables of a new file, or check an existing one's version and add what it lacks: in one
        write transaction, so two processes opening a new file at once do not both make it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._check_schema_in_transaction()
        except BaseException:
            self._rollback()
            raise
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on a full disk)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _check_schema_in_transaction(self) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in (_SCHEMA + _CLAIMS + _BATCHES).split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute("INSERT INTO mapd_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        row = (self._db.execute("SELECT value FROM mapd_meta WHERE name='schema_version'").fetchone()
               if "mapd_meta" in tables else None)
        if (error := _schema_error(self.path, tables, row[0] if row else None)) is not None:
            raise error
        present = {row[1] for row in self._db.execute("PRAGMA table_info(calls)")}
        for column, kind in _ADDED.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE calls ADD COLUMN {column} {kind}")
        for statement in (_CLAIMS + _BATCHES).split(";"):
            if statement.strip():
                self._db.execute(statement)

    def get(self, key: str) -> CallResult | None:
        """The cached successful result for ``key`` (``cached=True``, no call key yet), else None."""
        with self._access():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM calls WHERE key=? AND text IS NOT NULL", (key,)).fetchone()
        if row is None:
            return None
        text, error, input_tokens, output_tokens, latency_s, attempts, finish_reason = row
        return CallResult(None, text, error, input_tokens, output_tokens, latency_s, cached=True, attempts=attempts,
                          finish_reason=finish_reason)

    def put(self, key: str, result: CallResult, teacher: str = "", cost_usd: float = 0.0, owner: str = "") -> None:
        """Record ``result`` and what it cost (added to what earlier attempts cost), release ``owner``'s
        claim on ``key``, settle the batch request that answered it, and commit now, with every reply kept in
        ``unwritten``; a failure never replaces a stored success. CacheUnavailable when the file cannot take
        them: they stay in ``unwritten``."""
        values = (key, teacher, result.text, result.error, result.input_tokens, result.output_tokens,
                  result.latency_s, result.attempts, result.finish_reason, time.time(), cost_usd)
        kept = self.unwritten.get(key)
        if kept is not None:  # a result of this key not written yet: a success stays, a failure's cost adds up
            earlier = kept[0]
            values = earlier if earlier[2] is not None else (*values[:-1], earlier[-1] + cost_usd)
        self.unwritten[key] = (values, owner, result.batch)
        self._write_kept()

    def flush(self, *, patient: bool = True) -> None:
        """Write the replies kept in ``unwritten``, waiting for another process's lock up to CACHE_WAIT_S
        (``patient``) or TROUBLE_WAIT_S; CacheUnavailable, and they stay kept, when the file cannot take them."""
        if self.unwritten:
            with self._lock:
                self._set_wait(CACHE_WAIT_S if patient else TROUBLE_WAIT_S)
            self._write_kept()

    def _write_kept(self) -> None:
        with self._transaction():
            for values, owner, batch in self.unwritten.values():
                self._write(values, owner, batch)
        self.unwritten.clear()

    def _write(self, values: tuple, owner: str, batch: str | None) -> None:
        key = values[0]
        self._db.execute(
            f"INSERT INTO calls (key, teacher, {_COLUMNS}, created, cost_usd) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET teacher=excluded.teacher, text=excluded.text, error=excluded.error, "
            "input_tokens=excluded.input_tokens, output_tokens=excluded.output_tokens, "
            "latency_s=excluded.latency_s, attempts=excluded.attempts, finish_reason=excluded.finish_reason, "
            "created=excluded.created, cost_usd=COALESCE(calls.cost_usd, 0) + excluded.cost_usd "
            "WHERE calls.text IS NULL",
            values,
        )
        self._db.execute("DELETE FROM claims WHERE key=? AND owner=?", (key, owner))
        if batch is not None:
            self._db.execute("UPDATE batch_requests SET settled=1 WHERE key=? AND input_file_id=?", (key, batch))

    # -- batches ---------------------------------------------------------------------------------

    def add_batch_file(self, input_file_id: str, teacher: str, requests: list[tuple[str, str, float]],
                       owner: str, lease_s: float) -> None:
        """Record an uploaded batch input file and its requests ``(key, call, reserved_usd)``, before its batch
        is created: the requests' reservations move from ``owner``'s claims to the file, in one transaction.
        Until its batch id is recorded the file is ``owner``'s (a lease renewed with its claims): no other live
        process creates a batch from it."""
        now = time.time()
        with self._transaction():
            if self._db.execute("SELECT 1 FROM batches WHERE input_file_id=?", (input_file_id,)).fetchone():
                raise MapdError(f"{self.path}: the endpoint named a new upload {input_file_id}, an id this cache "
                                "already holds for an earlier batch (a restarted or different server?)")
            self._db.execute("INSERT INTO batches (input_file_id, teacher, status, requests, created, updated, owner, "
                             "expires) VALUES (?,?,?,?,?,?,?,?)",
                             (input_file_id, teacher, "uploaded", len(requests), now, now, owner, now + lease_s))
            self._db.executemany("INSERT INTO batch_requests (key, input_file_id, call, reserved_usd) VALUES (?,?,?,?)",
                                 [(key, input_file_id, call, reserved) for key, call, reserved in requests])
            self._db.executemany("DELETE FROM claims WHERE key=? AND owner=?", [(key, owner) for key, *_ in requests])

    def update_batch(self, input_file_id: str, *, batch_id: str | None = None, status: str,
                     completed: int = 0, failed: int = 0, error: str | None = None) -> None:
        """Record a batch's state as the provider last reported it."""
        with self._transaction():
            self._db.execute("UPDATE batches SET batch_id=COALESCE(?, batch_id), status=?, completed=?, failed=?, "
                             "error=COALESCE(?, error), updated=? WHERE input_file_id=?",
                             (batch_id, status, completed, failed, error, time.time(), input_file_id))

    def pending_batch(self, key: str) -> str | None:
        """The input file of the batch that may still answer ``key`` (an unsettled request), else None."""
        with self._access():
            row = self._db.execute("SELECT input_file_id FROM batch_requests WHERE key=? AND settled=0 "
                                   "ORDER BY rowid DESC", (key,)).fetchone()
        return row[0] if row else None

    def settle(self, input_file_id: str, key: str | None = None) -> None:
        """Mark the request ``key`` of that batch (every one of its requests when None) given up: the batch
        will not answer it."""
        with self._access():
            self._db.execute("UPDATE batch_requests SET settled=1 WHERE input_file_id=? AND (? IS NULL OR key=?)",
                             (input_file_id, key, key))

    def submissions(self, key: str) -> int:
        """How many batches ``key`` was submitted in."""
        with self._access():
            return self._db.execute("SELECT COUNT(*) FROM batch_requests WHERE key=?", (key,)).fetchone()[0]

    def batch(self, input_file_id: str) -> dict:
        """One batch's row."""
        return self.batches(input_file_id)[0]

    def batches(self, input_file_id: str | None = None) -> list[dict]:
        """Every recorded batch (or the one of ``input_file_id``), oldest first, with ``unsettled``: its requests
        still waiting for it."""
        where, args = ("WHERE b.input_file_id=?", (input_file_id,)) if input_file_id else ("", ())
        with self._access():
            cursor = self._db.execute(
                "SELECT b.*, (SELECT COUNT(*) FROM batch_requests r WHERE r.input_file_id=b.input_file_id "
                f"AND r.settled=0) AS unsettled FROM batches b {where} ORDER BY b.created, b.rowid", args)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def claim(self, key: str, owner: str, *, lease_s: float, reserve_usd: float = 0.0,
              budget_usd: float | None = None) -> Literal["claimed", "answered", "busy", "over budget"]:
        """Claim the call ``key`` for ``owner`` (this process) before making it: "answered" when another
        process has made it meanwhile, "busy" while another live process holds it or a batch may still answer
        it, "over budget" when
        ``reserve_usd`` on top of everything paid through this cache and every live claim's reservation
        would pass ``budget_usd``, or when a budget at least as large was reached before (so a rerun with the
        same budget makes no call; a raised one goes on). A dead process's claims expire (at once when it ran on
        this machine: :func:`owner_is_gone`)."""
        now = time.time()
        with self._transaction():
            if self._db.execute("SELECT 1 FROM calls WHERE key=? AND text IS NOT NULL", (key,)).fetchone():
                return "answered"
            holder = self._db.execute("SELECT owner FROM claims WHERE key=? AND expires>?", (key, now)).fetchone()
            if holder is not None and holder[0] != owner and not owner_is_gone(holder[0]):
                return "busy"
            if self._db.execute("SELECT 1 FROM batch_requests WHERE key=? AND settled=0", (key,)).fetchone():
                return "busy"  # a batch may still answer it
            if budget_usd is not None:
                reached = self._db.execute("SELECT value FROM mapd_meta WHERE name='budget_reached_usd'").fetchone()
                if (reached and budget_usd <= float(reached[0])) or self._committed_usd(now) + reserve_usd > budget_usd:
                    self._db.execute("INSERT OR REPLACE INTO mapd_meta VALUES ('budget_reached_usd', ?)",
                                     (repr(max(budget_usd, float(reached[0]) if reached else 0.0)),))
                    return "over budget"
            self._db.execute("INSERT OR REPLACE INTO claims VALUES (?,?,?,?)", (key, owner, now + lease_s, reserve_usd))
            return "claimed"

    def renew(self, owner: str, lease_s: float) -> None:
        """Extend ``owner``'s claims and its uploaded files' leases: it is alive."""
        with self._access():
            self._db.execute("UPDATE claims SET expires=? WHERE owner=?", (time.time() + lease_s, owner))
            self._db.execute("UPDATE batches SET expires=? WHERE owner=?", (time.time() + lease_s, owner))

    def release(self, owner: str, key: str | None = None) -> None:
        """Drop ``owner``'s claim on ``key`` (all of its claims and upload leases when ``key`` is None)."""
        with self._access():
            if key is None:
                self._db.execute("DELETE FROM claims WHERE owner=?", (owner,))
                self._db.execute("UPDATE batches SET expires=0 WHERE owner=?", (owner,))
            else:
                self._db.execute("DELETE FROM claims WHERE key=? AND owner=?", (key, owner))

    def spent_usd(self) -> float:
        """What every call recorded in this cache cost, over all runs and processes."""
        with self._access():
            return self._db.execute(f"SELECT COALESCE(SUM({_finite('cost_usd')}), 0) FROM calls").fetchone()[0]

    def _committed_usd(self, now: float) -> float:
        """Paid, plus what live claims and unsettled batch requests (within BATCH_RESERVE_S) hold."""
        return self._db.execute(
            f"SELECT (SELECT COALESCE(SUM({_finite('cost_usd')}), 0) FROM calls) + "
            f"(SELECT COALESCE(SUM({_finite('reserved_usd')}), 0) FROM claims WHERE expires>?) + "
            f"(SELECT COALESCE(SUM({_finite('r.reserved_usd')}), 0) FROM batch_requests r JOIN batches b "
            "ON r.input_file_id=b.input_file_id WHERE r.settled=0 AND b.created>?)",
            (now, now - BATCH_RESERVE_S)).fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction that other processes see whole (BEGIN IMMEDIATE takes the write lock first)."""
        with self._access():
            self._same_file()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._set_wait(CACHE_WAIT_S)

    def close(self) -> None:
        """Close the database (also checkpoints the WAL); replies it still could not write are named in an error
        line (their stage has them in its records and stopped incomplete)."""
        if self.unwritten:
            log.error("%s: %d paid replies could not be written to the call cache and are not in it",
                      self.path, len(self.unwritten))
        with self._lock:
            self._db.close()

    def __enter__(self) -> "CallCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
