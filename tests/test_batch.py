"""Batch API teachers (docs/batch.md) against the project's own batch server (tests/batch_server.py):
two submission rounds, results by custom_id, resume after SIGKILL without submitting twice, expiry,
per-request errors, a failed batch, the budget, a mixed live + batch committee, and --batch-status."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from tests.batch_server import FakeBatchServer
from tests.reliability_kit import (COMMITTEE, FAST, KEY_ENV, CountingReply, mapd_argv, run_killed, teach_records,
                                   wait_for, write_teach_setup)
from tests.reliability_kit import teach_argv as kit_teach_argv

from mapd.cli import main
from mapd.config import TeacherConfig
from mapd.llm import Call, CallCache, CallKey, Dispatcher
from mapd.llm.openai_provider import OpenAIProvider

BATCH = {"batch": True, "batch_poll_s": 0.05}
N = 6  # mistakes
PHASE_1 = N * len(COMMITTEE) * 2  # feedback + rationale per teacher and mistake
REVIEWS = N * len(COMMITTEE) * (len(COMMITTEE) - 1)


def teach_argv(folder: Path, out: Path, *extra: str) -> list[str]:
    """`mapd teach` on the setup that write_teach_setup wrote into ``folder``."""
    return kit_teach_argv(folder / "config.yaml", folder / "mistakes.jsonl", out, *extra)



def assert_complete(out: Path, n: int = N) -> None:
    """Every feedback, rationale and review is there once, answered, keyed by its own (id, teacher, reviewer)."""
    feedback, rationales = teach_records(out)
    assert sorted((r["id"], r["teacher"]) for r in feedback) == sorted(
        (f"q{i}", t) for i in range(n) for t in COMMITTEE)
    assert all(r["text"] and r["text"].startswith(f"model-{r['teacher']} explains") for r in feedback)
    assert all(r["text"].startswith(f"model-{r['teacher']} works") for r in rationales)
    for rationale in rationales:
        assert sorted(v["reviewer"] for v in rationale["reviews"]) == sorted(set(COMMITTEE) - {rationale["teacher"]})
        assert all(v["score"] == 4 for v in rationale["reviews"])
        assert rationale["accepted"]


def set_config(folder: Path, **fields) -> dict:
    """Set top-level fields of folder/config.yaml; the config."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config.update(fields)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return config


def stats(out: Path) -> dict:
    return json.loads((out / "teach_stats.json").read_text())


def test_batch_committee_has_every_record_no_live_call_and_two_rounds(tmp_path, key):
    reply = CountingReply()
    with FakeBatchServer(reply, seed=3) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, price_input_per_mtok=2.0,
                          price_output_per_mtok=8.0, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        assert server.requests == 0  # no live call
        assert server.batches_created == 2 * len(COMMITTEE)  # phase 1 and the reviews, one file per teacher
        assert server.batch_lines == PHASE_1 + REVIEWS
        assert max(server.submitted_custom_ids.values()) == 1 and reply.duplicates == 0
        assert {f"Bearer {key}"} == set(server.batch_auth_headers)
    assert_complete(tmp_path / "out")
    for name, row in stats(tmp_path / "out").items():
        assert row["batch_calls"] == row["calls"] == PHASE_1 / len(COMMITTEE) + REVIEWS / len(COMMITTEE)
        assert row["batches"] == 2
        full_price = (row["input_tokens"] * 2.0 + row["output_tokens"] * 8.0) / 1e6
        assert row["batch_cost_usd"] == row["cost_usd"] == pytest.approx(full_price / 2, abs=1e-6)
    assert main(["report", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "of which batch (batches)" in report and f"| {PHASE_1 // 3 + REVIEWS // 3} (2) |" in report
    # the calls are in the call cache: a run with live teachers on that cache calls nothing
    with FakeBatchServer(reply) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N)
        set_config(tmp_path, cache_path=str(tmp_path / "out" / "cache.sqlite"))
        assert main(teach_argv(tmp_path, tmp_path / "again")) == 0
        assert server.requests == 0 and server.batches_created == 0
    assert teach_records(tmp_path / "again") == teach_records(tmp_path / "out")


def test_files_are_split_at_the_request_limit(tmp_path, key):
    with FakeBatchServer(CountingReply()) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, batch_max_requests=5, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        per_file = [len(data.splitlines()) for data in server.uploaded_files.values()]
        assert max(per_file) <= 5 and sum(per_file) == PHASE_1 + REVIEWS
    assert_complete(tmp_path / "out")


def test_sigkill_while_batches_are_pending_then_rerun_submits_nothing_twice(tmp_path, key):
    reply = CountingReply()
    with FakeBatchServer(reply, batch_latency_s=3600) as server:  # the batches wait until finish_all()
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)
        argv = teach_argv(tmp_path, tmp_path / "out")
        assert run_killed(argv, lambda: server.batches_created == len(COMMITTEE) and server.batch_gets > 3,
                          log=tmp_path / "killed.log")
        cache = tmp_path / "out" / "cache.sqlite"
        with sqlite3.connect(cache) as db:
            recorded = db.execute("SELECT COUNT(*), SUM(batch_id IS NOT NULL) FROM batches").fetchone()
        assert recorded == (len(COMMITTEE), len(COMMITTEE))
        assert main([*argv, "--batch-status"]) == 0  # shows them, changes nothing
        server.finish_all()
        server.batch_latency_s = 0
        assert main(argv) == 0
        assert server.batches_created == 2 * len(COMMITTEE)  # the phase-1 batches were polled, not resubmitted
        assert max(server.submitted_custom_ids.values()) == 1 and reply.duplicates == 0
        assert server.requests == 0
    assert_complete(tmp_path / "out")


def test_an_expired_batch_resubmits_only_its_unanswered_half_once(tmp_path, key):
    reply = CountingReply()
    with FakeBatchServer(reply, expire_batches={0: 0.5}) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        expired = server.batch("batch_1")
        assert expired["status"] == "expired"
        first = [json.loads(line)["custom_id"] for line in server.uploaded_files[expired["input_file_id"]].splitlines()]
        answered, unanswered = first[: len(first) // 2], first[len(first) // 2:]
        assert all(server.submitted_custom_ids[c] == 1 for c in answered)
        assert all(server.submitted_custom_ids[c] == 2 for c in unanswered)
        assert reply.duplicates == 0 and server.requests == 0
    assert_complete(tmp_path / "out")


def test_request_errors_go_out_again_in_a_new_batch_or_live(tmp_path, key):
    with FakeBatchServer(CountingReply(), batch_error_first=1) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "batch")) == 0
        assert set(server.submitted_custom_ids.values()) == {2} and server.requests == 0
    assert_complete(tmp_path / "batch")
    with FakeBatchServer(CountingReply(), batch_error_first=1) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, batch_retry_live=True, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "live")) == 0
        assert set(server.submitted_custom_ids.values()) == {1}
        assert server.requests == PHASE_1 + REVIEWS  # each error retried live once
    assert_complete(tmp_path / "live")
    for row in stats(tmp_path / "live").values():
        assert row["batch_calls"] == 0 and row["calls"] == (PHASE_1 + REVIEWS) / len(COMMITTEE)


def test_a_request_that_keeps_failing_is_a_failed_record_and_exit_3(tmp_path, key):
    with FakeBatchServer(CountingReply(), batch_error_first=99) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1, batch_max_submissions=2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
        assert set(server.submitted_custom_ids.values()) == {2}
    feedback, rationales = teach_records(tmp_path / "out")
    assert all(r["text"] is None and "submitted 2 times" in r["error"] for r in feedback + rationales)


def test_a_failed_batch_is_a_loud_error_with_the_providers_message(tmp_path, key, capsys):
    with FakeBatchServer(CountingReply(), fail_batches={0: "The model `model-a` is not available for batch"}) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
    assert "is not available for batch" in capsys.readouterr().err
    feedback, rationales = teach_records(tmp_path / "out")
    failed = [r for r in feedback + rationales if r["text"] is None]
    assert failed and all("is not available for batch" in r["error"] for r in failed)
    assert len(feedback) == 2 * len(COMMITTEE) and len(rationales) == 2 * len(COMMITTEE)


def test_a_mixed_committee_of_live_and_batch_teachers(tmp_path, key):
    reply = CountingReply()
    with FakeBatchServer(reply) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N)
        config = yaml.safe_load((tmp_path / "config.yaml").read_text())
        config["teachers"][0].update(BATCH)  # one batch teacher, the others live
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        batch_teacher = config["teachers"][0]["name"]
        per_teacher = PHASE_1 // len(COMMITTEE) + REVIEWS // len(COMMITTEE)
        # the live rationales came back before the batch went out: their reviews went with phase 1
        assert server.batch_lines == per_teacher and server.batches_created == 1
        assert server.requests == (len(COMMITTEE) - 1) * per_teacher and reply.duplicates == 0
    assert_complete(tmp_path / "out")
    assert {name: row["batch_calls"] for name, row in stats(tmp_path / "out").items()} == {
        name: per_teacher if name == batch_teacher else 0 for name in COMMITTEE}


def test_the_budget_holds_the_batch_worst_case(tmp_path, key):
    """Each request reserves its worst case at batch prices before its batch goes out; a budget below one
    round's worst case submits nothing."""
    with FakeBatchServer(CountingReply()) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, price_input_per_mtok=1000.0,
                          price_output_per_mtok=1000.0, max_tokens=100, **BATCH)
        set_config(tmp_path, max_budget_usd=0.5)  # one request's worst case is about 0.05 USD at batch prices
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
        assert server.batch_lines < PHASE_1
    with sqlite3.connect(tmp_path / "out" / "cache.sqlite") as db:
        assert db.execute("SELECT SUM(cost_usd) FROM calls").fetchone()[0] <= 0.5


def test_dry_run_estimates_at_batch_prices(tmp_path, key, capsys):
    with FakeBatchServer() as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, price_input_per_mtok=1.0, price_output_per_mtok=1.0,
                          **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out", "--dry-run")) == 0
        batch_cost = capsys.readouterr().out
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, price_input_per_mtok=1.0, price_output_per_mtok=1.0)
        assert main(teach_argv(tmp_path, tmp_path / "out", "--dry-run")) == 0
        live_cost = capsys.readouterr().out
        assert server.requests == 0 and server.batches_created == 0
    costs = [[float(usd) for usd in re.findall(r"at most ([\d.]+) USD", text)] for text in (batch_cost, live_cost)]
    assert costs[0] and [2 * c for c in costs[0]] == pytest.approx(costs[1])


def test_batch_needs_an_http_endpoint(tmp_path, key, capsys):
    write_teach_setup(tmp_path, "http://127.0.0.1:9/v1", KEY_ENV, 1)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["teachers"][0] = {"name": "local", "model": "embedded:tiny", "batch": True}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(teach_argv(tmp_path, tmp_path / "out")) == 2
    assert "batch: true needs base_url" in capsys.readouterr().err



def test_killed_between_creating_a_batch_and_recording_it_the_rerun_adopts_that_batch(tmp_path, key, monkeypatch):
    """The uploaded file is recorded before its batch is created: a rerun finds the batch the provider made for
    it (batches.list) instead of creating a second one."""
    from mapd.errors import MapdError
    from mapd.llm.cache import CallCache

    recorded = CallCache.update_batch

    def die_before_recording(self, input_file_id, *, batch_id=None, **fields):
        if batch_id is not None:  # the cache is left as by a SIGKILL right after batches.create returned
            raise MapdError("simulated crash")
        return recorded(self, input_file_id, batch_id=batch_id, **fields)

    reply = CountingReply()
    with FakeBatchServer(reply) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)
        argv = teach_argv(tmp_path, tmp_path / "out")
        monkeypatch.setattr(CallCache, "update_batch", die_before_recording)
        assert main(argv) == 3  # those calls failed; their files stay recorded
        monkeypatch.setattr(CallCache, "update_batch", recorded)
        assert server.batches_created >= 1  # (the other teachers may have created theirs in the same moment)
        assert main(argv) == 0
        assert server.batches_created == 2 * len(COMMITTEE)  # those unrecorded were adopted, not made again
        assert max(server.submitted_custom_ids.values()) == 1 and reply.duplicates == 0
    assert_complete(tmp_path / "out")


def test_pending_batch_requests_hold_their_reservation_after_the_process_is_gone(tmp_path):
    from mapd.llm.cache import CallCache

    with CallCache(tmp_path / "cache.sqlite") as cache:
        cache.add_batch_file("file-1", "t", [("k1", "feedback 'q1' of t", 0.6), ("k2", "rationale 'q1' of t", 0.3)],
                             owner="dead", lease_s=30)
        assert cache.claim("k3", "alive", lease_s=30, reserve_usd=0.2, budget_usd=1.0) == "over budget"
        assert cache.pending_batch("k1") == "file-1" and cache.submissions("k1") == 1
        cache.settle("file-1", "k1")
        assert cache.pending_batch("k1") is None
        assert cache.claim("k4", "alive", lease_s=30, reserve_usd=0.2, budget_usd=2.0) == "claimed"
        assert cache.batch("file-1")["unsettled"] == 1


def test_an_unreachable_batch_endpoint_fails_the_calls_and_exits_3(tmp_path, key, capsys):
    write_teach_setup(tmp_path, "http://127.0.0.1:9/v1", KEY_ENV, 1, max_retries=0, **BATCH)
    assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
    feedback, rationales = teach_records(tmp_path / "out")
    assert all(r["error"].startswith("BatchUpload: ") and "127.0.0.1', 9" in r["error"] for r in feedback + rationales)
    assert key not in capsys.readouterr().err


def test_credentials_echoed_in_batch_output_are_redacted(tmp_path, key):
    with FakeBatchServer(lambda messages: f"echo: Bearer {key} [4] The answer is 7.") as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_a_batch_cancelled_at_the_provider_resubmits_its_unanswered_requests(tmp_path, key):
    import threading

    import openai

    reply = CountingReply()
    with FakeBatchServer(reply, batch_latency_s=1.0) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)

        def cancel_the_first() -> None:  # as a user would, from the provider's dashboard
            if wait_for(lambda: server.batches_created >= 1, timeout=30):
                openai.OpenAI(base_url=server.base_url, api_key=key).batches.cancel("batch_1")

        canceller = threading.Thread(target=cancel_the_first)
        canceller.start()
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        canceller.join()
        cancelled = server.batch("batch_1")
        assert cancelled["status"] == "cancelled"
        lines = [json.loads(line)["custom_id"] for line in server.uploaded_files[cancelled["input_file_id"]].splitlines()]
        times = sorted(server.submitted_custom_ids[c] for c in lines)
        assert times == [1] * (len(lines) // 2) + [2] * (len(lines) - len(lines) // 2)
        assert reply.duplicates == 0 and server.requests == 0
    assert_complete(tmp_path / "out")


def test_an_endpoint_without_the_batch_api_stops_the_teacher_at_its_first_upload(tmp_path, key, capsys):
    """A vLLM-like server (chat completions only): the upload's 404 stops the teacher, loudly, exit 3."""
    from tests.openai_server import FakeOpenAIServer

    with FakeOpenAIServer(CountingReply()) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
        assert server.requests == 0
    err = capsys.readouterr().err
    assert "stopped teachers" in err and "no route /v1/files" in err
    feedback, rationales = teach_records(tmp_path / "out")
    assert all(r["error"].startswith("BatchUpload: NotFoundError") for r in feedback + rationales)


class LostCreateReply(FakeBatchServer):
    """Makes the first batch, then answers its create with a 502 (a reply lost on the way back)."""

    lost = False

    def _create(self, handler, raw, query):
        status, data = super()._create(handler, raw, query)
        if not self.lost and status == 200:
            self.lost = True
            return 502, {"error": {"message": "bad gateway", "type": "server_error"}}
        return status, data


def test_a_create_whose_reply_was_lost_is_found_not_made_again(tmp_path, key, fast_retries):
    reply = CountingReply()
    with LostCreateReply(reply) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 0
        assert server.lost and server.batches_created == 2 * len(COMMITTEE)
        assert max(server.submitted_custom_ids.values()) == 1 and reply.duplicates == 0
    assert_complete(tmp_path / "out", n=2)


class MalformedBodies(FakeBatchServer):
    def _completion(self, body, text, **fields):
        return {**super()._completion(body, text, **fields), "choices": 5}


def test_malformed_output_lines_are_resubmitted_then_failed_records_never_a_hang(tmp_path, key):
    with MalformedBodies(CountingReply()) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1, batch_max_submissions=2, **BATCH)
        assert main(teach_argv(tmp_path, tmp_path / "out")) == 3
        assert set(server.submitted_custom_ids.values()) == {2}
    feedback, rationales = teach_records(tmp_path / "out")
    assert all("unusable reply: TypeError" in r["error"] for r in feedback + rationales)


def test_two_processes_on_one_cache_submit_each_request_once(tmp_path, key):
    """B starts while A's files are uploaded but their batches not yet created (a slow create): B waits for A's
    batches instead of creating its own from A's files or submitting the requests again."""
    import subprocess


    class SlowCreate(FakeBatchServer):
        def _create(self, handler, raw, query):
            time.sleep(1.5)
            return super()._create(handler, raw, query)

    reply = CountingReply()
    with SlowCreate(reply, batch_latency_s=1) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, N, **BATCH)
        set_config(tmp_path, cache_path=str(tmp_path / "shared.sqlite"))
        first = subprocess.Popen(mapd_argv(*teach_argv(tmp_path, tmp_path / "a")), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        assert wait_for(lambda: server.files_uploaded >= 1, timeout=60)
        second = subprocess.run(mapd_argv(*teach_argv(tmp_path, tmp_path / "b")), capture_output=True, timeout=120)
        assert first.wait(timeout=120) == 0 and second.returncode == 0
        inputs = [job["input_file_id"] for job in map(server.batch, [f"batch_{i + 1}" for i in range(
            server.batches_created)])]
        assert len(inputs) == len(set(inputs))  # no file made into two batches (the reviews may split between A and B)
        assert max(server.submitted_custom_ids.values()) == 1 and reply.duplicates == 0
    assert teach_records(tmp_path / "a") == teach_records(tmp_path / "b")


def test_calls_a_batch_gave_up_share_the_teachers_live_request_slots(tmp_path, key, monkeypatch):
    """A live teacher whose earlier batch gave its calls up makes them live within the same max_concurrency as
    its other calls: never more of its calls at the endpoint at once than that."""
    making, most = 0, 0
    complete = OpenAIProvider.complete

    async def counted(self, call):
        nonlocal making, most
        making += 1
        most = max(most, making)
        try:
            return await complete(self, call)
        finally:
            making -= 1

    monkeypatch.setattr(OpenAIProvider, "complete", counted)
    calls = [Call(CallKey("test", str(i), "t"), [{"role": "user", "content": f"question {i}"}]) for i in range(12)]
    with (FakeBatchServer(CountingReply(), batch_latency_s=3600, batch_error_first=1, latency_s=0.2) as server,
          CallCache(tmp_path / "cache.sqlite") as cache):
        live = TeacherConfig(name="t", model="model-t", base_url=server.base_url, api_key_env=KEY_ENV,
                             max_concurrency=2, batch_poll_s=0.05)

        async def submit_then_stop() -> None:  # the run ends with its first 6 calls pending in one batch
            for call in calls[:6]:
                asyncio.ensure_future(dispatcher.complete(call))
            while not (rows := cache.batches()) or rows[0]["batch_id"] is None:
                await asyncio.sleep(0.05)

        with Dispatcher([live.model_copy(update={"batch": True})], cache) as dispatcher:
            dispatcher.run(submit_then_stop(), desc=None)
        server.finish_all()  # every line of that batch is an error: its calls go live in the next run
        server.batch_latency_s = 0
        server.reset()
        with Dispatcher([live], cache, backoff=FAST) as dispatcher:
            results = dispatcher.complete_all(calls)
        assert all(result.text for result in results.values())
        assert server.requests == 12 and server.batches_created == 0  # 6 given up by the batch, 6 new
        assert most == 2
