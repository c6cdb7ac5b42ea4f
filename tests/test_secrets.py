"""Credentials never reach disk, cache, report or terminal (issue #13, item 5).

A teacher's credentials: its API key (``api_key_env``), the ``user:password@`` of its base_url (sent as
Basic auth), its base_url's query parameters (sent with every request) and ``headers_env`` /
``query_env`` values. `mapd teach` runs against the local OpenAI-compatible server (tests/openai_server.py)
in a mode that echoes each request (target, headers, body) into its replies and its error bodies, as
some gateways do; then every file in the out folder and the cache, stdout, stderr and every log record
(at DEBUG) is searched for each credential and its encodings.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from secrets import token_hex
from urllib.parse import quote

import pytest
import yaml
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import COMMITTEE, CountingReply, write_teach_setup
from tests.reliability_kit import teach_argv as kit_teach_argv

from mapd import log
from mapd.cli import main
from mapd.config import RunConfig, TeacherConfig
from mapd.secrets import public_dump
from mapd.errors import MapdError
from mapd.io import read_jsonl
from mapd.secrets import Redactor, api_key, endpoint, protect_logs, redact_url

PASTED_KEY = "AIzaSyD0123456789abcdefghijklmnopqrstuv"  # a key that is also a valid variable name


@pytest.fixture
def creds(monkeypatch) -> dict[str, str]:
    """Random credentials, the env ones set: key (api_key_env), password (gpt's base_url), query (gemini's
    base_url ?key=), header and param (mistral's headers_env / query_env)."""
    values = {"key": f"sk-test-{token_hex(16)}", "password": f"pw{token_hex(8)}", "query": f"qk{token_hex(12)}",
              "header": f"hd{token_hex(12)}", "param": f"pm{token_hex(12)}"}
    monkeypatch.setenv("MAPD_TEST_KEY", values["key"])
    monkeypatch.setenv("MAPD_TEST_HEADER", values["header"])
    monkeypatch.setenv("MAPD_TEST_PARAM", values["param"])
    values["basic"] = base64.b64encode(f"alice:{values['password']}".encode()).decode()
    values["userinfo"] = f"alice:{values['password']}"
    return values


def committee_config(tmp_path: Path, base_url: str, creds: dict[str, str], n: int = 4, **fields) -> tuple[Path, Path]:
    """gpt with user:password@ in its base_url, gemini with ?key= in its, mistral with headers_env and
    query_env; all with api_key_env."""
    config, mistakes = write_teach_setup(tmp_path, base_url, "MAPD_TEST_KEY", n, **fields)
    data = yaml.safe_load(config.read_text())
    gpt, gemini, mistral = data["teachers"]
    gpt["base_url"] = base_url.replace("://", f"://{creds['userinfo']}@")
    gemini["base_url"] = f"{base_url}?key={creds['query']}&api-version=2024-10-21"
    mistral["headers_env"] = {"x-api-key": "MAPD_TEST_HEADER"}
    mistral["query_env"] = {"token": "MAPD_TEST_PARAM"}
    config.write_text(yaml.safe_dump(data))
    return config, mistakes


def teach_argv(config: Path, mistakes: Path, out: Path) -> list[str]:
    """`mapd -v teach`: the debug log is on, so it is checked for credentials too."""
    return ["-v", *kit_teach_argv(config, mistakes, out)]


def leaks(texts: dict[str, str], creds: dict[str, str]) -> dict[str, list[str]]:
    """``{credential: [where it was found]}`` over every credential and its URL encoding."""
    found = {}
    for name, secret in creds.items():
        for form in {secret, quote(secret, safe="")}:
            where = [place for place, text in texts.items() if form in text]
            if where:
                found[f"{name}={form}"] = where
    return found


def everything(tmp_path: Path, capfd, caplog) -> dict[str, str]:
    captured = capfd.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err, "log records": caplog.text}
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*")
              if p.is_file() and p.name not in ("config.yaml",)}
    return texts


def headers_of(server: FakeOpenAIServer, model: str) -> list[dict[str, str]]:
    return [{k.lower(): v for k, v in h.items()} for h, b in zip(server.headers, server.bodies) if b["model"] == model]


def queries_of(server: FakeOpenAIServer, model: str) -> list[dict[str, str]]:
    return [q for q, b in zip(server.queries, server.bodies) if b["model"] == model]


def test_an_echoing_server_gets_every_credential_and_nothing_keeps_one(tmp_path, creds, fast_retries, capfd, caplog):
    """Every reply echoes the request. The server saw each credential where it belongs, on every request;
    the folder (feedback, rationales, stats, cache.sqlite, mapd.log), stdout, stderr and every log record
    have none of them."""
    caplog.set_level(logging.DEBUG)  # every library's records (httpx logs each request's URL at INFO)
    with FakeOpenAIServer(echo=True) as server:
        config, mistakes = committee_config(tmp_path, server.base_url, creds)
        code = main(teach_argv(config, mistakes, tmp_path / "out"))
    texts = everything(tmp_path, capfd, caplog)
    assert code == 0, texts["stderr"][-2000:]

    gpt, gemini, mistral = (f"model-{name}" for name in COMMITTEE)
    assert server.requests == len(server.targets) > 0
    assert {t.split("?")[0] for t in server.targets} == {"/v1/chat/completions"}  # the query is not in the path
    assert {h["authorization"] for h in headers_of(server, gpt)} == {f"Basic {creds['basic']}"}
    assert {h["authorization"] for h in headers_of(server, gemini)} == {f"Bearer {creds['key']}"}
    assert queries_of(server, gemini) and all(q == {"key": creds["query"], "api-version": "2024-10-21"}
                                              for q in queries_of(server, gemini))
    assert queries_of(server, mistral) and all(q == {"token": creds["param"]} for q in queries_of(server, mistral))
    assert {h["x-api-key"] for h in headers_of(server, mistral)} == {creds["header"]}
    assert queries_of(server, gpt) and all(q == {} for q in queries_of(server, gpt))

    out = tmp_path / "out"
    feedback = read_jsonl(out / "feedback.jsonl")
    assert {r["teacher"] for r in feedback} == set(COMMITTEE) and all(r["text"] for r in feedback)
    echoed = [json.loads(r["text"]) for r in feedback]  # the echo, with the credentials taken out
    assert {e["headers"].get("authorization", e["headers"].get("Authorization")) for e in echoed} >= {"Basic ***"}
    assert any("key=***" in e["target"] and "api-version=2024-10-21" in e["target"] for e in echoed)
    assert any("HTTP Request: POST" in r.getMessage() and "key=***" in r.getMessage() for r in caplog.records)
    assert {"cache.sqlite", "mapd.log", "feedback.jsonl", "rationales.jsonl"} <= {p.name for p in out.iterdir()}
    assert leaks(texts, creds) == {}


def test_echoing_error_bodies_are_redacted_in_records_log_and_terminal(tmp_path, creds, fast_retries, capfd, caplog):
    """Error bodies (500 then retried, or 400) echo the request: the retry lines, the failed records'
    errors, the cache and the log carry the error with the credentials taken out."""
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer(CountingReply(), echo_errors=True, fail_first=("server_error_500",), fault_rate=0.3,
                          faults=("bad_request", "server_error_503"), seed=3) as server:
        config, mistakes = committee_config(tmp_path, server.base_url, creds, n=6, max_retries=2)
        code = main(teach_argv(config, mistakes, tmp_path / "out"))
    texts = everything(tmp_path, capfd, caplog)
    assert code in (0, 3), texts["stderr"][-2000:]  # 3: a stage that ended with failed calls
    assert server.faults["server_error_500"] > 0 and server.faults["bad_request"] > 0
    retry_line = "injected server_error_500; request: "  # the retry lines show the error body, redacted
    assert retry_line in texts["stdout"] + texts["stderr"] and retry_line in texts[str(tmp_path / "out" / "mapd.log")]
    records = read_jsonl(tmp_path / "out" / "feedback.jsonl") + read_jsonl(tmp_path / "out" / "rationales.jsonl")
    errors = [r["error"] for r in records if r["error"]]
    assert errors and all("***" in error for error in errors if "request: " in error)
    assert leaks(texts, creds) == {}


@pytest.mark.parametrize("field", ["api_key_env", "headers_env", "query_env"])
def test_a_key_pasted_in_place_of_a_variable_name_is_refused_unechoed(tmp_path, creds, capfd, field):
    """``AIzaSy…`` is a valid variable name, and still refused as what it is: exit 2, not echoed."""
    with FakeOpenAIServer() as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, "MAPD_TEST_KEY", 1)
        data = yaml.safe_load(config.read_text())
        data["teachers"][0][field] = PASTED_KEY if field == "api_key_env" else {"x-api-key": PASTED_KEY}
        config.write_text(yaml.safe_dump(data))
        capfd.readouterr()
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
        assert server.requests == 0
    out, err = capfd.readouterr()
    assert err.startswith(f"mapd: error: {config}: teachers.0.{field}") and "looks like a key" in err
    assert PASTED_KEY not in out + err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["api_key_env", "headers_env", "query_env"])
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_an_unset_or_empty_variable_is_refused_by_its_name(tmp_path, creds, capfd, monkeypatch, field, value):
    if value is None:
        monkeypatch.delenv("MAPD_TEST_MISSING", raising=False)
    else:
        monkeypatch.setenv("MAPD_TEST_MISSING", value)
    with FakeOpenAIServer() as server:
        config, mistakes = write_teach_setup(tmp_path, server.base_url, "MAPD_TEST_KEY", 1)
        data = yaml.safe_load(config.read_text())
        data["teachers"][1][field] = "MAPD_TEST_MISSING" if field == "api_key_env" else {"x-key": "MAPD_TEST_MISSING"}
        config.write_text(yaml.safe_dump(data))
        capfd.readouterr()
        assert main(teach_argv(config, mistakes, tmp_path / "out")) == 2
        assert server.requests == 0
    out, err = capfd.readouterr()
    assert err.startswith("mapd: error: teacher 'gemini': environment variable MAPD_TEST_MISSING is not set or empty")
    assert creds["key"] not in out + err


# -- units -------------------------------------------------------------------------------------


def test_endpoint_moves_credentials_out_of_the_url(monkeypatch):
    monkeypatch.setenv("HDR", "header-secret-1")
    monkeypatch.setenv("QRY", "query-secret-2")
    teacher = TeacherConfig(name="t", model="m", api_key_env="KEY",
                            base_url="https://al%40ice:p%40ss@host:8/v1?key=abc%2Fdef%2B1&api-version=2024-10-21",
                            headers_env={"x-api-key": "HDR"}, query_env={"sig": "QRY"})
    where = endpoint(teacher, "sk-key-0123456789")
    assert where.base_url == "https://host:8/v1"
    basic = base64.b64encode(b"al@ice:p@ss").decode()
    assert where.headers == {"Authorization": f"Basic {basic}", "x-api-key": "header-secret-1"}
    assert where.query == {"key": "abc/def+1", "api-version": "2024-10-21", "sig": "query-secret-2"}
    assert {"sk-key-0123456789", "p@ss", basic, "abc/def+1", "header-secret-1", "query-secret-2"} <= set(where.secrets)
    assert "2024-10-21" not in where.secrets and "al@ice" not in where.secrets  # not credentials
    assert endpoint(TeacherConfig(name="t", model="m", base_url="http://h/v1"), "not-needed").secrets == ()
    token_only = endpoint(TeacherConfig(name="t", model="m", base_url="https://tok-0123456789@h/v1"), "not-needed")
    token_basic = base64.b64encode(b"tok-0123456789:").decode()
    assert token_only.base_url == "https://h/v1" and token_only.headers == {"Authorization": f"Basic {token_basic}"}
    assert {"tok-0123456789", token_basic} <= set(token_only.secrets)


def test_redactor_takes_out_every_encoding_and_leaves_words_alone():
    redact = Redactor(["p@ss w/rd+1", "7", "sk-key-0123456789"])
    text = ('user p@ss w/rd+1, url p%40ss%20w%2Frd%2B1, query p%40ss+w%2Frd%2B1 or p%40ss+w/rd%2B1, '
            'json "p@ss w/rd+1", answer 7, 17 and 7.5, key sk-key-0123456789')
    assert redact(text) == ('user ***, url ***, query *** or ***, json "***", answer ***, 17 and ***.5, key ***')
    assert Redactor(["ab\"c\\d-long"])('{"v": "ab\\"c\\\\d-long"}') == '{"v": "***"}'
    assert not Redactor([None, ""]) and Redactor([])("text") == "text"


def test_api_key_is_refused_by_name_never_by_value(monkeypatch):
    monkeypatch.delenv("MAPD_NOT_SET", raising=False)
    with pytest.raises(MapdError, match="environment variable MAPD_NOT_SET is not set or empty"):
        api_key("MAPD_NOT_SET", "t")
    with pytest.raises(MapdError) as refused:
        api_key("sk-pasted key-0123456789", "t")  # not a variable name: never echoed
    assert "sk-pasted" not in str(refused.value) and "not shown" in str(refused.value)
    assert api_key(None, "t") == "not-needed"


def test_public_dump_keeps_names_and_hides_url_credentials():
    config = RunConfig(teachers=[TeacherConfig(name="t", model="m", api_key_env="KEY",
                                               base_url="https://alice:pw-123@host/v1?key=qk-456",
                                               headers_env={"x-api-key": "HDR"}, query_env={"sig": "QRY"})])
    dumped = json.dumps(public_dump(config))
    teacher = public_dump(config)["teachers"][0]
    assert teacher["base_url"] == "https://***@host/v1?***" == redact_url("https://alice:pw-123@host/v1?key=qk-456")
    assert teacher["headers_env"] == {"x-api-key": "HDR"} and teacher["query_env"] == {"sig": "QRY"}
    assert "pw-123" not in dumped and "qk-456" not in dumped and "alice" not in dumped


def test_protect_logs_redacts_every_mapd_logger_on_the_terminal_and_in_mapd_log(tmp_path, capsys):
    """The redaction is on mapd's handlers, so a child logger's record (say()'s mapd.out, mapd.runner, a stage's)
    is redacted too, on the terminal and in mapd.log, the error that ends a to_file block included."""
    secret = f"SECRET{token_hex(8)}"
    protect_logs([secret])
    log.setup()
    with pytest.raises(MapdError), log.to_file(tmp_path) as path:
        log.say(f"result {secret}")
        logging.getLogger("mapd.runner").info("runner %s", secret)
        logging.getLogger("mapd.stages.evaluate").warning(f"stage {secret}")
        raise MapdError(f"stopped {secret}")
    captured = capsys.readouterr()
    written = path.read_text()
    assert "result ***" in captured.out
    assert "mapd: runner ***" in captured.err and "mapd: stage ***" in captured.err
    assert all(line in written for line in ("INFO result ***", "INFO runner ***", "WARNING stage ***",
                                            "ERROR error: stopped ***")), written
    assert secret not in captured.out + captured.err + written
