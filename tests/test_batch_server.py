"""The fake OpenAI Batch API server, driven through the real ``openai`` SDK."""

from __future__ import annotations

import json

import openai
import pytest

from tests.batch_server import FakeBatchServer


def _jsonl(custom_ids, model: str = "m") -> bytes:
    return "".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": model, "messages": [{"role": "user", "content": f"q {c}"}]}}) + "\n"
                   for c in custom_ids).encode()


def _submit(server: FakeBatchServer, data: bytes, **kwargs):
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-batch", max_retries=0)
    file = client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  **kwargs)
    return client, batch


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_completes_with_every_answer_matched_by_custom_id_in_shuffled_order():
    ids = [f"r{i}" for i in range(20)]
    with FakeBatchServer(lambda messages, model: f"{model}: {messages[-1]['content']}") as server:
        client, batch = _submit(server, _jsonl(ids), metadata={"run": "1"})
        assert batch.status == "validating" and batch.metadata == {"run": "1"}
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.error_file_id is None
        assert batch.request_counts.model_dump() == {"total": 20, "completed": 20, "failed": 0}
        lines = _lines(client, batch.output_file_id)
        got = [line["custom_id"] for line in lines]
        assert got != ids and sorted(got) == sorted(ids)
        for line in lines:
            assert line["error"] is None and line["response"]["status_code"] == 200
            body = line["response"]["body"]
            assert body["choices"][0]["message"]["content"] == f"m: q {line['custom_id']}" and body["usage"]
        file_id = batch.input_file_id
        assert client.files.content(file_id).content == server.uploaded_files[file_id] == _jsonl(ids)
        assert client.files.retrieve(file_id).filename == "in.jsonl"
        assert (server.files_uploaded, server.batches_created, server.batch_lines, server.batch_gets) == (1, 1, 20, 1)
        assert set(server.batch_auth_headers) == {"Bearer sk-batch"} and server.submitted_custom_ids["r3"] == 1
        assert server.requests == 0  # live counters untouched


def test_a_batch_waits_its_latency_and_live_calls_still_work():
    with FakeBatchServer(batch_latency_s=60) as server:
        client, batch = _submit(server, _jsonl(["a"]))
        assert client.batches.retrieve(batch.id).status == "in_progress"
        live = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert live.choices[0].message.content == "m read: hi" and server.requests == 1
        server.finish_all()
        assert client.batches.retrieve(batch.id).status == "completed"


def test_request_errors_go_to_the_error_file_and_a_resubmission_can_succeed():
    with FakeBatchServer(batch_error_first=1, batch_error_rate=0.0) as server:
        client, batch = _submit(server, _jsonl(["a", "b"]))
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.output_file_id is None
        assert batch.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
        errors = _lines(client, batch.error_file_id)
        assert {e["custom_id"] for e in errors} == {"a", "b"}
        assert all(e["response"]["status_code"] == 500 and e["response"]["body"]["error"]["type"] == "server_error"
                   for e in errors)
        client, again = _submit(server, _jsonl(["a", "b"]))
        again = client.batches.retrieve(again.id)
        assert again.request_counts.completed == 2 and again.error_file_id is None
        assert server.submitted_custom_ids == {"a": 2, "b": 2}


def test_a_batch_error_rate_fails_some_requests():
    with FakeBatchServer(batch_error_rate=0.5, seed=3) as server:
        client, batch = _submit(server, _jsonl([f"r{i}" for i in range(40)]))
        batch = client.batches.retrieve(batch.id)
        answered, failed = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
        assert 5 < len(failed) < 35 and len(answered) + len(failed) == 40 == batch.request_counts.total
        assert batch.request_counts.failed == len(failed)


def test_an_expired_batch_answers_its_first_requests_only():
    with FakeBatchServer(expire_batches={0: 0.25}) as server:
        client, batch = _submit(server, _jsonl([f"r{i}" for i in range(8)]))
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "expired" and batch.expired_at
        assert {line["custom_id"] for line in _lines(client, batch.output_file_id)} == {"r0", "r1"}
        errors = _lines(client, batch.error_file_id)
        assert {e["custom_id"] for e in errors} == {f"r{i}" for i in range(2, 8)}
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)


def test_failed_batches_carry_their_message_and_no_output():
    with FakeBatchServer(fail_batches={0: "token limit exceeded"}) as server:
        client, batch = _submit(server, _jsonl(["a"]))
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "failed" and batch.output_file_id is None and batch.error_file_id is None
        assert batch.errors.data[0].message == "token limit exceeded" and batch.errors.data[0].code == "invalid_request"
        _, duplicated = _submit(server, _jsonl(["a", "b", "a"]))
        failed = server.batch(duplicated.id)
        assert failed["status"] == "failed" and "'a'" in failed["errors"]["data"][0]["message"]
        assert failed["errors"]["data"][0]["line"] == 3


def test_cancel_answers_the_first_half():
    with FakeBatchServer(batch_latency_s=60) as server:
        client, batch = _submit(server, _jsonl(["a", "b", "c", "d"]))
        assert client.batches.cancel(batch.id).status == "cancelling"
        batch = client.batches.retrieve(batch.id)
        assert batch.status == "cancelled" and batch.cancelled_at
        assert {line["custom_id"] for line in _lines(client, batch.output_file_id)} == {"a", "b"}
        assert {e["error"]["code"] for e in _lines(client, batch.error_file_id)} == {"batch_cancelled"}
        with pytest.raises(openai.BadRequestError):
            client.batches.cancel(batch.id)


def test_list_is_newest_first_with_limit_and_after():
    with FakeBatchServer() as server:
        client, first = _submit(server, _jsonl(["a"]))
        made = [client.batches.create(input_file_id=first.input_file_id,
                                      endpoint="/v1/chat/completions", completion_window="24h").id for _ in range(4)]
        page = client.batches.list(limit=2)
        assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
        rest = client.batches.list(limit=10, after=page.data[-1].id)
        assert [b.id for b in rest.data] == [made[1], made[0], first.id] and not rest.has_more
        assert len(list(client.batches.list(limit=2))) == 5  # the SDK pages through with after=


def test_bad_uploads_and_unknown_ids_get_openai_errors():
    with FakeBatchServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="file-99"):
            client.batches.create(input_file_id="file-99", endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            client.files.content("file-99")
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_99")
        with pytest.raises(openai.BadRequestError, match="line 2"):
            client.files.create(file=("in.jsonl", _jsonl(["a"]) + b'{"custom_id": "b"}\n'), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="purpose"):
            client.files.create(file=("in.jsonl", _jsonl(["a"])), purpose="fine-tune")
        file = client.files.create(file=("in.jsonl", _jsonl(["a"])), purpose="batch")
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings", completion_window="24h")
        assert server.files_uploaded == 1 and server.batches_created == 0
