"""Keys come only from environment variables; anything printed or written is redacted."""

from __future__ import annotations

import base64
import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from mapd.errors import MapdError

_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|Bearer\s+\S+)")


def redact_url(url: str) -> str:
    """``https://user:pass@host/v1?key=x`` -> ``https://***@host/v1?***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "***" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_credentials(url: str | None) -> tuple[str | None, dict[str, str] | None]:
    """``(url without user:pass@, {"Authorization": "Basic ..."} or None)``: credentials written in a
    base_url travel in a header (as HTTP clients send them), never in a URL that a library may log."""
    parts = urlsplit(url or "")
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), {"Authorization": f"Basic {token}"}


def redact_text(text: str, secrets: list[str] = ()) -> str:
    """Remove the given secret values and anything that looks like an API key from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


def api_key(env_var: str | None, teacher: str) -> str:
    """The key in ``env_var``; a MapdError before any call when it is unset or empty."""
    if env_var is None:
        return "not-needed"  # local servers (vLLM, llama.cpp, Ollama) accept any key
    value = os.environ.get(env_var, "")
    if not value:
        raise MapdError(f"teacher '{teacher}': environment variable {env_var} is not set (it must hold the API key)")
    return value
