"""The teacher call layer: cache, retries against a real local HTTP server, concurrency, budget."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from email.utils import formatdate
from types import SimpleNamespace

import pytest
from tests.openai_server import PERMANENT_FAULTS, TRANSIENT_FAULTS, FakeOpenAIServer

from mapd.errors import MapdError
from mapd.generation import Generation
from mapd.llm import BudgetExceeded, Call, CallCache, CallResult, Dispatcher, TeacherConfig
from mapd.llm.cache import cache_key
from mapd.llm.openai_provider import Backoff, retry_after_s

KEY_ENV = "MAPD_TEST_LLM_KEY"
SECRET = "sk-test-not-a-real-key-0123456789"
FAST = Backoff(initial_s=0.001, max_s=0.01, jitter_s=0.001)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture
def cache(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        yield cache


def teacher(server: FakeOpenAIServer, name: str = "t", **fields) -> TeacherConfig:
    settings = {"model": f"model-{name}", "base_url": server.base_url, "api_key_env": KEY_ENV, "timeout_s": 5.0,
                "max_retries": 4, "max_concurrency": 16, **fields}
    return TeacherConfig(name=name, **settings)


def calls_for(name: str, n: int, sample: int = 0) -> list[Call]:
    return [Call(name, [{"role": "user", "content": f"question {i}"}], sample) for i in range(n)]


def run(teachers: list[TeacherConfig], cache: CallCache, calls: list[Call], **kwargs) -> tuple[Dispatcher, list]:
    dispatcher = Dispatcher(teachers, cache, backoff=FAST, **kwargs)
    return dispatcher, dispatcher.run(calls, "test")


# -- cache --------------------------------------------------------------------------------


def test_cache_hit_miss_failure_and_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    with CallCache(path) as cache:
        assert cache.get("k") is None
        cache.put("k", CallResult(None, "RateLimitError: slow down", attempts=7))
        assert cache.get("k") is None  # a recorded failure is not a hit
        cache.put("k", CallResult("fine", None, 10, 3, 0.5, attempts=2))
        cache.put("k", CallResult(None, "late failure"))  # never replaces a success
    with CallCache(path) as cache:  # survives reopening
        hit = cache.get("k")
    assert (hit.text, hit.error, hit.input_tokens, hit.output_tokens, hit.attempts) == ("fine", None, 10, 3, 2)
    assert hit.cached


def test_cache_key_ignores_endpoint_and_key_but_not_sampling():
    base = TeacherConfig(name="a", model="m", base_url="https://user:pw@host/v1", api_key_env="X")
    call = Call("a", [{"role": "user", "content": "q"}])
    assert cache_key(base, call) == cache_key(base.model_copy(update={"base_url": "http://other/v1", "name": "b",
                                                                      "api_key_env": "Y"}), call)
    assert cache_key(base, call) != cache_key(base, Call("a", call.messages, sample=1))
    assert cache_key(base, call) != cache_key(base.model_copy(update={"temperature": 0.1}), call)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_request_carries_the_chosen_token_limit_field(cache, field):
    with FakeOpenAIServer() as server:
        run([teacher(server, max_tokens=77, max_tokens_field=field)], cache, calls_for("t", 1))
    [body] = server.bodies
    assert body[field] == 77
    assert {"max_tokens", "max_completion_tokens"} - {field} - set(body) == {"max_tokens", "max_completion_tokens"} - {field}


@pytest.mark.parametrize("content", [b"this is not a database, just text" * 100, None, "old-version"])
def test_damaged_or_foreign_cache_is_a_clear_error_and_kept(tmp_path, content):
    path = tmp_path / "c.sqlite"
    if content is None:  # an SQLite file of some other program
        sqlite3.connect(path).execute("CREATE TABLE other (x)").connection.commit()
    elif content == "old-version":
        CallCache(path).close()
        db = sqlite3.connect(path)
        db.execute("UPDATE mapd_meta SET value='0'")
        db.commit()
        db.close()
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    with pytest.raises(MapdError, match=str(path)):
        CallCache(path)
    assert path.read_bytes() == before


# -- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", TRANSIENT_FAULTS)
def test_each_transient_fault_recovers(cache, fault):
    with FakeOpenAIServer(fail_first=[fault], hang_s=2.0) as server:  # timeouts generous: the machine is shared
        dispatcher, [result] = run([teacher(server, timeout_s=1.0)], cache, calls_for("t", 1))
    assert result.text == "model-t read: question 0", result.error
    assert result.attempts == 2 and server.requests == 2 and server.faults[fault] == 1
    assert dispatcher.summary()["t"]["failures"] == 0


@pytest.mark.parametrize("fault", PERMANENT_FAULTS)
def test_permanent_faults_are_recorded_without_retry(cache, fault):
    with FakeOpenAIServer(fail_first=[fault]) as server:
        dispatcher, [result] = run([teacher(server)], cache, calls_for("t", 1))
    assert result.text is None and server.requests == 1
    expected = {"refusal": "Refusal: I cannot", "content_filter": "Refusal: finish_reason",
                "bad_request": "BadRequestError: "}[fault]
    assert result.error.startswith(expected)
    assert dispatcher.summary()["t"]["failures"] == 1


def test_retry_after_is_honoured(cache):
    with FakeOpenAIServer(fail_first=["rate_limit"], retry_after_s=0.4) as server:
        began = time.perf_counter()
        _, [result] = run([teacher(server)], cache, calls_for("t", 1))
    assert result.text and time.perf_counter() - began >= 0.4


def test_retry_after_header_forms():
    def exc(**headers):
        return SimpleNamespace(response=SimpleNamespace(headers=headers))

    assert retry_after_s(exc(**{"retry-after": "2.5"})) == 2.5
    assert retry_after_s(exc(**{"retry-after-ms": "300"})) == 0.3
    assert 8 < retry_after_s(exc(**{"retry-after": formatdate(time.time() + 10, usegmt=True)})) <= 10
    assert retry_after_s(exc(**{"retry-after": "soon"})) is None
    assert retry_after_s(exc()) is None and retry_after_s(ValueError()) is None


def test_retries_are_bounded_and_a_failure_is_retried_next_run(cache):
    with FakeOpenAIServer(fault_rate=1.0, faults=["server_error_503"]) as server:
        dispatcher, [result] = run([teacher(server, max_retries=3)], cache, calls_for("t", 1))
        assert result.text is None and result.error.startswith("InternalServerError: Error code: 503")
        assert result.attempts == 4 and server.requests == 4
        assert dispatcher.summary()["t"]["failures"] == 1
        run([teacher(server, max_retries=0)], cache, calls_for("t", 1))
        assert server.requests == 5  # the recorded failure was not a cache hit
    row = sqlite3.connect(cache.path).execute("SELECT error, attempts FROM calls").fetchone()
    assert row[0].startswith("InternalServerError") and row[1] == 1


def test_thirty_percent_faults_all_complete(cache):
    n = 1000
    with FakeOpenAIServer(fault_rate=0.3, seed=3, hang_s=2.0) as server:  # client and server share 2 busy cores:
        dispatcher, results = run([teacher(server, timeout_s=1.0, max_retries=10, max_concurrency=32)],  # 1 s timeout
                                  cache, calls_for("t", n))
    failed = Counter(r.error for r in results if r.text is None)
    assert not failed, failed
    assert [r.text for r in results] == [f"model-t read: question {i}" for i in range(n)]
    assert server.completions >= n and sum(server.faults.values()) > 0.25 * server.requests  # >=: a reply can
    # come after the client gave up on it when the shared machine is busy
    assert dispatcher.summary()["t"]["calls"] == n and dispatcher.summary()["t"]["failures"] == 0


# -- concurrency, cache reuse, limits -----------------------------------------------------


def test_calls_run_concurrently_and_second_run_is_free(cache):
    n = 32
    with FakeOpenAIServer(latency_s=0.1) as server:
        began = time.perf_counter()
        _, first = run([teacher(server, max_concurrency=16)], cache, calls_for("t", n))
        elapsed = time.perf_counter() - began
        assert elapsed < n * 0.1 / 2 and server.max_in_flight > 4  # one at a time would take n * 0.1 s
        server.reset()
        dispatcher, second = run([teacher(server, max_concurrency=16)], cache, calls_for("t", n))
    assert server.requests == 0
    assert [r.text for r in first] == [r.text for r in second] and all(r.cached for r in second)
    assert dispatcher.summary()["t"]["cache_hits"] == n and dispatcher.summary()["t"]["calls"] == 0


def test_identical_calls_are_made_once_and_teachers_are_routed(cache):
    with FakeOpenAIServer() as server:
        calls = calls_for("a", 3) + calls_for("a", 3) + calls_for("b", 3) + calls_for("b", 1, sample=1)
        _, results = run([teacher(server, "a"), teacher(server, "b")], cache, calls)
    assert server.requests_by_model == {"model-a": 3, "model-b": 4}
    assert [r.text for r in results[:3]] == [r.text for r in results[3:6]]
    assert results[6].text.startswith("model-b read")


def test_request_rate_limit_spaces_requests(cache):
    with FakeOpenAIServer() as server:
        began = time.perf_counter()
        run([teacher(server, requests_per_minute=120)], cache, calls_for("t", 122))
    assert time.perf_counter() - began >= 0.4  # 120 burst, then one every 0.5 s


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_stops_new_calls_and_keeps_the_finished(cache, concurrency):
    priced = {"max_concurrency": concurrency, "max_tokens": 100, "price_output_per_mtok": 10_000.0}  # 100 tokens: 1 USD
    with FakeOpenAIServer(reply=lambda messages: "x" * 400) as server:  # replies of 100 tokens
        with pytest.raises(BudgetExceeded, match="max_budget_usd=5"):
            run([teacher(server, **priced)], cache, calls_for("t", 20), max_budget_usd=5.0)
        made = server.completions
        assert made == 5
        server.reset()
        dispatcher, results = run([teacher(server, **priced)], cache, calls_for("t", 20), max_budget_usd=100.0)
    assert server.requests == 20 - made and all(r.text for r in results)
    assert dispatcher.summary()["t"]["cache_hits"] == made and dispatcher.spent_usd <= 100


def test_dry_run_estimates_without_requests_or_keys(cache, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([teacher(server, price_input_per_mtok=1e6, max_tokens=10)], cache, dry_run=True)
        calls = calls_for("t", 4) + calls_for("t", 1)
        estimate = dispatcher.estimate(calls)
        results = dispatcher.run(calls, "dry")
    assert server.requests == 0 and all(r.text is None and r.error.startswith("DryRun") for r in results)
    assert estimate["t"]["calls"] == 5 and estimate["t"]["to_call"] == 4
    assert estimate["t"]["max_output_tokens"] == 40
    assert estimate["t"]["input_tokens"] == 4 * (len("question 0") // 4 + 1)  # characters / 4
    assert estimate["t"]["cost_usd"] == pytest.approx(estimate["t"]["input_tokens"])
    assert dispatcher.estimated == estimate


def test_unset_key_fails_before_any_request(cache, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([teacher(server)], cache)
        with pytest.raises(MapdError, match=KEY_ENV):
            dispatcher.check_keys()
        with pytest.raises(MapdError, match=KEY_ENV):
            dispatcher.run(calls_for("t", 2), "x")
    assert server.requests == 0


def test_unknown_teacher_is_an_error(cache):
    with pytest.raises(MapdError, match="unknown teachers"):
        Dispatcher([], cache).run(calls_for("nobody", 1), "x")


def test_key_is_sent_but_never_stored(cache):
    with FakeOpenAIServer(fail_first=["bad_request"]) as server:
        dispatcher, _ = run([teacher(server)], cache, calls_for("t", 3))
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    stored = b"".join(p.read_bytes() for p in cache.path.parent.iterdir() if p.name.startswith(cache.path.name))
    assert SECRET.encode() not in stored and b"Bearer" not in stored
    assert SECRET not in dispatcher.summary_table()


def test_summary_has_the_teach_stats_fields(cache):
    with FakeOpenAIServer() as server:
        dispatcher, _ = run([teacher(server)], cache, calls_for("t", 5))
    row = dispatcher.summary()["t"]
    assert set(row) == {"calls", "cache_hits", "failures", "input_tokens", "output_tokens", "cost_usd", "seconds",
                        "latency_p50_s", "latency_p95_s"}
    assert row["calls"] == 5 and row["input_tokens"] > 0 and row["latency_p95_s"] >= row["latency_p50_s"]
    assert "t" in dispatcher.summary_table()


# -- local teacher ------------------------------------------------------------------------


def test_local_teacher_batches_seeds_and_caches(cache, monkeypatch):
    """The local path with a stand-in model: batches of max_concurrency, seeds from the sample."""
    batches = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        batches.append((len(prompts), kwargs["seed"], kwargs["max_new_tokens"]))
        return [Generation(f"local {p[-1]['content']} s{kwargs['seed']}", 5, 2) for p in prompts]

    monkeypatch.setattr("mapd.llm.local_provider.load_model", lambda name, gguf: ("model", "tokenizer"))
    monkeypatch.setattr("mapd.llm.local_provider.generate", fake_generate)
    local = TeacherConfig(name="loc", model="some/model", max_concurrency=4, max_tokens=16)
    calls = calls_for("loc", 6) + calls_for("loc", 2, sample=1)
    dispatcher = Dispatcher([local], cache)
    results = dispatcher.run(calls, "local")
    assert sorted(batches) == sorted([(4, 0, 16), (2, 1, 16), (2, 100003, 16)])
    assert results[0].text.startswith("local question 0") and results[6].text.endswith("s100003")
    batches.clear()
    again = Dispatcher([local], cache).run(calls, "local")
    assert batches == [] and [r.text for r in again] == [r.text for r in results]


@pytest.mark.slow
def test_local_teacher_real_model(cache):
    local = TeacherConfig(name="smol", model="embedded:smollm2-135m-instruct", max_tokens=16, max_concurrency=4,
                          temperature=0.8)
    calls = [Call("smol", [{"role": "user", "content": q}]) for q in ("What is 2+3?", "Name a colour.")]  # one batch
    dispatcher = Dispatcher([local], cache)
    results = dispatcher.run(calls, "smol")
    assert all(r.text for r in results), [r.error for r in results]
    assert dispatcher.summary()["smol"]["calls"] == 2 and dispatcher.summary()["smol"]["output_tokens"] > 0
    fresh = Dispatcher([local], cache)
    again = fresh.run(calls, "smol")
    assert [r.text for r in again] == [r.text for r in results]
    assert fresh.summary()["smol"]["calls"] == 0 and fresh._local["smol"]._loaded is None  # nothing generated or loaded
