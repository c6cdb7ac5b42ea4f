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

import json
import logging
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx2
import openai
from aiolimiter import AsyncLimiter
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential,
                      wait_random)

from mapd.config import TeacherConfig
from mapd.llm.base import Call, CallResult
from mapd.secrets import redact_text, redact_url, split_credentials

log = logging.getLogger("mapd.llm")


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: ``initial_s * 2**n`` capped at ``max_s`` plus up to ``jitter_s``
    of random jitter, or the server's Retry-After (capped at ``retry_after_max_s``)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    jitter_s: float = 1.0
    retry_after_max_s: float = 300.0


class UnusableReply(Exception):
    """A 200 reply that carries no usable text (no choices, empty content): worth retrying."""


def approx_tokens(messages: list[dict[str, str]]) -> int:
    """A rough token count for estimates: characters / 4."""
    return sum(len(str(message.get("content", ""))) for message in messages) // 4 + 1


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


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    # APITimeoutError is an APIConnectionError; a truncated or malformed body is a JSONDecodeError
    return isinstance(exc, (openai.APIConnectionError, openai.APIResponseValidationError, json.JSONDecodeError,
                            UnusableReply))


class OpenAIProvider:
    """Calls one OpenAI-compatible teacher. Create it inside the event loop that uses it, and keep it
    for many calls: a new client's first requests pay for opening its connections."""

    def __init__(self, teacher: TeacherConfig, api_key: str, backoff: Backoff = Backoff()) -> None:
        self.teacher = teacher
        self._secrets = [api_key]
        base_url, credentials = split_credentials(teacher.base_url)
        pool = httpx2.Limits(max_connections=teacher.max_concurrency, max_keepalive_connections=teacher.max_concurrency)
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=teacher.timeout_s, default_headers=credentials,
            http_client=openai.DefaultAioHttpClient(limits=pool),
        )
        self._backoff = backoff
        self._exponential = (wait_exponential(multiplier=backoff.initial_s, max=backoff.max_s)
                             + wait_random(0, backoff.jitter_s))
        rpm, tpm = teacher.requests_per_minute, teacher.tokens_per_minute
        self._request_limiter = AsyncLimiter(rpm, 60) if rpm else None
        self._token_limiter = AsyncLimiter(tpm, 60) if tpm else None

    async def complete(self, call: Call) -> CallResult:
        """One chat completion with retries, answered with the call's key; failures come back as
        ``CallResult(text=None, error=...)``."""
        start = time.perf_counter()
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.teacher.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_transient),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    result = await self._attempt(call)
        except Exception as exc:  # every failure becomes a recorded result, never an exception in the stage
            result = CallResult(call.key, None, self._describe(exc))
        return result.of(call.key, latency_s=time.perf_counter() - start, attempts=attempts)

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.close()

    async def _attempt(self, call: Call) -> CallResult:
        teacher, messages = self.teacher, call.messages
        if self._request_limiter:
            await self._request_limiter.acquire()
        if self._token_limiter:
            needed = approx_tokens(messages) + teacher.max_tokens
            await self._token_limiter.acquire(min(needed, teacher.tokens_per_minute))
        body = {"model": teacher.model, "messages": messages, "temperature": teacher.temperature,
                "top_p": teacher.top_p, teacher.max_tokens_field: teacher.max_tokens, **teacher.extra_body}
        reply = await self._client.post("/chat/completions", body=body, cast_to=object)  # the JSON reply as is
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices:
            raise UnusableReply("the reply has no choices")
        choice = choices[0]
        message = choice.get("message") or {}
        usage = reply.get("usage")
        tokens = ((usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)) if usage
                  else (approx_tokens(messages), 0))
        refusal = message.get("refusal")
        if refusal or choice.get("finish_reason") == "content_filter":
            reason = refusal or "finish_reason is content_filter"
            return CallResult(call.key, None, self._describe_text(f"Refusal: {reason}"), *tokens,
                              finish_reason=choice.get("finish_reason"))
        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise UnusableReply(f"empty content (finish_reason {choice.get('finish_reason')})")
        if not usage:
            tokens = (tokens[0], len(text) // 4 + 1)
        return CallResult(call.key, text, None, *tokens, finish_reason=choice.get("finish_reason"))

    def _wait(self, state: RetryCallState) -> float:
        asked = retry_after_s(state.outcome.exception() if state.outcome else None)
        if asked is not None:
            return min(asked, self._backoff.retry_after_max_s)
        return self._exponential(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.info(
            "teacher %s: %s; retry %d/%d in %.2f s",
            self.teacher.name, self._describe(exc), state.attempt_number, self.teacher.max_retries,
            state.next_action.sleep if state.next_action else 0.0,
        )

    def _describe(self, exc: BaseException | None) -> str:
        """``Type: message``, plus the underlying error's when there is one: the SDK's aiohttp transport
        reports a refused connection as "APITimeoutError: Request timed out." and the cause says what happened."""
        text = f"{type(exc).__name__}: {exc}"
        root = exc
        while root is not None and root.__cause__ is not None:
            root = root.__cause__
        if root is not exc:
            text += f" ({type(root).__name__}: {root})"
        return self._describe_text(text)

    def _describe_text(self, text: str) -> str:
        """``text`` cut to 500 characters with the key and the endpoint's credentials removed."""
        base_url = str(self.teacher.base_url or "")
        if base_url:
            text = text.replace(base_url, redact_url(base_url))
        return redact_text(text, self._secrets)[:500]
