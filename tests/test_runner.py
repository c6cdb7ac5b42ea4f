"""`mapd run` end to end in seconds: a tiny student, a committee on the local test server."""

import json

import pytest
import yaml

from mapd.cli import main
from mapd.io import read_jsonl, write_jsonl
from mapd.stats import format_p, mcnemar_exact, wilson_interval
from tests.reliability_kit import CountingReply, write_pipeline_setup
from tests.openai_server import FakeOpenAIServer


@pytest.fixture()
def run_config(tmp_path, tiny_model_dir):
    server = FakeOpenAIServer(reply=CountingReply()).start()
    path, _ = write_pipeline_setup(tmp_path, server.base_url, tiny_model_dir)
    yield path, server
    server.close()


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory, tiny_model_dir):
    """(config path, run folder): one finished two-round run of run_config's setup, shared by the tests that
    read one (a whole pipeline run per test was the slowest part of this module)."""
    root = tmp_path_factory.mktemp("two-rounds")
    server = FakeOpenAIServer(reply=CountingReply()).start()
    path, _ = write_pipeline_setup(root, server.base_url, tiny_model_dir)
    config = yaml.safe_load(path.read_text())
    config["rounds"] = 2
    path.write_text(yaml.safe_dump(config))
    out = root / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    yield path, out
    server.close()


def test_run_every_stage_then_resume_without_calls(run_config, tmp_path, capsys):
    config_path, server = run_config
    out = tmp_path / "run"
    assert main(["run", str(config_path), "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    stages = manifest["rounds"][0]["stages"]
    assert list(stages) == ["eval_before", "mine", "teach", "build", "train", "eval_after"]
    assert all(stage["status"] == "done" for stage in stages.values())
    assert manifest["versions"]["torch"] and manifest["seeds"]["train"] == 731
    round_dir = out / "round-0"
    mistakes = read_jsonl(round_dir / "mistakes.jsonl")
    assert len(read_jsonl(round_dir / "feedback.jsonl")) == 2 * len(mistakes)
    assert read_jsonl(round_dir / "train.jsonl")
    assert (round_dir / "model" / "config.json").exists()
    assert json.loads((round_dir / "eval_after" / "metrics.json").read_text())["n"] == 4
    assert (out / "report.html").exists()
    calls = server.requests
    assert calls > 0

    assert main(["run", str(config_path), "--out", str(out)]) == 0
    assert server.requests == calls, "a finished run makes no teacher call when run again"
    assert "done earlier, skipped" in capsys.readouterr().out


def test_resume_after_a_crash_reruns_only_unfinished_stages(run_config, tmp_path, monkeypatch):
    config_path, server = run_config
    out = tmp_path / "run"
    import mapd.stages.build as build

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_build", crash)
    assert main(["run", str(config_path), "--out", str(out)]) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rounds"][0]["stages"]["teach"]["status"] == "done"
    assert manifest["rounds"][0]["stages"]["build"]["status"] == "interrupted"  # never left "running" (issue 21)
    calls = server.requests
    monkeypatch.undo()
    assert main(["run", str(config_path), "--out", str(out)]) == 0
    assert server.requests == calls, "teacher calls are not paid twice after a crash"


@pytest.mark.parametrize("error", [RuntimeError("a bug, key sk-leaked0123456789abcdef"), OSError(28, "No space left")],
                         ids=["a bug", "an OSError"])
def test_a_stage_that_raises_any_other_error_is_recorded_failed(run_config, tmp_path, monkeypatch, error):
    """Not only an interrupt or an incomplete stage: whatever ends a stage leaves a final status, never
    "running" (a failed stage keeps its error text, keys redacted), and the error still propagates."""
    config_path, server = run_config
    out = tmp_path / "run"
    from mapd.stages import evaluate

    def crash(*args, **kwargs):
        raise error

    monkeypatch.setattr(evaluate, "run_eval_before", crash)
    with pytest.raises(type(error)):
        main(["run", str(config_path), "--out", str(out)])
    record = json.loads((out / "manifest.json").read_text())["rounds"][0]["stages"]["eval_before"]
    assert record["status"] == "failed", record
    assert record["finished"] and record["seconds"] >= 0
    assert str(error).split(" key ")[0] in record["error"]
    assert "sk-leaked" not in (out / "manifest.json").read_text()
    assert server.requests == 0
    if isinstance(error, OSError):  # once the cause is gone, the same command reruns the failed stage
        monkeypatch.undo()
        assert main(["run", str(config_path), "--out", str(out)]) == 0
        stages = json.loads((out / "manifest.json").read_text())["rounds"][0]["stages"]
        assert stages["eval_before"]["status"] == "done" and "error" not in stages["eval_before"]


def test_changed_config_refuses_the_folder(run_config, tmp_path, capsys):
    config_path, _ = run_config
    out = tmp_path / "run"
    (out).mkdir()
    (out / "manifest.json").write_text(json.dumps({"manifest_version": 1, "rounds": [], "config": {"task": {}}}))
    assert main(["run", str(config_path), "--out", str(out)]) == 2
    assert "different config" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["student", "local teacher"])
def test_a_missing_local_model_is_refused_before_any_stage(run_config, tmp_path, capsys, model):
    config_path, server = run_config
    config = yaml.safe_load(config_path.read_text())
    missing = str(tmp_path / "no-such-model")
    if model == "student":
        config["student"]["model"] = missing
    else:
        config["teachers"].append({"name": "local", "model": missing, "provider": "local"})
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", str(config_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"mapd: error: model {missing}: no such folder\n"
    assert not out.exists() and server.requests == 0


def test_two_rounds(two_round_run):
    _, out = two_round_run  # the fixture's `mapd run` exited 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["rounds"]) == 2
    assert (out / "round-1" / "model" / "config.json").exists()


def test_eval_after_summary_holds_the_paired_comparison(two_round_run):
    """Each round's eval_after summary in manifest.json: the accuracy's 95 % Wilson interval and the comparison
    with the base student (round 0's eval_before) by question id; report.md names the test and the p-value."""
    config_path, out = two_round_run  # the fixture's `mapd run` exited 0
    manifest = json.loads((out / "manifest.json").read_text())
    before = {p["id"]: p["correct"] for p in read_jsonl(out / "round-0" / "eval_before" / "predictions.jsonl")}
    markdown = (out / "report.md").read_text()
    assert "exact McNemar" in markdown
    for index in (0, 1):
        summary = manifest["rounds"][index]["stages"]["eval_after"]["summary"]
        after = {p["id"]: p["correct"] for p in read_jsonl(out / f"round-{index}" / "eval_after" / "predictions.jsonl")}
        gained = sum(after[i] and not before[i] for i in after)
        lost = sum(before[i] and not after[i] for i in after)
        assert summary["n"] == summary["paired_n"] == len(after) == 4  # the metrics stay beside the new keys
        assert (summary["gained"], summary["lost"]) == (gained, lost)
        assert (summary["before_correct"], summary["after_correct"]) == (sum(before.values()), sum(after.values()))
        assert summary["mcnemar_p"] == mcnemar_exact(gained, lost)
        low, high = wilson_interval(sum(after.values()), 4)
        assert summary["accuracy_ci95"] == [round(low, 4), round(high, 4)]
        assert f"| round-{index} | 4 |" in markdown and f"| {format_p(summary['mcnemar_p'])} |" in markdown

    assert main(["run", str(config_path), "--out", str(out)]) == 0  # every stage skipped: the summary stays
    again = json.loads((out / "manifest.json").read_text())
    assert again["rounds"][1]["stages"]["eval_after"]["summary"] == summary


# -- users' own files through the stage commands --------------------------------------------------


def test_a_mistakes_file_with_integer_ids_works_end_to_end(run_config, tmp_path, tiny_model_dir, capsys):
    """A mistakes.jsonl whose ids are JSON integers goes through `mapd teach`, `mapd build`, `mapd train`,
    `mapd eval` and `mapd report`; the ids come out as strings in every artifact."""
    config_path, server = run_config
    out = tmp_path / "round"
    mistakes = [{"id": i, "question": f"What is {i} + 7 - {i}?", "gold": "7", "output": f"{i} + 7 = {i + 7}",
                 "answer": str(i + 7), "status": "wrong"} for i in range(4)]
    write_jsonl(out / "mistakes.jsonl", mistakes)
    assert [type(json.loads(line)["id"]) for line in (out / "mistakes.jsonl").read_text().splitlines()] == [int] * 4
    ids = [str(i) for i in range(4)]

    config = ["--config", str(config_path)]
    assert main(["teach", *config, "--mistakes", str(out / "mistakes.jsonl"), "--out", str(out)]) == 0
    assert server.requests == 4 * 2 * 3  # feedback, rationale and one review, per mistake and teacher
    assert main(["build", "--run", str(out), *config]) == 0
    assert main(["train", *config, "--model", str(tiny_model_dir), "--data", str(out / "train.jsonl"),
                 "--out", str(out / "model")]) == 0
    assert main(["eval", "--model", str(out / "model"), "--task", "jsonl", "--data", str(tmp_path / "data"),
                 "--max-new-tokens", "8", "--batch-size", "8", "--out", str(out / "eval_after")]) == 0
    assert main(["report", str(out)]) == 0
    capsys.readouterr()

    feedback, rationales = read_jsonl(out / "feedback.jsonl"), read_jsonl(out / "rationales.jsonl")
    assert [(r["id"], r["teacher"]) for r in feedback] == [(i, t) for i in ids for t in ("gpt", "gemini")]
    assert [(r["id"], r["teacher"]) for r in rationales] == [(i, t) for i in ids for t in ("gpt", "gemini")]
    assert all(r["accepted"] is True and r["text"] for r in rationales)  # every review scores 4
    train = read_jsonl(out / "train.jsonl")
    assert [(r["id"], r["kind"]) for r in train] == [(i, kind) for i in ids for kind in ("feedback", "rationale")]
    assert [r["step"] for r in read_jsonl(out / "model" / "train_log.jsonl")] == [1, 2]
    assert (out / "model" / "config.json").exists()
    predictions = read_jsonl(out / "eval_after" / "predictions.jsonl")
    assert len(predictions) == 4 and all(isinstance(r["id"], str) for r in predictions)
    assert json.loads((out / "eval_after" / "metrics.json").read_text())["n"] == 4
    assert (out / "report.html").exists() and (out / "report.md").exists()


def test_a_boolean_given_as_a_string_is_refused_by_build(tmp_path, capfd):
    """`"accepted": "false"` in rationales.jsonl is one `mapd: error:` line naming file:line and field,
    never counted as an accepted rationale; the JSON boolean builds."""
    out = tmp_path / "round"
    write_jsonl(out / "mistakes.jsonl", [{"id": "q0", "question": "What is 3 + 4?", "gold": "7",
                                          "output": "3 + 4 = 8", "answer": "8", "status": "wrong"}])
    write_jsonl(out / "feedback.jsonl", [{"id": "q0", "teacher": t, "text": "Add again.", "error": None}
                                         for t in ("gpt", "gemini")])
    rationale = {"id": "q0", "text": "3 + 4 = 7. The answer is 7.", "error": None, "answer": "7", "reviews": [],
                 "mean_score": None}
    rationales = [{**rationale, "teacher": "gpt", "accepted": True},
                  {**rationale, "teacher": "gemini", "accepted": "false"}]
    write_jsonl(out / "rationales.jsonl", rationales)
    capfd.readouterr()
    assert main(["build", "--run", str(out)]) == 2
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mapd: error: {out / 'rationales.jsonl'}:2: field 'accepted': "), lines
    assert not (out / "train.jsonl").exists()

    write_jsonl(out / "rationales.jsonl", [rationales[0], {**rationales[1], "accepted": False}])
    assert main(["build", "--run", str(out), "--mode", "single:gemini"]) == 0  # single: used though not accepted
    assert [(r["kind"], r["teacher"]) for r in read_jsonl(out / "train.jsonl")] == [("feedback", "gemini"),
                                                                                   ("rationale", "gemini")]


def test_run_with_bad_task_data_creates_nothing(tmp_path, tiny_model_dir, capsys):
    path, config = write_pipeline_setup(tmp_path, "http://127.0.0.1:9/v1", tiny_model_dir)
    (tmp_path / "data" / "test.jsonl").write_text('{"id": "q1", "question": "What is 1 + 1?"}\n')  # no answer
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "test.jsonl:1" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_the_manifest_holds_no_base_url_credentials(tmp_path):
    from mapd.config import parse_config
    from mapd.layout import RunLayout
    from mapd.runner import Manifest, _stages

    url = "https://u:secretpw@h.example/v1?key=qsecretq"
    config = parse_config({"student": {"model": "served-student", "base_url": url},
                           "teachers": [{"name": "a", "model": "m", "base_url": url}],
                           "review": {"enabled": False}})
    Manifest(RunLayout(tmp_path / "run"), config, _stages())
    text = (tmp_path / "run" / "manifest.json").read_text()
    assert "secretpw" not in text and "qsecretq" not in text
    assert json.loads(text)["config"]["student"]["base_url"] == "https://***@h.example/v1?***"
