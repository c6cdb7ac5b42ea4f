"""One provider for every OpenAI-compatible chat endpoint, with visible, bounded retries.

The ``openai`` client's own retries are off; tenacity retries 429, 408/409, 5xx, timeouts,
connection errors, unparseable replies and empty content, with exponential backoff and
jitter, or the server's Retry-After when it sends one. A refusal is returned at once as a
failed result. Whatever happens, ``complete`` returns a CallResult and never raises.

The client is built for many calls at once: one ``openai.AsyncOpenAI`` per teacher, kept for
the dispatcher's lifetime, on the SDK's aiohttp transport with a pool of ``max_concurrency``
kept-alive connections. Requests go through ``client.post`` with plain JSON in and out, which
skips the SDK's typed-parameter pass and response models: the same HTTP request and reply for
about half the client's CPU time per call (docs/llm.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

import aiohttp
import httpx2
import openai
from aiolimiter import AsyncLimiter
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential,
                      wait_random)

from mapd.config import EndpointConfig
from mapd.llm.base import Call, CallResult
from mapd.secrets import Redactor, endpoint, protect_logs, redact_url

log = logging.getLogger("mapd.llm")
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: ``initial_s * 2**n`` capped at ``max_s`` plus up to ``jitter_s``
    of random jitter, or the server's Retry-After (capped at ``retry_after_max_s``)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    jitter_s: float = 1.0
    retry_after_max_s: float = 60.0


class UnusableReply(Exception):
    """A 200 reply that carries no usable text (no choices, empty content): worth retrying."""


class TeacherStopped(Exception):
    """The teacher was stopped (an error every call would get, or the circuit breaker): no more requests."""


# What the endpoint or the network can do to a call: these become failed results. Anything else is a bug in
# mapd's own code and propagates with its traceback (tests/test_llm.py::test_a_bug_in_mapd_is_raised_not_recorded).
PROVIDER_ERRORS: tuple[type[Exception], ...] = (
    openai.APIError,  # status errors, connection errors and timeouts, unreadable responses
    httpx2.HTTPError, aiohttp.ClientError,  # the transports, should one escape the SDK unwrapped
    TimeoutError, OSError,  # asyncio.TimeoutError is TimeoutError
    json.JSONDecodeError, UnicodeDecodeError,  # a reply that is not JSON, or not text
    UnusableReply,  # a 200 reply with no usable text
)


# A wrong key, no access, no such model or endpoint: every call to the teacher would fail alike.
STOPS_TEACHER = (401, 403, 404)
_UNKNOWN_MODEL = re.compile(r"model\b.{0,100}?(?:not (?:be )?found|does not exist|unknown|not supported)", re.I | re.S)
USAGE_LIMIT = 10_000_000  # token counts above this are not believed
MAX_CHARS_PER_TOKEN = 32  # nor counts below the text's length / this: no tokenizer packs that much text a token


def request_body(teacher: EndpointConfig, messages: list[dict[str, str]]) -> dict:
    """The JSON body of one chat completion request (live, or a line of a batch input file)."""
    return {"model": teacher.model, "messages": messages, "temperature": teacher.temperature, "top_p": teacher.top_p,
            teacher.max_tokens_field: teacher.max_tokens, **teacher.extra_body}


CHARS_PER_TOKEN = 4  # the rough rule behind every token estimate


def approx_tokens(messages: list[dict[str, str]]) -> int:
    """A rough token count for estimates: characters / CHARS_PER_TOKEN."""
    return sum(len(str(message.get("content", ""))) for message in messages) // CHARS_PER_TOKEN + 1


def retry_after_s(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (``Retry-After`` seconds or HTTP date, or ``retry-after-ms``)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None  # a header we cannot read: fall back to our own backoff


def stops_teacher(exc: BaseException) -> bool:
    """Whether ``exc`` means every call to this teacher will fail: stop it at once."""
    if not isinstance(exc, openai.APIStatusError):
        return False
    return exc.status_code in STOPS_TEACHER or (exc.status_code in (400, 422) and bool(_UNKNOWN_MODEL.search(str(exc))))


def transient_status(code: int) -> bool:
    """Whether an HTTP status may go away on another attempt: a timeout, a conflict, a rate limit, a server error."""
    return code in (408, 409, 429) or code >= 500


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed."""
    if isinstance(exc, openai.APIStatusError):
        return transient_status(exc.status_code)
    # APITimeoutError is an APIConnectionError; a truncated or malformed body is a JSONDecodeError
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError,
                            UnusableReply))


class OpenAIProvider:
    """Calls one OpenAI-compatible teacher. Create it inside the event loop that uses it, and keep it
    for many calls: a new client's first requests pay for opening its connections."""

    def __init__(self, teacher: EndpointConfig, api_key: str, backoff: Backoff = Backoff(), *,
                 who: str | None = None) -> None:
        self.teacher = teacher
        self.who = who or f"teacher {teacher.name}"  # how log lines name the endpoint's role, e.g. "the student"
        # user:password@ -> a Basic header; base_url's query and query_env -> every request's query;
        # headers_env -> headers. Every credential value is redacted from whatever leaves the provider.
        where = endpoint(teacher, api_key)  # MapdError naming an unset variable
        self._redact_error = Redactor(where.secrets, key_like=True)  # error texts: also anything key-like
        self._redact_reply = Redactor(where.secrets)  # reply texts: the credentials only
        protect_logs(where.secrets)
        pool = httpx2.Limits(max_connections=teacher.max_concurrency, max_keepalive_connections=teacher.max_concurrency)
        self._client = openai.AsyncOpenAI(
            base_url=where.base_url, api_key=api_key, max_retries=0, timeout=teacher.timeout_s,
            default_headers=where.headers or None, default_query=where.query or None,
            http_client=openai.DefaultAioHttpClient(limits=pool),
        )
        self._backoff = backoff
        self._exponential = (wait_exponential(multiplier=backoff.initial_s, max=backoff.max_s)
                             + wait_random(0, backoff.jitter_s))
        rpm, tpm = teacher.requests_per_minute, teacher.tokens_per_minute
        self._request_limiter = AsyncLimiter(rpm, 60) if rpm else None
        self._token_limiter = AsyncLimiter(tpm, 60) if tpm else None
        self.stopped: str | None = None  # why the teacher was stopped
        self._stop_event = asyncio.Event()  # wakes the calls waiting to retry
        self._failures_in_a_row = 0
        self._failing_since = 0.0  # when the current run of failed attempts began

    async def complete(self, call: Call) -> CallResult:
        """One chat completion with retries, answered with the call's key; failures come back as
        ``CallResult(text=None, error=...)``."""
        start = time.perf_counter()
        attempts = 0
        try:
            async for attempt in self.retrying():
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if self.stopped:
                        raise TeacherStopped(self.stopped)
                    result = await self._counted(self._attempt(call))
        except TeacherStopped as exc:
            result = CallResult(call.key, None, f"TeacherStopped: {exc}")
        except PROVIDER_ERRORS as exc:  # the endpoint's failures become recorded results; a bug in mapd raises
            result = CallResult(call.key, None, self.describe(exc))
        return result.of(call.key, latency_s=time.perf_counter() - start, attempts=attempts)

    def retrying(self) -> AsyncRetrying:
        """The teacher's retry policy: transient errors, up to max_retries more attempts, backoff or Retry-After."""
        return AsyncRetrying(stop=stop_after_attempt(self.teacher.max_retries + 1), wait=self._wait,
                             retry=retry_if_exception(is_transient), before_sleep=self._log_retry, sleep=self._sleep,
                             reraise=True)

    async def request(self, make: Callable[[], Awaitable[T]], *, missing_ok: bool = False) -> T:
        """``make()`` (a request to the endpoint other than a completion: files, batches) with the retry policy
        and the circuit breaker; the last error is raised (TeacherStopped once the teacher is stopped).
        ``missing_ok``: a 404 means the object asked for is gone, not the endpoint; it stops nothing."""
        async for attempt in self.retrying():
            with attempt:
                if self.stopped:
                    raise TeacherStopped(self.stopped)
                return await self._counted(make(), missing_ok=missing_ok)
        raise AssertionError("unreachable: the retry policy reraises")

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The teacher's HTTP client (its credentials set)."""
        return self._client

    async def _counted(self, attempt: Awaitable[T], *, missing_ok: bool = False) -> T:
        """One attempt, with the circuit breaker's count: an error every call would get stops the teacher at
        once; so do ``max_consecutive_failures`` transient failures in a row (429s excepted) over at least
        ``failing_for_s`` seconds without a reply (an endpoint that is down, not one that is flaky)."""
        try:
            result = await attempt
        except Exception as exc:
            if stops_teacher(exc) and not (missing_ok and isinstance(exc, openai.NotFoundError)):
                self.stop(self.describe(exc))
            elif is_transient(exc) and getattr(exc, "status_code", None) != 429:
                now = time.monotonic()
                if self._failures_in_a_row == 0:
                    self._failing_since = now
                self._failures_in_a_row += 1
                failing_for = now - self._failing_since
                if (self._failures_in_a_row >= self.teacher.max_consecutive_failures
                        and failing_for >= self.teacher.failing_for_s):
                    self.stop(f"{self._failures_in_a_row} failed attempts in a row over {failing_for:.0f} s, "
                              f"the last: {self.describe(exc)}")
            raise
        self._failures_in_a_row = 0
        return result

    def stop(self, reason: str) -> None:
        """Stop the teacher: its calls waiting to retry wake and fail, later calls fail without a request."""
        if self.stopped is None:
            self.stopped = reason
            self._stop_event.set()
            log.error("%s stopped: %s", self.who, reason)

    async def _sleep(self, seconds: float) -> None:
        """Wait before a retry, unless the teacher is stopped meanwhile."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), seconds)
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def _attempt(self, call: Call) -> CallResult:
        teacher, messages = self.teacher, call.messages
        if self._request_limiter:
            await self._limited(self._request_limiter, 1, "requests_per_minute")
        if self._token_limiter:
            needed = approx_tokens(messages) + teacher.max_tokens
            await self._limited(self._token_limiter, min(needed, teacher.tokens_per_minute), "tokens_per_minute")
        reply = await self._client.post("/chat/completions", body=request_body(teacher, messages), cast_to=object)
        return self.parse_reply(call, reply)  # the JSON reply as is

    def parse_reply(self, call: Call, reply: object) -> CallResult:
        """The result in a chat completion's JSON (a live reply or a batch output line's body): a refusal
        is a failed result; UnusableReply when it carries no text."""
        messages = call.messages
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices:
            raise UnusableReply("the reply has no choices")
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        finish_reason = choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None
        refusal = message.get("refusal")
        if refusal or finish_reason == "content_filter":
            reason = refusal or "finish_reason is content_filter"
            return CallResult(call.key, None, self.describe_text(f"Refusal: {reason}"), finish_reason=finish_reason,
                              **self._usage(reply, messages, str(reason)))
        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise UnusableReply(f"empty content (finish_reason {finish_reason})")
        # a lone surrogate (invalid UTF-16 in the JSON) cannot be stored or printed: it becomes U+FFFD
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return CallResult(call.key, self._redact(text), None, finish_reason=finish_reason,
                          **self._usage(reply, messages, text))

    def _usage(self, reply: dict, messages: list[dict[str, str]], text: str) -> dict:
        """``input_tokens``, ``output_tokens`` and ``usage_estimated``: the reply's usage where it is believable, else an
        estimate from the text (~4 characters a token). Missing, null, non-integer, negative or absurd counts
        (above USAGE_LIMIT, or below the text's length / MAX_CHARS_PER_TOKEN: 0 tokens for real text) never abort
        the call and never make it cheaper than the text it brought."""
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        estimates = (approx_tokens(messages), len(text) // CHARS_PER_TOKEN + 1)
        lengths = (sum(len(str(message.get("content", ""))) for message in messages), len(text))
        counts, estimated = [], False
        for name, estimate, length in zip(("prompt_tokens", "completion_tokens"), estimates, lengths):
            value = usage.get(name)
            believable = (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= USAGE_LIMIT
                          and value * MAX_CHARS_PER_TOKEN >= length)  # 0 tokens for real text: not believed
            counts.append(value if believable else estimate)
            estimated = estimated or not believable
        return {"input_tokens": counts[0], "output_tokens": counts[1], "usage_estimated": estimated}

    async def _limited(self, limiter: AsyncLimiter, amount: float, limit: str) -> None:
        """Take ``amount`` from a rate limiter, saying so when the wait is long."""
        began = time.perf_counter()
        await limiter.acquire(amount)
        waited = time.perf_counter() - began
        if waited >= 1:
            log.info("%s: waited %.1f s for its %s limit", self.who, waited, limit)

    def _wait(self, state: RetryCallState) -> float:
        asked = retry_after_s(state.outcome.exception() if state.outcome else None)
        if asked is not None:
            return min(asked, self._backoff.retry_after_max_s)
        return self._exponential(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        asked = retry_after_s(exc)
        capped = f" (the server asked for {asked:.0f} s)" if asked is not None and asked > self._backoff.retry_after_max_s else ""
        log.info(
            "%s: %s; retry %d/%d in %.1f s%s",
            self.who, self.describe(exc)[:200], state.attempt_number, self.teacher.max_retries,
            state.next_action.sleep if state.next_action else 0.0, capped,
        )

    def describe(self, exc: BaseException | None) -> str:
        """``Type: message``, plus the underlying error's when there is one: the SDK's aiohttp transport
        reports a refused connection as "APITimeoutError: Request timed out." and the cause says what happened."""
        text = f"{type(exc).__name__}: {exc}"
        root = exc
        while root is not None and root.__cause__ is not None:
            root = root.__cause__
        if root is not exc:
            text += f" ({type(root).__name__}: {root})"
        return self.describe_text(text)

    def describe_text(self, text: str) -> str:
        """``text`` cut to 500 characters with the key and the endpoint's credentials removed."""
        base_url = str(self.teacher.base_url or "")
        if base_url:
            text = text.replace(base_url, redact_url(base_url))
        return self._redact_error(text)[:500]

    def _redact(self, text: str | None) -> str | None:
        """A reply text without the endpoint's credentials: a server or gateway that echoes the request
        (headers, query, body) must not put them into feedback, rationales or the cache."""
        return self._redact_reply(text) if text and self._redact_reply else text
