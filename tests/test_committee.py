"""The committee stages: score parsing, acceptance, feedback/rationales/review over a real local
OpenAI-compatible server, `mapd teach`, and the reference-data import (acceptance reproduced)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import (COMMITTEE, FAST, FEEDBACK_MARK, KEY_ENV, REVIEW_MARK, make_mistakes, teach_argv,
                                   teach_records)

from mapd.cli import main
from mapd.config import PromptConfig, ReviewConfig, TeacherConfig
from mapd.errors import MapdError
from mapd.io import read_jsonl, write_jsonl
from mapd.layout import RoundLayout
from mapd.llm import CallCache, Dispatcher
from mapd.records import Feedback, Mistake, Rationale
from mapd.review_score import parse_score
from mapd.stages.import_reference import import_reference
from mapd.stages.review import accept, check_committee, reviewers
from mapd.stages.teach import teach

pytestmark = pytest.mark.usefixtures("key")  # conftest: a key in $KEY_ENV for every test


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("[4]", 4),
        ("Score: [4/5]", 4),
        ("[5]. On reflection the last step is off. [3]", 3),
        ("4/5", 4),  # a bare N/M is one value, N
        ("I give it 4 out of 5", 5),  # the rule takes the last integer: 5 (a known blind spot of the rule)
        ("The steps are sound. Score: 4", 4),
        ("[ 4 ]", 4),
        ("**[5]**", 5),
        ("[4 / 5]", 4),
        ("[0]", None),
        ("[83]", None),
        ("[4.5]", None),  # a bracketed non-integer is invalid, not a fall-through to the last integer
        ("[-1]", None),
        ("Looks right to me.", None),
        ("", None),
        ("Score: 6", None),
        ("The answer 14 is right [see step 2] so 5", 5),  # bracketed text is not a value
        ("Final score: 4.", 4),
        ("rated on a 1-5 scale: 2", 2),
    ],
)
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize(
    ("scores", "fields", "expected"),
    [
        ([4, 3], {}, (3.5, True)),
        ([3, 3], {}, (3.0, False)),  # the paper: strictly greater than 3
        ([3, 3], {"comparison": ">="}, (3.0, True)),
        ([None, 4], {}, (4.0, True)),  # an invalid score is left out, never 0
        ([None, None], {}, (None, False)),  # no valid score: not accepted
        ([], {}, (None, False)),
        ([5, 1, 4], {"aggregator": "median"}, (4.0, True)),
        ([5, 3], {"aggregator": "min"}, (3.0, False)),
        ([5, 4], {"aggregator": "min"}, (4.0, True)),
        ([4, 4], {"threshold": 4.0}, (4.0, False)),
        ([1, None], {"enabled": False}, (1.0, True)),
        ([], {"enabled": False}, (None, True)),
    ],
)
def test_accept(scores, fields, expected):
    assert accept(scores, ReviewConfig(**fields)) == expected


def test_reviewers_are_the_others_in_committee_order():
    committee = ["gpt", "gemini", "mistral"]
    assert reviewers("gemini", committee, ReviewConfig()) == ["gpt", "mistral"]
    assert reviewers("gpt", committee, ReviewConfig(max_reviewers=1)) == ["gemini"]
    assert reviewers("gpt", committee, ReviewConfig(enabled=False)) == []


def test_one_teacher_committee_needs_review_off():
    with pytest.raises(MapdError, match="review.enabled: false"):
        check_committee(["solo"], ReviewConfig())
    check_committee(["solo"], ReviewConfig(enabled=False))


# -- the stages against a real local OpenAI-compatible server ------------------------------------

DEFAULTS = PromptConfig()
# Scripted reviewers: gpt is generous, gemini strict, mistral never gives a score.
REVIEW_REPLIES = {"model-gpt": "Sound and correct. [5]", "model-gemini": "The second step is off. [2]",
                  "model-mistral": "I would rather not grade this."}


def scripted(messages: list[dict], model: str) -> str:
    """Feedback, rationale or review reply, by the prompt's kind; mistral's rationales answer 8, the rest 7."""
    content = messages[-1]["content"]
    if content.startswith(REVIEW_MARK):
        return REVIEW_REPLIES[model]
    if content.startswith(FEEDBACK_MARK):
        return f"{model} explains: the student added instead of multiplying."
    return f"{model} works it out step by step. The answer is {8 if model == 'model-mistral' else 7}."


def mistake_records(n: int) -> list[Mistake]:
    return [Mistake.model_validate(record) for record in make_mistakes(n)]


def teacher_config(server: FakeOpenAIServer, name: str) -> TeacherConfig:
    return TeacherConfig(name=name, model=f"model-{name}", base_url=server.base_url, api_key_env=KEY_ENV,
                         timeout_s=2, max_retries=4, max_concurrency=4)


@pytest.fixture
def server():
    with FakeOpenAIServer(scripted) as server:
        yield server


@pytest.fixture
def dispatcher_for(tmp_path):
    """``dispatcher_for(server, names)``: a Dispatcher over a fresh cache with fast retries."""
    with CallCache(tmp_path / "cache.sqlite") as cache:
        yield lambda server, names=COMMITTEE: Dispatcher([teacher_config(server, n) for n in names], cache,
                                                         backoff=FAST)


def taught(mistakes: list[Mistake], dispatcher: Dispatcher, committee=COMMITTEE,
           **fields) -> tuple[list[Feedback], list[Rationale]]:
    """The teach stage (feedback, rationales, peer review) with the default prompts and ``ReviewConfig(**fields)``."""
    return teach(mistakes, dispatcher, committee=list(committee), prompts=DEFAULTS, review=ReviewConfig(**fields),
                 answer_kind="number")


def review_requests(server: FakeOpenAIServer) -> int:
    """Requests the server received that were peer reviews."""
    return sum(body["messages"][-1]["content"].startswith(REVIEW_MARK) for body in server.bodies)


def test_feedback_rationales_review_end_to_end(server, dispatcher_for):
    mistakes, dispatcher = mistake_records(3), dispatcher_for(server)
    notes, records = taught(mistakes, dispatcher)
    assert [(r.id, r.teacher) for r in notes] == [(m.id, t) for m in mistakes for t in COMMITTEE]
    assert all(r.error is None and r.text.startswith(f"model-{r.teacher} explains") for r in notes)
    prompts = [body["messages"][-1]["content"] for body in server.bodies]
    parts = (mistakes[0].question, mistakes[0].output, "is 7")  # question, student's answer, hint
    assert any(all(part in prompt for part in parts) for prompt in prompts)

    assert [(r.id, r.teacher) for r in records] == [(m.id, t) for m in mistakes for t in COMMITTEE]
    assert [r.answer for r in records[:3]] == ["7", "7", "8"]
    assert set(records[0].model_dump()) == {"id", "teacher", "text", "error", "answer", "cut_off", "reviews",
                                            "mean_score", "accepted"}

    assert review_requests(server) == len(records) * 2  # each rationale reviewed by the two others, once
    assert server.requests == len(notes) + len(records) + len(records) * 2
    by_teacher = {r.teacher: r for r in records if r.id == "q0"}
    gpt, gemini, mistral = (by_teacher[name] for name in COMMITTEE)
    assert [(v.reviewer, v.score) for v in gpt.reviews] == [("gemini", 2), ("mistral", None)]
    assert gpt.reviews[1].raw == REVIEW_REPLIES["model-mistral"]  # invalid, kept, excluded
    assert (gpt.mean_score, gpt.accepted) == (2.0, False)
    assert (gemini.mean_score, gemini.accepted) == (5.0, True)  # gpt 5, mistral invalid
    assert (mistral.mean_score, mistral.accepted) == (3.5, True)  # gpt 5, gemini 2

    server.reset()
    _, strict = taught(mistakes, dispatcher, require_gold_answer=True)  # mistral answers 8, gold is 7
    assert [r.accepted for r in strict if r.id == "q0"] == [False, True, False]
    _, capped = taught(mistakes, dispatcher, max_reviewers=1)
    assert [[v.reviewer for v in r.reviews] for r in capped[:3]] == [["gemini"], ["gpt"], ["gpt"]]
    assert server.requests == 0  # the other settings reuse the cached calls, reviews included


def test_a_rationale_the_gold_check_rejects_is_not_sent_for_review(server, dispatcher_for, tmp_path):
    """With review.require_gold_answer, a rationale whose answer is not the gold cannot be accepted: its reviews
    are not asked for (nor paid). A dry run's estimate still counts every review (an upper bound)."""
    mistakes = mistake_records(2)
    _, records = taught(mistakes, dispatcher_for(server), require_gold_answer=True)
    assert [(r.teacher, len(r.reviews), r.accepted) for r in records if r.id == "q0"] == [
        ("gpt", 2, False), ("gemini", 2, True), ("mistral", 0, False)]  # mistral answers 8, the gold is 7
    assert review_requests(server) == 2 * 2 * 2  # gpt's and gemini's rationales, each by the two others
    requests = server.requests
    with CallCache(tmp_path / "dry.sqlite") as cache, Dispatcher(
            [teacher_config(server, name) for name in COMMITTEE], cache, dry_run=True) as dry:
        taught(mistakes, dry, require_gold_answer=True)
    assert sum(row.calls for row in dry.estimated.values()) == 2 * (3 + 3 + 3 * 2) and server.requests == requests


def test_one_teacher_without_review_accepts_every_rationale(server, dispatcher_for):
    dispatcher = dispatcher_for(server, ["gpt"])
    with pytest.raises(MapdError, match="at least two teachers"):
        taught(mistake_records(2), dispatcher, committee=["gpt"])
    assert server.requests == 0  # refused before any call
    _, records = taught(mistake_records(2), dispatcher, committee=["gpt"], enabled=False)
    assert review_requests(server) == 0 and server.requests == 2 * 2  # feedback and rationale, no review
    assert [(r.reviews, r.mean_score, r.accepted) for r in records] == [([], None, True)] * 2


def test_faults_are_retried_or_recorded_never_dropped(dispatcher_for):
    mistakes = mistake_records(6)
    faults = ("server_error_503", "bad_request", "refusal")
    with FakeOpenAIServer(scripted, fault_rate=0.5, faults=faults, seed=3) as server:
        dispatcher = dispatcher_for(server)
        _, records = taught(mistakes, dispatcher)
    assert server.faults["server_error_503"] and server.faults["bad_request"]
    failed = [r for r in records if r.text is None]
    assert failed and len(failed) < len(records)
    for record in failed:  # a failed rationale keeps its error, is not reviewed and not accepted
        assert record.error and record.answer is None and record.reviews == [] and not record.accepted
    for record in records:
        for verdict in record.reviews:
            assert (verdict.raw is None) == (verdict.error is not None)
            assert verdict.error is None or verdict.score is None


# -- `mapd teach` ---------------------------------------------------------------------------------


def write_setup(tmp_path, server: FakeOpenAIServer, mistakes: list[dict]) -> tuple[str, str]:
    config = {"task": {"name": "svamp"},
              "teachers": [teacher_config(server, name).model_dump(exclude_defaults=True) for name in COMMITTEE]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    write_jsonl(tmp_path / "mistakes.jsonl", mistakes)
    return str(tmp_path / "config.yaml"), str(tmp_path / "mistakes.jsonl")


def test_mapd_teach_writes_artifacts_and_a_rerun_calls_nothing(tmp_path, server, capsys):
    config, mistakes = write_setup(tmp_path, server, make_mistakes(4))
    out = tmp_path / "out"
    assert main(teach_argv(config, mistakes, out, "--dry-run")) == 0
    assert "gpt: 16 calls" in capsys.readouterr().out  # 4 feedback, 4 rationales, 2 x 4 reviews
    assert server.requests == 0 and not out.exists()

    assert main(teach_argv(config, mistakes, out)) == 0
    assert "accepted 8 of 12 rationales (gpt 0/4, gemini 4/4, mistral 4/4)" in capsys.readouterr().out
    assert server.requests == 4 * 3 * 2 + 4 * 3 * 2  # feedback + rationales, then two reviews each
    notes, drafts = teach_records(out)
    pairs = [(f"q{i}", t) for i in range(4) for t in COMMITTEE]
    assert [(r["id"], r["teacher"]) for r in notes] == pairs == [(r["id"], r["teacher"]) for r in drafts]
    assert set(drafts[0]) == {"id", "teacher", "text", "error", "answer", "cut_off", "reviews", "mean_score",
                              "accepted"}
    stats = json.loads((out / "teach_stats.json").read_text())
    assert stats["gpt"]["calls"] == 4 + 4 + 8 and stats["gpt"]["failures"] == 0

    server.reset()
    assert main(teach_argv(config, mistakes, out)) == 0
    assert server.requests == 0
    assert read_jsonl(out / "rationales.jsonl") == drafts


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"id": "a", "question": "q", "gold": "1"}, "mistakes.jsonl:2: field 'output': missing"),
        ({"id": "a", "question": "q", "gold": 1, "output": "o"},
         "mistakes.jsonl:2: field 'gold': Input should be a valid string (got 1)"),
        ({"id": "q0", "question": "q", "gold": "1", "output": "o"},
         "mistakes.jsonl:2: field 'id': 'q0' already on line 1"),
    ],
)
def test_mapd_teach_names_the_bad_line_and_field(tmp_path, server, capsys, line, message):
    config, mistakes = write_setup(tmp_path, server, make_mistakes(1) + [line])
    assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert server.requests == 0


def test_mapd_teach_checks_keys_before_any_call(tmp_path, server, capsys, monkeypatch):
    config, mistakes = write_setup(tmp_path, server, make_mistakes(1))
    monkeypatch.delenv(KEY_ENV)
    assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
    assert f"{KEY_ENV} is not set" in capsys.readouterr().err
    assert server.requests == 0


def test_mapd_teach_needs_teachers(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("task: {name: svamp}\n", encoding="utf-8")
    write_jsonl(tmp_path / "mistakes.jsonl", make_mistakes(1))
    assert main(teach_argv(tmp_path / "config.yaml", tmp_path / "mistakes.jsonl", tmp_path / "out")) == 2
    assert "at least one teacher" in capsys.readouterr().err


# -- the reference implementation's recorded committee -----------------------------------------------


def test_import_reference_reproduces_the_recorded_acceptance(shared, tmp_path):
    folder = shared / "reference-data"
    names = {kind: folder / f"Llama-2-7b-chat-hf_svamp_{kind}_round0.json"
             for kind in ("false", "feedback", "rationale")}
    counts = import_reference("svamp", names["false"], names["feedback"], names["rationale"], RoundLayout(tmp_path))
    assert counts == {"mistakes": 387, "feedback": 1161, "rationales": 1161, "accepted": 826}
    recorded = {}
    for record in json.loads(names["rationale"].read_text(encoding="utf-8")):
        for teacher in COMMITTEE:
            recorded[(str(record["id"]), teacher)] = record[f"{teacher}_rationale"][0] in record["correct_rationale"]
    ours = {(r["id"], r["teacher"]): r for r in read_jsonl(tmp_path / "rationales.jsonl")}
    assert {key: r["accepted"] for key, r in ours.items()} == recorded
    assert Counter(r["teacher"] for r in ours.values() if r["accepted"]) == {"gpt": 286, "gemini": 221, "mistral": 319}
    invalid = [(key, v["raw"]) for key, r in ours.items() for v in r["reviews"] if v["score"] is None]
    assert sorted(raw for _, raw in invalid) == ["0", "83"]  # the two out-of-range recorded scores
    mistakes = read_jsonl(tmp_path / "mistakes.jsonl")
    assert mistakes[0] == {**mistakes[0], "id": "0", "gold": "145", "answer": "0.92", "status": "wrong"}
    assert sum(m["status"] == "unparsed" for m in mistakes) == 9
    assert all(r["text"] and r["error"] is None for r in read_jsonl(tmp_path / "feedback.jsonl"))


def test_import_reference_strategyqa_canonical_gold(shared, tmp_path):
    path = shared / "reference-data" / "Llama-2-7b-chat-hf_strategyQA_false_round0.json"
    import_reference("strategyqa", path, None, None, RoundLayout(tmp_path))
    mistakes = read_jsonl(tmp_path / "mistakes.jsonl")
    assert len(mistakes) == 825 and not (tmp_path / "feedback.jsonl").exists()
    assert Counter(m["gold"] for m in mistakes) == {"true": 471, "false": 354}
    assert Counter(m["answer"] for m in mistakes) == {"false": 358, None: 278, "true": 189}


def test_import_reference_errors_name_file_record_and_field(tmp_path):
    bad = tmp_path / "false.json"
    bad.write_text(json.dumps([{"id": 0, "question": "q", "gold_answer": "1", "student_wrong_pred": "p",
                                "student_wrong_final_answer": "2"}, {"id": 1, "question": "q", "gold_answer": "1"}]))
    with pytest.raises(MapdError, match=r"false\.json: record 1: missing field 'student_wrong_final_answer'"):
        import_reference("svamp", bad, None, None, RoundLayout(tmp_path / "out"))
    with pytest.raises(MapdError, match="not 'aqua'"):
        import_reference("aqua", bad, None, None, RoundLayout(tmp_path / "out"))
    rationale = tmp_path / "rationale.json"
    rationale.write_text(json.dumps([{"id": 0, "gpt_rationale": ["r", 4], "gemini_rationale": ["r", 4, 4],
                                      "mistral_rationale": ["r", 4, 4]}]))
    bad.write_text(json.dumps([{"id": 0, "question": "q", "gold_answer": "1", "student_wrong_pred": "p",
                                "student_wrong_final_answer": "2"}]))
    with pytest.raises(MapdError, match=r"rationale\.json: record 0: field 'gpt_rationale'"):
        import_reference("svamp", bad, None, rationale, RoundLayout(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing is written unless everything converts


def test_import_reference_gsm8k_and_logiqa_layouts(tmp_path):
    gsm8k = tmp_path / "gsm8k.json"
    gsm8k.write_text(json.dumps([{"id": 3, "question": "How many?", "gold_answer": "2 * 617 = 1234\n#### 1,234",
                                  "student_wrong_pred": "Answer: 12", "student_wrong_final_answer": "12"}]))
    import_reference("gsm8k", gsm8k, None, None, RoundLayout(tmp_path / "g"))
    assert read_jsonl(tmp_path / "g" / "mistakes.jsonl") == [
        {"id": "3", "question": "How many?", "gold": "1234", "output": "Answer: 12", "answer": "12", "status": "wrong",
         "cut_off": None}]
    logiqa = tmp_path / "logiqa.json"
    logiqa.write_text(json.dumps([{"id": 0, "context": "All cats sleep.", "question": "Which follows?",
                                   "options": ["a", "b", "c", "d"], "gold_answer": "2", "student_wrong_pred": "b",
                                   "student_wrong_final_answer": "1"},
                                  {"id": 1, "context": "C", "question": "Q", "options": ["a", "b"], "gold_answer": "0",
                                   "student_wrong_pred": "?", "student_wrong_final_answer": "ABSOLUTE_WRONG_FINAL_ANS"}]))
    import_reference("logiqa", logiqa, None, None, RoundLayout(tmp_path / "l"))
    first, second = read_jsonl(tmp_path / "l" / "mistakes.jsonl")
    assert first["question"] == "All cats sleep.\nWhich follows?\n\nA. a\nB. b\nC. c\nD. d"
    assert (first["gold"], first["answer"], first["status"]) == ("C", "B", "wrong")
    assert (second["gold"], second["answer"], second["status"]) == ("A", None, "unparsed")
