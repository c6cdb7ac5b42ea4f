"""A real OpenAI Batch API server (files + batches) on 127.0.0.1, for tests and benches.

    from tests.batch_server import FakeBatchServer

    with FakeBatchServer(reply=lambda messages: "[4]", batch_latency_s=0.5, batch_error_rate=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
        file = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        server.finish_all()  # instead of sleeping out the latency
        client.files.content(client.batches.retrieve(batch.id).output_file_id).text

It still answers live ``POST /v1/chat/completions`` like :class:`FakeOpenAIServer`, and adds
``POST /v1/files``, ``GET /v1/files/{id}[/content]``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]`` and
``POST /v1/batches/{id}/cancel``. A batch's state is worked out lazily whenever it is read.
"""

from __future__ import annotations

import copy
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qsl, urlsplit

from tests.openai_server import FakeOpenAIServer, _send, _send_bytes

ENDPOINT = "/v1/chat/completions"
UNEXECUTED = {
    "expired": "This request could not be executed before the completion window expired.",
    "cancelled": "This request was not executed because the batch was cancelled.",
}
ROUTES = (  # method, path pattern, handler method name
    ("POST", r"/v1/files", "_upload"),
    ("GET", r"/v1/files/([^/]+)", "_file"),
    ("GET", r"/v1/files/([^/]+)/content", "_file_content"),
    ("POST", r"/v1/batches", "_create"),
    ("GET", r"/v1/batches", "_list"),
    ("GET", r"/v1/batches/([^/]+)", "_retrieve"),
    ("POST", r"/v1/batches/([^/]+)/cancel", "_cancel"),
)


def _error(status: int, message: str) -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}


def _parse_requests(data: bytes) -> list[dict]:
    """The request lines of a batch input file; ValueError names the first bad line."""
    requests = []
    for n, text in enumerate(data.decode().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            raise ValueError(f"line {n} is not JSON") from None
        body = line.get("body") if isinstance(line, dict) else None
        if not (isinstance(body, dict) and isinstance(line.get("custom_id"), str) and line.get("method") == "POST"
                and line.get("url") == ENDPOINT and "model" in body and "messages" in body):
            raise ValueError(f"line {n} needs a custom_id string, method POST, url {ENDPOINT} and a body "
                             "with model and messages")
        requests.append(line)
    return requests


@dataclass
class _Job:
    batch: dict  # the public Batch object
    index: int  # 0 = the first batch created on this server
    start: float  # when the latency started
    requests: list[dict]
    attempts: list[int]  # how many times each custom_id was submitted before this batch
    problem: tuple[str, str, int | None] | None  # (code, message, line) if validation fails


class FakeBatchServer(FakeOpenAIServer):
    """:class:`FakeOpenAIServer` plus the OpenAI Batch API; takes all its arguments, and:

    batch_latency_s: seconds from a batch's creation until it ends (``completed``, ``expired``); the reply
        to ``create`` says ``validating``, later reads ``in_progress`` until then. ``finish_all()`` skips it.
    batch_error_rate: probability that a request line gets a 500 in the error file, from an RNG seeded with
        ``seed``, the custom_id and how many times it was submitted before (a resubmission may succeed).
    batch_error_first: every custom_id gets a 500 the first N times it is submitted.
    expire_batches: ``{batch index: fraction}``: that batch (0 = the first created here) ends ``expired``,
        the first ``round(fraction * n)`` requests (input order) answered, the rest ``batch_expired`` errors.
    fail_batches: ``{batch index: message}``: that batch fails validation with that message, no output.
    A file with a duplicate custom_id or several models also fails validation. A cancelled batch
    (``cancelling``, then ``cancelled`` on the next read) answers its first half; the rest are
    ``batch_cancelled`` errors. Output and error files list their lines in a seeded shuffled order.
    The live faults (``fault_rate``, ``fail_first``...) do not apply to batch lines.

    Counters (thread-safe, cleared by ``reset()`` with the live ones): ``files_uploaded``, ``uploaded_files``
    (id -> bytes), ``batches_created``, ``batch_lines`` (request lines in created batches),
    ``submitted_custom_ids`` (custom_id -> times submitted in a created batch), ``batch_gets`` (retrieves and
    lists), ``batch_auth_headers`` (the Authorization header of every files/batches request).
    """

    def __init__(self, reply: Callable[..., str] | None = None, *, batch_latency_s: float = 0.0,
                 batch_error_rate: float = 0.0, batch_error_first: int = 0,
                 expire_batches: dict[int, float] | None = None, fail_batches: dict[int, str] | None = None,
                 **kwargs) -> None:
        self.batch_latency_s, self.batch_error_rate, self.batch_error_first = (
            batch_latency_s, batch_error_rate, batch_error_first)
        self.expire_batches, self.fail_batches = dict(expire_batches or {}), dict(fail_batches or {})
        self._batch_lock = threading.RLock()
        self._files: dict[str, tuple[dict, bytes]] = {}
        self._jobs: dict[str, _Job] = {}
        self._submissions: Counter[str] = Counter()  # never reset: it drives batch_error_first
        self._ids: Counter[str] = Counter()  # prefix -> the last number given
        super().__init__(reply, **kwargs)

    def reset(self) -> None:
        """Clear the live and batch counters (not the files, batches or submission history)."""
        super().reset()
        with self._batch_lock:
            self.files_uploaded = self.batches_created = self.batch_lines = self.batch_gets = 0
            self.submitted_custom_ids: Counter[str] = Counter()
            self.uploaded_files: dict[str, bytes] = {}
            self.batch_auth_headers: list[str] = []

    def finish_all(self) -> None:
        """Let every pending batch's latency pass now."""
        with self._batch_lock:
            for job in self._jobs.values():
                job.start = float("-inf")
                self._advance(job)

    def batch(self, batch_id: str) -> dict:
        """A copy of one batch's current state (not counted in ``batch_gets``)."""
        with self._batch_lock:
            return copy.deepcopy(self._advance(self._jobs[batch_id]))

    # routing

    def _post(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        if not self._route("POST", handler, raw):
            super()._post(handler, raw)

    def _get(self, handler: BaseHTTPRequestHandler) -> None:
        if not self._route("GET", handler, b""):
            super()._get(handler)

    def _route(self, method: str, handler: BaseHTTPRequestHandler, raw: bytes) -> bool:
        url = urlsplit(handler.path)
        for route_method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, url.path.rstrip("/"))
            if route_method == method and match:
                with self._batch_lock:
                    self.batch_auth_headers.append(handler.headers.get("Authorization", ""))
                    status, data = getattr(self, name)(handler, raw, dict(parse_qsl(url.query)), *match.groups())
                    data = copy.deepcopy(data)  # batches change under the lock; send a snapshot
                if isinstance(data, bytes):
                    _send_bytes(handler, status, data, content_type="application/octet-stream")
                else:
                    _send(handler, status, data)
                return True
        return False

    # files

    def _new_id(self, prefix: str) -> str:
        self._ids[prefix] += 1
        return f"{prefix}{self._ids[prefix]}"

    def _store(self, data: bytes, filename: str, purpose: str) -> dict:
        meta = {"id": self._new_id("file-"), "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self._files[meta["id"]] = (meta, data)
        return meta

    def _upload(self, handler, raw, query) -> tuple[int, dict]:
        head = f"Content-Type: {handler.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = BytesParser(policy=policy.HTTP).parsebytes(head + raw)
        fields = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
        if "purpose" not in fields or "file" not in fields:
            return _error(400, "a multipart form with fields purpose and file is required")
        if (purpose := fields["purpose"].get_content().strip()) != "batch":
            return _error(400, f"purpose must be 'batch', not {purpose!r}")
        data = fields["file"].get_payload(decode=True)
        try:
            _parse_requests(data)
        except ValueError as exc:
            return _error(400, f"invalid batch input file: {exc}")
        meta = self._store(data, fields["file"].get_filename() or "upload.jsonl", "batch")
        self.files_uploaded += 1
        self.uploaded_files[meta["id"]] = data
        return 200, meta

    def _file(self, handler, raw, query, file_id, part: int = 0) -> tuple[int, dict | bytes]:
        if file_id not in self._files:
            return _error(404, f"No such File object: {file_id}")
        return 200, self._files[file_id][part]

    def _file_content(self, handler, raw, query, file_id) -> tuple[int, dict | bytes]:
        return self._file(handler, raw, query, file_id, part=1)

    # batches

    def _create(self, handler, raw, query) -> tuple[int, dict]:
        try:
            params = json.loads(raw)
            file_id, endpoint, window = params["input_file_id"], params["endpoint"], params["completion_window"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "body must be JSON with input_file_id, endpoint and completion_window")
        if file_id not in self._files or self._files[file_id][0]["purpose"] != "batch":
            return _error(404, f"No such File object: {file_id}")
        if endpoint != ENDPOINT or window != "24h":
            return _error(400, f"only endpoint {ENDPOINT} and completion_window 24h are supported")
        requests = _parse_requests(self._files[file_id][1])
        ids = [r["custom_id"] for r in requests]
        now = time.time()
        batch = {"id": self._new_id("batch_"), "object": "batch", "endpoint": endpoint, "input_file_id": file_id,
                 "completion_window": window, "status": "validating", "created_at": int(now),
                 "in_progress_at": None, "completed_at": None, "expired_at": None, "failed_at": None,
                 "cancelling_at": None, "cancelled_at": None, "expires_at": int(now) + 24 * 3600,
                 "output_file_id": None, "error_file_id": None, "errors": None,
                 "request_counts": {"total": len(ids), "completed": 0, "failed": 0},
                 "metadata": params.get("metadata")}
        job = _Job(batch, len(self._jobs), now, requests, [self._submissions[c] for c in ids], None)
        seen: set[str] = set()
        duplicate = next((n for n, c in enumerate(ids) if c in seen or seen.add(c)), None)
        models = sorted({r["body"]["model"] for r in requests})
        if duplicate is not None:
            job.problem = ("duplicate_custom_id", f"The custom_id {ids[duplicate]!r} is duplicated", duplicate + 1)
        elif len(models) > 1:
            job.problem = ("mismatched_model", f"A batch may use one model, this file uses {models}", None)
        elif job.index in self.fail_batches:
            job.problem = ("invalid_request", self.fail_batches[job.index], None)
        self._jobs[batch["id"]] = job
        self._submissions.update(ids)
        self.submitted_custom_ids.update(ids)
        self.batches_created += 1
        self.batch_lines += len(ids)
        return 200, batch

    def _retrieve(self, handler, raw, query, batch_id) -> tuple[int, dict]:
        if batch_id not in self._jobs:
            return _error(404, f"No such Batch object: {batch_id}")
        self.batch_gets += 1
        return 200, self._advance(self._jobs[batch_id])

    def _list(self, handler, raw, query) -> tuple[int, dict]:
        self.batch_gets += 1
        ids = list(reversed(self._jobs))  # newest first
        if "after" in query:
            if query["after"] not in self._jobs:
                return _error(404, f"No such Batch object: {query['after']}")
            ids = ids[ids.index(query["after"]) + 1:]
        limit = int(query.get("limit", 20))
        page = [self._advance(self._jobs[i]) for i in ids[:limit]]
        return 200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    def _cancel(self, handler, raw, query, batch_id) -> tuple[int, dict]:
        if batch_id not in self._jobs:
            return _error(404, f"No such Batch object: {batch_id}")
        batch = self._advance(self._jobs[batch_id])
        if batch["status"] != "in_progress":
            return _error(400, f"Cannot cancel a batch with status {batch['status']!r}")
        batch.update(status="cancelling", cancelling_at=int(time.time()))
        return 200, batch

    def _advance(self, job: _Job) -> dict:
        """Bring a batch's state up to now; returns its Batch object."""
        batch, now = job.batch, int(time.time())
        if batch["status"] == "validating":
            if job.problem:
                code, message, line = job.problem
                batch.update(status="failed", failed_at=now, errors={
                    "object": "list", "data": [{"code": code, "message": message, "line": line, "param": None}]})
                return batch
            batch.update(status="in_progress", in_progress_at=now)
        n = len(job.requests)
        if batch["status"] == "cancelling":
            self._finish(job, "cancelled", n // 2)
        elif batch["status"] == "in_progress" and time.time() - job.start >= self.batch_latency_s:
            if job.index in self.expire_batches:
                self._finish(job, "expired", round(self.expire_batches[job.index] * n))
            else:
                self._finish(job, "completed", n)
        return batch

    def _finish(self, job: _Job, status: str, executed: int) -> None:
        """Answer the first ``executed`` requests, write the output and error files, end in ``status``."""
        batch, outputs, errors = job.batch, [], []
        for i, (request, attempt) in enumerate(zip(job.requests, job.attempts)):
            line = {"id": self._new_id("batch_req_"), "custom_id": request["custom_id"], "response": None,
                    "error": None}
            request_id = f"req_{batch['id']}_{i}"
            if i >= executed:
                line["error"] = {"code": f"batch_{status}", "message": UNEXECUTED[status]}
                errors.append(line)
            elif self._batch_fault(request["custom_id"], attempt):
                line["response"] = {"status_code": 500, "request_id": request_id, "body": {"error": {
                    "message": "injected batch request failure", "type": "server_error"}}}
                errors.append(line)
            else:
                body = request["body"]
                completion = self._completion(body, self._reply_text(body["messages"], body["model"]))
                line["response"] = {"status_code": 200, "request_id": request_id, "body": completion}
                outputs.append(line)
        rng = random.Random(f"{self.seed}:{batch['id']}")
        for kind, lines in (("output", outputs), ("error", errors)):
            if lines:
                rng.shuffle(lines)
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                batch[f"{kind}_file_id"] = self._store(data, f"{batch['id']}_{kind}.jsonl", "batch_output")["id"]
        batch["request_counts"] = {"total": len(job.requests), "completed": len(outputs), "failed": len(errors)}
        batch.update({"status": status, f"{status}_at": int(time.time())})

    def _batch_fault(self, custom_id: str, attempt: int) -> bool:
        if attempt < self.batch_error_first:
            return True
        return random.Random(f"{self.seed}:batch:{custom_id}:{attempt}").random() < self.batch_error_rate
