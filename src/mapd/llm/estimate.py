"""A dry run's estimates: every call not yet made counted at its worst case (the reply uses all of the teacher's
``max_tokens``), and the longest reply a teacher may give, which a dry run answers with so that the calls quoting
it are estimated at their worst too (``mapd teach --dry-run``, ``mapd check``; docs/llm.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from mapd.config import EndpointConfig
from mapd.llm.base import Call, CallResult
from mapd.llm.openai_provider import CHARS_PER_TOKEN, approx_tokens


@dataclass
class Estimate:
    """A dry run's tally for one teacher: calls asked, calls not cached, and their worst case."""

    calls: int = 0
    to_call: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, teacher: EndpointConfig, call: Call) -> None:
        """Tally one call not yet made at its worst case: the reply uses all of ``max_tokens``."""
        tokens, cost = worst_case(teacher, call)
        self.to_call += 1
        self.input_tokens += tokens
        self.max_output_tokens += teacher.max_tokens
        self.cost_usd += cost


def longest_reply(key: object, max_tokens: int) -> str:
    """A stand-in reply as long as the longest one ``max_tokens`` allow (CHARS_PER_TOKEN characters a token):
    what a dry run answers, so that the calls quoting it are estimated at their worst."""
    return f"{key}: ".ljust(CHARS_PER_TOKEN * max_tokens, ".")


def dry_run_reply(teacher: EndpointConfig, call: Call) -> CallResult:
    """What a dry run answers ``call`` with: the longest reply the teacher may give, under the call's key."""
    return CallResult(call.key, longest_reply(call.key, teacher.max_tokens), dry_run=True, attempts=0)


def worst_case(teacher: EndpointConfig, call: Call) -> tuple[int, float]:
    """(estimated input tokens, worst-case cost: the reply uses all of max_tokens, at batch prices for a batch
    teacher unless it may retry live); also what the budget reserves while a call is made."""
    tokens = approx_tokens(call.messages)
    return tokens, teacher.cost(tokens, teacher.max_tokens, batch=teacher.batch and not teacher.batch_retry_live)
