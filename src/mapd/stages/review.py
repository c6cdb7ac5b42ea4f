"""Simulated peer review: every other teacher scores each rationale 1-5; acceptance rule."""

from __future__ import annotations

import re
import statistics
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from mapd.answers import is_correct
from mapd.errors import MapdError
from mapd.llm.base import Call, CallResult
from mapd.prompts import ANSWER_FORMATS, PromptConfig

if TYPE_CHECKING:  # config.py imports this module: keep its imports light
    from mapd.llm import Dispatcher


class ReviewConfig(BaseModel):
    """How rationales are reviewed and accepted (METHOD.md step 4)."""

    enabled: bool = Field(True, description="Peer review on; off accepts every rationale (an ablation).")
    threshold: float = Field(3.0, description="Acceptance threshold on the aggregated valid scores.")
    comparison: Literal[">", ">="] = Field(">", description="Accept when aggregate > threshold (the paper) or >=.")
    aggregator: Literal["mean", "median", "min"] = Field("mean", description="How valid scores are combined.")
    max_reviewers: int | None = Field(None, ge=1, description="Use at most this many other teachers as reviewers.")
    require_gold_answer: bool = Field(
        False, description="Also require the rationale's own final answer to equal the gold answer (off: faithful to the paper)."
    )

    model_config = {"extra": "forbid"}


# A bracketed value: "[4]", "[ 4 ]", "[4/5]", "[4.5]", "[-1]". Decimals and signs are matched so that
# "[4.5]" is an invalid score rather than falling through to the last integer.
_BRACKETED = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+\s*)?\]")
# A bare number, where "4/5" is one value (4); "4 out of 5" is two numbers, the last being 5. No sign:
# outside brackets a hyphen is a range or a dash ("a 1-5 scale").
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(?:\s*/\s*\d+)?")
_AGGREGATORS = {"mean": statistics.fmean, "median": statistics.median, "min": min}


def parse_score(text: str) -> int | None:
    """A reviewer's 1-5 score (METHOD.md step 4): the last bracketed value, else the last number.

    ``N/M`` counts as N. A value outside 1..5, a non-integer or no number at all is invalid: None.
    """
    found = _BRACKETED.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() and 1 <= value <= 5 else None


def accept(scores: list[int | None], config: ReviewConfig) -> tuple[float | None, bool]:
    """``(aggregate of the valid scores or None, accepted)``; no valid score is never accepted
    while review is on, and review off accepts everything."""
    valid = [score for score in scores if score is not None]
    aggregate = float(_AGGREGATORS[config.aggregator](valid)) if valid else None
    if not config.enabled:
        return aggregate, True
    if aggregate is None:
        return None, False
    passed = aggregate > config.threshold if config.comparison == ">" else aggregate >= config.threshold
    return aggregate, passed


def check_committee(committee: list[str], config: ReviewConfig) -> None:
    """Peer review needs someone else to review: a one-teacher committee must turn review off."""
    if config.enabled and len(committee) < 2:
        raise MapdError(
            f"peer review needs at least two teachers, the committee has {len(committee)} "
            f"({', '.join(committee) or 'none'}): add a teacher or set review.enabled: false"
        )


def reviewers(teacher: str, committee: list[str], config: ReviewConfig) -> list[str]:
    """The teachers that review ``teacher``'s rationales: every other one, in committee order, capped."""
    if not config.enabled:
        return []
    return [other for other in committee if other != teacher][: config.max_reviewers]


def review_calls(
    record: dict, mistake: dict, committee: list[str], prompts: PromptConfig, config: ReviewConfig, *, answer_kind: str
) -> list[Call]:
    """The calls that review one rationale record of ``mistake``: one per reviewer, none for a failed rationale."""
    if record["text"] is None:
        return []
    messages = prompts.messages(
        prompts.review, question=mistake["question"], rationale=record["text"], gold=mistake["gold"],
        answer_format=ANSWER_FORMATS[answer_kind],
    )
    return [Call(teacher=reviewer, messages=messages) for reviewer in reviewers(record["teacher"], committee, config)]


def review_records(
    rationales: list[dict],
    mistakes: list[dict],
    calls: list[list[Call]],
    results: list[CallResult],
    config: ReviewConfig,
    *,
    answer_kind: str,
) -> list[dict]:
    """``rationales`` with ``reviews``, ``mean_score`` and ``accepted``; ``calls[i]`` are the review calls of
    ``rationales[i]`` and ``results`` the results of all of them, in that order."""
    by_id = {mistake["id"]: mistake for mistake in mistakes}
    replies = iter(results)
    out = []
    for record, own_calls in zip(rationales, calls, strict=True):
        own = []
        for call, result in zip(own_calls, replies):
            score = None if result.text is None else parse_score(result.text)
            own.append({"reviewer": call.teacher, "score": score, "raw": result.text, "error": result.error})
        mean_score, accepted = accept([r["score"] for r in own], config)
        if config.require_gold_answer:
            accepted = accepted and is_correct(record["answer"], by_id[record["id"]]["gold"], answer_kind)
        accepted = accepted and record["text"] is not None
        out.append({**record, "reviews": own, "mean_score": mean_score, "accepted": accepted})
    return out


def review(
    rationales: list[dict],
    mistakes: list[dict],
    dispatcher: Dispatcher,
    prompts: PromptConfig,
    config: ReviewConfig,
    *,
    answer_kind: str,
) -> list[dict]:
    """Each rationale scored by the other teachers (the committee: the teachers of ``rationales``,
    in order of appearance) with the gold hint; adds ``reviews``, ``mean_score`` and ``accepted``."""
    by_id = {mistake["id"]: mistake for mistake in mistakes}
    committee = list(dict.fromkeys(record["teacher"] for record in rationales))
    check_committee(committee, config)
    calls = [review_calls(record, by_id[record["id"]], committee, prompts, config, answer_kind=answer_kind)
             for record in rationales]
    results = dispatcher.run([call for own in calls for call in own], desc="review")
    return review_records(rationales, mistakes, calls, results, config, answer_kind=answer_kind)
