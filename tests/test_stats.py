"""mapd.stats against published and hand-computed values."""

import math

import pytest

from mapd.errors import MapdError
from mapd.stats import format_p, mcnemar_exact, paired_comparison, wilson_interval


@pytest.mark.parametrize(("correct", "n", "low", "high"), [
    (8, 10, 0.490, 0.943),
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, no continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval(correct: int, n: int, low: float, high: float):
    got = wilson_interval(correct, n)
    digits = 3 if (correct, n) == (8, 10) else 4
    assert (round(got[0], digits), round(got[1], digits)) == (low, high)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing answered: nothing known
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and round(low, 4) == 0.7225
    with pytest.raises(MapdError, match="between 0 and n"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(("gained", "lost", "p"), [
    (15, 5, 0.0414),
    (5, 15, 0.0414),  # two-sided: symmetric
    (0, 0, 1.0),
    (1, 0, 1.0),
    (0, 6, 0.03125),  # 2 / 2**6
    (10, 0, 0.001953),  # 2 / 2**10
    (7, 7, 1.0),
])
def test_mcnemar_exact(gained: int, lost: int, p: float):
    assert mcnemar_exact(gained, lost) == pytest.approx(p, abs=5e-5 if p > 0.01 else 5e-6)


@pytest.mark.parametrize(("gained", "lost"), [(3, 9), (12, 4), (20, 31), (1, 1), (0, 13)])
def test_mcnemar_exact_is_the_binomial_tail(gained: int, lost: int):
    """Two-sided exact binomial test at 1/2 = twice the smaller tail, capped at 1 (exact integer arithmetic)."""
    n, k = gained + lost, min(gained, lost)
    expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_exact_rejects_negative_counts():
    with pytest.raises(MapdError, match="must not be negative"):
        mcnemar_exact(-1, 3)


def _outcomes(pattern: str) -> dict[str, bool]:
    return {f"q{i}": c == "1" for i, c in enumerate(pattern)}


def test_paired_comparison_matches_by_id():
    before = {"a": True, "b": False, "c": False, "d": True, "only-before": True}
    after = {"d": False, "c": True, "b": True, "a": True, "only-after": False}
    c = paired_comparison(before, after)
    assert (c.n, c.before_correct, c.after_correct) == (4, 2, 3)
    assert c.gained_ids == ("c", "b") and c.lost_ids == ("d",)  # in the after evaluation's order
    assert (c.gained, c.lost) == (2, 1)
    assert c.summary() == {"paired_n": 4, "before_correct": 2, "after_correct": 3, "gained": 2, "lost": 1,
                           "mcnemar_p": 1.0}


def test_sentence_significant_gain():
    c = paired_comparison(_outcomes("0" * 15 + "1" * 5 + "1" * 20), _outcomes("1" * 15 + "0" * 5 + "1" * 20))
    assert (c.n, c.gained, c.lost) == (40, 15, 5) and c.significant
    assert c.sentence().startswith("After training the student is better, and the difference is significant at the "
                                   "5 % level")
    assert "exact McNemar test, p = 0.0414" in c.sentence()


def test_sentence_significant_loss():
    c = paired_comparison(_outcomes("1" * 10 + "0" * 30), _outcomes("0" * 40))
    assert c.sentence().startswith("After training the student is worse")


def test_sentence_not_significant():
    c = paired_comparison(_outcomes("0" * 6 + "1" * 4 + "0" * 30), _outcomes("1" * 6 + "0" * 4 + "0" * 30))
    assert not c.significant and format_p(c.p_value) == "0.754"
    assert c.sentence().startswith("The difference is not significant at the 5 % level")


def test_sentence_too_few_questions():
    c = paired_comparison(_outcomes("0" * 10), _outcomes("1" * 10))  # p = 0.002, but only 10 questions
    assert c.p_value < 0.05 and not c.significant
    assert c.sentence().startswith("With only 10 paired questions (fewer than 30) no conclusion is possible")


def test_sentence_no_discordant_pairs():
    c = paired_comparison(_outcomes("10" * 20), _outcomes("10" * 20))
    assert (c.gained, c.lost, c.p_value) == (0, 0, 1.0)
    assert "no discordant pairs" in c.sentence()


def test_sentence_nothing_paired():
    c = paired_comparison({"a": True}, {"b": True})
    assert c.n == 0 and c.p_value == 1.0
    assert c.sentence() == "No question was evaluated both before and after: there is nothing to compare."
