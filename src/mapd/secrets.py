"""Keys come only from environment variables; anything printed, logged or written is redacted.

A teacher's credentials are its API key (``api_key_env``), the ``user:password@`` of its base_url
(sent as a Basic ``Authorization`` header, never in a URL), the query parameters of its base_url
(sent with every request), and the values of ``headers_env`` / ``query_env``. :func:`endpoint`
gathers them, refusing an unset variable by its name; :class:`Redactor` takes every one of them
(and their URL, JSON and Basic encodings) out of a text. The provider redacts error texts and reply
texts before a result leaves it, and :func:`protect_logs` redacts the HTTP libraries' log records,
which carry request URLs.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

from mapd import log
from mapd.errors import MapdError

if TYPE_CHECKING:
    from mapd.config import EndpointConfig, RunConfig

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|Bearer\s+[^\s\"'<>,;]+)")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# base_url query parameters that configure the endpoint and hold no credential (Azure's api-version,
# Gemini's alt=sse): sent like the others, but not hunted for in reply texts.
NOT_SECRET_QUERY = frozenset({"api-version", "api_version", "alt", "format", "version"})
# A secret shorter than this is only redacted where it stands alone (not inside a longer word or
# number); a longer one wherever it occurs.
_WHOLE_WORD_BELOW = 8
REDACTED = "***"


def redact_url(url: str) -> str:
    """``https://user:pass@host/v1?key=x`` -> ``https://***@host/v1?***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# characters that URL encoders (urllib, httpx, aiohttp, servers echoing a request) leave as they are
_SAFE_SETS = ("", "/", "/:@", "/:@!$'()*,;=~", "!$&'()*+,;=:@/?~")


def public_dump(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data for manifests: key *names* only, credentials in URLs redacted."""
    data = config.model_dump(mode="json")
    for section in [*data["teachers"], data["student"]]:  # the config's every base_url
        if section.get("base_url"):
            section["base_url"] = redact_url(section["base_url"])
    return data


def _variants(secret: str) -> set[str]:
    """``secret`` as it may appear in a text: as is, URL-encoded (in a path or a query, by any of the
    usual encoders), JSON-escaped."""
    forms = {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    for safe in _SAFE_SETS:
        forms |= {quote(secret, safe=safe), quote_plus(secret, safe=safe)}
    return forms - {""}


class Redactor:
    """Replaces each of ``secrets`` (and its encodings) in a text with ``***``; ``key_like`` also
    removes anything that looks like an API key (``sk-…``, ``AIza…``, ``Bearer …``)."""

    def __init__(self, secrets: Iterable[str | None] = (), key_like: bool = False) -> None:
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))
        self.key_like = key_like
        variants = sorted({v for s in self.secrets for v in _variants(s)}, key=len, reverse=True)
        patterns = [re.escape(v) if len(v) >= _WHOLE_WORD_BELOW
                    else rf"(?<![A-Za-z0-9_]){re.escape(v)}(?![A-Za-z0-9_])" for v in variants]
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(REDACTED, text)
        return _KEY_LIKE.sub(REDACTED, text) if self.key_like else text

    def __bool__(self) -> bool:
        return self._pattern is not None


def _check_name(env_var: str, teacher: str, what: str) -> None:
    if not isinstance(env_var, str) or not _VARIABLE_NAME.fullmatch(env_var):
        # never echoed: a key pasted where its variable's name belongs
        raise MapdError(f"teacher '{teacher}': {what} must name an environment variable (the value given is "
                        "not a variable name; it is not shown)")


def env_secret(env_var: str, teacher: str, what: str) -> str:
    """The value of ``env_var``; a MapdError naming the teacher and the variable (never a value) when
    it is not a variable name, unset or empty."""
    _check_name(env_var, teacher, what)
    value = os.environ.get(env_var, "")
    if not value:
        raise MapdError(f"teacher '{teacher}': environment variable {env_var} is not set or empty "
                        f"(it must hold {what})")
    return value


def api_key(env_var: str | None, teacher: str) -> str:
    """The key in ``env_var``; a MapdError before any call when it is unset or empty."""
    if env_var is None:
        return "not-needed"  # local servers (vLLM, llama.cpp, Ollama) accept any key
    return env_secret(env_var, teacher, "the API key")


def check_credentials(teachers: Iterable[EndpointConfig]) -> None:
    """MapdError, before any call, when an endpoint teacher's key, ``headers_env`` or ``query_env`` variable
    is unset (the error names the variable, never a value)."""
    for teacher in teachers:
        if teacher.base_url:
            endpoint(teacher, api_key(teacher.api_key_env, teacher.name))


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach an OpenAI-compatible teacher, credentials apart from the URL."""

    base_url: str | None  # without user:password@ and without query
    headers: dict[str, str] = field(default_factory=dict)  # Basic Authorization, headers_env
    query: dict[str, str] = field(default_factory=dict)  # base_url's query, query_env: on every request
    secrets: tuple[str, ...] = ()  # every credential value, to redact from whatever is shown or stored


def endpoint(teacher: EndpointConfig, key: str | None = None) -> Endpoint:
    """The teacher's URL, headers and query; ``key`` (its API key, when it has one) joins the secrets.
    MapdError, naming the variable, when a ``headers_env`` / ``query_env`` variable is unset."""
    secrets: list[str] = [key] if key and teacher.api_key_env else []
    base_url, headers = teacher.base_url, {}
    parts = urlsplit(base_url or "")
    if "@" in parts.netloc:  # user:password@ travels in a Basic header, never in a URL that a library may log
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        base_url = urlunsplit(parts._replace(netloc=host))
        secrets += [userinfo, unquote(userinfo), unquote(password) if colon else unquote(user), token]
    query: dict[str, str] = {}
    if base_url:
        parts = urlsplit(base_url)
        for piece in parts.query.split("&"):
            name, _, raw = piece.partition("=")
            if name:
                query[unquote_plus(name)] = value = unquote_plus(raw)
                if unquote_plus(name).lower() not in NOT_SECRET_QUERY:
                    secrets += [value, raw]  # raw: as written in base_url, which an echo may show
        base_url = urlunsplit(parts._replace(query="", fragment=""))
    for header, env_var in teacher.headers_env.items():
        headers[header] = env_secret(env_var, teacher.name, f"the value of header {header}")
        secrets.append(headers[header])
    for name, env_var in teacher.query_env.items():
        query[name] = env_secret(env_var, teacher.name, f"the value of query parameter {name}")
        secrets.append(query[name])
    return Endpoint(base_url, headers, query, tuple(s for s in secrets if s))


# -- logs -----------------------------------------------------------------------------------------

# Loggers whose records may carry a request URL (httpx logs "HTTP Request: POST <url>" at INFO) or an
# exception text; their records pass through the redactor before any handler sees them.
_LOGGERS = ("httpx2", "httpx", "httpcore", "openai", "openai._base_client", "aiohttp.client", "mapd", "mapd.llm")


class _RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self.redact = Redactor(key_like=True)

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            new = set(secrets) - self._secrets
            if new:
                self._secrets |= new
                self.redact = Redactor(self._secrets, key_like=True)

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redact
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler's own error path
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_LOG_FILTER = _RedactingFilter()


def protect_logs(secrets: Iterable[str]) -> None:
    """Redact ``secrets`` from every record that mapd's handlers write (the terminal, mapd.log: every mapd logger's,
    child loggers included), and from every record of the HTTP and mapd loggers whatever handlers a user adds."""
    _LOG_FILTER.add(s for s in secrets if s)
    log.redact_with(_LOG_FILTER)
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)
