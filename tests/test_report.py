"""mapd report: full runs, partial and mid-write folders, escaping, and the SVAMP reference figures."""

import json
import re
from pathlib import Path

import pytest

from mapd.errors import MapdError
from mapd.stages.import_reference import import_reference
from mapd.io import write_json, write_jsonl
from mapd.layout import EvalLayout, RoundLayout
from mapd.report import answer_kind, eval_summary, write_report

TEACHERS = ["alpha", "beta", "gamma"]


def _review(reviewer: str, score: int | None, error: str | None = None) -> dict:
    return {"reviewer": reviewer, "score": score, "raw": None if error else f"Looks fine. [{score}]", "error": error}


def make_round(folder: Path, *, before: bool, failed_call: bool = False, rationale_text: str = "So 5 + 3 = 8.") -> None:
    """A complete synthetic round: 4 mistakes, 3 teachers, reviews, training pairs, loss log, evaluation."""
    mistakes = [{"id": str(i), "question": f"What is 5 + {i}?", "gold": str(5 + i), "output": "It is 2.",
                 "answer": None if i == 3 else "2", "status": "unparsed" if i == 3 else "wrong"} for i in range(4)]
    write_jsonl(folder / "mistakes.jsonl", mistakes)
    feedback = [{"id": m["id"], "teacher": t, "text": f"{t}: you added wrong.", "error": None}
                for m in mistakes for t in TEACHERS]
    if failed_call:
        feedback[0].update(text=None, error="HTTP 500 after 6 retries")
    write_jsonl(folder / "feedback.jsonl", feedback)
    rationales = []
    for m in mistakes:
        for k, t in enumerate(TEACHERS):
            others = [o for o in TEACHERS if o != t]
            scores = [5, 4] if k == 0 else [2, 3] if k == 1 else [4, None]
            right = k != 1 or m["id"] == "0"  # beta is rejected, and right only on question 0
            answer = m["gold"] if right else "999"
            valid = [s for s in scores if s is not None]
            mean = sum(valid) / len(valid)
            text = rationale_text if k == 0 and m["id"] == "0" else f"Add them: the answer is {answer}."
            rationales.append({"id": m["id"], "teacher": t, "text": text, "error": None, "answer": answer,
                               "reviews": [_review(o, s) for o, s in zip(others, scores)],
                               "mean_score": mean, "accepted": mean > 3})
    write_jsonl(folder / "rationales.jsonl", rationales)
    stats = {t: {"calls": 20, "cache_hits": 2, "failures": 0, "input_tokens": 1200, "output_tokens": 800,
                 "cost_usd": 0.0123, "seconds": 9.5, "latency_p50_s": 0.4, "latency_p95_s": 1.7} for t in TEACHERS}
    write_json(folder / "teach_stats.json", stats)
    pairs = [{"id": m["id"], "kind": kind, "teacher": "alpha", "prompt": "p", "completion": "c"}
             for m in mistakes for kind in ("feedback", "rationale")]
    write_jsonl(folder / "train.jsonl", pairs)
    write_jsonl(folder / "model" / "train_log.jsonl", [
        {"step": s, "epoch": s / 10, "loss": 2 / s, "loss_feedback": 2.2 / s, "loss_rationale": 1.8 / s,
         "learning_rate": 1e-5}
        for s in range(1, 11)])
    evals = ["eval_before", "eval_after"] if before else ["eval_after"]
    for index, name in enumerate(evals):
        predictions = [{"id": f"t{i}", "question": f"Test {i}?", "output": f"The answer is {i}.", "answer": str(i),
                        "status": "ok", "strict": True, "gold": "1", "correct": i == 1 or (index == 1 and i == 2)}
                       for i in range(5)]
        write_jsonl(folder / name / "predictions.jsonl", predictions)
        accuracy = sum(p["correct"] for p in predictions) / len(predictions)
        write_json(folder / name / "metrics.json", {"task": "svamp", "split": "test", "model": "m", "n": 5,
                                                    "accuracy": accuracy, "strict_accuracy": accuracy,
                                                    "unparsed_rate": 0.0, "seconds": 1.5})


def make_manifest(run_dir: Path, rounds: int) -> None:
    stage = {"status": "done", "seconds": 12.5, "summary": {}}
    write_json(run_dir / "manifest.json", {
        "manifest_version": 1, "created": "2025-01-01T00:00:00+00:00",
        "config": {"task": {"name": "svamp"}, "student": {"model": "embedded:smollm2-135m-instruct"},
                   "teachers": [{"name": t, "model": f"{t}-model"} for t in TEACHERS], "rounds": rounds,
                   "build": {"mode": "mixed"}},
        "versions": {"mapd": "0.1.0"}, "seeds": {"train": 731},
        "rounds": [{"round": i, "stages": {"mine": {**stage, "summary": {"n": 10, "wrong": 3, "unparsed": 1}},
                                           "teach": stage, "train": stage}} for i in range(rounds)],
    })


@pytest.fixture
def full_run(tmp_path: Path) -> Path:
    make_manifest(tmp_path, 2)
    make_round(tmp_path / "round-0", before=True)
    make_round(tmp_path / "round-1", before=False, failed_call=True)
    return tmp_path


def _md_row(markdown: str, first_cell: str, after: str = "### Funnel") -> list[str]:
    """The cells of the first Markdown table row after the heading ``after`` whose first cell is ``first_cell``."""
    for line in markdown[markdown.index(after):].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_full_run(full_run: Path):
    path = write_report(full_run)
    assert path == full_run / "report.html"
    page, markdown = path.read_text(), (full_run / "report.md").read_text()
    assert page.count('src="data:image/png;base64,') == 2 * 3 + 1  # funnel, histogram, loss per round + accuracy
    assert not re.search(r"(src|href)=\"(https?:)?//", page), "the report must not load anything from outside"
    assert "<script" not in page and "<link" not in page
    for text in ("Round 0", "Round 1", "accuracy before", "20.0%", "40.0%", "alpha-model", "smollm2-135m-instruct"):
        assert text in page, text
    assert 'href="round-1/eval_after/predictions.jsonl"' in page
    assert "[4 wrong of 5](round-0/eval_before/predictions.jsonl)" in markdown
    # funnel: 10 questions, 4 mistakes (3 wrong, 1 unparsed), 12 rationales of which 8 accepted, 8 pairs
    assert _md_row(markdown, "questions")[1] == "10"
    assert _md_row(markdown, "mistakes")[1:4] == ["4", "4", "3 wrong, 1 unparsed"]
    assert _md_row(markdown, "accepted")[1] == "8"
    assert _md_row(markdown, "training pairs")[1] == "8"
    # per teacher (round 0): alpha accepted 4/4, received mean 4.5, gave scores 2 (to beta) and 4 (to gamma)
    assert _md_row(markdown, "alpha")[:7] == ["alpha", "4", "4", "100.0%", "4.50", "3.00", "0"]
    assert _md_row(markdown, "beta")[2:4] == ["0", "0.0%"]
    assert "$0.0123" in markdown and "0.40 / 1.70" in markdown
    # round 1 has one failed feedback call by alpha
    round1 = markdown[markdown.index("## Round 1"):]
    assert _md_row(round1, "alpha")[6] == "1"
    # gold check: beta's rejected rationale on question 0 is right; everything accepted is right
    assert "Accepted but wrong: 0 " in markdown and "rejected but right: 1 " in markdown
    assert _md_row(markdown, "beta", after="### Peer review against") == ["beta", "0", "0", "4", "1", "1"]
    assert re.search(r"Krippendorff's alpha \(ordinal; units = 12 rationales, coders = 3 reviewers.*\): -?\d\.\d{3}\.",
                     markdown)
    assert _md_row(markdown, "0", after="## Run") == ["0", "mine", "done", "12.5"]  # stage timings from the manifest


def test_rationale_answer_extracted_when_not_recorded(tmp_path: Path):
    """Without an `answer` field the rationale's answer is extracted from its text ("5 + 3 = 8", gold 5)."""
    make_round(tmp_path, before=False)
    records = [json.loads(line) for line in (tmp_path / "rationales.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "rationales.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in records])
    write_report(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "Accepted but wrong: 1 " in markdown
    assert _md_row(markdown, "alpha", after="### Peer review against")[1:3] == ["4", "1"]


def test_only_mistakes(tmp_path: Path):
    make_round(tmp_path, before=False)
    for name in ("feedback.jsonl", "rationales.jsonl", "teach_stats.json", "train.jsonl"):
        (tmp_path / name).unlink()
    for folder in ("model", "eval_after"):
        for file in (tmp_path / folder).iterdir():
            file.unlink()
        (tmp_path / folder).rmdir()
    page = write_report(tmp_path).read_text()
    markdown = (tmp_path / "report.md").read_text()
    assert "manifest.json is absent" in page
    assert "feedback.jsonl absent" in markdown and "rationales.jsonl absent" in markdown
    assert "No evaluation yet" in markdown and "has not been trained" in markdown
    assert _md_row(markdown, "mistakes")[1] == "4"


def test_mid_write_and_died_run(full_run: Path):
    """A run killed mid-round: partial last lines, no train_log, no eval_after, manifest without finished."""
    with open(full_run / "round-1" / "rationales.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"id": "9", "teacher": "alpha", "te')
    for file in (full_run / "round-1" / "eval_after").iterdir():
        file.unlink()
    (full_run / "round-1" / "model" / "train_log.jsonl").unlink()
    (full_run / "round-1" / "train.jsonl").write_text('{"id": "0", "kind": "feed')
    markdown = (write_report(full_run), (full_run / "report.md").read_text())[1]
    round1 = markdown[markdown.index("## Round 1"):]
    assert _md_row(round1, "rationales")[1] == "12"
    assert _md_row(round1, "training pairs")[1] == "0"
    assert "not finished" in markdown


def test_run_that_has_not_started_a_round(tmp_path: Path):
    make_manifest(tmp_path, 1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["rounds"] = []
    write_json(tmp_path / "manifest.json", manifest)
    assert "No round has started" in write_report(tmp_path).read_text()


def test_html_escaping(tmp_path: Path):
    make_round(tmp_path, before=True, rationale_text="<script>alert('x')</script> & the answer is 5.")
    page = write_report(tmp_path).read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; the answer is 5." in page


def test_not_a_run_folder(tmp_path: Path):
    with pytest.raises(MapdError, match="run folder not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(MapdError, match="no manifest.json"):
        write_report(tmp_path)
    mistake = {"id": 1, "question": "What is 1 + 1?", "gold": "2", "output": "3", "answer": "3"}  # integer id: fine
    (tmp_path / "mistakes.jsonl").write_text(json.dumps(mistake) + "\nnot json\n")
    with pytest.raises(MapdError, match=r"mistakes.jsonl:2"):
        write_report(tmp_path)


@pytest.mark.parametrize(("file", "line", "change", "error"), [
    ("rationales.jsonl", 2, {"accepted": "false"}, "field 'accepted'"),  # a string is not a boolean
    ("feedback.jsonl", 3, {"teacher": None}, "field 'teacher'"),
    ("mistakes.jsonl", 1, {"gold": None}, "field 'gold'"),
    ("eval_before/predictions.jsonl", 4, {"correct": "yes"}, "field 'correct'"),
    ("model/train_log.jsonl", 2, {"step": None}, "field 'step'"),
])
def test_malformed_artifact(full_run: Path, file: str, line: int, change: dict, error: str):
    """A record with a bad field is one MapdError naming the file, its line and the field."""
    path = full_run / "round-0" / file
    records = [json.loads(text) for text in path.read_text().splitlines()]
    records[line - 1].update(change)
    write_jsonl(path, records)
    with pytest.raises(MapdError, match=rf"round-0/{re.escape(file)}:{line}: {error}"):
        write_report(full_run)


@pytest.mark.parametrize(("file", "change", "error"), [
    ("eval_after/metrics.json", {"accuracy": "high"}, "field 'accuracy'"),
    ("teach_stats.json", {"alpha": {"calls": 3}}, "field 'alpha.cache_hits': missing"),
])
def test_malformed_document(full_run: Path, file: str, change: dict, error: str):
    path = full_run / "round-1" / file
    write_json(path, {**json.loads(path.read_text()), **change})
    with pytest.raises(MapdError, match=rf"round-1/{re.escape(file)}: {error}"):
        write_report(full_run)


def test_round_folder_with_an_evaluation_only(tmp_path: Path):
    """A folder holding only an evaluation still reads as a round folder; every other file is absent."""
    make_round(tmp_path, before=True)
    for name in ("mistakes.jsonl", "feedback.jsonl", "rationales.jsonl", "teach_stats.json", "train.jsonl"):
        (tmp_path / name).unlink()
    (tmp_path / "eval_before" / "metrics.json").unlink()  # killed before its metrics were written
    markdown = (write_report(tmp_path), (tmp_path / "report.md").read_text())[1]
    assert "[4 wrong of 5](eval_before/predictions.jsonl)" in markdown
    assert _md_row(markdown, "mistakes")[1:4] == ["absent", "—", "mistakes.jsonl absent"]


def test_answer_kind():
    assert answer_kind({"config": {"task": {"name": "strategyqa"}}}, ["3"]) == "bool"
    assert answer_kind({"config": {"task": {"name": "jsonl", "path": "x.jsonl", "answer_kind": "choice",
                                            "options_field": "o"}}}, []) == "choice"
    assert answer_kind(None, ["true", "False"]) == "bool"
    assert answer_kind(None, ["A", "c"]) == "choice"
    assert answer_kind(None, ["12", "A"]) == "number"
    assert answer_kind({"config": {"task": {"name": "no-such-task"}}}, ["true"]) == "bool"


def test_svamp_reference(shared: Path, tmp_path: Path):
    """The folder `mapd import-reference` makes from the reference SVAMP files shows the real figures."""
    data = shared / "reference-data"
    files = {kind: data / f"Llama-2-7b-chat-hf_svamp_{kind}_round0.json" for kind in ("false", "feedback", "rationale")}
    import_reference("svamp", files["false"], files["feedback"], files["rationale"], RoundLayout(tmp_path))
    page = write_report(tmp_path).read_text()
    markdown = (tmp_path / "report.md").read_text()

    records = json.loads(files["rationale"].read_text())
    teachers = ("gpt", "gemini", "mistral")
    total = sum(1 for r in records for t in teachers if r[f"{t}_rationale"][0].strip())
    accepted = {t: sum(r[f"{t}_rationale"][0] in r["correct_rationale"] for r in records) for t in teachers}
    assert (total, sum(accepted.values())) == (1161, 826)
    assert accepted == {"gpt": 286, "gemini": 221, "mistral": 319}
    assert _md_row(markdown, "rationales")[1] == f"{total:,}"  # the funnel
    assert _md_row(markdown, "accepted")[1] == f"{sum(accepted.values())}"
    for teacher, count in accepted.items():
        row = _md_row(markdown, teacher)
        assert row[1:3] == [f"{len(records)}", f"{count}"], row
    n_accepted = sum(accepted.values())
    assert f"{total:,}" in page and f"{n_accepted} ({100 * n_accepted / total:.1f}%)" in page
    assert "answer kind: number" in markdown


def _write_eval(folder: Path, right: set[int], wrong_answer: str | None, n: int = 40) -> None:
    """An evaluation of questions q0..q{n-1} (gold 7): right on ``right``, else ``wrong_answer`` (None: cut off)."""
    predictions = [{"id": f"q{i}", "question": f"What is 3 + 4 (question {i})?", "output": "...",
                    "answer": "7" if i in right else wrong_answer,
                    "status": "ok" if i in right or wrong_answer else "truncated", "strict": True, "gold": "7",
                    "correct": i in right} for i in range(n)]
    write_jsonl(folder / "predictions.jsonl", predictions)
    write_json(folder / "metrics.json", {"task": "chain_sum", "split": "test", "model": "m", "n": n,
                                         "accuracy": len(right) / n, "strict_accuracy": len(right) / n,
                                         "unparsed_rate": 0.0, "seconds": 1.0})


def test_paired_comparison(tmp_path: Path):
    """40 paired questions: 25 gained, 5 lost (exact McNemar p = 0.000325), 10 right both times; the report shows
    the Wilson intervals, the test and its sentence, and the first 20 changed questions in both files."""
    make_manifest(tmp_path, 1)
    _write_eval(tmp_path / "round-0" / "eval_before", set(range(5)) | set(range(30, 40)), "3")
    _write_eval(tmp_path / "round-0" / "eval_after", set(range(5, 40)), None)
    page = write_report(tmp_path).read_text()
    markdown = (tmp_path / "report.md").read_text()
    section = markdown[markdown.index("## Before and after training"):]
    assert _md_row(markdown, "round-0", after="## Accuracy")[2:5] == ["40", "37.5%", "24.2% – 53.0%"]
    assert _md_row(markdown, "round-0", after="## Before and after") == [
        "round-0", "40", "15 (37.5%)", "35 (87.5%)", "25", "5", "0.000325"]
    sentence = ("round-0: After training the student is better, and the difference is significant at the 5 % level "
                "(25 gained, 5 lost of 40 paired questions; exact McNemar test, p = 0.000325).")
    assert sentence in section
    assert "questions whose verdict changed (10 more not shown" in section
    changed = [line for line in section.splitlines() if re.match(r"\| q\d+ \|", line)]
    assert len(changed) == 20  # capped: 15 gained, then the 5 lost
    assert changed[0] == "| q5 | What is 3 + 4 (question 5)? | 3 | 7 | 7 | gained |"
    assert changed[-1] == "| q4 | What is 3 + 4 (question 4)? | 7 | none (truncated) | 7 | lost |"
    assert sum(line.endswith("| lost |") for line in changed) == 5
    for text in (sentence, "exact McNemar p", "24.2% – 53.0%", "73.9% – 94.5%", "<td>q4</td>", "none (truncated)"):
        assert text in page, text


@pytest.mark.parametrize(("after", "expected"), [
    (set(range(5)), "no discordant pairs"),  # the same verdicts
    (set(range(1, 6)), "not significant at the 5 % level"),  # 1 gained, 1 lost
])
def test_paired_comparison_without_a_difference(tmp_path: Path, after: set[int], expected: str):
    _write_eval(tmp_path / "eval_before", set(range(5)), "3")
    _write_eval(tmp_path / "eval_after", after, "3")
    markdown = (write_report(tmp_path), (tmp_path / "report.md").read_text())[1]
    assert expected in markdown and "exact McNemar test, p = 1)" in markdown


def test_paired_comparison_needs_both_evaluations(full_run: Path):
    """Few questions: no conclusion; round 1 has no discordant pair; no base evaluation: no comparison."""
    markdown = (write_report(full_run), (full_run / "report.md").read_text())[1]
    assert "round-0: With only 5 paired questions (fewer than 30) no conclusion is possible" in markdown
    assert "round-1: None of the 5 paired questions changed its verdict" in markdown
    for file in (full_run / "round-0" / "eval_before").iterdir():
        file.unlink()
    markdown = (write_report(full_run), (full_run / "report.md").read_text())[1]
    assert "No paired comparison yet: it needs the base student's predictions (round 0, " \
           "eval_before/predictions.jsonl)" in markdown


def test_eval_summary(tmp_path: Path):
    """The numbers the runner adds to the eval_after stage summary."""
    _write_eval(tmp_path / "eval_before", set(range(5)) | set(range(30, 40)), "3")
    _write_eval(tmp_path / "eval_after", set(range(5, 40)), None)
    summary = eval_summary(EvalLayout(tmp_path / "eval_before"), EvalLayout(tmp_path / "eval_after"))
    assert summary == {"accuracy_ci95": [0.7389, 0.9454], "paired_n": 40, "before_correct": 15, "after_correct": 35,
                       "gained": 25, "lost": 5, "mcnemar_p": pytest.approx(0.000325, abs=5e-7)}
    assert eval_summary(EvalLayout(tmp_path / "absent"), EvalLayout(tmp_path / "eval_after")) == {
        "accuracy_ci95": [0.7389, 0.9454]}
