"""A run loses nothing and leaks nothing: endpoint faults, SIGKILLs, bad input, secrets, two runs.

Stage and CLI level (the dispatcher's own fault handling is tested in test_llm.py). Teachers are
the local OpenAI-compatible server of tests/openai_server.py; the student is conftest's tiny model.
Subprocesses run `python -m mapd.cli` against the server in this process. bench/soak.py is the
longer version of the fault and kill tests.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import sqlite3
import subprocess
import threading
from collections import Counter
from pathlib import Path
from secrets import token_hex

import pytest
import yaml
from tests.openai_server import ALL_FAULTS, FakeOpenAIServer
from tests.reliability_kit import (COMMITTEE, KEY_ENV, CountingReply, dead_url, jsonl_problems, make_mistakes,
                                   mapd_argv, run_killed, run_mapd, snapshot, teach_argv, teach_records,
                                   teacher_entries, wait_for, write_teach_setup)

from mapd.cli import main
from mapd.io import folder_lock, read_jsonl, write_jsonl
from mapd.llm import CallCache, CallResult

MAX_RETRIES = 6
# a tqdm progress bar line: "desc:  40%|####  | 2/5 [00:01<00:02, ...]" or, total unknown, "desc: 3call [00:00, ...]"
PROGRESS_BAR = re.compile(r"\[\d+:\d\d[<,]")


# -- endpoint faults --------------------------------------------------------------------------


def test_teach_keeps_every_record_at_thirty_percent_faults(tmp_path, key, fast_retries, capsys):
    """90 mistakes x 3 teachers: feedback, rationale and, for each rationale written, 2 reviews (> 1,000
    calls); every fault kind."""
    n = 90
    with FakeOpenAIServer(CountingReply(), fault_rate=0.3, faults=ALL_FAULTS, seed=11, hang_s=2.5) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, n, timeout_s=2.0,
                                             max_retries=MAX_RETRIES, max_concurrency=16)
        # refusals and 400s are not retried: the stage ends incomplete (exit 3), with every record written
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 3
    feedback, rationales = teach_records(tmp_path / "out")
    pairs = [(f"q{i}", teacher) for i in range(n) for teacher in COMMITTEE]
    assert [(r["id"], r["teacher"]) for r in feedback] == pairs == [(r["id"], r["teacher"]) for r in rationales]
    verdicts = [v for r in rationales for v in r["reviews"]]
    for record in rationales:  # a rationale is reviewed by both others exactly when it was written
        assert [v["reviewer"] for v in record["reviews"]] == ([t for t in COMMITTEE if t != record["teacher"]]
                                                             if record["text"] else [])
    outcomes = [(r["text"], r["error"]) for r in feedback + rationales] + [(v["raw"], v["error"]) for v in verdicts]
    assert all((text is None) != (error is None) for text, error in outcomes)  # text, or the error that says why
    errors = Counter(error.split(":")[0] for _, error in outcomes if error)
    assert errors["Refusal"] and errors["BadRequestError"]  # refusals, content filter, 400: not retried
    assert set(errors) <= {"Refusal", "BadRequestError", "APITimeoutError"}, errors  # timeouts: a busy machine

    calls = len(outcomes)
    per_request = Counter(json.dumps(body, sort_keys=True) for body in server.bodies)
    assert len(per_request) == calls >= 1000  # every call reached the server, none was dropped
    assert max(per_request.values()) <= MAX_RETRIES + 1  # bounded attempts
    assert set(server.faults) == set(ALL_FAULTS)
    assert 0.25 < sum(server.faults.values()) / server.requests < 0.35
    stats = json.loads((tmp_path / "out" / "teach_stats.json").read_text())
    assert sum(row["calls"] for row in stats.values()) == calls
    assert sum(row["failures"] for row in stats.values()) == sum(errors.values())
    assert f"failed calls: {sum(r['error'] is not None for r in feedback)} feedback" in capsys.readouterr().out


def test_an_unreachable_teacher_is_recorded_not_dropped(tmp_path, key, fast_retries):
    """Connection refused on every attempt: the teacher's records carry the error; the others are whole."""
    with FakeOpenAIServer(CountingReply()) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 5, max_retries=2)
        data = yaml.safe_load(config.read_text())
        data["teachers"][2]["base_url"] = dead_url()
        config.write_text(yaml.safe_dump(data))
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 3  # incomplete: every record written
    feedback, rationales = teach_records(tmp_path / "out")
    dead = COMMITTEE[2]
    for record in feedback + rationales:  # (the error's wording is the transport's: connection or timeout)
        assert (record["error"] is not None) == (record["teacher"] == dead)
    assert all((v["error"] is not None) == (v["reviewer"] == dead) for r in rationales for v in r["reviews"])
    db = sqlite3.connect(tmp_path / "out" / "cache.sqlite")
    rows = db.execute("SELECT attempts FROM calls WHERE teacher=?", (dead,)).fetchall()
    db.close()
    assert rows and {attempts for (attempts,) in rows} == {3}  # 1 + max_retries, then recorded


# -- crashes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_during_teach_then_rerun_gives_the_uninterrupted_artifacts(tmp_path, key, seed):
    """Kills during the calls (after a random number of requests), while the artifacts are written,
    and at a random moment; then a rerun. Nothing is lost and only calls in flight are paid twice."""
    n, concurrency = 16, 4
    reply = CountingReply()
    with FakeOpenAIServer(reply, latency_s=0.03) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, n, max_concurrency=concurrency)
        assert main(teach_argv(config, mistakes, tmp_path / "whole")) == 0
        whole, calls = teach_records(tmp_path / "whole"), server.requests
        assert calls == n * 3 * 4 and reply.duplicates == 0
        server.reset()
        reply.paid.clear()

        out, rng = tmp_path / "killed", random.Random(seed)
        argv = teach_argv(config, mistakes, out)
        moments = [lambda after=rng.randint(1, calls * 2 // 3): server.requests >= after,  # during the calls
                   lambda: (out / "feedback.jsonl").exists(),  # while the artifacts are written
                   rng.uniform(0.5, 3.0)]  # any time: start-up, calls, writing, or after the end
        landed = []  # the later moments may come after the run ended
        for when in moments:
            landed.append(run_killed(argv, when, log=tmp_path / "killed.log"))
            assert jsonl_problems(out) == []  # whole files or none: no half-written line
        assert landed[0], (tmp_path / "killed.log").read_text()[-2000:]
        assert main(argv) == 0
        kills = sum(landed)
    assert teach_records(out) == whole
    in_flight = kills * len(COMMITTEE) * concurrency  # the most calls a kill can catch in the air
    assert server.requests <= calls + in_flight
    assert reply.duplicates <= in_flight


TRAIN = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_length": 64, "save_steps": 1,
         "save_total_limit": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0, "max_steps": 2}


def train_pairs() -> list[dict]:
    return [{"id": str(i), "kind": kind, "teacher": "t", "prompt": f"{kind}: what is {i} + 7?",
             "completion": f"{i} + 7 = {i + 7}. The answer is {i + 7}."}
            for i in range(8) for kind in ("feedback", "rationale")]


def test_sigkill_while_checkpointing_then_rerun_resumes(tmp_path, tiny_model_dir, capsys):
    """`mapd train` killed as it starts writing checkpoint-2 resumes from checkpoint-1 (the partial
    checkpoint is passed over) and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", train_pairs())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    argv = ["train", "--config", str(tmp_path / "config.yaml"), "--model", str(tiny_model_dir),
            "--data", str(tmp_path / "train.jsonl"), "--out"]
    out = tmp_path / "killed"
    assert run_killed([*argv, str(out)], lambda: (out / "checkpoint-2").exists(), log=tmp_path / "train.log")
    complete = sorted(p.name for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    assert complete == ["checkpoint-1"], complete
    log = out / "train_log.jsonl"  # mark the logged step that must survive, and cut a line short
    kept = [{**r, "mark": "before the kill"} for r in read_jsonl(log) if r["step"] <= 1]
    log.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 2, "loss": 1', encoding="utf-8")

    assert main([*argv, str(out)]) == 0
    assert "2 steps, resumed from checkpoint-1" in capsys.readouterr().out
    records = read_jsonl(log)  # strict: the cut line is gone
    assert [(r["step"], r.get("mark")) for r in records] == [(1, "before the kill"), (2, None)]  # 1 not redone
    assert main([*argv, str(tmp_path / "whole")]) == 0
    resumed, whole = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(resumed[name].equal(whole[name]) for name in whole)


def test_a_partial_last_line_is_never_read_as_data(tmp_path, key, capfd):
    """Appended logs lose a cut tail; stage inputs (always written whole) refuse one, naming the line."""
    mistakes = make_mistakes(3)
    write_jsonl(tmp_path / "mistakes.jsonl", mistakes)
    with open(tmp_path / "mistakes.jsonl", "a") as handle:
        handle.write(json.dumps(make_mistakes(4)[3])[:30])
    with FakeOpenAIServer(CountingReply()) as server:
        config, _ = write_teach_setup(tmp_path / "setup", server.base_url, KEY_ENV, 1)
        assert main(teach_argv(config, tmp_path / "mistakes.jsonl", tmp_path / "out")) == 2
        assert server.requests == 0
    assert capfd.readouterr().err.startswith(f"mapd: error: {tmp_path / 'mistakes.jsonl'}:4: not valid JSON")

    run = tmp_path / "run"  # a round folder whose training log was cut mid-append
    write_jsonl(run / "mistakes.jsonl", mistakes)
    write_jsonl(run / "model" / "train_log.jsonl", [{"step": 1, "epoch": 0.5, "loss": 2.0, "loss_feedback": 2.0,
                                                     "loss_rationale": 2.0, "learning_rate": 0.01}])
    with open(run / "model" / "train_log.jsonl", "a") as handle:
        handle.write('{"step": 2, "epoch": 1.0, "lo')
    assert main(["report", str(run)]) == 0


# -- bad input ---------------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _config(tmp_path: Path, base_url: str, **sections) -> str:
    data = {"task": {"name": "svamp"}, "teachers": teacher_entries(base_url, KEY_ENV), **sections}
    return _write(tmp_path / "config.yaml", yaml.safe_dump(data))


def _data(tmp_path: Path, text: str) -> str:
    _write(tmp_path / "data" / "test.jsonl", text)
    return str(tmp_path / "data")


def _old_cache(path: Path) -> None:
    CallCache(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE mapd_meta SET value='0'")
    db.commit()
    db.close()


GOOD_ROWS = '{"question": "What is 2 + 5?", "answer": 7}\n'

# case -> (set-up: (tmp_path, server url, out dir) -> argv, what the one error line must name)
BAD_INPUT = {
    "config missing field": (
        lambda t, url, out: ["teach", "--config", _write(t / "c.yaml", "teachers: [{name: gpt}]\n"),
                             "--mistakes", str(out / "mistakes.jsonl"), "--out", str(out)],
        "c.yaml: teachers.0.model: Field required"),
    "config mistyped field": (
        lambda t, url, out: ["teach", "--config", _config(t, url, student={"batch_size": "many"}),
                             "--mistakes", str(out / "mistakes.jsonl"), "--out", str(out)],
        "config.yaml: student.batch_size: Input should be a valid integer"),
    "config unknown field": (
        lambda t, url, out: ["teach", "--config", _config(t, url, studnet={}),
                             "--mistakes", str(out / "mistakes.jsonl"), "--out", str(out)],
        "config.yaml: studnet: Extra inputs are not permitted"),
    "teacher that does not exist": (
        lambda t, url, out: ["build", "--run", str(out), "--mode", "single:claude"],
        "build mode single:claude: unknown teacher 'claude'"),
    "local teacher model that does not exist": (
        lambda t, url, out: ["teach", "--config", _write(t / "c.yaml", yaml.safe_dump(
            {"task": {"name": "svamp"}, "review": {"enabled": False},
             "teachers": [{"name": "ghost", "model": str(t / "no-such-model")}]})),
            "--mistakes", str(out / "mistakes.jsonl"), "--out", str(out)],
        "no-such-model: no such folder"),
    "unset key variable": (
        lambda t, url, out: ["teach", "--config", _config(t, url), "--mistakes", str(out / "mistakes.jsonl"),
                             "--out", str(out)],
        f"environment variable {KEY_ENV} is not set"),
    "dataset with a bad line": (
        lambda t, url, out: ["eval", "--model", "unused", "--task", "jsonl",
                             "--data", _data(t, GOOD_ROWS + '{"question": "Why?", "answer": \n' + GOOD_ROWS),
                             "--out", str(out / "eval")],
        "test.jsonl:2: not valid JSON"),
    "gold answer that cannot be parsed": (
        lambda t, url, out: ["eval", "--model", "unused", "--task", "jsonl",
                             "--data", _data(t, GOOD_ROWS + '{"question": "How many?", "answer": "seven"}\n'),
                             "--out", str(out / "eval")],
        "test.jsonl:2: gold answer is 'seven', expected a number"),
    "empty dataset": (
        lambda t, url, out: ["eval", "--model", "unused", "--task", "jsonl", "--data", _data(t, ""),
                             "--out", str(out / "eval")],
        "split 'test' is empty"),
    "student path that does not exist": (
        lambda t, url, out: ["eval", "--model", str(t / "no-such-student"), "--task", "jsonl",
                             "--data", _data(t, GOOD_ROWS), "--out", str(out / "eval")],
        "no-such-student: no such folder"),
    "cache from an older version": (
        lambda t, url, out: (_old_cache(out / "cache.sqlite"),
                             ["teach", "--config", _config(t, url), "--mistakes", str(out / "mistakes.jsonl"),
                              "--out", str(out)])[1],
        "cache.sqlite: call cache schema version 0"),
    "corrupted cache": (
        lambda t, url, out: (_write(out / "cache.sqlite", "not a database " * 500),
                             ["teach", "--config", _config(t, url), "--mistakes", str(out / "mistakes.jsonl"),
                              "--out", str(out)])[1],
        "cache.sqlite: not a readable mapd call cache"),
    "run folder from an older version": (
        lambda t, url, out: (_write(out / "manifest.json", '{"manifest_version": 0, "rounds": []}'),
                             ["run", _config(t, url), "--out", str(out)])[1],
        "manifest.json: written by another mapd version"),
    "corrupted run folder": (
        lambda t, url, out: (_write(out / "manifest.json", '{"manifest_version": 1, "rou'),
                             ["run", _config(t, url), "--out", str(out)])[1],
        "manifest.json: corrupted manifest"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line_and_deletes_nothing(tmp_path, monkeypatch, capfd, case):
    monkeypatch.setenv(KEY_ENV, "sk-test-bad-input-0123456789")
    out = tmp_path / "out"  # what earlier commands computed
    write_jsonl(out / "mistakes.jsonl", make_mistakes(2))
    write_jsonl(out / "feedback.jsonl", [{"id": "q0", "teacher": "gpt", "text": "Mind the sign.", "error": None}])
    write_jsonl(out / "rationales.jsonl", [{"id": "q0", "teacher": "gpt", "text": "The answer is 7.", "error": None,
                                            "answer": "7", "reviews": [], "mean_score": None, "accepted": True}])
    if case != "corrupted cache":
        with CallCache(out / "cache.sqlite") as cache:
            cache.put("k", CallResult(None, "a paid reply", None, 10, 5), "gpt")
    setup, names = BAD_INPUT[case]
    with FakeOpenAIServer() as server:
        argv = setup(tmp_path, server.base_url, out)
        if case == "unset key variable":
            monkeypatch.delenv(KEY_ENV)
        before = snapshot(out)
        capfd.readouterr()
        assert main(argv) == 2
        assert server.requests == 0
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert len(lines) == 1 and lines[0].startswith("mapd: error: ") and names in lines[0], lines
    after = snapshot(out)
    assert {path: after.get(path) for path in before} == before  # every earlier file as it was


@pytest.mark.parametrize("command", [
    ["mine", "--out", "{out}"],
    ["teach", "--config", "{config}", "--mistakes", "{out}/mistakes.jsonl", "--out", "{out}"],
    ["build", "--run", "{out}"],
    ["train", "--data", "{out}/train.jsonl", "--out", "{out}"],
    ["import-reference", "--task", "svamp", "--mistakes", "{out}/false.json", "--out", "{out}"],
], ids=lambda argv: argv[0])
def test_a_stage_refuses_a_folder_another_command_is_writing(tmp_path, capfd, command):
    out = tmp_path / "out"
    write_jsonl(out / "mistakes.jsonl", make_mistakes(2))
    argv = [arg.format(out=out, config=_config(tmp_path, "http://127.0.0.1:9/v1")) for arg in command]
    with folder_lock(out):
        before = snapshot(out)
        capfd.readouterr()
        assert main(argv) == 2
    assert capfd.readouterr().err == f"mapd: error: {out}: another mapd command is writing this folder; " \
                                      "wait for it or choose another one\n"
    assert snapshot(out) == before


# -- secrets -----------------------------------------------------------------------------------


def test_keys_and_url_credentials_are_never_written(tmp_path, key, fast_retries, capfd, caplog):
    """The key is sent (Authorization: Bearer) and a base_url's user:password is sent (Basic), but
    neither is in the out folder, the cache, the output or any log record, faults included."""
    caplog.set_level(logging.DEBUG)  # every library's records, as a user who turns logging on sees them
    password = f"pw{token_hex(8)}"
    with FakeOpenAIServer(CountingReply(), fault_rate=0.3, faults=ALL_FAULTS, seed=4, hang_s=1.5) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 6, timeout_s=1.0)
        data = yaml.safe_load(config.read_text())
        data["teachers"][2]["base_url"] = server.base_url.replace("://", f"://alice:{password}@")
        data["cache_path"] = str(tmp_path / "cache" / "calls.sqlite")
        config.write_text(yaml.safe_dump(data))
        assert main(teach_argv(config, mistakes, tmp_path / "out")) in (0, 3)  # 3: a refusal or 400 was drawn
    basic = base64.b64encode(f"alice:{password}".encode()).decode()
    assert set(server.auth_headers) == {f"Bearer {key}", f"Basic {basic}"}
    assert sum(server.faults.values()) > 0
    captured = capfd.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log records": caplog.text}
    texts |= {str(p): p.read_bytes().decode("latin-1") for folder in ("out", "cache")
              for p in (tmp_path / folder).rglob("*") if p.is_file()}
    assert any(name.endswith("calls.sqlite") for name in texts) and caplog.text
    for secret in (key, password, basic):
        assert [name for name, text in texts.items() if secret in text] == []


def test_a_key_pasted_in_place_of_its_variable_name_is_refused_unechoed(tmp_path, key, capfd):
    with FakeOpenAIServer() as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, key, 1)  # the key where its name belongs
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
        assert server.requests == 0
    err = capfd.readouterr().err
    assert err.startswith(f"mapd: error: {config}: teachers.0.api_key_env: String should match pattern")
    assert key not in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


# -- two runs, one folder ---------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_refuses_and_the_first_finishes(tmp_path, key, tiny_model_dir):
    """`mapd run` end to end (tiny student, teachers on the local server, one with credentials in its
    base_url). The first run holds the folder while its teachers answer; a second exits 2 and changes
    nothing; the first then finishes, and neither the key nor the password is anywhere in the folder."""
    for split in ("train", "test"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl",
                    [{"question": f"What is {i} + 7 - {i}?", "answer": 7} for i in range(3)])
    answering = threading.Event()
    counting = CountingReply()

    def held(messages: list[dict], model: str) -> str:
        answering.wait(60)
        return counting(messages, model)

    password = f"pw{token_hex(8)}"
    with FakeOpenAIServer(held) as server:
        teachers = teacher_entries(server.base_url, KEY_ENV, names=COMMITTEE[:2])
        teachers[1]["base_url"] = server.base_url.replace("://", f"://alice:{password}@")
        config = {"task": {"name": "jsonl", "path": str(tmp_path / "data")},
                  "student": {"model": str(tiny_model_dir), "max_new_tokens": 4, "batch_size": 4},
                  "teachers": teachers, "train": {**TRAIN, "max_steps": 1, "max_length": 128}}
        _write(tmp_path / "run.yaml", yaml.safe_dump(config))
        run = tmp_path / "run"
        argv = mapd_argv("run", str(tmp_path / "run.yaml"), "--out", str(run))
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            try:
                assert wait_for(lambda: server.requests > 0 or first.poll() is not None, 120)  # it is teaching
                before = snapshot(run)
                second = run_mapd("run", str(tmp_path / "run.yaml"), "--out", str(run))
                assert second.returncode == 2 and second.stdout == ""
                assert second.stderr == f"mapd: error: {run}: another mapd command is writing this folder; " \
                                        "wait for it or choose another one\n"
                assert snapshot(run) == before
            finally:
                answering.set()
                first.wait(timeout=180)
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 0, output[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    stages = manifest["rounds"][0]["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(
        ["eval_before", "mine", "teach", "build", "train", "eval_after"], "done")
    assert manifest["config"]["teachers"][1]["base_url"].startswith("http://***@127.0.0.1:")
    texts = {"first": output, "second": second.stdout + second.stderr}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in run.rglob("*") if p.is_file()}
    for secret in (key, password):
        assert [name for name, text in texts.items() if secret in text] == []
