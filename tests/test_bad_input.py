"""Bad input, as a hostile user would try it (issue #13, item 6): every case is one ``mapd: error:`` line
naming the file (and its line and field where it has them), exit code 2, no traceback, and nothing made:
no output folder, no lock, no log, no empty cache (docs/reliability.md#bad-input).

Each case builds its inputs under ``tmp_path/in`` and names ``tmp_path/out`` (absent) as the folder to
write; the whole of ``tmp_path`` must be byte for byte the same after the command.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from tests.reliability_kit import make_mistakes, teach_argv

from mapd.cli import main
from mapd.config_file import load_config
from mapd.io import folder_lock
from mapd.llm import CallCache, CallResult

KEY_ENV = "MAPD_TEST_KEY"
TEACHER = {"name": "gpt", "model": "model-gpt", "base_url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV,
           "max_retries": 0}


def _write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _config(t: Path, **sections) -> str:
    data = {"task": {"name": "svamp"}, "teachers": [TEACHER], "review": {"enabled": False}, **sections}
    return _write(t / "in" / "config.yaml", yaml.safe_dump(data))


GOOD = _jsonl(make_mistakes(2))


def _teach(t: Path, mistakes: str | bytes = GOOD, config: str | None = None, out: Path | None = None) -> list[str]:
    return teach_argv(config or _config(t), _write(t / "in" / "m.jsonl", mistakes), out or t / "out")


def _with(mistake: dict) -> str:
    return _jsonl([{**make_mistakes(1)[0], **mistake}])


def _round(t: Path, mistakes: str = GOOD, feedback: list[dict] | None = None,
           rationales: list[dict] | None = None) -> Path:
    """An existing round folder (as mapd teach leaves it) for `mapd build`."""
    folder = t / "in" / "round"
    _write(folder / "mistakes.jsonl", mistakes)
    _write(folder / "feedback.jsonl", _jsonl(feedback or [
        {"id": "q0", "teacher": "gpt", "text": "Mind the sign.", "error": None}]))
    _write(folder / "rationales.jsonl", _jsonl(rationales or [
        {"id": "q0", "teacher": "gpt", "text": "The answer is 7.", "error": None, "answer": "7", "reviews": [],
         "mean_score": None, "accepted": True}]))
    return folder


def _reference(t: Path, records: list[dict] | str) -> str:
    text = records if isinstance(records, str) else json.dumps(records)
    return _write(t / "in" / "false.json", text)


def _pairs(t: Path, text: str) -> str:
    return _write(t / "in" / "train.jsonl", text)


PAIR = {"id": "q0", "kind": "rationale", "teacher": "gpt", "prompt": "What is 2 + 5?", "completion": "7"}
REF = {"id": 0, "question": "Is the sky blue?", "gold_answer": "true.\tIt is.", "student_wrong_pred": "No.",
       "student_wrong_final_answer": "false"}


def _bomb() -> str:
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    return "\n".join(levels) + "\nteachers:\n- {name: gpt, model: m, extra_body: {k: *a6}}\n"


def _sqlite_not_mapd(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE other (x)")
    db.commit()
    db.close()
    return str(path)


def _old_cache(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    CallCache(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE mapd_meta SET value='0'")
    db.commit()
    db.close()
    return str(path)


# case -> (argv from tmp_path, what the one error line must hold: file, line and field where there are)
Case = tuple[Callable[[Path], list[str]], list[str]]
CASES: dict[str, Case] = {
    # -- the config
    "config not UTF-8": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", b"task: {name: svamp}\n# caf\xe9\n")),
        ["c.yaml:2: not UTF-8 text"]),
    "config that is a YAML list": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "- task\n- teachers\n")),
        ["c.yaml: expected a mapping of config sections at the top level, got list"]),
    "config indented with a tab": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "task:\n\tname: svamp\n")),
        ["c.yaml:2: not valid YAML", "'\\t'"]),
    "config with a section twice": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "task: {name: svamp}\nrounds: 2\ntask: {name: gsm8k}\n")),
        ["c.yaml:3: not valid YAML (field 'task' appears twice (also on line 1))"]),
    "config with an unknown section": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "task: {name: svamp}\nstudnet: {}\n")),
        ["c.yaml: studnet: Extra inputs are not permitted (line 2)"]),
    "config with a mistyped field": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "task: {name: svamp}\nstudent:\n  batch_size: many\n")),
        ["c.yaml: student.batch_size: Input should be a valid integer", "(line 3)"]),
    "config with a 5000-digit number": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "task: {name: svamp}\nrounds: " + "9" * 5000 + "\n")),
        ["c.yaml:2: a number too long to read"]),
    "config nested too deeply": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "rounds: " + "[" * 5000 + "]" * 5000 + "\n")),
        ["c.yaml: not valid YAML (nested too deeply to read)"]),
    "config alias bomb": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", _bomb())),
        ["c.yaml: the config expands to more than 100,000 values"]),
    "config alias inside its own anchor": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml",
                                          "teachers:\n- name: gpt\n  model: m\n  extra_body: &x {k: [*x]}\n")),
        ["c.yaml:4: field 'teachers.0.extra_body.k.0' contains itself"]),
    "config with a lone surrogate escape": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", 'task: {name: svamp}\nprompts:\n  system: "a \\ud800"\n')),
        ["c.yaml:3: field 'prompts.system': a lone surrogate escape"]),
    "config that is a folder": (
        lambda t: _teach(t, config=str((t / "in" / "c.yaml").mkdir(parents=True) or t / "in" / "c.yaml")),
        ["c.yaml: is a folder, expected a YAML config file"]),
    "config naming an unknown task": (
        lambda t: _teach(t, config=_config(t, task={"name": "arithmetic"})),
        ["config.yaml:4: task.name: unknown task 'arithmetic'"]),
    "config of a jsonl task without a path": (
        lambda t: _teach(t, config=_config(t, task={"name": "jsonl"})),
        ["config.yaml:4: task jsonl: set task.path"]),
    "config with no teacher, for teach": (
        lambda t: _teach(t, config=_config(t, teachers=[])), ["config.yaml: teachers: the committee needs"]),
    "config with one teacher and peer review on": (
        lambda t: _teach(t, config=_config(t, review={"enabled": True})),
        ["config.yaml: review.enabled: peer review needs at least two teachers"]),
    "config with a base_url without its scheme": (
        lambda t: _teach(t, config=_config(t, teachers=[{**TEACHER, "base_url": "user:hunter2@localhost:8000/v1"}])),
        ["config.yaml:", "teachers.0.base_url: expected an http:// or https:// URL", "(value not shown)"]),
    "config with a student base_url without its scheme": (
        lambda t: _teach(t, config=_config(t, student={"base_url": "user:hunter2@localhost:8000/v1"})),
        ["config.yaml:", "student.base_url: expected an http:// or https:// URL", "(value not shown)"]),
    "config with an unknown build mode": (
        lambda t: _teach(t, config=_config(t, build={"mode": "single"})),
        ["config.yaml:", "build.mode: unknown mode 'single' (modes: mixed, single:<teacher>, no-review, all)"]),
    # -- mapd run's up-front checks: before the run folder is made or any stage runs
    "run with one teacher and peer review on": (
        lambda t: ["run", _config(t, review={"enabled": True}), "--out", str(t / "run")],
        ["config.yaml: review.enabled: peer review needs at least two teachers"]),
    "run with no teacher": (
        lambda t: ["run", _config(t, teachers=[]), "--out", str(t / "run")],
        ["config.yaml: teachers: the committee needs at least one teacher"]),
    "run whose single:<teacher> build mode names no teacher of the config": (
        lambda t: ["run", _config(t, build={"mode": "single:claude"}), "--out", str(t / "run")],
        ["config.yaml: build.mode: single:claude: teacher 'claude' is not in the config (teachers: gpt)"]),
    # -- task data
    "jsonl task data with a bad row after a blank line": (
        lambda t: ["mine", "--out", str(t / "out"), "--config", _config(t, task={
            "name": "jsonl", "path": _write(t / "in" / "d.jsonl", '{"question": "1 + 1?", "answer": 2}\n\n'
                                                                     '{"question": "2 + 2?"}\n')})],
        ["d.jsonl:3: missing field 'answer'"]),
    "config with a prompt template naming an unknown field": (
        lambda t: _teach(t, config=_config(t, prompts={"feedback": "Explain {mistake} to {student_answer}."})),
        ["config.yaml:", "prompts.feedback: {mistake} is not a field of this template"]),
    "config with a prompt template holding a lone brace": (
        lambda t: _teach(t, config=_config(t, prompts={"answer": "Answer {question} as JSON: }"})),
        ["config.yaml:", "prompts.answer: not a str.format template", "write {{ or }}"]),
    "config with a .nan threshold": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", "review:\n  enabled: false\n  threshold: .nan\n")),
        ["c.yaml:3: field 'review.threshold': .nan is not a number"]),
    "config with a training seed numpy refuses": (
        lambda t: _teach(t, config=_config(t, train={"seed": 2**40})),
        ["config.yaml: train.seed: Input should be less than 4294967296"]),
    "config a local teacher path that does not exist": (
        lambda t: _teach(t, config=_write(t / "in" / "c.yaml", yaml.safe_dump(
            {"task": {"name": "svamp"}, "review": {"enabled": False},
             "teachers": [{"name": "ghost", "model": str(t / "no-such-model")}]}))),
        ["no-such-model: no such folder"]),
    # -- a mistakes file
    "mistakes line with a lone surrogate escape": (
        lambda t: _teach(t, _with({"question": "How many \ud800?"})),
        ["m.jsonl:1: field 'question': a lone surrogate escape"]),
    "mistakes line nested too deeply": (
        lambda t: _teach(t, GOOD + '{"id": "x", "question": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
        ["m.jsonl:3: JSON nested too deeply to read"]),
    "mistakes line with a 5000-digit number": (
        lambda t: _teach(t, GOOD + '{"id": ' + "9" * 5000 + ', "question": "q", "gold": "1", "output": "o"}\n'),
        ["m.jsonl:3: field 'id': a number too long to read"]),
    "mistakes file empty": (lambda t: _teach(t, ""), ["m.jsonl: no mistakes (the file is empty)"]),
    "mistakes file blank": (lambda t: _teach(t, "\n   \n\n"), ["m.jsonl: no mistakes (the file is empty)"]),
    "mistakes line that is a JSON array": (
        lambda t: _teach(t, GOOD + "[1, 2]\n"), ["m.jsonl:3: expected a JSON object, got list"]),
    "mistakes line with a NUL byte": (
        lambda t: _teach(t, GOOD + '\x00{"id": "z"}\n'), ["m.jsonl:3: not valid JSON"]),
    "mistakes file not UTF-8": (
        lambda t: _teach(t, GOOD.encode() + b'{"id": "caf\xe9"}\n'), ["m.jsonl:3: not UTF-8 text"]),
    "mistakes with a repeated id": (
        lambda t: _teach(t, _jsonl(make_mistakes(2) + make_mistakes(1))),
        ["m.jsonl:3: field 'id': 'q0' already on line 1"]),
    "mistakes id that is a float": (lambda t: _teach(t, _with({"id": 1.5})), ["m.jsonl:1: field 'id'"]),
    "mistakes id that is a boolean": (lambda t: _teach(t, _with({"id": True})), ["m.jsonl:1: field 'id'"]),
    "mistakes line with a field twice": (
        lambda t: _teach(t, _with({}).replace('"gold": "7"', '"gold": "7", "gold": "banana"')),
        ["m.jsonl:1: field 'gold' appears twice"]),
    "gold that is not a number (banana for SVAMP)": (
        lambda t: _teach(t, GOOD + _with({"id": "q9", "gold": "banana"})),
        ["m.jsonl:3: field 'gold': 'banana' is not a number", "task svamp"]),
    "gold number with a thousands separator": (
        lambda t: _teach(t, _with({"gold": "1,000"})), ["m.jsonl:1: field 'gold': '1,000'", "write 1000"]),
    "gold that is not true/false for StrategyQA": (
        lambda t: _teach(t, _with({"gold": "yes"}), config=_config(t, task={"name": "strategyqa"})),
        ["m.jsonl:1: field 'gold': 'yes' is not true or false"]),
    "gold that is not an option letter for LogiQA": (
        lambda t: _teach(t, _with({"gold": "2"}), config=_config(t, task={"name": "logiqa"})),
        ["m.jsonl:1: field 'gold': '2' is not an option letter"]),
    "blank question": (lambda t: _teach(t, _with({"question": "  "})), ["m.jsonl:1: field 'question': blank"]),
    "mistakes path that is a folder": (
        lambda t: ["teach", "--config", _config(t), "--mistakes", str(t / "in"), "--out", str(t / "out")],
        ["in: is a folder, expected a file"]),
    # -- where teach writes
    "--out naming a file": (
        lambda t: _teach(t, out=Path(_write(t / "in" / "a-file", "x"))), ["a-file: is a file, not a folder"]),
    "--out inside a file": (
        lambda t: _teach(t, out=Path(_write(t / "in" / "a-file", "x")) / "out"), ["a-file is a file, not a folder"]),
    "cache_path naming a folder": (
        lambda t: _teach(t, config=_config(t, cache_path=str(t / "in"))), ["in: cache_path is a folder"]),
    "cache_path naming a file that is not SQLite": (
        lambda t: _teach(t, config=_config(t, cache_path=_write(t / "in" / "notes.txt", "my notes\n"))),
        ["notes.txt: not a readable mapd call cache"]),
    "cache_path naming an SQLite file that is not a cache": (
        lambda t: _teach(t, config=_config(t, cache_path=_sqlite_not_mapd(t / "in" / "other.sqlite"))),
        ["other.sqlite: an SQLite file that is not a mapd call cache"]),
    "cache_path naming a cache of another mapd version": (
        lambda t: _teach(t, config=_config(t, cache_path=_old_cache(t / "in" / "old.sqlite"))),
        ["old.sqlite: call cache schema version 0"]),
    "cache_path inside a file": (
        lambda t: _teach(t, config=_config(t, cache_path=_write(t / "in" / "a-file", "x") + "/cache.sqlite")),
        ["a-file is a file"]),
    "an output of teach that is a folder": (
        lambda t: (_teach(t, out=t / "in" / "round"), (t / "in" / "round" / "feedback.jsonl").mkdir(parents=True))[0],
        ["feedback.jsonl: is a folder, expected a file"]),
    "unset key variable": (
        lambda t: _teach(t, config=_config(t, teachers=[{**TEACHER, "api_key_env": "MAPD_TEST_UNSET_KEY"}])),
        ["MAPD_TEST_UNSET_KEY"]),
    # -- build
    "build --run on a missing path": (
        lambda t: ["build", "--run", str(t / "out")], ["--run", "out: no such folder"]),
    "build: accepted is the string \"false\"": (
        lambda t: ["build", "--run", str(_round(t, rationales=[
            {"id": "q0", "teacher": "gpt", "text": "The answer is 7.", "error": None, "answer": "7", "reviews": [],
             "mean_score": None, "accepted": "false"}]))],
        ["rationales.jsonl:1: field 'accepted'"]),
    "build: a gold not of the config's task": (
        lambda t: ["build", "--run", str(_round(t, mistakes=_with({"id": "q0", "gold": "banana"}))),
                   "--config", _config(t)],
        ["mistakes.jsonl:1: field 'gold': 'banana' is not a number"]),
    "build: feedback for a mistake that is not in the mistakes file": (
        lambda t: ["build", "--run", str(_round(t, feedback=[
            {"id": "q0", "teacher": "gpt", "text": "Mind the sign.", "error": None},
            {"id": "q7", "teacher": "gpt", "text": "Mind the sign.", "error": None}]))],
        ["feedback.jsonl:2: field 'id': 'q7' is not in"]),
    "build: blank feedback and rationale texts": (
        lambda t: ["build", "--run", str(_round(
            t, feedback=[{"id": "q0", "teacher": "gpt", "text": " ", "error": None}],
            rationales=[{"id": "q0", "teacher": "gpt", "text": "", "error": None, "answer": None, "reviews": [],
                         "mean_score": None, "accepted": True}]))],
        ["round: no usable mistake (2 without feedback"]),
    # -- report
    "report on valid JSON of the wrong shape": (
        lambda t: ["report", str(Path(_write(t / "in" / "run" / "manifest.json",
                                             '{"config": {"task": "svamp"}, "rounds": []}')).parent)],
        ["manifest.json: field 'config.task': Input should be a valid dictionary"]),
    "report on a manifest whose rounds are not a list": (
        lambda t: ["report", str(Path(_write(t / "in" / "run" / "manifest.json", '{"rounds": {"0": {}}}')).parent)],
        ["manifest.json: field 'rounds'"]),
    "report on a manifest whose stage is a list": (
        lambda t: ["report", str(Path(_write(t / "in" / "run" / "manifest.json",
                                             '{"rounds": [{"stages": {"mine": []}}]}')).parent)],
        ["manifest.json: field 'rounds.0.stages.mine'"]),
    "report where report.html is a folder": (
        lambda t: ["report", str(Path(_write(t / "in" / "run" / "mistakes.jsonl", GOOD)).parent)]
        if (t / "in" / "run" / "report.html").mkdir(parents=True) is None else [],
        ["report.html: is a folder, expected a file"]),
    # -- import-reference
    "StrategyQA golds imported under --task svamp": (
        lambda t: ["import-reference", "--task", "svamp", "--mistakes", _reference(t, [REF]), "--out", str(t / "out")],
        ["false.json: record 0: field 'gold_answer'", "is not a number", "task svamp"]),
    "import-reference of an empty list": (
        lambda t: ["import-reference", "--task", "svamp", "--mistakes", _reference(t, []), "--out", str(t / "out")],
        ["false.json: no mistakes (the list is empty)"]),
    "import-reference of deeply nested JSON": (
        lambda t: ["import-reference", "--task", "svamp", "--mistakes", _reference(t, "[" * 100_000 + "]" * 100_000),
                   "--out", str(t / "out")],
        ["false.json: JSON nested too deeply to read"]),
    "import-reference with a lone surrogate escape": (
        lambda t: ["import-reference", "--task", "strategyqa", "--mistakes",
                   _reference(t, json.dumps([{**REF, "question": "Is it \ud800?"}])), "--out", str(t / "out")],
        ["false.json: field '0.question': a lone surrogate escape"]),
    # -- train
    "train with a model path that does not exist": (
        lambda t: ["train", "--model", str(t / "no-such-model"), "--data", _pairs(t, _jsonl([PAIR])),
                   "--out", str(t / "out")],
        ["no-such-model: no such folder"]),
    "train.jsonl with an empty completion": (
        lambda t: ["train", "--model", str(t / "no-such-model"), "--data", _pairs(t, _jsonl([{**PAIR, "completion": ""}])),
                   "--out", str(t / "out")],
        ["train.jsonl:1: field 'completion'"]),
    "train.jsonl that does not exist": (
        lambda t: ["train", "--data", str(t / "in" / "train.jsonl"), "--out", str(t / "out")],
        ["train.jsonl: file not found"]),
    "train --alpha out of range": (
        lambda t: ["train", "--data", _pairs(t, _jsonl([PAIR])), "--alpha", "2", "--out", str(t / "out")],
        ["--alpha: Input should be less than or equal to 1"]),
    # -- eval and mine
    "eval --limit 0": (
        lambda t: ["eval", "--model", str(t / "no-such-model"), "--task", "jsonl",
                   "--data", _write(t / "in" / "data" / "test.jsonl", '{"question": "2 + 5?", "answer": 7}\n'),
                   "--limit", "0", "--out", str(t / "out")],
        ["limit must be at least 1"]),
    "eval --batch-size 0": (
        lambda t: ["eval", "--model", "m", "--task", "svamp", "--batch-size", "0", "--out", str(t / "out")],
        ["argument --batch-size: must be at least 1, got 0"]),
    "eval --out naming a file": (
        lambda t: ["eval", "--model", "m", "--task", "svamp", "--out", _write(t / "in" / "a-file", "x")],
        ["a-file: is a file, not a folder"]),
    "mine with a task.path that does not exist": (
        lambda t: ["mine", "--config", _config(t, task={"name": "jsonl", "path": str(t / "no-such-data")}),
                   "--out", str(t / "out")],
        ["no data file", "no-such-data"]),
    "mine with a student path that does not exist": (
        lambda t: ["mine", "--config", _config(t, task={"name": "jsonl", "path": _write(
            t / "in" / "data" / "train.jsonl", '{"question": "2 + 5?", "answer": 7}\n')},
            student={"model": str(t / "no-such-student")}), "--out", str(t / "out")],
        ["no-such-student: no such folder"]),
    "run with a config that is not UTF-8": (
        lambda t: ["run", _write(t / "in" / "c.yaml", b"\xff\xfe"), "--out", str(t / "out")],
        ["c.yaml:1: not UTF-8 text"]),
}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_place_and_makes_nothing(tmp_path, monkeypatch, capfd, case):
    monkeypatch.setenv(KEY_ENV, "sk-test-bad-input-0123456789")
    monkeypatch.delenv("MAPD_TEST_UNSET_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    setup, expected = CASES[case]
    argv = setup(tmp_path)
    before = tree(tmp_path)
    capfd.readouterr()
    assert main(argv) == 2
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mapd: error: "), lines
    assert all(part in lines[0] for part in expected), (lines[0], expected)
    assert "Traceback" not in captured.err + captured.out
    assert "hunter2" not in captured.err + captured.out
    assert tree(tmp_path) == before  # no folder, lock, log or cache made; every input as it was


def test_a_held_folder_with_valid_input_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, "sk-test-bad-input-0123456789")
    argv = _teach(tmp_path)
    with folder_lock(tmp_path / "out"):
        before = tree(tmp_path)
        assert main(argv) == 2
        assert tree(tmp_path) == before
    assert capfd.readouterr().err.strip().endswith("another mapd command is writing this folder; "
                                                   "wait for it or choose another one")


def test_a_byte_order_mark_and_crlf_line_ends_are_read(tmp_path):
    from mapd.records import read_mistakes

    path = Path(_write(tmp_path / "m.jsonl", b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode()))
    assert [m.id for m in read_mistakes(path)] == ["q0", "q1"]
    config = Path(_write(tmp_path / "c.yaml", b"\xef\xbb\xbftask: {name: gsm8k}\r\n"))
    assert load_config(config).task.name == "gsm8k"


def test_yaml_merge_keys_are_not_repeated_fields(tmp_path):
    config = _write(tmp_path / "c.yaml", "teachers:\n- &t {name: a, model: m, temperature: 0.5}\n- {<<: *t, name: b}\n")
    assert [(t.name, t.temperature) for t in load_config(config).teachers] == [("a", 0.5), ("b", 0.5)]


def test_a_cache_made_by_mapd_still_opens(tmp_path):
    with CallCache(tmp_path / "cache.sqlite") as cache:
        cache.put("k", CallResult(None, "a paid reply", None, 10, 5), "gpt")
    with CallCache(tmp_path / "cache.sqlite") as cache:
        assert cache.get("k").text == "a paid reply"
