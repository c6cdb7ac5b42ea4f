"""[trust] Numbers that cannot lie and names that are not paths (issue 21): every numeric config field is finite
and in a range that means something, usage figures are believed only when plausible, max_budget_usd needs prices,
teacher names are unique identifiers, and a sampling teacher's name is part of its calls' keys."""

from __future__ import annotations

import json
import math
import types
import typing

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import KEY_ENV, CountingReply, teach_argv, teach_records, write_teach_setup

from mapd import config as config_module
from mapd.cli import main
from mapd.config import RunConfig, TeacherConfig, parse_config
from mapd.config_file import load_config
from mapd.errors import MapdError
from mapd.llm import Call, CallCache, CallKey, Dispatcher
from mapd.llm.openai_provider import OpenAIProvider

REMOTE = "https://api.example.com/v1"


def _sections() -> list[type[BaseModel]]:
    """Every config section class (RunConfig and the classes its fields hold)."""
    found, todo = [], [RunConfig]
    while todo:
        model = todo.pop()
        if model in found:
            continue
        found.append(model)
        for info in model.model_fields.values():
            section = config_module.section_model(info.annotation)
            if section is not None:
                todo.append(section)
    return found


def _float_fields() -> list[tuple[type[BaseModel], str]]:
    def has_float(annotation) -> bool:  # float, or float | None (not containers)
        unions = (typing.Union, types.UnionType)
        return annotation is float or (typing.get_origin(annotation) in unions
                                       and any(has_float(a) for a in typing.get_args(annotation)))

    return [(model, name) for model in _sections() for name, info in model.model_fields.items()
            if has_float(info.annotation)]


def _minimal(model: type[BaseModel]) -> dict:
    return {"name": "a", "model": "m"} if model is TeacherConfig else {}


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_float_field_of_any_section_takes_a_non_finite_value(value):
    fields = _float_fields()
    assert len(fields) >= 20  # (the issue counted about 20)
    for model, name in fields:
        with pytest.raises(ValidationError, match="finite number"):
            model.model_validate({**_minimal(model), name: value})


@pytest.mark.parametrize("field, value, expected", [
    ("teachers.0.timeout_s", ".inf", "finite number"),
    ("teachers.0.batch_poll_s", ".inf", "finite number"),
    ("teachers.0.price_output_per_mtok", ".inf", "finite number"),
    ("train.learning_rate", ".inf", "finite number"),
    ("max_budget_usd", ".inf", "finite number"),
    ("review.threshold", "-.inf", "finite number"),
    ("teachers.0.extra_body.penalty", ".inf", "is not a finite number"),
    ("teachers.0.timeout_s", "1e300", "less than or equal to 86400"),  # (OverflowError in every call)
    ("train.learning_rate", "5", "less than or equal to 1"),
    ("teachers.0.batch_price_factor", "3", "less than or equal to 1"),
    ("teachers.0.requests_per_minute", "0.5", "greater than or equal to 1"),  # (every call failed: ValueError)
])
def test_a_bad_number_stops_mapd_run_before_anything_is_created(tmp_path, capsys, field, value, expected):
    data = {"teachers": [{"name": "gpt", "model": "m", "base_url": REMOTE, "price_input_per_mtok": 1.0}]}
    *path, last = field.split(".")
    target = data
    for part in path:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[last] = "@@"
    text = yaml.safe_dump(data).replace("'@@'", value)
    (tmp_path / "c.yaml").write_text(text)
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "c.yaml:" in err[0]
    assert field.split(".")[-1] in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("url, ok", [("http://127.0.0.1:70000/v1", False), ("http://127.0.0.1:0/v1", False),
                                     ("http://127.0.0.1:99999999/v1", False), ("http://h:port/v1", False),
                                     ("http://127.0.0.1:65535/v1", True), ("http://127.0.0.1:1/v1", True)])
def test_a_port_outside_1_to_65535_is_refused_at_once_not_retried(url, ok):
    data = {"teachers": [{"name": "a", "model": "m", "base_url": url}]}
    if ok:
        parse_config(data)
        return
    with pytest.raises(MapdError, match="port must be a number from 1 to 65535"):
        parse_config(data)


def test_max_budget_needs_prices_for_a_paid_teacher_but_not_for_a_free_one():
    with pytest.raises(MapdError) as caught:
        parse_config({"max_budget_usd": 5, "teachers": [
            {"name": "gpt", "model": "m", "base_url": REMOTE, "price_input_per_mtok": 1},
            {"name": "cheap", "model": "m", "base_url": REMOTE}]})
    message = str(caught.value)
    assert "teacher 'cheap'" in message and "price_input_per_mtok" in message and "gpt" not in message
    for free in ({"base_url": "http://127.0.0.1:8000/v1"}, {"base_url": "http://localhost:8000/v1"},
                 {"base_url": "http://[::1]:8000/v1"}, {}, {"serve": "vllm serve {model} --port {port}"}):
        parse_config({"max_budget_usd": 5, "teachers": [{"name": "local", "model": "m", **free}]})
    parse_config({"teachers": [{"name": "cheap", "model": "m", "base_url": REMOTE}]})  # no budget: no prices needed


@pytest.mark.parametrize("name", ["../x", "a/b", "x/../../etc", "a b", "", ".hidden", "-x", "_x", "x" * 65,
                                  "a\x00b", "a\\b", "gpt:4", "gpt.4", "<b>x</b>", "[x](javascript:1)"])
def test_a_teacher_name_that_is_not_an_identifier_is_refused(name):
    with pytest.raises(MapdError, match="teachers.0.name: a teacher name is 1-64 letters"):
        parse_config({"teachers": [{"name": name, "model": "m"}]})


@pytest.mark.parametrize("names", [("gpt", "GPT"), ("gpt", "ｇｐｔ"), ("ﬁne", "fine"), ("Straße", "STRASSE")])
def test_teacher_names_equal_after_case_folding_and_unicode_normalisation_are_refused(names):
    with pytest.raises(MapdError, match="teacher names must be unique"):
        parse_config({"teachers": [{"name": n, "model": "m"} for n in names]})


def test_good_names_pass_and_their_files_stay_in_the_run_folder(tmp_path):
    names = ["gpt", "gpt-4o_mini", "Qwen2", "教师", "a" * 64]
    config = parse_config({"teachers": [{"name": n, "model": "m"} for n in names]})
    for teacher in config.teachers:  # e.g. the serve: teacher's log, mapd.stages.teach
        assert (tmp_path / f"server-{teacher.name}.log").resolve().parent == tmp_path.resolve()


def test_bad_names_stop_mapd_teach_before_anything_is_created(tmp_path, key, capsys):
    config, mistakes = write_teach_setup(tmp_path, "http://127.0.0.1:9/v1", KEY_ENV, 1)
    data = yaml.safe_load(config.read_text())
    data["teachers"][0]["name"] = "../../outside"
    config.write_text(yaml.safe_dump(data))
    assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
    assert "a teacher name is" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "outside").exists()


@pytest.mark.parametrize("temperature, requests", [(0.8, 2), (0.0, 1)])
def test_two_names_on_one_sampled_model_are_two_samples(tmp_path, key, temperature, requests):
    reply = CountingReply()
    with FakeOpenAIServer(reply) as server, CallCache(tmp_path / "cache.sqlite") as cache:
        teachers = [TeacherConfig(name=name, model="same", base_url=server.base_url, api_key_env=KEY_ENV,
                                  temperature=temperature) for name in ("first", "second")]
        calls = [Call(CallKey("feedback", str(n), t.name), [{"role": "user", "content": f"q{n}"}])
                 for n in range(5) for t in teachers]
        with Dispatcher(teachers, cache) as dispatcher:
            results = dispatcher.complete_all(calls)
            stats = dispatcher.summary()
    assert server.requests == 5 * requests and len(results) == 10
    assert sum(row["calls"] for row in stats.values()) == 5 * requests  # the statistics count what was made


# -- usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("usage, estimated", [
    ({"prompt_tokens": 0, "completion_tokens": 0}, True),  # 0/0 for real text
    ({"prompt_tokens": 30, "completion_tokens": 5}, True),  # 5 tokens for a long reply
    ({"prompt_tokens": 30, "completion_tokens": 2000}, False),  # honest
])
def test_implausible_usage_is_replaced_by_the_text_estimate(usage, estimated):
    provider = OpenAIProvider.__new__(OpenAIProvider)
    call = Call(CallKey("t", "1", "t"), [{"role": "user", "content": "a question of some length " * 4}])
    reply = {"choices": [{"message": {"content": "word " * 2000}, "finish_reason": "stop"}], "usage": usage}
    counts = provider._usage(reply, call.messages, reply["choices"][0]["message"]["content"])
    assert counts["usage_estimated"] is estimated
    assert counts["output_tokens"] >= 10_000 // 32 and math.isfinite(counts["output_tokens"])


def _budget_run(folder, usage: dict | None) -> tuple[int, int, dict]:
    """`mapd teach` under a 1 USD budget on a server reporting ``usage`` (None: honest); (exit, requests, stats)."""
    with FakeOpenAIServer(CountingReply(), usage=usage) as server:
        config, mistakes = write_teach_setup(folder, server.base_url, KEY_ENV, 10, max_concurrency=2, max_tokens=100,
                                             price_input_per_mtok=1000.0, price_output_per_mtok=1000.0)
        data = yaml.safe_load(config.read_text())
        data["max_budget_usd"] = 1.0
        config.write_text(yaml.safe_dump(data))
        code = main(teach_argv(config, mistakes, folder / "out"))
        requests = server.requests
    return code, requests, json.loads((folder / "out" / "teach_stats.json").read_text())


def test_a_server_reporting_zero_usage_is_stopped_by_the_budget_about_where_an_honest_one_is(tmp_path, key):
    honest_code, honest, honest_stats = _budget_run(tmp_path / "honest", None)
    zero_code, zero, zero_stats = _budget_run(tmp_path / "zero", {"prompt_tokens": 0, "completion_tokens": 0})
    assert honest_code == zero_code == 3
    in_flight = 3 * 2  # teachers x max_concurrency
    assert abs(zero - honest) <= in_flight, (honest, zero)  # before: 4x the requests
    assert all(row["usage_estimated"] == row["calls"] > 0 for row in zero_stats.values())
    assert all(row["usage_estimated"] == 0 for row in honest_stats.values())
    for stats in (honest_stats, zero_stats):
        assert all(math.isfinite(row["cost_usd"]) and row["cost_usd"] > 0 for row in stats.values())
    assert all(r["text"] or r["error"] for r in sum(teach_records(tmp_path / "zero" / "out"), []))


def test_config_load_refuses_inf_in_a_free_form_field(tmp_path):
    (tmp_path / "c.yaml").write_text("teachers:\n  - name: a\n    model: m\n    extra_body: {x: .inf}\n")
    with pytest.raises(MapdError, match=r"c.yaml:4: field 'teachers.0.extra_body.x': inf is not a finite number"):
        load_config(tmp_path / "c.yaml")


def test_teacher_names_from_records_are_escaped_in_report_md_and_html(tmp_path):
    """Config names are identifiers now, but a round folder's records (imported, edited by hand) may hold any."""
    from mapd.io import write_jsonl
    from mapd.report import write_report

    evil = "<img src=x onerror=alert(1)>[click](javascript:alert(2))"
    write_jsonl(tmp_path / "mistakes.jsonl", [{"id": "1", "question": "What is 5 + 1?", "gold": "6", "output": "2",
                                               "answer": "2", "status": "wrong"}])
    write_jsonl(tmp_path / "feedback.jsonl", [{"id": "1", "teacher": evil, "text": "you added wrong.", "error": None}])
    page = write_report(tmp_path).read_text()
    markdown = (tmp_path / "report.md").read_text()
    assert evil not in page and "<img src=x" not in page
    assert "<img" not in markdown and "&lt;img src=x" in markdown
    assert "[click](" not in markdown and "\\[click\\](javascript" in markdown  # brackets escaped: no link


def test_a_refused_name_is_shown_escaped_on_one_line():
    with pytest.raises(MapdError) as caught:
        parse_config({"teachers": [{"name": "gpt\n\u202eevil", "model": "m"}]})
    assert "\n" not in str(caught.value) and "\u202e" not in str(caught.value) and "\\u202e" in str(caught.value)
