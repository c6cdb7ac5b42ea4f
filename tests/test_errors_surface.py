"""Errors that surface (issue 23): only the endpoint's and the network's failures become failed calls; a bug in
mapd raises with its traceback; a batch whose polls keep failing gives up, saying so; re-raised errors keep
their cause."""

from __future__ import annotations

import asyncio

import pytest
from tests.batch_server import FakeBatchServer, _error
from tests.openai_server import FakeOpenAIServer
from tests.reliability_kit import KEY_ENV, teach_records, write_teach_setup
from tests.reliability_kit import teach_argv as kit_teach_argv

from mapd.cli import main
from mapd.config import TaskConfig, TeacherConfig
from mapd.errors import MapdError
from mapd.llm import Call, CallKey
from mapd.llm.batch import FAILED_POLLS
from mapd.llm.openai_provider import OpenAIProvider, UnusableReply
from mapd.tasks import get_task

CALL = Call(CallKey("test", "0", "t"), [{"role": "user", "content": "question"}])


def _complete_with(server: FakeOpenAIServer, key: str, parse_error: Exception) -> object:
    """One call through a provider whose reply parser raises ``parse_error``."""
    teacher = TeacherConfig(name="t", model="m", base_url=server.base_url, api_key_env=KEY_ENV, max_retries=0)

    async def call() -> object:
        provider = OpenAIProvider(teacher, key)
        provider.parse_reply = lambda call, reply: (_ for _ in ()).throw(parse_error)
        try:
            return await provider.complete(CALL)
        finally:
            await provider.aclose()

    return asyncio.run(call())


def test_a_bug_in_mapd_is_raised_not_recorded(key):
    with FakeOpenAIServer() as server:
        with pytest.raises(ZeroDivisionError, match="a bug"):
            _complete_with(server, key, ZeroDivisionError("a bug"))


def test_an_unusable_reply_is_a_failed_call(key):
    with FakeOpenAIServer() as server:
        result = _complete_with(server, key, UnusableReply("the reply has no choices"))
    assert result.text is None and result.error.startswith("UnusableReply: the reply has no choices")
    assert result.key == CALL.key


class PollsFail(FakeBatchServer):
    """Batches are created, but every poll of one gets a 503."""

    def _retrieve(self, handler, raw, query, batch_id):
        self.batch_gets += 1
        return _error(503, "the batch service is down")


def test_a_batch_whose_polls_keep_failing_gives_up_and_says_so(tmp_path, key, capsys):
    with PollsFail(batch_latency_s=3600) as server:
        write_teach_setup(tmp_path, server.base_url, KEY_ENV, 1, max_retries=0, batch=True, batch_poll_s=0.05)
        assert main(kit_teach_argv(tmp_path / "config.yaml", tmp_path / "mistakes.jsonl", tmp_path / "out")) == 3
        assert server.batches_created >= 1
    feedback, rationales = teach_records(tmp_path / "out")
    assert all(r["error"].startswith("BatchUnreachable: ") and f"{FAILED_POLLS} polls in a row failed" in r["error"]
               for r in feedback + rationales)
    err = capsys.readouterr().err
    assert f"failed, {FAILED_POLLS} in a row; its calls fail for now, a rerun polls it again" in err
    assert key not in err


def test_a_task_loader_keeps_the_cause_of_the_error_it_re_raises(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(MapdError, match="cannot load .* from the hub: no network") as raised:
        get_task(TaskConfig(name="gsm8k")).load("test")
    assert isinstance(raised.value.__cause__, ConnectionError)
