"""What mapd prints goes through logging: -q / -v before or after the subcommand, every result line and
each call (at -v) in the folder's mapd.log, the fatal error and the interrupt too; `mapd eval` locks and
logs like the other stage commands; `mapd teach --batch-status` finds a run folder's cache."""

from __future__ import annotations

import json
import re

import pytest

from mapd.cli import main
from mapd.io import folder_lock, write_jsonl
from mapd.llm import CallCache
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import KEY_ENV, CountingReply, teach_argv, write_teach_setup


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_verbose_work_before_or_after_the_subcommand(tmp_path, key, capsys, where):
    with FakeOpenAIServer(reply=CountingReply()) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2)
        argv = teach_argv(config, mistakes, tmp_path / "quiet")
        assert main(["-q", *argv] if where == "before" else [*argv, "-q"]) == 0
        quiet = capsys.readouterr()
        argv = teach_argv(config, mistakes, tmp_path / "loud")
        assert main(["-v", *argv] if where == "before" else [*argv, "-v"]) == 0
        loud = capsys.readouterr()
    assert quiet.out == ""
    assert all("call/s" in line for line in re.split(r"[\r\n]", quiet.err) if line.strip()), quiet.err  # bars only
    assert "accepted" in loud.out
    # -v: each call, with its teacher, key, status, attempts, latency and tokens
    call_lines = [line for line in loud.err.splitlines() if line.startswith("mapd: call ")]
    assert len(call_lines) == 2 * 3 * 2 + 2 * 3 * 2, loud.err
    assert any("feedback 'q0' of gpt: teacher gpt, ok, 1 attempt(s)" in line and "output tokens" in line
               for line in call_lines), call_lines
    log = (tmp_path / "quiet" / "mapd.log").read_text()  # -q quiets the terminal, not the log
    assert "accepted" in log and "DEBUG call " in log and "teacher calls" in log


def test_a_fatal_error_and_an_interrupt_are_in_mapd_log(tmp_path, key, capsys, monkeypatch):
    with FakeOpenAIServer(fail_first=["unauthorized"] * 20) as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 2)
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mapd: error: teach incomplete")
    log = (tmp_path / "out" / "mapd.log").read_text()
    assert log.strip().splitlines()[-1].endswith(last.removeprefix("mapd: "))
    assert log.count("teach incomplete") == 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mapd.stages.teach._teach_into", interrupted)
    assert main(teach_argv(config, mistakes, tmp_path / "stopped")) == 130
    assert "interrupted; rerun" in (tmp_path / "stopped" / "mapd.log").read_text()
    assert "interrupted; rerun" in capsys.readouterr().err


def test_eval_locks_its_folder_and_writes_mapd_log(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "data"
    write_jsonl(data / "test.jsonl", [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(2)])
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "jsonl", "--data", str(data), "--max-new-tokens", "4",
            "--out", str(tmp_path / "out")]
    with folder_lock(tmp_path / "out"):
        assert main(argv) == 2
    assert "another mapd command is writing this folder" in capsys.readouterr().err
    assert main(argv) == 0
    log = (tmp_path / "out" / "mapd.log").read_text()
    assert "jsonl/test: accuracy" in log and (tmp_path / "out" / ".lock").exists()


def test_batch_status_finds_a_run_folders_cache_without_mistakes(tmp_path, key, capsys):
    with FakeOpenAIServer() as server:
        config, _ = write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1)
        run = tmp_path / "run"
        (run / "round-0").mkdir(parents=True)
        (run / "manifest.json").write_text(json.dumps({"version": 2}))
        for out in (run / "round-0", run):
            assert main(["teach", "--config", str(config), "--out", str(out), "--batch-status"]) == 2
            assert f"{run / 'cache.sqlite'}: no call cache yet" in capsys.readouterr().err
        CallCache(run / "cache.sqlite").close()
        for out in (run / "round-0", run):
            assert main(["teach", "--config", str(config), "--out", str(out), "--batch-status"]) == 0
            assert f"batches in {run / 'cache.sqlite'}" in capsys.readouterr().out.replace("\n", "")
    assert main(["teach", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "--mistakes is required" in capsys.readouterr().err
