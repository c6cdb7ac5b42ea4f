"""The config: validation errors name the field and file; defaults are documented and valid."""

import yaml
import pytest

from mapd.cli import main
from mapd.config import RunConfig, parse_config
from mapd.config_doc import default_config_yaml
from mapd.config_file import embedded_default_config, load_config
from mapd.secrets import public_dump
from mapd.errors import MapdError

REPO_CONFIGS = ["configs/offline-default.yaml", "configs/paper-committee.yaml", "configs/vllm-committee.yaml",
                "configs/multi-gpu-7b.yaml", "configs/lora-one-gpu.yaml"]


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_example_configs_are_valid(name):
    from tests.conftest import REPO

    config = load_config(REPO / name)
    assert config.teachers, "every example config has a committee"


def test_every_mapd_config_in_configs_is_listed():
    from tests.conftest import REPO

    assert sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")) == sorted(REPO_CONFIGS)


@pytest.mark.parametrize("name", ["configs/accelerate/fsdp.yaml", "configs/accelerate/zero3.yaml"])
def test_accelerate_configs_load(name):
    """The accelerate files (not mapd configs) load in accelerate, and every key of their plugin section
    is an `accelerate launch` option (accelerate checks only the top-level keys itself)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    from tests.conftest import REPO

    config = load_config_from_file(str(REPO / name))
    assert config.mixed_precision == "bf16"
    options = {action.dest for action in launch_command_parser()._actions}
    section = config.fsdp_config if config.distributed_type.value == "FSDP" else config.deepspeed_config
    assert section and set(section) <= options, set(section) - options


def test_every_field_has_help_text():
    def walk(model_type):
        for name, info in model_type.model_fields.items():
            assert info.description, f"{model_type.__name__}.{name} has no description"
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                walk(annotation)

    walk(RunConfig)
    from mapd.config import TeacherConfig

    walk(TeacherConfig)


def test_config_show_round_trips(capsys):
    assert main(["config", "--demo"]) == 0  # the demo's config (`mapd config` alone: the bare defaults)
    shown = capsys.readouterr().out
    assert "# Sampling temperature" in shown
    assert parse_config(yaml.safe_load(shown)) == embedded_default_config()
    assert default_config_yaml(embedded_default_config()) == shown


def test_unknown_field_names_field_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  alhpa: 0.3\n")
    with pytest.raises(MapdError, match=r"c\.yaml: train\.alhpa"):
        load_config(path)


def test_mistyped_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teachers:\n  - name: a\n    model: m\n    temperature: hot\n")
    with pytest.raises(MapdError, match=r"teachers\.0\.temperature"):
        load_config(path)


def test_missing_required_teacher_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teachers:\n  - name: a\n")
    with pytest.raises(MapdError, match=r"teachers\.0\.model: Field required"):
        load_config(path)


def test_duplicate_teacher_names():
    with pytest.raises(MapdError, match="repeated: a"):
        parse_config({"teachers": [{"name": "a", "model": "x"}, {"name": "a", "model": "y"}]})


def test_bad_yaml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("task: [unclosed\n")
    with pytest.raises(MapdError, match="not valid YAML"):
        load_config(path)
    assert main(["mine", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mapd: error: {tmp_path / 'nope.yaml'}: config file not found"]


def test_provider_inferred_and_unknown_teacher():
    config = parse_config({"teachers": [{"name": "a", "model": "m", "base_url": "http://h/v1"}, {"name": "b", "model": "x"}]})
    assert [t.provider for t in config.teachers] == ["openai", "local"]
    with pytest.raises(MapdError, match="teacher 'c' is not in the config"):
        config.teacher("c")


def test_public_dump_redacts_url_credentials():
    config = parse_config({"teachers": [{"name": "a", "model": "m", "base_url": "https://u:secretpw@h.example/v1?key=abc"}]})
    dumped = public_dump(config)
    assert "secretpw" not in str(dumped) and "abc" not in str(dumped)
    assert dumped["teachers"][0]["base_url"] == "https://***@h.example/v1?***"


def test_public_dump_redacts_every_base_url_student_included():
    url = "https://u:secretpw@h.example/v1?key=qsecretq"
    config = parse_config({"student": {"model": "m", "base_url": url},
                           "teachers": [{"name": "a", "model": "m", "base_url": url}]})
    dumped = public_dump(config)
    assert "secretpw" not in str(dumped) and "qsecretq" not in str(dumped)
    assert dumped["student"]["base_url"] == dumped["teachers"][0]["base_url"] == "https://***@h.example/v1?***"
    assert config.student.base_url == url  # redacted in the dump only: the calls still carry it


@pytest.mark.parametrize("section", ["student", "teacher"])
@pytest.mark.parametrize("url", ["localhost:8000/v1", "u:hunter2@localhost:8000/v1", "ftp://h/v1", "http:///v1"])
def test_a_base_url_must_be_http_with_a_host(section, url):
    data = ({"student": {"base_url": url}} if section == "student"
            else {"teachers": [{"name": "a", "model": "m", "base_url": url}]})
    with pytest.raises(MapdError, match=r"base_url: expected an http:// or https:// URL with a host") as error:
        parse_config(data, "c.yaml")
    assert "hunter2" not in str(error.value) and "localhost" not in str(error.value)


def test_cache_path_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_config({"cache_path": "~/calls/cache.sqlite"}).cache_path == str(tmp_path / "calls" / "cache.sqlite")
    assert parse_config({"cache_path": "cache.sqlite"}).cache_path == "cache.sqlite"
    assert parse_config({}).cache_path is None


@pytest.mark.parametrize("mode", ["mixed", "no-review", "all", "single:gpt"])
def test_build_modes(mode):
    assert parse_config({"build": {"mode": mode}}).build.mode == mode


@pytest.mark.parametrize("mode", ["mix", "single:", "single: ", "Mixed", ""])
def test_an_unknown_build_mode_is_a_config_error(mode):
    with pytest.raises(MapdError, match=r"c.yaml: build.mode: unknown mode .* \(modes: mixed, single:<teacher>, "
                                        r"no-review, all\)"):
        parse_config({"build": {"mode": mode}}, "c.yaml")


def test_task_options_reach_the_generator_and_are_checked_with_the_config():
    """task.options: handed to reasoning-gym, checked before anything runs, only for generated tasks."""
    from mapd.tasks import get_task

    options = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    config = parse_config({"task": {"name": "reasoning_gym:chain_sum", "size": 20, "options": options}})
    questions = [example.question for example in get_task(config.task).load("train")]
    assert all(len(question.split(":")[1].split()) == 4 for question in questions)  # "a op b =": two terms
    for bad, says in (({"bogus": 1}, "bogus"), ({"min_terms": 0}, "min_terms must be positive"),
                      ({"max_digits": [1]}, "task.options.max_digits")):
        with pytest.raises(MapdError, match=says):
            get_task(parse_config({"task": {"name": "reasoning_gym:chain_sum", "options": bad}}).task)
    with pytest.raises(MapdError, match="only reasoning_gym"):
        parse_config({"task": {"name": "svamp", "options": {"min_terms": 2}}})
