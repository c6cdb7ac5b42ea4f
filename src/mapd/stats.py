"""Is a before/after difference real? Accuracy intervals and the paired test, from ``scipy.stats``.

- ``wilson_interval``: the 95 % Wilson score interval of an accuracy (no continuity correction).
- ``mcnemar_exact``: the exact McNemar test of two evaluations on the same questions, i.e. the two-sided
  exact binomial test of the discordant questions (right only after vs. right only before) at 1/2.
- ``paired_comparison``: both evaluations matched by question id: gained, lost, the p-value and one plain
  sentence saying what may be concluded (docs/report.md#is-the-gain-real).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import binomtest

from mapd.errors import MapdError

LEVEL = 0.05  # the significance level the sentence speaks of
MIN_PAIRED = 30  # under this many paired questions the sentence says no conclusion is possible


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``correct / n``; ``(0.0, 1.0)`` when ``n`` is 0."""
    if not 0 <= correct <= n:
        raise MapdError(f"wilson_interval: correct must be between 0 and n, got {correct} of {n}")
    if n == 0:
        return 0.0, 1.0
    interval = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson interval of an evaluation's accuracy over ``n`` questions (metrics.json stores the
    accuracy; the count of right answers is recovered from it)."""
    return wilson_interval(round(accuracy * n), n)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts; 1.0 when there are none."""
    if gained < 0 or lost < 0:
        raise MapdError(f"mcnemar_exact: counts must not be negative, got {gained} and {lost}")
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


def format_p(p: float) -> str:
    """A p-value as the report writes it (three significant digits)."""
    return f"{p:.3g}"


@dataclass(frozen=True)
class PairedComparison:
    """Two evaluations of the same questions (matched by id): ``gained`` were right only after,
    ``lost`` right only before."""

    n: int
    before_correct: int
    after_correct: int
    gained_ids: tuple[str, ...]
    lost_ids: tuple[str, ...]
    p_value: float

    @property
    def gained(self) -> int:
        return len(self.gained_ids)

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at 5 % and there are enough paired questions to say so."""
        return self.n >= MIN_PAIRED and self.p_value < LEVEL

    def sentence(self) -> str:
        """One plain sentence: what the exact McNemar test lets one conclude."""
        test = f"exact McNemar test, p = {format_p(self.p_value)}"
        if self.n == 0:
            return "No question was evaluated both before and after: there is nothing to compare."
        if self.gained + self.lost == 0:
            return (f"None of the {self.n:,} paired questions changed its verdict (no discordant pairs), "
                    f"so there is no difference to test ({test}).")
        if self.n < MIN_PAIRED:
            return (f"With only {self.n:,} paired questions (fewer than {MIN_PAIRED}) no conclusion is possible "
                    f"({self.gained:,} gained, {self.lost:,} lost; {test}).")
        if self.significant:
            direction = "better" if self.gained > self.lost else "worse"
            return (f"After training the student is {direction}, and the difference is significant at the 5 % "
                    f"level ({self.gained:,} gained, {self.lost:,} lost of {self.n:,} paired questions; {test}).")
        return (f"The difference is not significant at the 5 % level: it may be chance ({self.gained:,} gained, "
                f"{self.lost:,} lost of {self.n:,} paired questions; {test}).")

    def summary(self) -> dict[str, int | float]:
        """The numbers as a stage summary records them (manifest.json)."""
        return {"paired_n": self.n, "before_correct": self.before_correct, "after_correct": self.after_correct,
                "gained": self.gained, "lost": self.lost, "mcnemar_p": self.p_value}


def paired_comparison(before: Mapping[str, bool], after: Mapping[str, bool]) -> PairedComparison:
    """Compare two evaluations (question id -> answered correctly) on the questions both answered;
    ids are kept in ``after``'s order."""
    ids = [i for i in after if i in before]
    gained = tuple(i for i in ids if after[i] and not before[i])
    lost = tuple(i for i in ids if before[i] and not after[i])
    return PairedComparison(n=len(ids), before_correct=sum(bool(before[i]) for i in ids),
                            after_correct=sum(bool(after[i]) for i in ids), gained_ids=gained, lost_ids=lost,
                            p_value=mcnemar_exact(len(gained), len(lost)))
