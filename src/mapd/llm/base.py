"""What one model call is: its key, its messages, and the result that comes back with the key."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class CallKey:
    """Names one call in a run: which stage, for which question, by whom.

    ``teacher`` wrote the text the call is about; ``reviewer`` is set for a peer review, and then
    the reviewer is the one called. ``sample`` tells repeated samples of the same prompt apart.
    """

    stage: str
    id: str
    teacher: str
    reviewer: str | None = None
    sample: int = 0

    @property
    def caller(self) -> str:
        """The committee member that answers this call."""
        return self.reviewer or self.teacher

    def __str__(self) -> str:
        by = f" reviewed by {self.reviewer}" if self.reviewer else ""
        return f"{self.stage} {self.id!r} of {self.teacher}{by}" + (f" sample {self.sample}" if self.sample else "")


@dataclass(frozen=True)
class Call:
    """One chat completion to make, named by its key."""

    key: CallKey
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class CallResult:
    """The outcome of one call, carrying the call's key. ``text`` is None exactly when ``error`` says why.

    ``finish_reason`` is the endpoint's ("stop", "length": cut off at the token limit), None when
    unknown. ``dry_run`` marks a stand-in text of the longest possible reply (``--dry-run``);
    ``usage_estimated`` token counts estimated from the text (the endpoint's usage was missing or unbelievable).
    ``batch`` names the batch input file whose batch answered the call (None: a live call).
    """

    key: CallKey | None
    text: str | None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False
    attempts: int = 1
    finish_reason: str | None = None
    dry_run: bool = False
    usage_estimated: bool = False
    batch: str | None = None

    @property
    def cut_off(self) -> bool | None:
        """Whether the reply stopped at its token limit; None when the endpoint did not say."""
        return None if self.finish_reason is None else self.finish_reason == "length"

    def of(self, key: CallKey, **changes) -> "CallResult":
        """This result as the answer to ``key`` (an identical call's reply, or a cache hit)."""
        return replace(self, key=key, **changes)
