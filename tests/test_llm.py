"""The teacher call layer: cache, retries against a real local HTTP server, concurrency, budget."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from email.utils import formatdate
from types import SimpleNamespace

import pytest
from tests.openai_server import PERMANENT_FAULTS, TRANSIENT_FAULTS, FakeOpenAIServer
from tests.reliability_kit import FAST

from mapd.config import TeacherConfig
from mapd.errors import MapdError
from mapd.generation import Generation, key_seed
from mapd.llm import Call, CallCache, CallKey, CallResult, Dispatcher
from mapd.llm.cache import cache_key
from mapd.llm.dispatch import BUDGET_ERROR
from mapd.llm.estimate import Estimate, longest_reply, worst_case
from mapd.llm.openai_provider import CHARS_PER_TOKEN, retry_after_s
from mapd.llm.tally import TeacherTally, summary_table
from mapd.records import TeacherStats
from mapd.secrets import check_credentials

KEY_ENV = "MAPD_TEST_LLM_KEY"
SECRET = "sk-test-not-a-real-key-0123456789"


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


def calls_for(name: str, n: int, sample: int = 0, stage: str = "test") -> list[Call]:
    """``n`` calls to teacher ``name`` with ids "0".."n-1" (``stage`` tells apart calls with the same messages)."""
    return [Call(CallKey(stage, str(i), name, sample=sample), [{"role": "user", "content": f"question {i}"}])
            for i in range(n)]


def run(teachers: list[TeacherConfig], cache: CallCache, calls: list[Call], **kwargs) -> tuple[Dispatcher, list]:
    """One ``complete_all`` on a new dispatcher (closed afterwards); the results in the order of ``calls``."""
    with Dispatcher(teachers, cache, backoff=FAST, **kwargs) as dispatcher:
        by_key = dispatcher.complete_all(calls, "test")
    assert set(by_key) == {call.key for call in calls}
    assert all(result.key == key for key, result in by_key.items())  # every result carries its own call's key
    return dispatcher, [by_key[call.key] for call in calls]


# -- cache --------------------------------------------------------------------------------


def test_cache_hit_miss_failure_and_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    with CallCache(path) as cache:
        assert cache.get("k") is None
        cache.put("k", CallResult(None, None, "RateLimitError: slow down", attempts=7))
        assert cache.get("k") is None  # a recorded failure is not a hit
        cache.put("k", CallResult(None, "fine", None, 10, 3, 0.5, attempts=2))
        cache.put("k", CallResult(None, None, "late failure"))  # never replaces a success
    with CallCache(path) as cache:  # survives reopening
        hit = cache.get("k")
    assert (hit.text, hit.error, hit.input_tokens, hit.output_tokens, hit.attempts) == ("fine", None, 10, 3, 2)
    assert hit.cached and hit.key is None  # the cache knows replies, not which call asked


def test_cache_key_ignores_endpoint_and_key_but_not_sampling():
    # greedy: a sampling teacher's name is part of its key (tests/test_trust_names.py)
    base = TeacherConfig(name="a", model="m", base_url="https://user:pw@host/v1", api_key_env="X", temperature=0)
    call = Call(CallKey("feedback", "1", "a"), [{"role": "user", "content": "q"}])
    assert cache_key(base, call) == cache_key(base.model_copy(update={"base_url": "http://other/v1", "name": "b",
                                                                      "api_key_env": "Y"}), call)
    assert cache_key(base, call) == cache_key(base, Call(CallKey("review", "2", "b", "a"), call.messages))
    assert cache_key(base, call) != cache_key(base, Call(CallKey("feedback", "1", "a", sample=1), call.messages))
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
        calls = (calls_for("a", 3) + calls_for("a", 3, stage="again") + calls_for("b", 3)
                 + calls_for("b", 1, sample=1))
        _, results = run([teacher(server, "a"), teacher(server, "b")], cache, calls)
    assert server.requests_by_model == {"model-a": 3, "model-b": 4}
    assert [r.text for r in results[:3]] == [r.text for r in results[3:6]]
    assert [r.key.stage for r in results[:6]] == ["test"] * 3 + ["again"] * 3  # a shared reply, each with its key
    assert results[6].text.startswith("model-b read")


def test_complete_all_refuses_calls_that_share_a_key(cache):
    with FakeOpenAIServer() as server, Dispatcher([teacher(server, "a")], cache, backoff=FAST) as dispatcher:
        with pytest.raises(MapdError, match="share a key"):
            dispatcher.complete_all(calls_for("a", 2) + calls_for("a", 1), "x")
    assert server.requests == 0


def test_request_rate_limit_spaces_requests(cache):
    with FakeOpenAIServer() as server:
        began = time.perf_counter()
        run([teacher(server, requests_per_minute=120)], cache, calls_for("t", 122))
    assert time.perf_counter() - began >= 0.4  # 120 burst, then one every 0.5 s


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_stops_new_calls_and_keeps_the_finished(cache, concurrency):
    priced = {"max_concurrency": concurrency, "max_tokens": 100, "price_output_per_mtok": 10_000.0}  # 100 tokens: 1 USD
    with FakeOpenAIServer(reply=lambda messages: "x" * 400) as server:  # replies of 100 tokens
        stopped, refused = run([teacher(server, **priced)], cache, calls_for("t", 20), max_budget_usd=5.0)
        made = server.completions
        assert made == 5 and stopped.budget_reached and stopped.summary()["t"]["not_made"] == 15
        assert sum(r.error == BUDGET_ERROR for r in refused) == 15 and sum(bool(r.text) for r in refused) == 5
        server.reset()
        again, _ = run([teacher(server, **priced)], cache, calls_for("t", 20), max_budget_usd=5.0)
        assert server.requests == 0 and again.budget_reached  # the budget is a total: the same budget pays nothing more
        dispatcher, results = run([teacher(server, **priced)], cache, calls_for("t", 20), max_budget_usd=100.0)
    assert server.requests == 20 - made and all(r.text for r in results)
    assert dispatcher.summary()["t"]["cache_hits"] == made and dispatcher.spent_usd <= 100
    assert cache.spent_usd() == pytest.approx(20.0)  # every call paid once, over the three runs


@pytest.mark.parametrize("concurrency", [1, 4])
def test_budget_holds_only_the_calls_in_flight(cache, concurrency):
    """A call's worst case is held from when it starts until it ends: calls waiting for a slot hold nothing,
    so cheap replies leave room for every call (worst case 1 USD each, a reply costs 0.1 USD: 2 USD for 20,
    and at most ``concurrency`` USD held at once)."""
    priced = {"max_concurrency": concurrency, "max_tokens": 100, "price_output_per_mtok": 10_000.0}
    with FakeOpenAIServer(reply=lambda messages: "x" * 40) as server:  # replies of 10 tokens
        dispatcher, results = run([teacher(server, **priced)], cache, calls_for("t", 20),
                                  max_budget_usd=concurrency + 2.5)
    assert server.completions == 20 and all(r.text for r in results)
    assert dispatcher.spent_usd == pytest.approx(2.0)


def test_dry_run_estimates_without_requests_or_keys(cache, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([teacher(server, price_input_per_mtok=1e6, max_tokens=10)], cache, dry_run=True)
        calls = calls_for("t", 4) + calls_for("t", 1, stage="again")
        by_key = dispatcher.complete_all(calls, "dry")
        dispatcher.close()
    results = [by_key[call.key] for call in calls]
    # nothing is called: a stand-in reply as long as the longest possible (max_tokens * ~4 characters)
    assert server.requests == 0 and all(r.dry_run and r.error is None and len(r.text) == 40 for r in results)
    estimate = dispatcher.estimated
    assert estimate["t"].calls == 5 and estimate["t"].to_call == 4
    assert estimate["t"].max_output_tokens == 40
    assert estimate["t"].input_tokens == 4 * (len("question 0") // 4 + 1)  # characters / 4
    assert estimate["t"].cost_usd == pytest.approx(estimate["t"].input_tokens)
    assert dispatcher.summary()["t"]["calls"] == 0 and dispatcher.spent_usd == 0  # the estimate is all a dry run makes


def test_unset_key_fails_before_any_request(cache, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([teacher(server)], cache)
        with pytest.raises(MapdError, match=KEY_ENV):
            check_credentials(dispatcher.teachers.values())
        with pytest.raises(MapdError, match=KEY_ENV):
            dispatcher.complete_all(calls_for("t", 2), "x")
        dispatcher.close()
    assert server.requests == 0


def test_unknown_teacher_is_an_error(cache):
    with Dispatcher([], cache) as dispatcher, pytest.raises(MapdError, match="unknown teacher 'nobody'"):
        dispatcher.complete_all(calls_for("nobody", 1), "x")


def test_key_is_sent_but_never_stored(cache):
    with FakeOpenAIServer(fail_first=["bad_request"]) as server:
        dispatcher, _ = run([teacher(server)], cache, calls_for("t", 3))
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}
    stored = b"".join(p.read_bytes() for p in cache.path.parent.iterdir() if p.name.startswith(cache.path.name))
    assert SECRET.encode() not in stored and b"Bearer" not in stored
    assert SECRET not in summary_table({"t": TeacherStats.from_counts(dispatcher.summary()["t"]).model_dump()})


def test_summary_has_the_teach_stats_fields(cache):
    with FakeOpenAIServer() as server:
        dispatcher, _ = run([teacher(server)], cache, calls_for("t", 5))
    row = TeacherStats.from_counts(dispatcher.summary()["t"]).model_dump()  # as the teach stage stores it
    assert set(dispatcher.summary()["t"]) <= set(row)  # the call path counts nothing the record does not hold
    assert set(row) == {"calls", "cache_hits", "failures", "input_tokens", "output_tokens", "cost_usd",
                                     "seconds", "latency_p50_s", "latency_p95_s", "not_made", "usage_estimated", "stopped",
                                     "batch_calls", "batch_input_tokens", "batch_output_tokens", "batch_cost_usd",
                                     "batches"}
    assert row["calls"] == 5 and row["input_tokens"] > 0 and row["latency_p95_s"] >= row["latency_p50_s"]
    assert "t" in summary_table({"t": row})


def test_a_tally_counts_live_batch_and_failed_calls_apart():
    """llm.tally on its own: a batch call counts in both the totals and the batch columns; a failure counts."""
    tally = TeacherTally()
    tally.add(CallResult(None, "a", input_tokens=10, output_tokens=5, latency_s=1.0), 0.5)
    tally.add(CallResult(None, "b", input_tokens=20, output_tokens=7, latency_s=3.0, batch="file-1"), 0.25)
    tally.add(CallResult(None, None, "APIError: down", latency_s=2.0, usage_estimated=True), 0.0)
    row = tally.summary()
    assert (row["calls"], row["failures"], row["usage_estimated"], row["input_tokens"], row["output_tokens"]) == (
        3, 1, 1, 30, 12)
    assert (row["batch_calls"], row["batch_input_tokens"], row["batch_output_tokens"]) == (1, 20, 7)
    assert (row["cost_usd"], row["batch_cost_usd"], row["latency_p50_s"], row["latency_p95_s"]) == (0.75, 0.25, 2.0, 3.0)
    assert set(row) <= set(TeacherStats.model_fields)  # every counter is a field of the record
    table = summary_table({"t": TeacherStats.from_counts(row).model_dump()})
    assert "teacher calls" in table and "0.75" in table.splitlines()[-2]  # the one row, its cost


def test_a_dry_run_estimate_counts_the_worst_case():
    """llm.estimate: a call not made is counted with all of max_tokens as output, and the stand-in reply is the
    longest one max_tokens allow."""
    judge = TeacherConfig(name="t", model="m", base_url="http://x/v1", max_tokens=100, price_input_per_mtok=1.0,
                          price_output_per_mtok=2.0)
    call = Call(CallKey("feedback", "1", "t"), [{"role": "user", "content": "x" * 400}])
    estimate = Estimate()
    estimate.add(judge, call)
    tokens, cost = worst_case(judge, call)
    assert (estimate.to_call, estimate.input_tokens, estimate.max_output_tokens, estimate.cost_usd) == (
        1, tokens, 100, cost)
    assert tokens > 0 and cost == pytest.approx((tokens * 1.0 + 100 * 2.0) / 1e6)
    assert len(longest_reply(call.key, 100)) == CHARS_PER_TOKEN * 100


# -- local teacher ------------------------------------------------------------------------


def test_local_teacher_batches_seeds_and_caches(cache, tmp_path, monkeypatch):
    """The local path with a stand-in model: batches of max_concurrency with one sample index each, every call
    seeded from its own key (the same call samples with the same seed whatever batch it lands in), and cached."""
    batches = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        batches.append(([p[-1]["content"] for p in prompts], kwargs["seeds"], kwargs["max_new_tokens"]))
        return [Generation(f"local {p[-1]['content']} s{seed}", 5, 2) for p, seed in zip(prompts, kwargs["seeds"])]

    monkeypatch.setattr("mapd.llm.local_provider.load_model", lambda name, gguf, **placement: ("model", "tokenizer"))
    monkeypatch.setattr("mapd.llm.local_provider.generate", fake_generate)
    local = TeacherConfig(name="loc", model="some/model", max_concurrency=4, max_tokens=16)
    calls = calls_for("loc", 6) + calls_for("loc", 2, sample=1, stage="resample")
    with Dispatcher([local], cache) as dispatcher:
        by_key = dispatcher.complete_all(calls, "local")
    results = [by_key[call.key] for call in calls]
    questions = [f"question {i}" for i in range(6)]
    assert sorted((len(b[0]), b[2]) for b in batches) == [(2, 16), (2, 16), (4, 16)]
    assert sorted(q for b in batches[:2] for q in b[0]) == questions  # sample 0: 4 + 2
    assert sorted(batches[2][0]) == questions[:2]  # sample 1 apart, although its prompts are those of sample 0
    seeds = [key_seed(c.key.stage, c.key.id, c.key.teacher, c.key.reviewer, c.key.sample) for c in calls]
    assert len(set(seeds)) == len(calls)  # every call its own seed, the same prompt's samples included
    assert [r.text for r in results] == [f"local {c.messages[-1]['content']} s{seed}" for c, seed in zip(calls, seeds)]
    first = batches[:]
    batches.clear()
    with CallCache(tmp_path / "fresh.sqlite") as fresh, Dispatcher([local], fresh) as dispatcher:  # reproducible
        anew = dispatcher.complete_all(calls, "local")
    assert batches == first and {k: r.text for k, r in anew.items()} == {k: r.text for k, r in by_key.items()}
    one_by_one = local.model_copy(update={"max_concurrency": 1})
    with CallCache(tmp_path / "single.sqlite") as single, Dispatcher([one_by_one], single) as dispatcher:
        alone = dispatcher.complete_all(calls, "local")  # other batches, the same seeds and texts
    assert {k: r.text for k, r in alone.items()} == {k: r.text for k, r in by_key.items()}
    batches.clear()
    with Dispatcher([local], cache) as dispatcher:
        again = dispatcher.complete_all(calls, "local")
    assert batches == [] and [again[call.key].text for call in calls] == [r.text for r in results]
    assert all(again[call.key].cached for call in calls)


@pytest.mark.slow
def test_local_teacher_real_model(cache):
    local = TeacherConfig(name="smol", model="embedded:smollm2-135m-instruct", max_tokens=16, max_concurrency=4,
                          temperature=0.8)
    calls = [Call(CallKey("test", str(i), "smol"), [{"role": "user", "content": q}])
             for i, q in enumerate(("What is 2+3?", "Name a colour."))]  # one batch
    with Dispatcher([local], cache) as dispatcher:
        results = dispatcher.complete_all(calls, "smol")
    assert all(r.text for r in results.values()), [r.error for r in results.values()]
    assert dispatcher.summary()["smol"]["calls"] == 2 and dispatcher.summary()["smol"]["output_tokens"] > 0
    with Dispatcher([local], cache) as fresh:
        again = fresh.complete_all(calls, "smol")
    assert [again[c.key].text for c in calls] == [results[c.key].text for c in calls]
    assert fresh.summary()["smol"]["calls"] == 0 and fresh._local["smol"].weights._loaded is None  # nothing generated or loaded


def test_two_teachers_on_one_local_model_share_its_weights(cache, monkeypatch):
    """Two names on one local model are two voices (their own calls and seeds) on one copy of the weights."""
    loads = []
    monkeypatch.setattr("mapd.llm.local_provider.load_model",
                        lambda name, gguf, **placement: loads.append(name) or ("model", "tokenizer"))
    monkeypatch.setattr("mapd.llm.local_provider.generate", lambda model, tokenizer, prompts, **kwargs: [
        Generation(f"{model} s{seed}", 5, 2) for seed in kwargs["seeds"]])
    voices = [TeacherConfig(name=name, model="some/model", temperature=0.7) for name in ("a", "b")]
    other = TeacherConfig(name="c", model="other/model")
    with Dispatcher([*voices, other], cache) as dispatcher:
        results = dispatcher.complete_all(calls_for("a", 2) + calls_for("b", 2) + calls_for("c", 1), "local")
    assert sorted(loads) == ["other/model", "some/model"]
    assert len({result.text for result in results.values()}) == 5  # every call its own seed
