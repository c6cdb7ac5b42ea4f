"""[trust] The call cache is the ledger of paid work: busy, read-only or full, it never loses a paid reply to a
"move it away", and a malformed batch reply is a warning on that batch, never a cache error (issue 21)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading

import pytest
from tests.batch_server import FakeBatchServer
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import (COMMITTEE, FAST, KEY_ENV, CountingReply, dead_url, teach_argv, teach_records,
                                   write_teach_setup)

from mapd.cli import main
from mapd.config import TeacherConfig
from mapd.errors import MapdError
from mapd.llm import Call, CallCache, CallKey, CallResult, Dispatcher
from mapd.llm.cache import CacheUnavailable

pytestmark = pytest.mark.usefixtures("key", "fast_retries")
MOVE_IT_AWAY = "move it away"
# another process that takes the cache's write lock, says so, and holds it for argv[2] seconds
LOCKER = ("import sqlite3, sys, time\n"
          "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
          "db.execute('BEGIN IMMEDIATE')\n"
          "print('locked', flush=True)\n"
          "time.sleep(float(sys.argv[2]))\n")


class LockAfter:
    """The server's reply function (a CountingReply) that, as it answers request number ``after``, has another
    process take the cache's write lock for ``hold_s`` seconds: the reply arrives while the cache is locked."""

    def __init__(self, cache_file, after: int, hold_s: float) -> None:
        self.reply, self.cache_file, self.after, self.hold_s = CountingReply(), cache_file, after, hold_s
        self.seen, self.locker = 0, None
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict], model: str) -> str:
        with self._lock:
            self.seen += 1
            if self.seen == self.after:
                self.locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(self.cache_file), str(self.hold_s)],
                                               stdout=subprocess.PIPE, text=True)
                assert self.locker.stdout.readline().strip() == "locked"
        return self.reply(messages, model)

    def release(self) -> None:
        if self.locker is not None:
            self.locker.kill()
            self.locker.wait()
            self.locker.stdout.close()


def _teach(folder, out) -> int:
    return main(teach_argv(folder / "config.yaml", folder / "mistakes.jsonl", out))


def test_a_cache_locked_by_another_process_mid_run_is_waited_for_and_nothing_is_paid_twice(tmp_path, monkeypatch):
    monkeypatch.setattr("mapd.llm.cache.CACHE_WAIT_S", 60.0)  # (default 120 s; the lock is held 2 s)
    lock = LockAfter(tmp_path / "out" / "cache.sqlite", after=5, hold_s=2.0)
    try:
        with FakeOpenAIServer(lock) as server:
            write_teach_setup(tmp_path, server.base_url, KEY_ENV, 4, max_concurrency=2)
            assert _teach(tmp_path, tmp_path / "out") == 0
            assert lock.locker is not None and lock.locker.wait() == 0  # it held the lock mid-run, then let go
            server.reset()
            assert _teach(tmp_path, tmp_path / "out") == 0  # the rerun: every reply is in the cache
            assert server.requests == 0
    finally:
        lock.release()
    assert lock.reply.duplicates == 0
    assert all(r["text"] for r in sum(teach_records(tmp_path / "out"), []))


def test_a_cache_locked_past_the_wait_stops_incomplete_with_the_records_and_pays_only_what_was_in_flight(
        tmp_path, monkeypatch, capfd):
    monkeypatch.setattr("mapd.llm.cache.CACHE_WAIT_S", 1.0)
    monkeypatch.setattr("mapd.llm.cache.TROUBLE_WAIT_S", 0.1)
    monkeypatch.setattr("mapd.llm.dispatch.CLAIM_LEASE_S", 3.0)  # the stopped run's claims (not released: the
    # cache was locked) expire before the rerun takes their calls over: 3 s instead of 30
    lock = LockAfter(tmp_path / "out" / "cache.sqlite", after=5, hold_s=600)
    try:
        with FakeOpenAIServer(lock, latency_s=0.05) as server:
            write_teach_setup(tmp_path, server.base_url, KEY_ENV, 4, max_concurrency=2)
            assert _teach(tmp_path, tmp_path / "out") == 3
            err = capfd.readouterr().err
            last = err.strip().splitlines()[-1]
            assert "locked by another process" in last and "rerun" in last and MOVE_IT_AWAY not in err
            feedback, rationales = teach_records(tmp_path / "out")  # every record that could be written
            assert len(feedback) == len(rationales) == 4 * len(COMMITTEE)
            made = [r for r in feedback + rationales if r["text"]]
            assert len(made) >= 5 and all(r["error"].startswith("CacheUnavailable")
                                          for r in feedback + rationales if not r["text"])
            lock.release()
            assert _teach(tmp_path, tmp_path / "out") == 0  # the lock gone: the rerun finishes
    finally:
        lock.release()
    in_flight = 2 * len(COMMITTEE)  # max_concurrency per teacher
    assert 0 < lock.reply.duplicates <= in_flight  # paid twice: only replies that arrived while it was locked


def _result(n: int, text: str = "x") -> CallResult:
    return CallResult(CallKey("test", str(n), "t"), text * 200, input_tokens=10, output_tokens=50)


def test_a_full_disk_keeps_paid_replies_in_memory_and_writes_them_once_it_has_room(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        cache.put("first", _result(0), "t", 0.5)
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's own "database or disk is full"
        with pytest.raises(CacheUnavailable) as caught:
            for n in range(1, 40):
                cache.put(f"k{n}", _result(n), "t", 0.5)
        assert caught.value.condition == "disk full" and caught.value.exit_code == 3
        assert "free space" in str(caught.value) and MOVE_IT_AWAY not in str(caught.value)
        kept = set(cache.unwritten)
        assert kept and all(cache.get(key) is None for key in kept)
        cache._db.execute("PRAGMA max_page_count=1073741823")  # room again: the next write takes them all
        cache.put("after", _result(99), "t", 0.5)
        assert not cache.unwritten and all(cache.get(key) is not None for key in kept | {"after"})
        stored = cache._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        assert cache.spent_usd() == pytest.approx(0.5 * stored)  # every paid reply counted once


def test_a_read_only_cache_is_named_read_only_never_unreadable(tmp_path):
    """(The tests run as root, for whom file modes do not apply: the cache's connection is swapped for a
    read-only one, as SQLite has it for a file that cannot be written.)"""
    path = tmp_path / "cache.sqlite"
    with CallCache(path) as cache:
        cache.put("paid", _result(0), "t", 0.25)
        cache._db.close()
        cache._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                    isolation_level=None)
        with pytest.raises(CacheUnavailable) as caught:
            cache.put("new", _result(1), "t", 0.25)
        assert caught.value.condition == "read-only" and "writable" in str(caught.value)
        assert MOVE_IT_AWAY not in str(caught.value) and "new" in cache.unwritten
        assert cache.get("paid").text  # still read


def test_a_dispatcher_stops_new_calls_when_the_cache_cannot_take_replies_and_keeps_the_paid_ones(tmp_path):
    with FakeOpenAIServer(latency_s=0.02) as server, CallCache(tmp_path / "cache.sqlite") as cache:
        teacher = TeacherConfig(name="t", model="m", base_url=server.base_url, api_key_env=KEY_ENV, max_concurrency=2)
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count={pages + 2}")
        calls = [Call(CallKey("test", str(n), "t"), [{"role": "user", "content": f"q{n} " * 300}]) for n in range(30)]
        with Dispatcher([teacher], cache, backoff=FAST) as dispatcher:
            results = dispatcher.complete_all(calls)
            assert dispatcher.cache_problem is not None and dispatcher.cache_problem.condition == "disk full"
        answered = [r for r in results.values() if r.text]
        refused = [r for r in results.values() if not r.text]
        assert answered and refused and server.completions == len(answered)  # every paid reply reached the stage
        assert all(r.error.startswith("CacheUnavailable") and r.attempts == 0 for r in refused)
        cache._db.execute("PRAGMA max_page_count=1073741823")
        cache.flush()
        assert not cache.unwritten
        stored = cache._db.execute("SELECT COUNT(*) FROM calls WHERE text IS NOT NULL").fetchone()[0]
        assert stored == len(answered)  # none lost


def test_a_damaged_file_is_still_one_to_move_away(tmp_path):
    path = tmp_path / "cache.sqlite"
    with CallCache(path) as cache:
        cache.put("k", _result(0))
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree
    path.write_bytes(bytes(data))
    with pytest.raises(Exception) as caught:
        with CallCache(path) as cache:
            cache.get("k")
    assert MOVE_IT_AWAY in str(caught.value) and not isinstance(caught.value, CacheUnavailable)


class StatuslessBatches(FakeBatchServer):
    """A Batch API whose batches.retrieve replies lack a status (the first ``bad`` of them)."""

    def __init__(self, *args, bad: int, **kwargs) -> None:
        self.bad = bad
        super().__init__(*args, **kwargs)

    def _retrieve(self, handler, raw, query, batch_id):
        code, batch = super()._retrieve(handler, raw, query, batch_id)
        if code == 200 and self.bad > 0:
            self.bad -= 1
            batch = {k: v for k, v in batch.items() if k != "status"}
        return code, batch


def _batch_setup(folder, base_url) -> None:
    write_teach_setup(folder, base_url, KEY_ENV, 2, batch=True, batch_poll_s=0.05)


def test_a_batch_reply_without_status_is_a_warning_on_that_batch_never_a_cache_error(tmp_path, capfd):
    with StatuslessBatches(CountingReply(), bad=3) as server:  # a few malformed polls, then good ones
        _batch_setup(tmp_path, server.base_url)
        assert _teach(tmp_path, tmp_path / "out") == 0
    err = capfd.readouterr().err
    assert "malformed (no status)" in err and MOVE_IT_AWAY not in err and "constraint" not in err.lower()
    assert all(r["text"] for r in sum(teach_records(tmp_path / "out"), []))


def test_a_batch_that_keeps_answering_without_status_fails_its_calls_and_a_rerun_collects_it(tmp_path, capfd):
    with StatuslessBatches(CountingReply(), bad=10**6) as server:
        _batch_setup(tmp_path, server.base_url)
        assert _teach(tmp_path, tmp_path / "out") == 3
        err = capfd.readouterr().err
        assert "BatchMalformed" in err and MOVE_IT_AWAY not in err
        created = server.batches_created
        server.bad = 0  # the endpoint mends: the rerun polls the same batches, submits nothing twice
        assert _teach(tmp_path, tmp_path / "out") == 0
        assert server.batches_created == created + len(COMMITTEE)  # only the reviews' batches are new
        assert max(server.submitted_custom_ids.values()) == 1


class DuplicatingBatches(FakeBatchServer):
    """The first output file's first line appears twice: the second time with another reply (or the same)."""

    def __init__(self, *args, same: bool, **kwargs) -> None:
        self.same, self.duplicated = same, False
        super().__init__(*args, **kwargs)

    def _store(self, data: bytes, filename: str, purpose: str) -> dict:
        if filename.endswith("_output.jsonl") and not self.duplicated:
            self.duplicated = True
            first = json.loads(data.decode().splitlines()[0])
            if not self.same:
                first["response"]["body"]["choices"][0]["message"]["content"] = "a different reply"
            data += (json.dumps(first) + "\n").encode()
        return super()._store(data, filename, purpose)


@pytest.mark.parametrize("same", [True, False])
def test_a_custom_id_twice_in_a_batch_output_is_never_silently_the_last(tmp_path, capfd, same):
    with DuplicatingBatches(CountingReply(), same=same) as server:
        _batch_setup(tmp_path, server.base_url)
        code = _teach(tmp_path, tmp_path / "out")
    err = capfd.readouterr().err
    assert "twice" in err and ("taken once" in err) == same
    records = sum(teach_records(tmp_path / "out"), [])
    assert "a different reply" not in json.dumps(records)
    if same:
        assert code == 0
    else:  # neither line is taken: the request goes out again (and its batch answers it)
        assert code == 0 and max(server.submitted_custom_ids.values()) == 2


def test_batch_status_with_the_endpoint_down_is_bounded_and_says_the_states_are_last_known(tmp_path):
    import asyncio

    cache_file = tmp_path / "cache.sqlite"
    with FakeBatchServer(CountingReply(), batch_latency_s=3600) as server:  # its batches stay in progress
        teacher = TeacherConfig(name="t", model="m", base_url=server.base_url, api_key_env=KEY_ENV, batch=True,
                                batch_poll_s=0.05)
        with CallCache(cache_file) as cache, Dispatcher([teacher], cache, backoff=FAST) as dispatcher:
            async def submit_then_stop() -> None:
                calls = [Call(CallKey("test", str(n), "t"), [{"role": "user", "content": f"q{n}"}]) for n in range(3)]
                tasks = [asyncio.ensure_future(dispatcher.complete(call)) for call in calls]
                while not cache.batches() or cache.batches()[0]["batch_id"] is None:
                    await asyncio.sleep(0.05)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            dispatcher.run(submit_then_stop(), desc=None)
    down = teacher.model_copy(update={"base_url": dead_url()})  # the endpoint is gone: nothing answers
    with CallCache(cache_file) as cache, Dispatcher([down], cache, backoff=FAST) as dispatcher:
        table = dispatcher.batch_table()
    assert "validating *" in table and "* the last known state" in table.splitlines()[-1]
    assert "Connect" in table.splitlines()[-1]  # why: the connection was refused


def test_an_infinite_cost_stored_by_an_earlier_mapd_never_poisons_the_budget(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        cache.put("poisoned", _result(0), "t", float("inf"))  # as a price of .inf wrote it before
        cache.put("fine", _result(1), "t", 0.25)
        assert cache.spent_usd() == 0.25
        assert cache.claim("next", "me", lease_s=30, reserve_usd=0.5, budget_usd=1.0) == "claimed"


def test_a_device_is_no_cache_and_an_unopenable_place_is_named_unwritable(tmp_path):
    with pytest.raises(MapdError, match="not a regular file") as caught:
        CallCache("/dev/null")  # (SQLite said "disk I/O error")
    assert not isinstance(caught.value, CacheUnavailable)
    with pytest.raises(CacheUnavailable, match="cannot be written") as caught:
        CallCache("/proc/self/cache.sqlite")  # a folder nobody can make files in (root included)
    assert caught.value.condition == "read-only" and MOVE_IT_AWAY not in str(caught.value)


def _remove(path) -> None:
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def test_a_cache_removed_mid_run_is_written_back_with_every_paid_reply(tmp_path):
    path = tmp_path / "cache.sqlite"
    with CallCache(path) as cache:
        cache.put("before", _result(0), "t", 0.5)
        _remove(path)  # `rm cache.sqlite*` while the run goes on (before: every reply of the run was lost)
        cache.put("after", _result(1), "t", 0.5)
    with CallCache(path) as cache:
        assert cache.get("before").text and cache.get("after").text and cache.spent_usd() == 1.0


def test_another_file_in_the_caches_place_is_never_written_over(tmp_path):
    path = tmp_path / "cache.sqlite"
    with CallCache(path) as cache:
        cache.put("before", _result(0), "t", 0.5)
        _remove(path)
        with CallCache(path) as other:  # e.g. another run made a new cache there
            other.put("theirs", _result(2), "t", 0.25)
        with pytest.raises(CacheUnavailable, match="another file took the call cache's place") as caught:
            cache.put("mine", _result(1), "t", 0.5)
        assert caught.value.condition == "replaced" and "mine" in cache.unwritten
    with CallCache(path) as cache:
        assert cache.get("theirs").text and cache.get("mine") is None


def test_replies_the_cache_never_took_make_the_stage_incomplete_even_when_every_call_was_answered(tmp_path, caplog):
    """The cache fills up for good: the records have every reply, but the stage may not end as done (exit 0)
    while paid replies are missing from the cache, and closing the cache names them."""
    from mapd.errors import IncompleteStage
    from mapd.records import TeachStats
    from mapd.stages.teach import _raise_if_incomplete

    with FakeOpenAIServer(latency_s=0.02) as server, CallCache(tmp_path / "cache.sqlite") as cache:
        teacher = TeacherConfig(name="t", model="m", base_url=server.base_url, api_key_env=KEY_ENV, max_concurrency=2)
        pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
        cache._db.execute(f"PRAGMA max_page_count={pages + 2}")
        calls = [Call(CallKey("test", str(n), "t"), [{"role": "user", "content": f"q{n} " * 300}]) for n in range(30)]
        with Dispatcher([teacher], cache, backoff=FAST) as dispatcher:
            dispatcher.complete_all(calls)
            unwritten = len(cache.unwritten)
            assert unwritten and dispatcher.cache_problem.condition == "disk full"
            with pytest.raises(IncompleteStage) as caught:
                _raise_if_incomplete([], [], dispatcher, TeachStats({}))  # no record carries an error
    assert str(caught.value).startswith("teach incomplete: every call was answered. ")
    assert f"({unwritten} paid replies are in the records but not in the cache: a rerun pays them again)" in str(
        caught.value)
    assert f"{unwritten} paid replies could not be written to the call cache and are not in it" in caplog.text
