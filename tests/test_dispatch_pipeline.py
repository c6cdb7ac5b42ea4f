"""The dispatcher across runs (one loop, one client per teacher, close) and its follow-up calls
(``run(..., then=...)``), which let `mapd teach` start each rationale's reviews as soon as it arrives."""

from __future__ import annotations

import socket

import pytest
from tests.openai_server import FakeOpenAIServer

from mapd.config import RunConfig
from mapd.generation import Generation
from mapd.llm import Call, CallCache, Dispatcher, TeacherConfig
from mapd.llm.openai_provider import Backoff
from mapd.stages.feedback import feedback_calls, feedback_records
from mapd.stages.rationales import rationale_calls, rationale_records
from mapd.stages.review import review
from mapd.stages.teach import teach
from mapd.tasks import TaskConfig

FAST = Backoff(initial_s=0.001, max_s=0.01, jitter_s=0.001)


def http(server: FakeOpenAIServer, name: str, **fields) -> TeacherConfig:
    return TeacherConfig(name=name, model=f"model-{name}", base_url=server.base_url, timeout_s=5, **fields)


def ask(teacher: str, text: str) -> Call:
    return Call(teacher, [{"role": "user", "content": text}])


@pytest.fixture
def cache(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        yield cache


def test_followups_start_at_once_and_come_back_grouped_by_call(cache):
    # "a" makes one call at a time; with a barrier "b" would only start after both of a's calls
    with FakeOpenAIServer(latency_s=0.3) as server, \
            Dispatcher([http(server, "a", max_concurrency=1), http(server, "b")], cache, backoff=FAST) as dispatcher:
        seen = []

        def then(index, result):
            seen.append(index)
            return [ask("b", f"after {index}")] if index == 0 else [ask("b", "second"), ask("b", "third")]

        results = dispatcher.run([ask("a", "first"), ask("a", "later")], "test", then=then)
    assert sorted(seen) == [0, 1]
    assert [r.text for r in results] == ["model-a read: first", "model-a read: later", "model-b read: after 0",
                                         "model-b read: second", "model-b read: third"]
    assert server.max_in_flight >= 2  # b's follow-up of the first call ran while a's second call did


def test_followups_of_cached_calls_identical_calls_and_dry_runs(cache):
    with FakeOpenAIServer() as server:
        teachers = [http(server, "a"), http(server, "b")]
        with Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            dispatcher.run([ask("a", "cached")], "warm up")
        server.reset()

        def follow(index, result):
            return [ask("b", f"on {result.text}"), ask("a", "new")]

        with Dispatcher(teachers, cache, dry_run=True) as dry:
            planned = dry.run([ask("a", "cached"), ask("a", "new")], "dry", then=follow)
        assert server.requests == 0 and [r.text is None for r in planned] == [False, True, True, True, True, True]
        assert dry.estimated["a"]["calls"] == 4 and dry.estimated["a"]["to_call"] == 1  # "new" counted once
        with Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            results = dispatcher.run([ask("a", "cached"), ask("a", "new")], "test", then=follow)
    assert server.requests_by_model == {"model-a": 1, "model-b": 2}  # "new" three times, made once
    assert results[0].cached and results[2].text == "model-b read: on model-a read: cached"
    assert results[1].text == results[3].text == results[5].text == "model-a read: new"
    assert dispatcher.summary()["a"]["cache_hits"] == 1 and dispatcher.summary()["a"]["calls"] == 1


def test_clients_live_across_runs_until_close(cache):
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([http(server, "a")], cache, backoff=FAST)
        dispatcher.run([ask("a", "one")], "first")
        client = dispatcher._http["a"]
        dispatcher.run([ask("a", "two")], "second")
        assert dispatcher._http["a"] is client  # the same connections serve the second run
        dispatcher.close()
        assert dispatcher._http == {}
        dispatcher.close()  # closing twice is harmless
        with pytest.raises(RuntimeError, match="closed"):
            dispatcher.run([ask("a", "three")], "closed")


def test_an_error_in_then_leaves_the_dispatcher_usable(cache):
    with FakeOpenAIServer(latency_s=0.05) as server, Dispatcher([http(server, "a")], cache, backoff=FAST) as dispatcher:
        def broken(index, result):
            raise ValueError("no follow-up")

        with pytest.raises(ValueError, match="no follow-up"):
            dispatcher.run([ask("a", f"q{i}") for i in range(20)], "test", then=broken)
        assert [r.text for r in dispatcher.run([ask("a", "q0"), ask("a", "fresh")], "again")] == [
            "model-a read: q0", "model-a read: fresh"]


def test_teach_pipelined_equals_the_two_step_teach(tmp_path, monkeypatch):
    """The same records as dispatching feedback + rationales, then the reviews (what teach did before it
    pipelined), and a local teacher's calls batch and are seeded exactly as in those two runs."""
    batches = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        batches.append(([p[-1]["content"] for p in prompts], kwargs["seed"]))
        return [Generation(f"local s{kwargs['seed']}: the answer is {len(p[-1]['content']) % 3 + 6}. [4]", 5, 2)
                for p in prompts]

    monkeypatch.setattr("mapd.llm.local_provider.load_model", lambda name, gguf: ("model", "tokenizer"))
    monkeypatch.setattr("mapd.llm.local_provider.generate", fake_generate)
    mistakes = [{"id": f"q{i}", "question": f"What is {i} + 7 - {i}?", "gold": "7", "output": f"{i + 7}"}
                for i in range(5)]

    def reply(messages, model):
        content = messages[-1]["content"]  # q2's calls fail (empty replies); scores 0-5 (0 is invalid)
        return "" if "is 2 + 7" in content else f"{model}: the answer is {len(content) % 3 + 6}. [{len(content) % 6}]"

    with FakeOpenAIServer(reply, latency_s=0.02) as server:
        teachers = [http(server, "gpt", max_concurrency=3, max_retries=1),
                    TeacherConfig(name="loc", model="x", max_concurrency=4),
                    http(server, "gemini", max_concurrency=2, max_retries=1)]
        config = RunConfig(task=TaskConfig(name="svamp"), teachers=teachers)
        names = [t.name for t in teachers]
        with CallCache(tmp_path / "a.sqlite") as cache, Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            pipelined = teach(mistakes, config, dispatcher, "number")
        pipelined_batches = batches[:]
        batches.clear()
        with CallCache(tmp_path / "b.sqlite") as cache, Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            first = feedback_calls(mistakes, "number", names, config.prompts)
            second = rationale_calls(mistakes, "number", names, config.prompts)
            results = dispatcher.run(first + second)
            drafts = rationale_records(mistakes, "number", names, results[len(first):])
            two_step = (feedback_records(mistakes, names, results[: len(first)]),
                        review(drafts, mistakes, dispatcher, config.prompts, config.review, answer_kind="number"))
    assert pipelined == two_step
    assert pipelined_batches == batches and len(batches) > 3  # 10 calls in batches of 4, then the reviews
    drafts = pipelined[1]
    assert any(r["text"] is None for r in drafts) and any(r["accepted"] for r in drafts)
    assert all(len(r["reviews"]) == (0 if r["text"] is None else 2) for r in drafts)


def test_a_refused_connection_says_so(cache):
    """The SDK's aiohttp transport calls a refused connection a timeout; the recorded error adds the cause."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    dead = TeacherConfig(name="dead", model="m", base_url=url, max_retries=0)
    with Dispatcher([dead], cache, backoff=FAST) as dispatcher:
        [result] = dispatcher.run([ask("dead", "hello?")], "test")
    assert result.text is None and "ConnectionRefusedError" in result.error, result.error
