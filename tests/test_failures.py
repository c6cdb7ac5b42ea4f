"""Failure is loud and early; the budget is a total; one cache serves many processes (docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import (COMMITTEE, KEY_ENV, CountingReply, dead_url, mapd_argv, teach_argv, teach_records,
                                   write_teach_setup)

from mapd.cli import main
from mapd.llm import CallCache
from mapd.llm.cache import process_owner

pytestmark = pytest.mark.usefixtures("key")  # conftest: a key in $KEY_ENV for every test
PRICED = {"price_input_per_mtok": 1000.0, "price_output_per_mtok": 1000.0}  # ~0.02 USD a call here


def teach(config, mistakes, out) -> int:
    return main(teach_argv(config, mistakes, out))


def records(out) -> list[dict]:
    """feedback.jsonl, then rationales.jsonl."""
    return sum(teach_records(out), [])


def set_teacher(config, index: int, **fields) -> None:
    data = yaml.safe_load(config.read_text())
    data["teachers"][index].update(fields)
    config.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("fault, shown", [("unauthorized", "AuthenticationError"),
                                          ("model_not_found", "NotFoundError")])
def test_an_error_every_call_would_get_stops_the_teacher_at_once(tmp_path, capfd, fault, shown):
    concurrency = 4
    with FakeOpenAIServer(fault_rate=1.0, faults=(fault,)) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 20, max_concurrency=concurrency)
        assert teach(config, mistakes, tmp_path / "out") == 3
    assert server.requests <= 3 * concurrency * len(COMMITTEE)  # at most the first wave of each slot, not 20 x 4 calls
    err = capfd.readouterr().err
    stops = [line for line in err.splitlines() if " stopped: " in line]
    assert sorted(line.split()[2] for line in stops) == sorted(COMMITTEE) and all(shown in line for line in stops)
    assert "Traceback" not in err and err.rstrip().splitlines()[-1].startswith("mapd: error: teach incomplete")
    written = records(tmp_path / "out")
    assert len(written) == 2 * 20 * len(COMMITTEE) and all(r["text"] is None for r in written)
    assert {r["error"].split(":")[0] for r in written} <= {shown, "TeacherStopped"}
    stats = json.loads((tmp_path / "out" / "teach_stats.json").read_text())
    assert all(shown in row["stopped"] for row in stats.values())


def test_a_teacher_that_is_down_is_stopped_by_its_circuit_breaker(tmp_path, capfd, fast_retries):
    with FakeOpenAIServer(CountingReply()) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 20, max_concurrency=4)
        set_teacher(config, 2, base_url=dead_url(), max_consecutive_failures=6, failing_for_s=0)
        assert teach(config, mistakes, tmp_path / "out") == 3
    err = capfd.readouterr().err
    assert f"teacher {COMMITTEE[2]} stopped: 6 failed attempts in a row" in err
    written = records(tmp_path / "out")
    dead = [r for r in written if r["teacher"] == COMMITTEE[2]]
    assert all(r["text"] is None for r in dead) and sum(r["error"].startswith("TeacherStopped") for r in dead) > 20
    assert all(r["text"] for r in written if r["teacher"] != COMMITTEE[2])  # the others are whole


def test_retries_and_long_waits_are_shown_and_logged(tmp_path, capfd, fast_retries):
    with FakeOpenAIServer(CountingReply(), fail_first=("rate_limit",), retry_after_s=100000) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1)
        assert teach(config, mistakes, tmp_path / "out") == 0
    err = capfd.readouterr().err
    retries = [line for line in err.splitlines() if "RateLimitError" in line]
    assert retries and all("retry 1/6 in 0.0 s (the server asked for 100000 s)" in line for line in retries)
    logged = (tmp_path / "out" / "mapd.log").read_text()
    assert "RateLimitError" in logged and "the server asked for 100000 s" in logged


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": None, "completion_tokens": None},
    {"prompt_tokens": "12", "completion_tokens": "30"},
    {"prompt_tokens": -5, "completion_tokens": -100},
    {"prompt_tokens": 10**12, "completion_tokens": 10**12},
    "not an object",
])
def test_malformed_usage_is_estimated_flagged_and_never_free(tmp_path, usage):
    with FakeOpenAIServer(CountingReply(), usage=usage) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2, **PRICED)
        assert teach(config, mistakes, tmp_path / "out") == 0
    stats = json.loads((tmp_path / "out" / "teach_stats.json").read_text())
    for row in stats.values():
        assert row["usage_estimated"] == row["calls"] > 0
        assert 0 < row["cost_usd"] < 1  # estimated from the texts: neither negative nor absurd


def test_the_budget_is_a_total_over_reruns(tmp_path, capfd):
    reply = CountingReply()
    with FakeOpenAIServer(reply) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 10, max_concurrency=2, max_tokens=100,
                                             **PRICED)  # a call's worst case ~0.15 USD, its cost ~0.06 USD
        data = yaml.safe_load(config.read_text())
        data["max_budget_usd"] = 1.0
        config.write_text(yaml.safe_dump(data))
        assert teach(config, mistakes, tmp_path / "out") == 3
        first = server.requests
        err = capfd.readouterr().err
        assert 0 < first < 10 * 3 * 4 and "raise max_budget_usd and rerun" in err.splitlines()[-1]
        assert any(r["error"] and r["error"].startswith("BudgetExceeded") for r in records(tmp_path / "out"))

        server.reset()
        assert teach(config, mistakes, tmp_path / "out") == 3  # the same budget: it is spent already
        assert server.requests == 0

        data["max_budget_usd"] = 100.0
        config.write_text(yaml.safe_dump(data))
        assert teach(config, mistakes, tmp_path / "out") == 0  # raised: it finishes
    assert first + server.requests == 10 * 3 * 4 and reply.duplicates == 0  # nothing paid twice
    assert all(r["text"] for r in records(tmp_path / "out"))


def test_two_processes_on_one_cache_pay_each_call_once(tmp_path):
    reply = CountingReply()
    with FakeOpenAIServer(reply, latency_s=0.05) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 12, max_concurrency=4)
        data = yaml.safe_load(config.read_text())
        data["cache_path"] = str(tmp_path / "shared.sqlite")
        config.write_text(yaml.safe_dump(data))
        runs = [subprocess.Popen(mapd_argv("-q", *teach_argv(config, mistakes, tmp_path / f"out{i}")),
                                 stderr=subprocess.PIPE, text=True)
                for i in range(2)]
        errors = [run.communicate(timeout=300)[1] for run in runs]
        assert [run.returncode for run in runs] == [0, 0], errors
    assert reply.duplicates == 0 and server.completions == 12 * 3 * 4
    assert (tmp_path / "out0" / "rationales.jsonl").read_text() == (tmp_path / "out1" / "rationales.jsonl").read_text()


def test_a_dead_process_claims_expire(tmp_path):
    with CallCache(tmp_path / "c.sqlite") as cache:
        assert cache.claim("k", "dead", lease_s=0.2) == "claimed"
        assert cache.claim("k", "alive", lease_s=30) == "busy"
        time.sleep(0.25)
        assert cache.claim("k", "alive", lease_s=30) == "claimed"
        assert cache.claim("k", "other", lease_s=30, reserve_usd=2, budget_usd=1) == "busy"
        cache.release("alive")
        assert cache.claim("k", "other", lease_s=30, reserve_usd=2, budget_usd=1) == "over budget"


def test_a_reply_with_a_lone_surrogate_is_stored_not_fatal(tmp_path):
    with FakeOpenAIServer(reply=lambda messages: "The answer is 7 \ud800.") as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1)
        assert teach(config, mistakes, tmp_path / "out") == 0
    assert all("\ufffd" in r["text"] for r in records(tmp_path / "out"))


def test_a_claim_of_a_process_that_ended_on_this_machine_is_taken_at_once(tmp_path):
    """A rerun after kill -9 does not wait out the dead process's leases; a claim of a live process, or of one
    on another machine (whose process ids mean nothing here), still holds until its lease ends."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    me = process_owner()
    host, namespace, _, tag = me.split(":")
    with CallCache(tmp_path / "cache.sqlite") as cache:
        assert cache.claim("a", f"{host}:{namespace}:{ended.pid}:{tag}", lease_s=30) == "claimed"
        assert cache.claim("a", me, lease_s=30) == "claimed"
        assert cache.claim("b", f"elsewhere:{namespace}:{ended.pid}:{tag}", lease_s=30) == "claimed"
        assert cache.claim("b", me, lease_s=30) == "busy"
        assert cache.claim("c", process_owner(), lease_s=30) == "claimed"  # this process, another dispatcher: alive
        assert cache.claim("c", me, lease_s=30) == "busy"
        assert cache.claim("d", "an owner of an older mapd", lease_s=30) == "claimed"  # not one of ours: its lease
        assert cache.claim("d", me, lease_s=30) == "busy"


def test_without_a_pid_namespace_to_read_claims_are_named_all_the_same(monkeypatch):
    """Where /proc/self/ns/pid cannot be read (not Linux), the namespace is "-" for every process here."""
    from mapd.llm import cache as cache_module

    def unreadable(path):
        raise OSError("no /proc here")

    monkeypatch.setattr(cache_module.os, "readlink", unreadable)
    owner = process_owner()
    assert owner.split(":")[1] == "-" and not cache_module.owner_is_gone(owner)
