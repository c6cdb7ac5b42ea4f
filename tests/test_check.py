"""`mapd check`: a config, its keys and its endpoints checked, and the teaching cost bounded, writing nothing."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from mapd.check import teaching_bound
from mapd.cli import main
from mapd.config_file import load_config
from mapd.io import write_jsonl
from tests.openai_server import FakeOpenAIServer, _send
from tests.reliability_kit import KEY_ENV

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = 3


class ListingServer(FakeOpenAIServer):
    """The fake server, with a models list that names ``served``."""

    def __init__(self, served: list[str]) -> None:
        super().__init__()
        self.served = served
        self.listed = 0

    def _get(self, handler) -> None:
        if handler.path.split("?")[0].rstrip("/") == "/v1/models":
            self.listed += 1
            return _send(handler, 200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.served]})
        super()._get(handler)


def write_config(folder: Path, base_url: str, **extra) -> Path:
    """A jsonl task of QUESTIONS questions and two priced teachers on ``base_url``."""
    write_jsonl(folder / "data" / "train.jsonl",
                [{"question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(QUESTIONS)])
    teachers = [{"name": name, "model": f"model-{name}", "base_url": base_url, "api_key_env": KEY_ENV,
                 "max_tokens": 100, "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0} for name in ("gpt", "gemini")]
    config = {"task": {"name": "jsonl", "path": str(folder / "data")}, "teachers": teachers, "max_budget_usd": 5,
              **extra}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder (the current one) and a HOME of its own, both watched for new files."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("MAPD_CACHE_DIR", raising=False)
    return work


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("mapd: error:")]


def test_a_good_config_exits_0_states_a_cost_and_writes_nothing(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    with ListingServer(["model-gpt", "model-gemini", "other"]) as server:
        config = write_config(tmp_path, server.base_url)
        before = files(tmp_path)
        assert main(["check", str(config)]) == 0
        assert server.listed == 2 and server.requests == 0  # the models list only: no completion paid
    out = capsys.readouterr().out
    assert files(tmp_path) == before
    # every question a mistake: per teacher its feedback, its rationale and one review of the other's rationale
    assert re.search(rf"gpt: {3 * QUESTIONS} calls", out)
    total = float(re.search(r"total: at most ([\d.]+) USD, within max_budget_usd 5", out).group(1))
    assert total > 0
    assert "serves model-gpt" in out and "sk-test" not in out


def test_the_bound_is_the_dry_run_estimate_of_every_question_at_max_tokens(tmp_path):
    config = load_config(write_config(tmp_path, "https://api.example.com/v1", rounds=2))
    questions, rows = teaching_bound(config)
    assert questions == QUESTIONS
    for row in rows.values():
        assert row.to_call == 2 * 3 * QUESTIONS
        assert row.max_output_tokens == 100 * row.to_call
        assert row.cost_usd == pytest.approx((row.input_tokens * 1.0 + row.max_output_tokens * 2.0) / 1e6)
    batch = load_config(write_config(tmp_path, "https://api.example.com/v1", rounds=2))
    batch.teachers[0] = batch.teachers[0].model_copy(update={"batch": True})
    _, batch_rows = teaching_bound(batch)
    assert batch_rows["gpt"].cost_usd == pytest.approx(rows["gpt"].cost_usd / 2)  # batch prices: half


@pytest.mark.parametrize("key", ["", None], ids=["empty key", "unset key"])
def test_an_empty_or_unset_key_names_the_teacher(tmp_path, workdir, monkeypatch, capsys, key):
    if key is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    with ListingServer(["model-gpt", "model-gemini"]) as server:
        before = files(tmp_path)
        assert main(["check", str(write_config(tmp_path, server.base_url))]) == 2
        assert server.listed == 0
    lines = errors(capsys)
    assert any("(gpt): api_key_env" in line and KEY_ENV in line for line in lines), lines
    assert any("(gemini): api_key_env" in line for line in lines), lines
    assert files(tmp_path) == before | {"config.yaml", "data", "data/train.jsonl"}


def test_an_endpoint_that_is_down_names_the_teacher(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["check", str(write_config(tmp_path, f"http://127.0.0.1:{port}/v1"))]) == 2
    lines = errors(capsys)
    assert any("(gpt): base_url: the endpoint does not answer" in line for line in lines), lines
    assert not list(workdir.iterdir())
    # --offline probes nothing: the keys are set, so the config passes
    assert main(["check", str(tmp_path / "config.yaml"), "--offline"]) == 0


def test_train_data_that_cannot_be_read_is_a_problem(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    path = write_config(tmp_path, "https://api.example.com/v1")
    (tmp_path / "data" / "train.jsonl").unlink()
    assert main(["check", str(path), "--offline"]) == 2
    lines = errors(capsys)
    assert any(": task.path: " in line and "train.jsonl" in line for line in lines), lines


def test_a_missing_local_model_or_a_one_teacher_committee_is_a_problem(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    path = write_config(tmp_path, "https://api.example.com/v1")
    config = yaml.safe_load(path.read_text())
    config["teachers"][1] = {"name": "local", "model": str(tmp_path / "no-such-model")}
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path), "--offline"]) == 2
    assert any("teachers.1 (local): model: " in line and "no such folder" in line for line in errors(capsys))
    config["teachers"] = config["teachers"][:1]  # one teacher cannot review another
    config["student"] = {"model": str(tmp_path / "no-student")}
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path), "--offline"]) == 2
    lines = errors(capsys)
    # the committee's own field, named once (it read "teachers: review.enabled: ..." when check prefixed it again)
    assert any(f"{path}: review.enabled: peer review needs at least two teachers" in line for line in lines), lines
    assert any(f"{path}: student.model: " in line for line in lines), lines


def test_a_model_the_endpoint_does_not_serve_names_the_teacher_and_field(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    with ListingServer(["model-gpt", "gemini-2.0-flash"]) as server:
        assert main(["check", str(write_config(tmp_path, server.base_url))]) == 2
    lines = errors(capsys)
    assert any("(gemini): model: 'model-gemini' is not served" in line for line in lines), lines
    assert not any("(gpt)" in line for line in lines)


def test_a_teacher_without_prices_is_refused_under_a_budget(tmp_path, workdir, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    path = write_config(tmp_path, "https://api.example.com/v1")
    config = yaml.safe_load(path.read_text())
    config["teachers"][1].update(price_input_per_mtok=0, price_output_per_mtok=0)
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path), "--offline"]) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and "'gemini'" in lines[0] and "price_input_per_mtok" in lines[0], lines


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_passes_check_offline_but_for_unset_keys(path, workdir, monkeypatch, capsys):
    config = load_config(path)
    for teacher in config.teachers:
        if teacher.api_key_env:
            monkeypatch.delenv(teacher.api_key_env, raising=False)
    code = main(["check", str(path), "--offline"])
    lines = errors(capsys)
    problems = lines[:-1] if code else lines  # the last line counts the problems
    assert all(": api_key_env: " in line and "is not set" in line for line in problems), problems
    assert code == (2 if problems else 0)
    for teacher in config.teachers:  # a hosted teacher has its prices, so max_budget_usd counts it
        if teacher.api_key_env:
            assert teacher.price_input_per_mtok > 0 and teacher.price_output_per_mtok > 0, teacher.name
    assert not list(workdir.iterdir())


def test_init_writes_each_starter_config_which_passes_check(workdir, capsys):
    for template in ("paper-committee", "vllm-committee", "offline-default"):
        assert main(["init", template]) == 0
        assert (workdir / f"{template}.yaml").read_text() == (ROOT / "configs" / f"{template}.yaml").read_text()
    assert main(["init", "offline-default"]) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err
    assert main(["check", "offline-default.yaml", "--offline"]) == 0


def test_config_shows_the_true_defaults(capsys):
    assert main(["config"]) == 0
    shown = capsys.readouterr().out
    assert "learning_rate: 1.0e-05" in shown  # 1e-05 in YAML that reads back as a number
    values = yaml.safe_load(shown)
    assert values["train"]["learning_rate"] == 1e-05
    assert values["train"]["max_steps"] == -1 and values["student"]["max_new_tokens"] == 512
    assert "#   name: (required)" in shown  # a teacher's fields, documented though the default committee is empty


def test_a_dry_run_on_the_offline_default_writes_nothing(tmp_path, workdir, monkeypatch, capsys):
    cache = tmp_path / "mapd-cache"
    monkeypatch.setenv("MAPD_CACHE_DIR", str(cache))  # where embedded models are assembled (docs/formats.md)
    write_jsonl(tmp_path / "mistakes.jsonl", [{"id": "q1", "question": "What is 2 + 2?", "gold": "4",
                                              "output": "2 + 2 = 5", "answer": "5"}])
    before = files(tmp_path)
    assert main(["teach", "--config", str(ROOT / "configs" / "offline-default.yaml"), "--mistakes",
                 str(tmp_path / "mistakes.jsonl"), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "dry run: nothing was called or written" in capsys.readouterr().out
    assert files(tmp_path) == before and not cache.exists()


def test_check_lists_every_problem_mapd_run_refuses(tmp_path, workdir, monkeypatch, capsys):
    """`mapd check` and `mapd run` share one list of pre-flight problems (runner.run_problems): an unknown
    single:<teacher> and a launcher that is not installed are problems for both, check listing them all."""
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    path = write_config(tmp_path, "https://api.example.com/v1", build={"mode": "single:nobody"},
                        train={"launch": "no-such-launcher-xyz --nproc 2"})
    before = files(tmp_path)
    assert main(["check", str(path), "--offline"]) == 2
    lines = errors(capsys)
    single = f"{path}: build.mode: single:nobody: teacher 'nobody' is not in the config (teachers: gpt, gemini)"
    launch = f"{path}: train.launch: no-such-launcher-xyz: no such command"
    assert any(line == f"mapd: error: {single}" for line in lines), lines
    assert any(line.startswith(f"mapd: error: {launch}") for line in lines), lines
    assert lines[-1] == f"mapd: error: {path}: 2 problem(s) above; nothing was called or written", lines
    assert files(tmp_path) == before and not list(workdir.iterdir())
    # mapd run refuses the same config with the first of them, as it did before check shared its list
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"mapd: error: {single}\n"
    assert not (tmp_path / "run").exists()


def test_an_empty_committee_is_named_once(tmp_path, workdir, monkeypatch, capsys):
    path = write_config(tmp_path, "https://api.example.com/v1")
    config = yaml.safe_load(path.read_text())
    config["teachers"] = []
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path), "--offline"]) == 2
    lines = errors(capsys)
    assert f"mapd: error: {path}: teachers: the committee needs at least one teacher" in lines, lines
    assert not any("teachers: teachers:" in line for line in lines), lines


def test_a_missing_local_model_is_named_by_check_and_refused_by_run_in_its_own_words(tmp_path, workdir, monkeypatch,
                                                                                   capsys):
    monkeypatch.setenv(KEY_ENV, "sk-test-check-0123456789")
    path = write_config(tmp_path, "https://api.example.com/v1")
    config = yaml.safe_load(path.read_text())
    missing = str(tmp_path / "no-such-model")
    config["teachers"][1] = {"name": "local", "model": missing}
    path.write_text(yaml.safe_dump(config))
    assert main(["check", str(path), "--offline"]) == 2
    assert f"mapd: error: {path}: teachers.1 (local): model: model {missing}: no such folder" in errors(capsys)
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"mapd: error: model {missing}: no such folder\n"
    assert not (tmp_path / "run").exists()
