"""The dispatcher across runs (one loop, one client per teacher, close) and follow-up calls: coroutines that
await ``complete`` of a first call and then complete their follow-ups, which let `mapd teach` start each
rationale's reviews as soon as it arrives (and land every record on its own key)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import pytest
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import FAST, dead_url

from mapd.config import PromptConfig, ReviewConfig, TeacherConfig
from mapd.generation import Generation
from mapd.llm import Call, CallCache, CallKey, CallResult, Dispatcher
from mapd.prompts import answer_messages, feedback_messages, review_messages
from mapd.records import Feedback, Mistake, Rationale, Review
from mapd.review_score import parse_score
from mapd.stages.review import judged, reviewers
from mapd.stages.teach import Committee, teach



def http(server: FakeOpenAIServer, name: str, **fields) -> TeacherConfig:
    return TeacherConfig(name=name, model=f"model-{name}", base_url=server.base_url, timeout_s=5, **fields)


def ask(teacher: str, text: str, stage: str = "test") -> Call:
    """A call to ``teacher`` keyed by its text (``stage`` tells apart the same question asked twice)."""
    return Call(CallKey(stage, text, teacher), [{"role": "user", "content": text}])


async def with_followups(dispatcher: Dispatcher, first: Call, follow) -> tuple[CallResult, list[CallResult]]:
    """``first``'s result, then the results of the follow-ups ``follow(result)`` gives, made at once."""
    result = await dispatcher.complete(first)
    return result, list(await asyncio.gather(*(dispatcher.complete(call) for call in follow(result))))


def every(dispatcher: Dispatcher, firsts: list[Call], follow) -> list[tuple[CallResult, list[CallResult]]]:
    """Each of ``firsts`` with its follow-ups, all at once, on the dispatcher's loop."""
    async def work():
        return await asyncio.gather(*(with_followups(dispatcher, first, follow) for first in firsts))

    return dispatcher.run(work(), "test")


@pytest.fixture
def cache(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        yield cache


def test_followups_start_at_once_and_come_back_grouped_by_call(cache):
    # "a" makes one call at a time; with a barrier "b" would only start after both of a's calls
    with FakeOpenAIServer(latency_s=0.3) as server, \
            Dispatcher([http(server, "a", max_concurrency=1), http(server, "b")], cache, backoff=FAST) as dispatcher:
        seen = []

        def then(result):
            seen.append(result.key.id)
            if result.key.id == "first":
                return [ask("b", "after first")]
            return [ask("b", "second"), ask("b", "third")]

        results = every(dispatcher, [ask("a", "first"), ask("a", "later")], then)
    assert sorted(seen) == ["first", "later"]
    assert [(first.text, [r.text for r in rest]) for first, rest in results] == [
        ("model-a read: first", ["model-b read: after first"]),
        ("model-a read: later", ["model-b read: second", "model-b read: third"])]
    assert all(r.key == CallKey("test", r.text.removeprefix("model-b read: "), "b")
               for _, rest in results for r in rest)  # each follow-up's result carries its own key
    assert server.max_in_flight >= 2  # b's follow-up of the first call ran while a's second call did


def test_followups_of_cached_calls_identical_calls_and_dry_runs(cache):
    with FakeOpenAIServer() as server:
        teachers = [http(server, "a"), http(server, "b")]
        with Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            dispatcher.complete_all([ask("a", "cached")], "warm up")
        server.reset()

        def follow(result):  # each first call's follow-ups: its own keys (stage), one of them the call "new" again
            after = result.key.id
            return [ask("b", f"on {result.text}", stage=f"after {after}"), ask("a", "new", stage=f"after {after}")]

        firsts = [ask("a", "cached"), ask("a", "new")]
        with Dispatcher(teachers, cache, dry_run=True) as dry:
            planned = every(dry, firsts, follow)
        flat = [r for first, rest in planned for r in (first, *rest)]  # each first call, then its follow-ups
        assert server.requests == 0 and [r.dry_run for r in flat] == [False, True, True, True, True, True]
        assert dry.estimated["a"].calls == 4 and dry.estimated["a"].to_call == 1  # "new" counted once
        assert dry.estimated["b"].calls == 2 and dry.estimated["b"].to_call == 2
        with Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            results = every(dispatcher, firsts, follow)
    assert server.requests_by_model == {"model-a": 1, "model-b": 2}  # "new" three times, made once
    (cached, (on_cached, new_again)), (new, (on_new, new_third)) = results
    assert cached.cached and on_cached.text == "model-b read: on model-a read: cached"
    assert new.text == new_again.text == new_third.text == "model-a read: new"
    assert on_new.text == "model-b read: on model-a read: new"
    assert [new.key, new_again.key, new_third.key] == [CallKey("test", "new", "a"), CallKey("after cached", "new", "a"),
                                                       CallKey("after new", "new", "a")]
    # one call made; cache hits: "cached", and "new" asked once more after it was made (the "new" that joined
    # the identical call in flight is neither a call nor a hit)
    assert dispatcher.summary()["a"]["cache_hits"] == 2 and dispatcher.summary()["a"]["calls"] == 1
    assert [new.cached, new_again.cached, new_third.cached] == [False, False, True]


def test_clients_live_across_runs_until_close(cache):
    with FakeOpenAIServer() as server:
        dispatcher = Dispatcher([http(server, "a")], cache, backoff=FAST)
        dispatcher.complete_all([ask("a", "one")], "first")
        client = dispatcher._http["a"]
        dispatcher.complete_all([ask("a", "two")], "second")
        assert dispatcher._http["a"] is client  # the same connections serve the second run
        dispatcher.close()
        assert dispatcher._http == {}
        dispatcher.close()  # closing twice is harmless
        with pytest.raises(RuntimeError, match="closed"):
            dispatcher.complete_all([ask("a", "three")], "closed")
    assert server.requests == 2


def test_an_error_in_a_followup_leaves_the_dispatcher_usable(cache):
    with FakeOpenAIServer(latency_s=0.05) as server, Dispatcher([http(server, "a")], cache, backoff=FAST) as dispatcher:
        def broken(result):
            raise ValueError("no follow-up")

        with pytest.raises(ValueError, match="no follow-up"):
            every(dispatcher, [ask("a", f"q{i}") for i in range(20)], broken)
        assert dispatcher._in_flight == {}  # the calls still in flight were stopped with their run
        again = dispatcher.complete_all([ask("a", "q0"), ask("a", "fresh")], "again")
        assert [r.text for r in again.values()] == ["model-a read: q0", "model-a read: fresh"]


def test_calls_in_flight_when_a_run_fails_do_not_outlive_it(cache):
    with FakeOpenAIServer(latency_s=0.3) as server, Dispatcher([http(server, "a")], cache, backoff=FAST) as dispatcher:
        async def failing():
            started = [asyncio.ensure_future(dispatcher.complete(ask("a", f"q{i}"))) for i in range(3)]
            await asyncio.sleep(0.1)  # the three requests are in flight
            raise ValueError(f"the stage failed with {len(started)} calls in flight")

        with pytest.raises(ValueError, match="the stage failed"):
            dispatcher.run(failing(), "test")
        assert dispatcher._in_flight == {} and dispatcher.summary()["a"]["calls"] == 0
        [result] = dispatcher.complete_all([ask("a", "q1")], "again").values()  # made anew, not the old request's
        assert result.text == "model-a read: q1" and not result.cached
        assert dispatcher.summary()["a"]["calls"] == 1 and server.requests == 4


def test_teach_pipelined_equals_the_two_step_teach(tmp_path, monkeypatch):
    """The same records as dispatching feedback + rationales, then the reviews (teach before it pipelined),
    and a local teacher's calls batch (at most max_concurrency, one sample each) and are each seeded from their key,
    whichever batch they land in."""
    batches = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        batches.append(list(zip((p[-1]["content"] for p in prompts), kwargs["seeds"], strict=True)))
        assert len(prompts) <= 4  # the local teacher's max_concurrency
        # its text depends on the prompt alone: which calls share a batch depends on when the replies come
        return [Generation(f"local: the answer is {len(p[-1]['content']) % 3 + 6}. [4]", 5, 2) for p in prompts]

    monkeypatch.setattr("mapd.llm.local_provider.load_model", lambda name, gguf, **placement: ("model", "tokenizer"))
    monkeypatch.setattr("mapd.llm.local_provider.generate", fake_generate)
    mistakes = [Mistake(id=f"q{i}", question=f"What is {i} + 7 - {i}?", gold="7", output=f"{i + 7}")
                for i in range(5)]

    def reply(messages, model):
        content = messages[-1]["content"]  # q2's calls fail (empty replies); scores 0-5 (0 is invalid)
        return "" if "is 2 + 7" in content else f"{model}: the answer is {len(content) % 3 + 6}. [{len(content) % 6}]"

    prompts, review = PromptConfig(), ReviewConfig()
    with FakeOpenAIServer(reply, latency_s=0.02) as server:
        teachers = [http(server, "gpt", max_concurrency=3, max_retries=1),
                    TeacherConfig(name="loc", model="x", max_concurrency=4),
                    http(server, "gemini", max_concurrency=2, max_retries=1)]
        names = [t.name for t in teachers]
        with CallCache(tmp_path / "a.sqlite") as cache, Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            pipelined = teach(mistakes, dispatcher, committee=names, prompts=prompts, review=review,
                              answer_kind="number")
        pipelined_batches = batches[:]
        batches.clear()
        with CallCache(tmp_path / "b.sqlite") as cache, Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            committee = Committee(dispatcher, names, prompts, review, "number")

            async def first_step():
                feedback = asyncio.gather(*(committee.feedback(m, t) for m in mistakes for t in names))
                drafts = asyncio.gather(*(dispatcher.complete(Call(
                    CallKey("rationale", m.id, t), answer_messages(prompts, m.question, "number")))
                    for m in mistakes for t in names))
                return list(await feedback), list(await drafts)

            async def second_step(drafts: list[CallResult]) -> list[Rationale]:
                by_id = {m.id: m for m in mistakes}

                async def reviewed(draft: CallResult) -> Rationale:
                    mistake, teacher = by_id[draft.key.id], draft.key.teacher
                    reviews = [] if draft.text is None else await asyncio.gather(*(
                        committee.peer_review(mistake, teacher, draft.text, reviewer)
                        for reviewer in reviewers(teacher, names, review)))
                    return judged(mistake.id, teacher, draft.text, draft.error, list(reviews), gold=mistake.gold,
                                  answer_kind="number", config=review, cut_off=draft.cut_off)

                return list(await asyncio.gather(*(reviewed(draft) for draft in drafts)))

            feedback, drafts = dispatcher.run(first_step(), "feedback + rationales")
            two_step = (feedback, dispatcher.run(second_step(drafts), "reviews"))
    assert pipelined == two_step
    assert len(pipelined_batches) > 3  # 10 calls in batches of 4, then the reviews
    seeds = {}  # the same call (its prompt) is seeded the same in both runs, whatever its batch; other calls otherwise
    for prompt, seed in (call for batch in pipelined_batches + batches for call in batch):
        assert seeds.setdefault(prompt, seed) == seed
    assert len(set(seeds.values())) == len(seeds) == sum(map(len, batches))
    drafts = pipelined[1]
    assert any(r.text is None for r in drafts) and any(r.accepted for r in drafts)
    assert all(len(r.reviews) == (0 if r.text is None else 2) for r in drafts)


def test_a_refused_connection_says_so(cache):
    """The SDK's aiohttp transport calls a refused connection a timeout; the recorded error adds the cause."""
    url = dead_url()
    dead = TeacherConfig(name="dead", model="m", base_url=url, max_retries=0)
    with Dispatcher([dead], cache, backoff=FAST) as dispatcher:
        [result] = dispatcher.complete_all([ask("dead", "hello?")], "test").values()
    assert result.text is None and "ConnectionRefusedError" in result.error, result.error


QUESTION = re.compile(r"Q\d+: What is (\d+) \+ (\d+)\?")


def signed_reply(messages: list[dict], model: str) -> str:
    """A reply that says who wrote it (``model``), about what (the question in the prompt and, for a review,
    the model that wrote the rationale under review) and for which exact prompt (a digest of the messages)."""
    content = messages[-1]["content"]
    question = QUESTION.search(content)
    about = re.search(r"model-\w+", content)  # only a review prompt quotes a model: the rationale's author
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]
    letters = "".join("abcdefghijklmnop"[int(c, 16)] for c in digest)  # no digits: nothing to read as a number
    total = int(question[1]) + int(question[2]) + (int(digest, 16) % 4 == 0)  # a wrong answer now and then
    by = f"{model} about {about[0]}" if about else model
    return f"{by} on {question[0]} ({letters}). The answer is {total}. [{1 + int(digest, 16) % 5}]"


def test_every_record_lands_on_its_own_key_whatever_order_the_replies_come_in(tmp_path):
    """The issue's must-show: a real local server answers in shuffled order (random per-request delays), and
    every feedback, rationale and review lands on its own (id, teacher, reviewer), in mistake then committee order."""
    mistakes = [Mistake(id=f"m{i}", question=f"Q{i:02d}: What is {i} + {i + 6}?", gold=str(2 * i + 6),
                        output=f"I think it is {2 * i + 5}.") for i in range(20)]
    prompts, review = PromptConfig(), ReviewConfig()
    names = ["gpt", "claude", "gemini"]
    with FakeOpenAIServer(signed_reply, random_latency_s=(0.0, 0.15), seed=7) as server:
        teachers = [http(server, name, max_concurrency=16, max_retries=0) for name in names]
        with CallCache(tmp_path / "cache.sqlite") as cache, Dispatcher(teachers, cache, backoff=FAST) as dispatcher:
            feedback, rationales = teach(mistakes, dispatcher, committee=names, prompts=prompts, review=review,
                                         answer_kind="number")
    calls = 20 * 3 * (1 + 1 + 2)  # feedback, rationale and two reviews per mistake and teacher
    assert server.requests == server.completions == len(server.answer_order) == calls  # each call made once
    assert server.answered_out_of_order > calls // 4, server.answered_out_of_order  # replies came back shuffled
    assert server.max_in_flight > 16  # the teachers' calls overlapped

    # mistake order, then committee order (reviews: the other teachers in committee order)
    assert [(r.id, r.teacher) for r in feedback] == [(m.id, t) for m in mistakes for t in names]
    assert [(r.id, r.teacher) for r in rationales] == [(m.id, t) for m in mistakes for t in names]
    assert all([v.reviewer for v in r.reviews] == [t for t in names if t != r.teacher] for r in rationales)
    for mistake, record in zip([m for m in mistakes for _ in names], feedback):
        assert record.text.startswith(f"model-{record.teacher} on {mistake.question} "), record
    for mistake, record in zip([m for m in mistakes for _ in names], rationales):
        assert record.text.startswith(f"model-{record.teacher} on {mistake.question} "), record
        for one in record.reviews:  # by that reviewer, about this teacher's rationale of this mistake
            assert one.raw.startswith(f"model-{one.reviewer} about model-{record.teacher} on {mistake.question} ")

    # and each text is the reply to its own call's exact prompt (the digest), so the records are exactly these
    def expected(mistake: Mistake, teacher: str) -> tuple[Feedback, Rationale]:
        said = signed_reply(feedback_messages(prompts, mistake.question, mistake.output, mistake.gold, "number"),
                            f"model-{teacher}")
        text = signed_reply(answer_messages(prompts, mistake.question, "number"), f"model-{teacher}")
        reviews = []
        for reviewer in reviewers(teacher, names, review):
            raw = signed_reply(review_messages(prompts, mistake.question, text, mistake.gold, "number"),
                               f"model-{reviewer}")
            reviews.append(Review(reviewer=reviewer, score=parse_score(raw), raw=raw))
        return (Feedback(id=mistake.id, teacher=teacher, text=said, cut_off=False),  # the server's "stop"
                judged(mistake.id, teacher, text, None, reviews, gold=mistake.gold, answer_kind="number",
                       config=review, cut_off=False))

    wanted = [expected(m, t) for m in mistakes for t in names]
    assert feedback == [f for f, _ in wanted]
    assert rationales == [r for _, r in wanted]
    assert 0 < sum(r.accepted for r in rationales) < len(rationales)  # the scores vary: both verdicts occur
