"""The student on a server: generation through the keyed call path, cached by checkpoint identity."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import CountingReply, write_pipeline_setup

from mapd.cli import main
from mapd.config import PromptConfig, StudentConfig
from mapd.layout import EvalLayout
from mapd.records import Prediction, read_records
from mapd.models import checkpoint_identity

ROWS = [{"id": i + 1, "question": f"What is {i} + 7 - {i}?", "final": 7} for i in range(6)]


def answer_seven(messages: list[dict], model: str) -> str:
    return f"{model}: {messages[-1]['content'][:20]} ... The answer is 7."


def write_data(folder) -> None:
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))


def test_eval_with_a_running_server_goes_through_the_call_path(tmp_path, capsys):
    write_data(tmp_path / "data")
    argv = ["eval", "--model", "my-student", "--task", "svamp", "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "out"), "--max-new-tokens", "32"]
    with FakeOpenAIServer(answer_seven) as server:
        assert main([*argv, "--base-url", server.base_url]) == 0
        bodies = list(server.bodies)
        server.reset()
        assert main([*argv, "--base-url", server.base_url]) == 0  # answered from the cache
        assert server.requests == 0
    assert len(bodies) == len(ROWS) and all(b["model"] == "my-student" and b["temperature"] == 0.0
                                            and b["max_tokens"] == 32 for b in bodies)
    # the student sees exactly the prompt of in-process evaluation
    from mapd.prompts import answer_messages
    sent = [body["messages"] for body in bodies]
    assert all(answer_messages(PromptConfig(), row["question"], "number") in sent for row in ROWS)
    predictions = read_records(EvalLayout(tmp_path / "out").predictions, Prediction)
    assert [p.id for p in predictions] == [str(i) for i in range(1, 7)] and all(p.correct for p in predictions)
    assert all(p.cut_off is False for p in predictions)  # the server's finish_reason "stop"
    assert "accuracy 100.0%" in capsys.readouterr().out


def test_a_failed_student_call_makes_eval_incomplete_and_writes_nothing(tmp_path):
    write_data(tmp_path / "data")
    with FakeOpenAIServer(answer_seven, fault_rate=1.0, faults=("bad_request",)) as server:
        code = main(["eval", "--model", "m", "--task", "svamp", "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "out"), "--base-url", server.base_url])
    assert code == 3 and not (tmp_path / "out" / "predictions.jsonl").exists()


def test_serve_and_base_url_are_exclusive(tmp_path, capsys):
    code = main(["eval", "--model", "m", "--task", "svamp", "--out", str(tmp_path / "out"),
                 "--serve", "x {model} {port}", "--base-url", "http://127.0.0.1:9/v1"])
    assert code == 2 and "not both" in capsys.readouterr().err


def test_a_checkpoint_trained_in_place_has_a_new_identity(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    first = checkpoint_identity(str(folder))
    assert checkpoint_identity(str(folder)) == first
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(b"trained")
    os.utime(folder / "model.safetensors")
    assert checkpoint_identity(str(folder)) != first
    assert checkpoint_identity("org/hub-model") == checkpoint_identity("org/hub-model") != first
    assert StudentConfig(base_url="http://x/v1").served and not StudentConfig().served


def test_a_run_serves_the_student_and_never_answers_the_trained_one_from_its_base_cache(tmp_path, tiny_model_dir):
    """`mapd run` with `student.serve`: mapd starts the engine for eval_before and mining, stops it for training
    and serves the trained checkpoint for eval_after, whose prompts equal eval_before's but whose checkpoint
    does not: every one of them is asked again, not read from the cache."""
    requests = tmp_path / "student-requests.jsonl"
    engine = Path(__file__).resolve().parent / "fake_engine.py"
    with FakeOpenAIServer(CountingReply()) as teachers:
        path, config = write_pipeline_setup(tmp_path, teachers.base_url, tiny_model_dir)
        config["student"]["serve"] = (f"{sys.executable} {engine} --port {{port}} --served-model-name {{name}} "
                                      f"--requests-file {requests}")
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
        asked = [json.loads(line) for line in requests.read_text().splitlines()]
        assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0  # done: nothing asked again
    assert len(requests.read_text().splitlines()) == len(asked) == 4 + 6 + 4  # eval_before, mine, eval_after
    assert all(request["model"] == "student" for request in asked)
    before, after = (sorted(r["last"] for r in part) for part in (asked[:4], asked[-4:]))
    assert before == after  # the same test prompts, asked of the trained checkpoint too
    round0 = tmp_path / "run" / "round-0"
    assert "listening" in (round0 / "eval_before" / "server.log").read_text()
    assert (round0 / "eval_after" / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_with_a_real_serving_engine(tmp_path, tiny_model_dir):
    """The same round trip on `transformers serve` (the `serve` extra): the student's calls are cached under the
    base model for eval_before and mining and under the trained checkpoint for eval_after."""
    with FakeOpenAIServer(CountingReply()) as teachers:
        path, config = write_pipeline_setup(tmp_path, teachers.base_url, tiny_model_dir)
        config["student"]["serve"] = "transformers serve {model} --port {port}"
        path.write_text(yaml.safe_dump(config))
        assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    with sqlite3.connect(tmp_path / "run" / "cache.sqlite") as db:
        rows = db.execute("SELECT COUNT(*), COUNT(text) FROM calls WHERE teacher='student'").fetchone()
    assert rows == (4 + 6 + 4, 4 + 6 + 4)
    metrics = json.loads((tmp_path / "run" / "round-0" / "eval_after" / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["model"].endswith("model")


def test_a_served_eval_whose_answers_are_cached_starts_no_server(tmp_path):
    write_data(tmp_path / "data")
    engine = Path(__file__).resolve().parent / "fake_engine.py"
    argv = ["eval", "--model", str(tmp_path / "data"), "--task", "svamp", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--serve", f"{sys.executable} {engine} --port {{port}}"]
    assert main(argv) == 0
    started = (tmp_path / "out" / "server.log").read_text().count("listening")
    assert main(argv) == 0  # every answer cached: the server is not started again
    assert started == 1 and (tmp_path / "out" / "server.log").read_text().count("listening") == 1


def test_a_wrong_served_model_name_names_the_student_not_a_teacher(tmp_path, capsys):
    write_data(tmp_path / "data")
    with FakeOpenAIServer(answer_seven, fault_rate=1.0, faults=("model_not_found",)) as server:
        code = main(["eval", "--model", "no-such-name", "--task", "svamp", "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "out"), "--base-url", server.base_url])
    err = capsys.readouterr().err
    assert code == 3
    assert "the student's server stopped" in err and "`no-such-name` does not exist" in err
    assert "teacher" not in err.lower()
