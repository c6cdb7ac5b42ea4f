"""Simulated peer review (docs/method.md#4-peer-review): the acceptance rule and who reviews whom (the
score a reviewer is asked for and its parser: mapd.review_score)."""

from __future__ import annotations

import statistics

from mapd.answers import extract, is_correct
from mapd.config import ReviewConfig
from mapd.errors import MapdError
from mapd.records import Rationale, Review

_AGGREGATORS = {"mean": statistics.fmean, "median": statistics.median, "min": min}


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


def check_committee(committee: list[str], config: ReviewConfig, source: str | None = None) -> None:
    """A committee needs a teacher, and peer review someone else to review: a one-teacher committee must
    turn review off. The error names the config field at fault, after ``source`` (the config file) if given."""
    at = f"{source}: " if source is not None else ""
    if not committee:
        raise MapdError(f"{at}teachers: the committee needs at least one teacher")
    if config.enabled and len(committee) < 2:
        raise MapdError(
            f"{at}review.enabled: peer review needs at least two teachers, the committee has {len(committee)} "
            f"({', '.join(committee)}): add a teacher or set review.enabled: false"
        )


def reviewers(teacher: str, committee: list[str], config: ReviewConfig) -> list[str]:
    """The teachers that review ``teacher``'s rationales: every other one, in committee order, capped."""
    if not config.enabled:
        return []
    return [other for other in committee if other != teacher][: config.max_reviewers]


def own_answer(text: str, answer_kind: str, cut_off: bool | None) -> str | None:
    """A rationale's own final answer (a text cut off at its token limit commits only explicitly)."""
    return extract(text, answer_kind, complete=None if cut_off is None else not cut_off).answer


def needs_review(text: str, *, gold: str, answer_kind: str, config: ReviewConfig, cut_off: bool | None) -> bool:
    """Whether peer review can still accept this rationale: with ``require_gold_answer`` one whose own answer is
    not the gold is rejected whatever its scores, so its reviews are not asked for (and not paid)."""
    return _gold_check_passes(own_answer(text, answer_kind, cut_off), gold, answer_kind, config)


def _gold_check_passes(answer: str | None, gold: str, answer_kind: str, config: ReviewConfig) -> bool:
    """``require_gold_answer``: a rationale whose own answer is not the gold is never accepted."""
    return not config.require_gold_answer or is_correct(answer, gold, answer_kind)


def judged(mistake_id: str, teacher: str, text: str | None, error: str | None, reviews: list[Review], *,
           gold: str, answer_kind: str, config: ReviewConfig, cut_off: bool | None = None) -> Rationale:
    """A rationale record: its own extracted answer (a text cut off at its token limit commits only
    explicitly), its reviews, their aggregate and the verdict. A failed rationale (no text) is never accepted."""
    answer = None if text is None else own_answer(text, answer_kind, cut_off)
    mean_score, accepted = accept([review.score for review in reviews], config)
    accepted = accepted and _gold_check_passes(answer, gold, answer_kind, config)
    return Rationale(id=mistake_id, teacher=teacher, text=text, error=error, answer=answer, cut_off=cut_off,
                     reviews=reviews, mean_score=mean_score, accepted=accepted and text is not None)
