"""The review-score contract: what the review prompt asks a reviewer to end with ({score_format} in
config.PromptConfig.review) and the parser that reads it, side by side so they change together. It knows
no stage: mapd.prompts fills SCORE_FORMAT in, the teach stage parses replies with parse_score."""

from __future__ import annotations

import re

SCORE_FORMAT = ("then finish with a single integer score from 1 (wrong) to 5 (fully correct and sound) "
                "in square brackets, for example [4].")

# A bracketed value: "[4]", "[ 4 ]", "[4/5]", "[4.5]", "[-1]". Decimals and signs are matched so that
# "[4.5]" is an invalid score rather than falling through to the last integer.
_BRACKETED = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+\s*)?\]")
# A bare number, where "4/5" is one value (4); "4 out of 5" is two numbers, the last being 5. No sign:
# outside brackets a hyphen is a range or a dash ("a 1-5 scale").
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)(?:\s*/\s*\d+)?")


def parse_score(text: str) -> int | None:
    """A reviewer's 1-5 score (the reply to SCORE_FORMAT): the last bracketed value, else the last number.

    ``N/M`` counts as N. A value outside 1..5, a non-integer or no number at all is invalid: None.
    """
    found = _BRACKETED.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return int(value) if value.is_integer() and 1 <= value <= 5 else None
