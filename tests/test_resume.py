"""`mapd run` resumes after safe config changes, refuses result-determining ones that reach a stage
already run, redoes from a stage with `--from` (outputs moved aside) and records incomplete stages.

The whole pipeline runs in seconds: a tiny student and a committee on the local test server."""

import functools
import json
import shutil

import pytest
import yaml

from mapd.cli import main
from mapd.config import RunConfig
from mapd.config_diff import config_changes, result_fields
from mapd.secrets import public_dump
from mapd.errors import IncompleteStage
from mapd.io import read_jsonl
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import CountingReply, snapshot, write_pipeline_setup

STAGES = ["eval_before", "mine", "teach", "build", "train", "eval_after"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """(server, config dict, a finished run folder to copy): one full run shared by the tests that need one."""
    root = tmp_path_factory.mktemp("resume")
    server = FakeOpenAIServer(reply=CountingReply()).start()
    path, config = write_pipeline_setup(root, server.base_url, tiny_model_dir)
    assert _run(path, root / "run") == 0
    yield server, config, root / "run"
    server.close()


@pytest.fixture()
def setup(finished, tmp_path):
    """(config path, server, run folder): the folder is absent; ``_done`` copies a finished run there."""
    server, config, template = finished
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, server, tmp_path / "run"


def _done(out, finished) -> None:
    """A copy of the finished run (all six stages done with the fixture's config) at ``out``."""
    shutil.copytree(finished[2], out)


def _edit(path, change) -> None:
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config))


def _run(config_path, out, *extra) -> int:
    return main(["run", str(config_path), "--out", str(out), *extra])


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _statuses(out, round_index=0) -> dict[str, str]:
    return {name: record["status"] for name, record in _manifest(out)["rounds"][round_index]["stages"].items()}


def _outputs(out) -> dict:
    """Every file of the run except the lock and the log (which a refused command may touch)."""
    return {path: value for path, value in snapshot(out).items() if path not in (".lock", "mapd.log")}


def _ran(stdout: str) -> list[str]:
    """The stages a run ran (not skipped), from its `[round N] stage ...` lines."""
    return [line.split()[2] for line in stdout.splitlines() if line.startswith("[round 0] ") and line.endswith(" ...")]


def test_operational_changes_are_accepted_and_redo_nothing(setup, finished, capsys):
    config_path, server, out = setup
    _done(out, finished)
    stages_before = _manifest(out)["rounds"][0]["stages"]
    assert all(record["fingerprint"].startswith("sha256:") for record in stages_before.values())
    assert len({record["fingerprint"] for record in stages_before.values()}) == len(STAGES)
    calls, files = server.requests, _outputs(out)
    capsys.readouterr()

    def operational(config):  # what users change after a budget stop, 429s and timeouts
        config["max_budget_usd"] = 50.0
        for teacher in config["teachers"]:
            teacher.update(max_concurrency=2, timeout_s=600, max_retries=9, requests_per_minute=120,
                           price_input_per_mtok=1.0, price_output_per_mtok=2.0)
        config["train"].update(logging_steps=5, save_total_limit=1)
        config["cache_path"] = str(out / "cache.sqlite")

    _edit(config_path, operational)
    assert _run(config_path, out) == 0
    captured = capsys.readouterr()
    assert _ran(captured.out) == [] and captured.out.count("done earlier, skipped") == len(STAGES)
    line = ("mapd: config changed in operational fields only (teachers.0.max_concurrency, "
            "teachers.0.requests_per_minute, "
            "teachers.0.timeout_s, teachers.0.max_retries, teachers.0.price_input_per_mtok, ")
    assert line in captured.err and "max_budget_usd): accepted, they do not change results" in captured.err
    assert line.removeprefix("mapd: ") in (out / "mapd.log").read_text(), "and the run's log keeps it"
    assert server.requests == calls, "no teacher call is made again"
    manifest = _manifest(out)
    assert manifest["manifest_version"] == 2
    assert manifest["config"]["max_budget_usd"] == 50.0 and manifest["config"]["teachers"][1]["timeout_s"] == 600
    assert manifest["rounds"][0]["stages"] == stages_before, "no stage was redone or re-stamped"
    changed = {path for path, value in _outputs(out).items() if files.get(path) != value}
    assert changed <= {"manifest.json", "report.html", "report.md"}, changed


@pytest.mark.parametrize(("field", "change", "stage"), [
    ("teachers.0.temperature", lambda c: c["teachers"][0].update(temperature=0.2), "teach"),
    ("teachers.2", lambda c: c["teachers"].append({"name": "mistral", "model": "mistral",
                                                   "base_url": c["teachers"][0]["base_url"]}), "teach"),
    ("train.learning_rate", lambda c: c["train"].update(learning_rate=5e-4), "train"),
    ("task.test_limit", lambda c: c["task"].update(test_limit=2), "eval_before"),
])
def test_a_result_determining_change_is_refused_naming_field_and_stage(setup, finished, capfd, field, change, stage):
    config_path, server, out = setup
    _done(out, finished)
    calls, files = server.requests, _outputs(out)
    capfd.readouterr()
    _edit(config_path, change)
    assert _run(config_path, out) == 2
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"mapd: error: {out}: ")
    assert f"config field {field} changed since this run began; it changes stage '{stage}' (round 0)" in lines[0]
    assert f"--from {stage}`" in lines[0] and "new --out folder" in lines[0]
    assert server.requests == calls
    assert _outputs(out) == files, "a refused run changes nothing"


def test_from_a_stage_redoes_it_and_every_later_one_moving_outputs_aside(setup, finished, capsys):
    config_path, server, out = setup
    _done(out, finished)
    round_dir = out / "round-0"
    kept = {path: value for path, value in _outputs(out).items()
            if path.startswith(("round-0/mistakes.jsonl", "round-0/eval_before/"))}
    old_feedback = (round_dir / "feedback.jsonl").read_bytes()
    old_metrics = (round_dir / "eval_after" / "metrics.json").read_bytes()
    first_manifest = _manifest(out)
    calls = server.requests
    _edit(config_path, lambda c: c["teachers"][0].update(temperature=0.2))
    capsys.readouterr()

    assert _run(config_path, out, "--from", "teach") == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "mapd: config changed in teachers.0.temperature (first changes stage 'teach', round 0): accepted, " \
           "--from teach redoes the stages they change" in captured.err
    assert "mapd: --from teach: 8 output(s) moved aside to " in captured.err
    assert "redoing teach (round 0), build (round 0), train (round 0), eval_after (round 0)" in captured.err
    assert _ran(stdout) == ["teach", "build", "train", "eval_after"]
    assert "[round 0] eval_before: done earlier, skipped" in stdout
    assert "[round 0] mine: done earlier, skipped" in stdout
    assert server.requests > calls, "gpt's calls at the new temperature are new calls"

    superseded = list((out / "superseded").iterdir())
    assert len(superseded) == 1
    old = superseded[0]
    for path in ("feedback.jsonl", "rationales.jsonl", "teach_stats.json", "train.jsonl", "model/config.json",
                 "model/train_log.jsonl", "eval_after/metrics.json"):
        assert (old / "round-0" / path).is_file(), path
    assert (old / "round-0" / "feedback.jsonl").read_bytes() == old_feedback
    assert (old / "round-0" / "eval_after" / "metrics.json").read_bytes() == old_metrics
    assert (old / "report.html").is_file() and (old / "report.md").is_file()
    assert not (old / "round-0" / "mistakes.jsonl").exists() and not (old / "round-0" / "eval_before").exists()
    assert json.loads((old / "manifest.json").read_text())["rounds"] == first_manifest["rounds"]
    assert {path: value for path, value in _outputs(out).items() if path in kept} == kept, "mine and eval_before kept"
    assert [r["step"] for r in read_jsonl(round_dir / "model" / "train_log.jsonl")] == [1, 2], "trained afresh"

    manifest = _manifest(out)
    assert _statuses(out) == dict.fromkeys(STAGES, "done")
    assert manifest["superseded"][0]["from"] == "teach"
    assert manifest["superseded"][0]["folder"] == f"superseded/{old.name}"
    assert "round-0/model" in manifest["superseded"][0]["moved"]
    assert manifest["config"]["teachers"][0]["temperature"] == 0.2
    before, after = first_manifest["rounds"][0]["stages"], manifest["rounds"][0]["stages"]
    assert [after[s]["fingerprint"] == before[s]["fingerprint"] for s in STAGES] == [True, True] + [False] * 4
    assert after["mine"]["finished"] == before["mine"]["finished"]

    calls = server.requests
    assert _run(config_path, out) == 0, "the new config is now the run's"
    assert _ran(capsys.readouterr().out) == [] and server.requests == calls


def test_from_without_a_change_pays_no_call_again(setup, finished, capsys):
    config_path, server, out = setup
    _done(out, finished)
    calls = server.requests
    capsys.readouterr()
    assert _run(config_path, out, "--from", "build") == 0
    assert _ran(capsys.readouterr().out) == ["build", "train", "eval_after"]
    assert server.requests == calls
    assert (next((out / "superseded").iterdir()) / "round-0" / "train.jsonl").is_file()
    assert not (next((out / "superseded").iterdir()) / "round-0" / "feedback.jsonl").exists()


def test_from_an_earlier_stage_than_the_change_is_accepted_but_a_later_one_is_not(setup, finished, capfd):
    config_path, server, out = setup
    _done(out, finished)
    _edit(config_path, lambda c: c.setdefault("review", {}).update(threshold=2.0))
    files = _outputs(out)
    capfd.readouterr()
    assert _run(config_path, out, "--from", "build") == 2
    err = capfd.readouterr().err
    assert "config field review.threshold changed" in err and "it changes stage 'teach' (round 0)" in err
    assert _outputs(out) == files and not (out / "superseded").exists()
    assert _run(config_path, out, "--from", "mine") == 0
    assert _statuses(out) == dict.fromkeys(STAGES, "done")


def test_an_unknown_from_stage_is_refused(setup, capfd):
    config_path, server, out = setup
    assert _run(config_path, out, "--from", "tech") == 2
    assert capfd.readouterr().err == ("mapd: error: --from tech: not a stage (stages, in order: eval_before, mine, "
                                      "teach, build, train, eval_after)\n")
    assert not out.exists()


def test_an_incomplete_stage_is_recorded_exits_3_and_the_rerun_completes_it(setup, capsys, monkeypatch):
    config_path, server, out = setup
    import mapd.stages.teach as teach

    real = teach.run_teach

    @functools.wraps(real)  # the same signature: the runner passes it the same config fields
    def incomplete(folder, **sections):
        real(folder, **sections)  # every record written, then the stage ends incomplete
        raise IncompleteStage("teach: 3 of 36 calls failed (gpt: HTTP 503); rerun to make only those")

    monkeypatch.setattr(teach, "run_teach", incomplete)
    assert _run(config_path, out) == 3
    stages = _manifest(out)["rounds"][0]["stages"]
    assert {name: record["status"] for name, record in stages.items()} == {
        "eval_before": "done", "mine": "done", "teach": "incomplete"}, "and no stage after it ran"
    assert stages["teach"]["error"] == "teach: 3 of 36 calls failed (gpt: HTTP 503); rerun to make only those"
    assert stages["teach"]["fingerprint"].startswith("sha256:")
    assert "finished" not in _manifest(out)
    calls = server.requests
    monkeypatch.undo()

    # a change to a stage that has not run yet is accepted; one to the incomplete stage is not
    _edit(config_path, lambda c: c["teachers"][1].update(max_tokens=64))
    capsys.readouterr()
    assert _run(config_path, out) == 2
    assert "config field teachers.1.max_tokens changed" in capsys.readouterr().err
    _edit(config_path, lambda c: (c["teachers"][1].update(max_tokens=32), c["train"].update(learning_rate=5e-4)))
    assert _run(config_path, out) == 0
    captured = capsys.readouterr()
    assert _ran(captured.out) == ["teach", "build", "train", "eval_after"]
    assert ("mapd: config changed in train.learning_rate (first changes stage 'train', round 0): accepted, "
            "no stage they change has run yet") in captured.err
    assert server.requests == calls, "the incomplete stage's calls come from the cache"
    stages = _manifest(out)["rounds"][0]["stages"]
    assert _statuses(out) == dict.fromkeys(STAGES, "done") and "error" not in stages["teach"]
    assert _manifest(out)["config"]["train"]["learning_rate"] == 5e-4


def test_a_budget_stop_then_a_raised_budget_finishes_the_run_paying_nothing_twice(setup):
    """The issue's case: `mapd run` stops at its budget (teach incomplete, exit 3); the same budget again makes
    no call; the raised budget is accepted (an operational field) and the run finishes."""
    config_path, _, out = setup
    reply = CountingReply()
    with FakeOpenAIServer(reply=reply) as server:
        def priced(config, budget):
            config["max_budget_usd"] = budget
            for teacher in config["teachers"]:
                teacher.update(base_url=server.base_url, price_input_per_mtok=1000.0, price_output_per_mtok=1000.0,
                               max_concurrency=2)

        _edit(config_path, lambda c: priced(c, 0.5))  # about a fifth of what the calls cost
        assert _run(config_path, out) == 3
        teach = _manifest(out)["rounds"][0]["stages"]["teach"]
        assert teach["status"] == "incomplete" and "max_budget_usd" in teach["error"]
        assert set(_statuses(out)) == {"eval_before", "mine", "teach"}
        calls = 2 * 3 * len(read_jsonl(out / "round-0" / "mistakes.jsonl"))  # feedback, rationale, review each
        paid = server.requests
        assert 0 < paid < calls
        assert _run(config_path, out) == 3
        assert server.requests == paid, "the same budget again makes no new call"

        _edit(config_path, lambda c: priced(c, 100.0))
        assert _run(config_path, out) == 0
        assert _statuses(out) == dict.fromkeys(STAGES, "done")
        assert server.requests == calls and reply.duplicates == 0, "every call paid once"


def test_a_version_1_manifest_takes_operational_changes_and_is_upgraded(setup, finished, capfd):
    config_path, server, out = setup
    _done(out, finished)
    manifest = _manifest(out)
    manifest["manifest_version"] = 1
    for record in manifest["rounds"][0]["stages"].values():
        del record["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    files = _outputs(out)

    _edit(config_path, lambda c: c["train"].update(learning_rate=5e-4))  # train has run: refused
    capfd.readouterr()
    assert _run(config_path, out) == 2
    assert "config field train.learning_rate changed" in capfd.readouterr().err
    assert _outputs(out) == files

    _edit(config_path, lambda c: (c["train"].update(learning_rate=1e-3), c.update(max_budget_usd=9.0)))
    assert _run(config_path, out) == 0
    upgraded = _manifest(out)
    assert upgraded["manifest_version"] == 2 and upgraded["config"]["max_budget_usd"] == 9.0
    assert all(r["fingerprint"].startswith("sha256:") for r in upgraded["rounds"][0]["stages"].values())


def test_a_later_round_is_moved_aside_by_from(setup, finished, capsys):
    config_path, server, out = setup
    _done(out, finished)
    _edit(config_path, lambda c: c.update(rounds=2))  # rounds may grow: round 1 runs
    assert _run(config_path, out) == 0
    assert (out / "round-1" / "model" / "config.json").exists()
    capsys.readouterr()
    assert _run(config_path, out, "--from", "eval_after") == 0
    stdout = capsys.readouterr().out
    assert "[round 0] eval_after ..." in stdout and "[round 1] mine ..." in stdout and "[round 1] train ..." in stdout
    old = next((out / "superseded").iterdir())
    assert (old / "round-1" / "mistakes.jsonl").is_file() and (old / "round-1" / "model" / "config.json").is_file()
    assert (old / "round-0" / "eval_after" / "metrics.json").is_file() and not (old / "round-0" / "model").exists()
    assert all(status == "done" for status in _statuses(out, 1).values())


# -- which fields count -----------------------------------------------------------------------------


def _config(**teacher) -> dict:
    url = "http://127.0.0.1:1/v1"
    return public_dump(RunConfig(teachers=[{"name": "a", "model": "m", "base_url": url},
                                           {"name": "b", "model": "m", "base_url": url, **teacher}]))


def test_config_changes_name_dotted_paths_and_tell_operational_ones():
    old = _config()
    assert config_changes(old, old) == []
    assert config_changes(old, _config(temperature=0.1)) == [("teachers.1.temperature", False)]
    assert config_changes(old, _config(extra_body={"seed": 1})) == [("teachers.1.extra_body.seed", False)]
    assert config_changes(old, _config(headers_env={"x-api-key": "KEY"}, timeout_s=5)) == [
        ("teachers.1.headers_env", True), ("teachers.1.timeout_s", True)]
    assert config_changes(old, _config(base_url=None)) == [("teachers.1.base_url", True),
                                                           ("teachers.1.provider", False)]
    grown = json.loads(json.dumps(old))
    grown["teachers"].append(dict(grown["teachers"][0], name="c"))
    grown["rounds"], grown["max_budget_usd"] = 3, 1.5
    grown["train"]["lora_target_modules"] = ["q_proj"]
    assert config_changes(old, grown) == [("teachers.2", False), ("train.lora_target_modules", False),
                                          ("rounds", True), ("max_budget_usd", True)]  # in the config's order
    assert config_changes(grown, old)[0] == ("teachers.2", False)


def test_result_fields_drop_operational_fields_at_every_depth():
    kept = result_fields(_config())
    assert set(kept) == {"task", "student", "teachers", "prompts", "review", "build", "train"}
    assert set(kept["teachers"][0]) == {"name", "model", "provider", "gguf_file", "temperature", "top_p",
                                        "max_tokens", "extra_body", "serve", "dtype"}
    assert "save_steps" not in kept["train"] and "learning_rate" in kept["train"]


def test_a_field_added_by_a_later_mapd_at_its_default_is_no_change():
    """A run folder made before a field existed resumes: the field at its default changes nothing; set, it does."""
    new = RunConfig.model_validate({"teachers": [{"name": "gpt", "model": "m"}]}).model_dump(mode="json")
    old = json.loads(json.dumps(new))
    del old["train"]["args"], old["task"]["options"], old["teachers"][0]["dtype"]
    assert config_changes(old, new) == []
    new["train"]["args"] = {"optim": "sgd"}
    assert config_changes(old, new) == [("train.args", False)]
