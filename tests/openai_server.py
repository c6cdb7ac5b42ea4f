"""A real OpenAI-compatible chat server on 127.0.0.1 with fault injection, for tests and benches.

    from tests.openai_server import FakeOpenAIServer   # (benches: put the repo root on sys.path)

    with FakeOpenAIServer(reply=lambda messages: "[4]", fault_rate=0.3, seed=1) as server:
        teacher = TeacherConfig(name="t", model="m", base_url=server.base_url)
        ...
        server.requests, server.requests_by_model, server.faults, server.auth_headers

It speaks ``POST /v1/chat/completions`` (and ``GET /v1/models``) in the OpenAI JSON format.
Faults are decided per request from a seeded RNG keyed by the request body and how many
times that body was seen, so a run is reproducible whatever the client's concurrency.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

TRANSIENT_FAULTS = (
    "rate_limit",  # 429 with Retry-After: <retry_after_s> seconds
    "rate_limit_no_header",  # 429 without Retry-After
    "rate_limit_date",  # 429 with Retry-After as an HTTP date (about 1 s ahead)
    "server_error_500",
    "server_error_502",
    "server_error_503",
    "disconnect",  # the connection is closed without a response
    "timeout",  # the reply comes after hang_s seconds (past the client's timeout)
    "truncated_json",  # 200 with the first half of a valid JSON body
    "malformed_json",  # 200 with a body that is not JSON
    "empty_content",  # 200 with content ""
)
PERMANENT_FAULTS = (
    "refusal",  # message.refusal set, content null
    "content_filter",  # finish_reason "content_filter", content ""
    "bad_request",  # 400
)
ALL_FAULTS = TRANSIENT_FAULTS + PERMANENT_FAULTS
TEACHER_FAULTS = (  # every call to the teacher would get them: not in ALL_FAULTS, whose faults are per request
    "unauthorized",  # 401, as for a wrong key
    "model_not_found",  # 404 "The model ... does not exist"
)


def default_reply(messages: list[dict], model: str) -> str:
    """Deterministic echo of the last message."""
    return f"{model} read: {messages[-1]['content'] if messages else ''}"


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeOpenAIServer:
    """A threaded HTTP server in a background thread; ``base_url`` ends in ``/v1``.

    reply: ``reply(messages)`` or ``reply(messages, model)`` -> the assistant text.
    latency_s: seconds every request waits before it is answered.
    random_latency_s: ``(lo, hi)``: each request also waits a time drawn uniformly from [lo, hi], from an
        RNG seeded with ``seed`` (so replies come back in another order than the requests came in).
    fault_rate: probability that a request gets a fault drawn from ``faults``.
    fail_first: faults that every distinct request body gets first, in order, before the random ones.
    retry_after_s: the Retry-After value of the ``rate_limit`` fault.
    hang_s: how long the ``timeout`` fault waits before replying.
    include_usage: send a ``usage`` object (some endpoints do not).
    usage: send this object as ``usage`` instead of the true counts (malformed usage).
    echo: every successful reply's content is the request as the server saw it, as JSON text
        ``{"target": path?query, "headers": {...}, "body": {...}}`` (as some gateways and test servers do).
    echo_errors: every error body (the 4xx/5xx faults) carries that same echo in its message.

    Counters (thread-safe, cleared by ``reset()``): ``requests`` (all, faulted included),
    ``requests_by_model``, ``faults`` (kind -> count), ``completions`` (successful replies),
    ``auth_headers`` (every Authorization header seen), ``bodies`` (every parsed request body),
    ``targets`` (every chat request's path with its query string, as sent), ``queries`` (each one's query
    parameters as a dict), ``headers`` (each one's headers as a dict),
    ``in_flight`` and ``max_in_flight`` (requests being served at once), ``answer_order`` (the arrival
    index of each successful reply, in the order the replies were sent: index i is ``bodies[i]``) and
    ``answered_out_of_order`` (how many of those went out after the reply to a request that came later).
    """

    def __init__(
        self,
        reply: Callable[..., str] | None = None,
        *,
        latency_s: float = 0.0,
        random_latency_s: tuple[float, float] | None = None,
        fault_rate: float = 0.0,
        faults: Sequence[str] = TRANSIENT_FAULTS,
        fail_first: Sequence[str] = (),
        seed: int = 0,
        retry_after_s: float = 0.01,
        hang_s: float = 5.0,
        include_usage: bool = True,
        usage: dict | None = None,
        echo: bool = False,
        echo_errors: bool = False,
    ) -> None:
        unknown = sorted((set(faults) | set(fail_first)) - set(ALL_FAULTS + TEACHER_FAULTS))
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {ALL_FAULTS + TEACHER_FAULTS}")
        self.reply = reply or default_reply
        self._reply_takes_model = reply is None or len(inspect.signature(self.reply).parameters) >= 2
        self.latency_s, self.fault_rate, self.faults_pool = latency_s, fault_rate, tuple(faults)
        if random_latency_s is not None and not 0 <= random_latency_s[0] <= random_latency_s[1]:
            raise ValueError(f"random_latency_s must be (lo, hi) with 0 <= lo <= hi, not {random_latency_s}")
        self.random_latency_s = random_latency_s
        self._latency_rng = random.Random(f"{seed}:latency")
        self.fail_first, self.seed = tuple(fail_first), seed
        self.retry_after_s, self.hang_s, self.include_usage = retry_after_s, hang_s, include_usage
        self.usage = usage  # sent as the reply's usage object as is (malformed-usage tests)
        self.echo, self.echo_errors = echo, echo_errors
        self._lock = threading.Lock()
        self._seen: Counter[str] = Counter()
        self.reset()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """Clear the counters (not the per-body history that drives ``fail_first``)."""
        with self._lock:
            self.requests = 0
            self.completions = 0
            self.requests_by_model: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.auth_headers: list[str] = []
            self.bodies: list[dict] = []
            self.targets: list[str] = []
            self.queries: list[dict[str, str]] = []
            self.headers: list[dict[str, str]] = []
            self.in_flight = 0
            self.max_in_flight = 0
            self.answer_order: list[int] = []

    @property
    def answered_out_of_order(self) -> int:
        """Successful replies sent after the reply to a request that arrived later than theirs."""
        with self._lock:
            order = list(self.answer_order)
        latest, late = -1, 0
        for arrival in order:
            late += arrival < latest
            latest = max(latest, arrival)
        return late

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "FakeOpenAIServer":
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and free the port (requests still sleeping are abandoned)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, handler: "BaseHTTPRequestHandler", raw: bytes) -> None:
        """Serve a POST (a subclass adds routes and falls back here)."""
        if urlsplit(handler.path).path.rstrip("/") != "/v1/chat/completions":  # a query string is allowed
            return _send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._answer(handler, raw)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _get(self, handler: "BaseHTTPRequestHandler") -> None:
        """Serve a GET (a subclass adds routes and falls back here)."""
        if urlsplit(handler.path).path.rstrip("/") == "/v1/models":
            return _send(handler, 200, {"object": "list", "data": []})
        _send(handler, 404, {"error": {"message": f"no route {handler.path}"}})

    def _choose_fault(self, raw: bytes) -> str | None:
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            attempt = self._seen[digest]
            self._seen[digest] += 1
        if attempt < len(self.fail_first):
            return self.fail_first[attempt]
        rng = random.Random(f"{self.seed}:{digest}:{attempt}")
        if self.faults_pool and rng.random() < self.fault_rate:
            return rng.choice(self.faults_pool)
        return None

    def _reply_text(self, messages: list[dict], model: str) -> str:
        return self.reply(messages, model) if self._reply_takes_model else self.reply(messages)

    def _completion(self, body: dict, text: str | None, *, refusal: str | None = None, finish: str = "stop") -> dict:
        prompt = "".join(str(m.get("content", "")) for m in body.get("messages", []))
        data = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": refusal},
                    "finish_reason": finish,
                }
            ],
        }
        if self.usage is not None:
            data["usage"] = self.usage
        elif self.include_usage:
            completion = _tokens(text or refusal or "")
            data["usage"] = {
                "prompt_tokens": _tokens(prompt),
                "completion_tokens": completion,
                "total_tokens": _tokens(prompt) + completion,
            }
        return data

    def _answer(self, handler: "BaseHTTPRequestHandler", raw: bytes) -> None:
        try:
            body = json.loads(raw)
            messages, model = body["messages"], body["model"]
        except (ValueError, KeyError, TypeError):
            return _send(handler, 400, {"error": {"message": "body must be JSON with model and messages"}})
        with self._lock:
            arrival = self.requests
            self.requests += 1
            self.requests_by_model[model] += 1
            self.auth_headers.append(handler.headers.get("Authorization", ""))
            self.bodies.append(body)
            self.targets.append(handler.path)
            self.queries.append(dict(parse_qsl(urlsplit(handler.path).query, keep_blank_values=True)))
            self.headers.append(dict(handler.headers.items()))
            wait = self.latency_s + (self._latency_rng.uniform(*self.random_latency_s) if self.random_latency_s else 0)
        if wait:
            time.sleep(wait)
        fault = self._choose_fault(raw)
        if fault:
            with self._lock:
                self.faults[fault] += 1
            return self._fault(handler, fault, body)
        if self.echo:
            text = _echo(handler, body)
        else:
            text = self._reply_text(messages, model)
        with self._lock:
            self.completions += 1
            self.answer_order.append(arrival)
        _send(handler, 200, self._completion(body, text))

    def _fault(self, handler: "BaseHTTPRequestHandler", fault: str, body: dict) -> None:
        error = {"error": {"message": f"injected {fault}", "type": fault}}
        if self.echo_errors:
            error["error"]["message"] += f"; request: {_echo(handler, body)}"
        if fault == "rate_limit":
            _send(handler, 429, error, {"Retry-After": f"{self.retry_after_s:g}"})
        elif fault == "rate_limit_no_header":
            _send(handler, 429, error)
        elif fault == "rate_limit_date":
            _send(handler, 429, error, {"Retry-After": formatdate(time.time() + 1, usegmt=True)})
        elif fault.startswith("server_error_"):
            _send(handler, int(fault.rsplit("_", 1)[1]), error)
        elif fault == "bad_request":
            _send(handler, 400, error)
        elif fault == "unauthorized":
            _send(handler, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        elif fault == "model_not_found":
            _send(handler, 404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                           "type": "invalid_request_error", "code": "model_not_found"}})
        elif fault == "disconnect":
            handler.close_connection = True  # the handler returns without writing a byte
        elif fault == "timeout":
            time.sleep(self.hang_s)
            _send(handler, 200, self._completion(body, "too late"))
        elif fault == "truncated_json":
            payload = json.dumps(self._completion(body, "cut short")).encode()
            _send_bytes(handler, 200, payload[: len(payload) // 2])
        elif fault == "malformed_json":
            _send_bytes(handler, 200, b'{"id": "chatcmpl-fake", "choices": [ <html>oops')
        elif fault == "empty_content":
            _send(handler, 200, self._completion(body, ""))
        elif fault == "refusal":
            _send(handler, 200, self._completion(body, None, refusal="I cannot help with that."))
        elif fault == "content_filter":
            _send(handler, 200, self._completion(body, "", finish="content_filter"))


def _echo(handler: BaseHTTPRequestHandler, body: dict) -> str:
    """The request as the server saw it: target (path and query), headers, body."""
    return json.dumps({"target": handler.path, "headers": dict(handler.headers.items()), "body": body})


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog of 5 drops connections under concurrency

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up (timeout, cancel) is part of the game, not a server bug


def _send_bytes(handler: BaseHTTPRequestHandler, status: int, payload: bytes, headers: dict | None = None,
                content_type: str = "application/json") -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
        handler.close_connection = True  # the client gave up (e.g. it timed out)


def _send(handler: BaseHTTPRequestHandler, status: int, data: dict, headers: dict | None = None) -> None:
    _send_bytes(handler, status, json.dumps(data).encode(), headers)


def _handler_class(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
        disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

        def do_POST(self) -> None:
            server._post(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def do_GET(self) -> None:
            server._get(self)

        def log_message(self, format: str, *args) -> None:
            pass  # quiet: tests read the counters instead

    return Handler
