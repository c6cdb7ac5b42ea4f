"""What a teacher is (data, not a class) and what one call to it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field, model_validator


class TeacherConfig(BaseModel):
    """One teacher of the committee. With ``base_url`` it is any OpenAI-compatible endpoint
    (OpenAI, Gemini's or Anthropic's compatibility endpoints, DeepInfra, Together, vLLM,
    llama.cpp server, Ollama); without one, ``model`` is a local model run in-process."""

    name: str = Field(description="Short unique name used in artifacts and reports, e.g. gpt.")
    model: str = Field(
        description="Model id sent to the endpoint, or for a local teacher a hub id, folder, "
        ".gguf file or embedded:<name> model."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1.")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",  # a key pasted here by mistake is refused, never echoed
        description="Name of the environment variable holding the API key, e.g. OPENAI_API_KEY "
        "(the key itself is never stored).",
    )
    provider: Literal["openai", "local"] | None = Field(
        None, description="openai (any OpenAI-compatible endpoint) or local; inferred from base_url when unset."
    )
    gguf_file: str | None = Field(None, description="Local teacher: GGUF file name inside the model folder.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature (the paper: 0.8).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling top-p.")
    max_tokens: int = Field(512, ge=1, description="Maximum new tokens per reply (the paper: 512).")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="Request field that carries max_tokens: OpenAI's reasoning models (o-series, gpt-5) "
        "accept only max_completion_tokens.",
    )
    max_concurrency: int = Field(8, ge=1, description="Requests in flight at once (local: batch size).")
    requests_per_minute: float | None = Field(None, gt=0, description="Optional request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Optional token rate limit (prompt + max_tokens).")
    timeout_s: float = Field(120, gt=0, description="Seconds before one request times out (then it is retried).")
    max_retries: int = Field(6, ge=0, description="Retries on 429, 5xx, timeouts and malformed replies.")
    price_input_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens, for cost reports.")
    price_output_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens.")
    extra_body: dict = Field(default_factory=dict, description="Extra JSON fields sent with every request.")

    model_config = {"extra": "forbid"}

    @model_validator(mode="after")
    def _infer_provider(self) -> "TeacherConfig":
        if self.provider is None:
            self.provider = "openai" if self.base_url else "local"
        return self

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD cost of the given token counts at this teacher's prices."""
        return (input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok) / 1e6


@dataclass(frozen=True)
class Call:
    """One chat completion to make: which teacher, which messages, which sample."""

    teacher: str
    messages: list[dict[str, str]]
    sample: int = 0


@dataclass
class CallResult:
    """The outcome of one call. ``text`` is None exactly when ``error`` says why."""

    text: str | None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    attempts: int = 1
    extra: dict = field(default_factory=dict)
