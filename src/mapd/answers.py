"""Final-answer extraction: the answer a model's text *commits to*, or "unparsed" when it commits to none.

The pipeline asks every model to end with "The answer is X." Models often do not, so the extractor
looks for the places where a text commits to an answer, strongest first:

1. "The answer is X", "Final answer: X", ``\\boxed{X}`` (the last one wins);
2. an "Answer: X" headline (it beats the explanation written after it);
3. numbers: the last concluding sentence ("So ...", "Therefore ...", "In total ...") or the final
   sentence; an answer stated before "Here's the reasoning:"; the result of the last equation;
   yes/no: a line that opens with its verdict ("False. ..."), "the statement is false", and last
   the polarity of a concluding sentence ("Therefore, it is unlikely that ...");
4. choices: a letter ("(C)", "option C", "C is correct", ``\\boxed{D}``) or the text of one option;
   a restated list of the options, or markers that run through several letters, commit to none.

It answers "unparsed" when the text never commits: empty or refusing texts, texts cut off while
restating the question, per-part results never combined ("Math: 8 pages / Biology: 3"), two values
side by side, ranges, equations never solved, hints or quizzes handed back to the reader.

A text cut off by the token limit (``complete=False``, or judged so from the text when ``complete``
is None: it ends inside a sentence, a formula or a list) commits only explicitly: a marker, an
"Answer:" headline or a closed ``\\boxed{}`` stated before the cut (or a conclusion just before a
final marker the cut shortened: "= 794 dollars. \\boxed{79"). The last number or sentence of its
unfinished working is no answer; without an explicit one the status is "truncated".
docs/answers.md has the rules in more detail and the accuracy on a labelled sample of real outputs.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from difflib import SequenceMatcher
from fractions import Fraction

KINDS = ("number", "bool", "choice")
LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Extraction:
    """What a text answers. ``answer`` is canonical: "145", "0.5", "-3"; "true"/"false"; "A".."J"."""

    answer: str | None
    status: str  # "ok", "unparsed" (the text commits to no answer) or "truncated" (cut off before it committed)
    strict: bool  # the text's last sentence is the requested "The answer is X."


UNPARSED = Extraction(None, "unparsed", False)
TRUNCATED = Extraction(None, "truncated", False)
SEVERAL = ""  # internal: the text states several values and commits to none of them

# --- patterns: numbers ------------------------------------------------------------------------------

# A number as models write it: a sign glued to it, currency ("$ 17" in SVAMP), thousands separators,
# decimals, a fraction "1/3"; units may follow ("5kg"). Not inside a word, an ordinal ("3rd") or a
# coefficient ("2x").
NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>-)?(?:[$€£]\s?)?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:/(?P<den>\d+)(?!\d|\.\d))?(?!\d|,\d|\.\d|(?:st|nd|rd|th)\b|[a-zA-Z]\b)"
)
NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS |= {"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
# What introduces a computed result: "= 145", "which gives us 145", "leaving 12", "makes 10".
RESULT = re.compile(
    r"=|\bequals\b|\bwhich\s+gives(?:\s+us)?\b|\bwe\s+get\b|\bgives\s+us\b|\bresults?\s+in\b|"
    r"\bleaving(?:\s+\w+\s+with)?\b|\bleaves(?:\s+\w+)?(?:\s+with)?\b|\bmak(?:es|ing)(?:\s+a\s+total\s+of)?\b", re.I)
# Two quantities side by side ("53 push-ups and 14 crunches", "15 kids on Monday, 18"), a range
# ("between 5 and 10", "5-10"): no single answer.
TWO_QUANTITIES = re.compile(
    r"\d\s+(?:[a-z-]+\s+){0,4}[a-z-]+(?:\s+and|,(?:\s+and)?)\s+(?:(?!x\s|times\s)[a-z]+\s+)?\$?\d[\d,.]*"
    r"(?:\s+[a-z]|\s*$)", re.I)
RANGE = re.compile(r"\bbetween\s+\$?\d[\d,.]*\s+and\s+\$?\d|\d\s+to\s+\$?\d|\d-\d", re.I)
# A number that names a known group, not the answer: "each of his 3 friends".
POSSESSIVE_BEFORE = re.compile(r"\b(?:his|her|their|its|my|your|our|each\s+of\s+the|all\s+(?:of\s+)?the)\s+$", re.I)
# A bare answer: "53 inches", "About 1,203,587 kids".
SHORT_ANSWER = re.compile(r"^(?:about|approximately|around|roughly|nearly|exactly|only|just)?\s*-?[$€£]?\s?\d", re.I)
# Words that combine parts ("In total, ..."): such a line is not one more partial result.
COMBINING = re.compile(r"\b(?:total|altogether|together|in\s+all|combined|sum)\b", re.I)

# --- patterns: where a text commits -------------------------------------------------------------------

# Strong markers: "the answer is", "the answer to the question "..." is", "the correct option is",
# "final answer:". What follows on the same line is the answer.
ANSWER_IS = re.compile(
    r"\b(?:answer|(?:correct|right|best)\s+(?:option|choice))(?:\s+to\s+(?:the|this)\s+question(?:\s*\"[^\"\n]*\")?)?"
    r"\s+(?:is|would\s+be|will\s+be)\b\s*:?|\bfinal\s+answer\s*[:\-]", re.I)
BOXED = re.compile(r"\\boxed\s*\{(?P<rest>(?:[^{}]|\{[^{}]*\})*)\}")
# An "Answer:" label opening a line: the headline answer, or only a header above working.
ANSWER_LABEL = re.compile(r"^\s*(?:final\s+|my\s+)?answer\s*(?:\(s\))?\s*[:\-]\s*(?P<rest>.*)$", re.I | re.M)
# Section headers that end an "Answer:" block.
SECTION = re.compile(
    r"^\s*(?:explanation|reasoning|justification|solution|note|hint|calculation|steps?)\b[^:\n]{0,20}:", re.I)
# Words that open working rather than an answer ("Answer: Let's start by ...").
WORKING_OPENER = re.compile(r"^\s*(?:let(?:'s|\s+us)?|to\s|first|we\s|in\s+order|step|here|using|given|now|"
                            r"i\s|okay|sure|the\s+problem|this\s+problem|based\s+on)\b", re.I)
# Sentences that conclude ("So, ...", "Therefore ..."), once list numbering is removed.
CONCLUSION = re.compile(r"^\s*(?:so|therefore|thus|hence|in\s+total|altogether|overall|in\s+conclusion|in\s+summary|"
                        r"finally|as\s+a\s+result|consequently|this\s+means|that\s+means|in\s+all)\b", re.I)
# "..., so she baked 20": the part after the last such clause is the conclusion.
CONCLUDING_CLAUSE = re.compile(r",\s*(?:and\s+)?(?:so|therefore|thus|hence)\b,?", re.I)
# A leading clause whose numbers are not the answer: "Since he got 3 ..., the ... is 3", "Within 57 days, ...".
SUBORDINATE = re.compile(r"^\s*(?:since|because|as|if|when|to|after|before|given|while|although|with|once|within|"
                         r"in|for|over|during|by|on|at|from|out\s+of)\b[^,]*,\s*", re.I)
# An answer stated first, then "Here's the reasoning:" (Mixtral's habit).
OPENER_FOLLOWED = re.compile(r"^\s*here(?:'s|\s+is)\s+(?:the\s+|my\s+|a\s+)?(?:step-by-step\s+)?"
                             r"(?:logic|reasoning|explanation|breakdown|calculation|solution)", re.I | re.M)
# Numbering in front of a line: "1. ", "2) ", "Step 3:", bullets, headings.
LIST_PREFIX = re.compile(r"^\s*(?:(?:step\s*)?\d+\s*[.):]\s+|[-*•>]\s+|#+\s+)", re.I)
PARENTHETICAL = re.compile(r"\([^()]*\)|\([^()]*$")  # working in brackets, closed or cut off
# Lines that are not the text's own answer: hints, notes, the question restated as a prompt.
ASIDE_LINE = re.compile(r"^\s*(?:(?:i(?:'ll|\s+will)\s+give\s+you\s+)?(?:a\s+)?hint|note|question|"
                        r"true\s+or\s+false)\b[^:\n]{0,10}[:?]", re.I)
# The text declines to answer.
REFUSAL = re.compile(
    r"\b(?:cannot|can't|can\s+not|unable\s+to|not\s+possible\s+to|impossible\s+to)\s+(?:be\s+)?"
    r"(?:answer|determine|calculate|tell|find|know|say|provide|give)|"
    r"\b(?:not\s+enough|insufficient|additional|more)\s+information\b|"
    r"\bdo(?:es)?\s+not\s+(?:provide|mention|contain)\b|\bup\s+to\s+you\b", re.I)
# The answer line each prompt asks for (mapd.prompts fills {answer_format} with it) and STRICT below, the
# parser that checks a text ended with it: change them together.
ANSWER_FORMATS = {
    "number": 'End with the line "The answer is N." where N is the final number.',
    "bool": 'End with the line "The answer is true." or "The answer is false."',
    "choice": 'End with the line "The answer is X." where X is the letter of the correct option.',
}
# The requested format as the text's last sentence: "The answer is X." (a "So," in front is fine).
STRICT = re.compile(r"^(?:(?:so|therefore|thus|hence),?\s+)?the\s+answer\s+is\s*:?\s*(?P<value>.+?)\s*[.!]?$", re.I)

# --- patterns: yes / no ---------------------------------------------------------------------------------

VERDICT_WORD = re.compile(r"\b(true|false|yes|no|correct|incorrect)\b", re.I)
VERDICT_LED = re.compile(r"^\s*(true|false|yes|no)\b\s*(?:[.,!:;)]|$)", re.I)  # "False. The Pope ..."
STATEMENT_VERDICT = re.compile(r"\b(?:this|that|it|the\s+(?:statement|claim|answer|premise))\s+(?:is|would\s+be)\s+"
                               r"(not\s+)?(true|false)\b", re.I)
# The text hands the question back to the reader (a quiz, not an answer).
REQUEST = re.compile(r"\bplease\s+(?:provide|answer|give|select|choose|explain)|\byour\s+(?:answer|turn)\b|_{4,}|"
                     r"\bwould\s+you\s+like\s+to\s+answer|\bwhat\s+do\s+you\s+think\b", re.I)
GUESS = re.compile(r"^\s*i\s+(?:would\s+)?(?:guess|think|believe)\b", re.I)
# A concession does not carry the sentence's polarity: "while X is not ..., Y", "..., even if ...".
CONCESSION = re.compile(r"^\s*,?\s*(?:while|although|though|even\s+though|even\s+if|despite)\b[^,]*,|"
                        r",\s*(?:even\s+if|even\s+though|although|though)\b[^,.]*", re.I)
NEGATIVE = re.compile(r"\b(?:not|no|never|cannot|unlikely|impossible|difficult|neither|nor|false)\b|n't\b", re.I)
POSITIVE = re.compile(r"\b(?:likely|possible\s+that|it\s+is\s+(?:possible|true)|true)\b", re.I)
HEDGE = re.compile(r"\b(?:depends|unclear|uncertain|hard\s+to\s+say|not\s+sure|may|might|could)\b", re.I)

# --- patterns: choices ----------------------------------------------------------------------------------

# A choice letter, upper case only ("a" is an article): first in a segment ("B", "(B).", "option B"),
# named anywhere ("option C", "(C)"), or declared ("C is correct").
LETTER_FIRST = re.compile(r"^\W*(?:option\s+|choice\s+)?\(?(?-i:(?P<letter>[A-J]))\)?(?=\s*$|\s*[.,:;)!]|\s+[-–])",
                          re.I)
LETTER_NAMED = re.compile(r"(?:\b(?:option|choice)\s+\(?|\()(?-i:(?P<letter>[A-J]))\b\)?", re.I)
LETTER_IS_CORRECT = re.compile(r"\b(?-i:(?P<letter>[A-J]))\)?\s+is\s+(?:the\s+)?(?:correct|right|best|answer)", re.I)


# --- public API -----------------------------------------------------------------------------------------


def extract(text: str, kind: str, options: list[str] | None = None, *, complete: bool | None = None) -> Extraction:
    """The final answer ``text`` commits to, for an answer ``kind`` of "number", "bool" or "choice".

    ``options`` (choice kind) lets the extractor recognise an answer given as an option's text.
    ``complete``: False for a text stopped by the token limit, True for a finished one, None when
    unknown (the extractor then judges from the text, as a person does: a text that ends inside a
    sentence, a formula or a list is unfinished). A cut-off text commits only explicitly (an answer
    marker, an "Answer:" headline, a complete ``\\boxed{}`` stated before the cut); without one its
    status is "truncated".
    """
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")
    raw = text or ""
    clean = _normalize(raw)
    if not clean.strip():
        return UNPARSED
    if complete is None:
        complete = not unfinished(raw)
    if not complete:
        answer = _committed_before_cut(clean, kind, options)
        if answer is None:
            return TRUNCATED
        return Extraction(answer, "ok", False)
    answer = _answer(clean, kind, options)
    if answer is None:
        return UNPARSED
    return Extraction(answer, "ok", _is_strict(clean, answer, kind, options))


def _answer(clean: str, kind: str, options: list[str] | None) -> str | None:
    """The answer a finished (normalized) text commits to, or None."""
    if kind == "number":
        return _number_answer(clean) or None  # SEVERAL counts as no answer
    if kind == "bool":
        return _bool_answer(clean)
    return _choice_answer(clean, options)


def is_correct(answer: str | None, gold: str, kind: str) -> bool:
    """Whether an extracted ``answer`` equals ``gold``: numbers exactly as numbers ("1,052.50" = "1052.5"),
    yes/no and letters by value. A missing answer is never correct."""
    converters = {"number": _to_fraction, "bool": _to_bool, "choice": _to_letter}
    if kind not in converters:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")
    if answer is None or gold is None:
        return False
    value = converters[kind](str(answer))
    return value is not None and value == converters[kind](str(gold))


# --- text preparation -----------------------------------------------------------------------------------


def _normalize(text: str) -> str:
    """Plain text: no markdown emphasis or LaTeX wrappers; one kind of minus, times sign and space."""
    text = text.replace("\r\n", "\n").replace("\u00a0", " ").replace("\\*", "*").replace("\\$", "$")
    text = re.sub(r"\*\*|__|`", "", text)
    text = re.sub(r"\\text\{([^{}]*)\}|\\mathrm\{([^{}]*)\}", lambda m: m.group(1) or m.group(2) or "", text)
    text = re.sub(r"\\[()\[\]]", " ", text)
    text = text.replace("\\times", " x ").replace("\\cdot", " x ").replace("\\,", "").replace("\\%", "%")
    return text.translate(str.maketrans({"×": "x", "÷": "/", "−": "-", "–": "-", "—": " - ", "’": "'"}))


def _sentences_by_line(text: str) -> list[tuple[str, int]]:
    """(sentence, line number) in order, without numbering, asides, questions or bracketed working."""
    out = []
    for number, line in enumerate(text.split("\n")):
        if ASIDE_LINE.match(line):
            continue
        for part in re.split(r"(?<=[.!?])\s+(?=[^a-z\s])", line):
            part = LIST_PREFIX.sub("", part).strip()
            if part and not part.endswith("?") and not re.fullmatch(r"\([^()]*\)[.!]?", part):
                out.append((part, number))
    return out


def _sentences(text: str) -> list[str]:
    return [sentence for sentence, _ in _sentences_by_line(text)]


def _numbers(text: str) -> list[re.Match]:
    """The numbers outside brackets."""
    return list(NUMBER.finditer(PARENTHETICAL.sub(" ", text)))


# --- cut-off texts -------------------------------------------------------------------------------------

# Words a finished sentence does not end on ("... how many eggs they will", "So, we").
DANGLING_WORD = re.compile(
    r"\b(?:the|a|an|of|to|and|or|but|is|are|was|were|be|been|by|with|from|for|in|on|at|as|that|which|who|this|"
    r"these|those|we|i|you|he|she|it|they|our|their|his|her|its|can|will|would|should|must|has|have|had|do|does|"
    r"not|than|then|so|if|when|because|since|each|per|into|onto|about|after|before|between|both|either|neither|"
    r"let|let's|us|get|find|need|next|therefore|thus|hence|what|how|"
    r"equals|gives|option|answer|statement|step|multiply|divide|add|subtract|calculate|compute|determine|solve|use|"
    r"set|plug|substitute|simplify|consider|check|look|analyze|evaluate)$", re.I)
# A line that opens a list item or a step and has nothing after it yet ("2.", "B)", "Step 3:").
EMPTY_ITEM = re.compile(r"^\s*(?:[-*•]|(?:step\s*)?\d+[.):]|\(?[A-J][.):]|#+)?\s*$", re.I)
# A marker whose value the cut may have shortened: "The answer is 7" / "\boxed{79" / "Answer:" at the very end.
PENDING_MARKER = re.compile(
    r"(?:\b(?:the\s+)?(?:final\s+)?answer(?:\s+is|\s*:)|\\boxed\s*\{|\bcorrect\s+(?:option|answer|choice)\s+is)"
    r"\s*:?\s*(?P<partial>[^\n]{0,12})$", re.I)


def unfinished(text: str) -> bool:
    """Whether a text looks stopped mid-way, as a person judges it: it ends inside a formula or code (an
    open ``\\[``, ``{``, ``(``, ``$$`` or code block, a trailing operator), inside a sentence (a dangling
    word; a new sentence that stops; a prose line of six words or more with no closing punctuation), on
    a heading that nothing follows ("4. Calculate the time") or on an empty list item ("3."). A line
    that ends on a number ("so she baked 20") reads as finished: a person cannot tell either."""
    text = text.rstrip()
    if not text:
        return False
    if text.count("\\[") > text.count("\\]") or text.count("\\(") > text.count("\\)") or text.count("$$") % 2:
        return True
    if text.count("{") > text.count("}") or text.count("```") % 2:
        return True
    last = re.sub(r"\*\*|__|`", "", text.split("\n")[-1]).strip()
    if not last:
        return False
    if last.count("(") > last.count(")") or last.count("[") > last.count("]"):
        return True
    if re.search(r"(?:[=+*/^:,(&\\-]|\bx|\\frac|\\times|\\cdot)$", last):
        return True
    if EMPTY_ITEM.match(last):
        return True
    if re.search(r"[.!?)\]}\"'”]$", last):
        return False
    words = re.findall(r"[A-Za-z']+", last)
    if words and words[-1] not in LETTERS and DANGLING_WORD.search(words[-1]) and not re.search(r"\d", last[-3:]):
        return True
    body = LIST_PREFIX.sub("", last)
    if re.search(r"\d%?$", body):
        return False
    heading = body != last or re.match(r"^\s*step\s*\d+\s*:", last, re.I)
    if heading and len(body.split()) <= 5:
        return True  # a heading that nothing follows ("4. Calculate the time", "Step 8: Determine the height")
    if re.match(r"^\(?(?-i:[A-J])[.)]\s", last):
        return False  # a listed option ("D. I is on the northernmost side"): options have no full stop
    if re.search(r"\w\s+\w+[.!?]\s+\S", body):
        return True  # a new sentence began on the last line and stopped ("The answer is B. If humans plunder")
    # a prose line that simply stops ("... and west of Ha"); one that ends on a number ("so she baked 20"),
    # and short answer lines ("53 inches", "x = 4"), read as finished
    return len(re.findall(r"[a-z]{2,}", body)) >= 6 and "=" not in body


def _cut_point(text: str) -> int:
    """Where the unfinished fragment of a cut-off text starts: the last line if it has no closing
    punctuation, from its last sentence end; else the end of the text."""
    stripped = text.rstrip()
    start = stripped.rfind("\n") + 1
    last = stripped[start:]
    if re.search(r"[.!?]\**$", last) and not unfinished(stripped):
        return len(stripped)
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s+\S)", last)]
    return start + ends[-1] if ends else start


def _committed_before_cut(text: str, kind: str, options: list[str] | None) -> str | None:
    """The answer a cut-off text commits to explicitly before the cut, or None."""
    cut = _cut_point(text)
    body, fragment = text[:cut], text[cut:].strip()
    answer = _explicit(body, kind, options)
    if answer:
        return answer
    # A commitment on the cut line whose value the cut did not reach ("Answer: 9 (61 - 52"): the
    # same without the last, possibly shortened, word.
    shortened = re.sub(r"[\w.,]+$", "", text.rstrip())
    answer = _explicit(shortened, kind, options)
    if answer and answer == _explicit(text, kind, options):
        return answer
    # Cut inside its final marker ("... = 794 dollars.\n\nThe answer is \boxed{79"): the working was
    # done; its conclusion counts when the shortened value agrees with it.
    pending = PENDING_MARKER.search(fragment) if fragment else None
    if pending and pending.start() < 40:
        partial = re.sub(r"\\(?:boxed|text|mathrm)|[^0-9A-Za-z]", "", pending.group("partial"))
        # a whole yes/no word or a single letter cannot be the start of another answer
        if kind == "bool" and partial.lower() in ("true", "false", "yes", "no"):
            return _to_bool(partial)
        if kind == "choice" and re.fullmatch(r"[A-J]", partial):
            return partial if partial in (LETTERS[: len(options)] if options else LETTERS) else None
        before = _answer(body.rstrip(), kind, options) if _sentences(body) else None
        if before and (not partial or (kind == "number" and before.replace("-", "").startswith(partial))):
            return before
    return None


def _explicit(body: str, kind: str, options: list[str] | None) -> str | None:
    """An explicit commitment in ``body``: a marker ("The answer is X", a closed \\boxed{X}) or an
    "Answer: X" headline; for numbers also an answer stated before "Here's the reasoning:"; for yes/no
    also a line that opens with its verdict. Markers that disagree commit to none."""
    if not body.strip():
        return None
    if kind == "number":
        for rest in _strong_segments(body):
            value = _value_of(rest, body)
            if value is not None:
                return value or None
        headline = _headline(body)
        if headline:
            return headline
        opener = OPENER_FOLLOWED.search(body)  # "Jerry added 11 action figures.\n\nHere's the logic: ..."
        stated = [s for s in _sentences(body[: opener.start()]) if _numbers(s)] if opener else []
        return (_value_of(stated[-1], body) or None) if stated else None
    if kind == "bool":
        return _explicit_verdict(_verdict_lines(body)) or None
    if _conflicting_letters(_marked_segments(body), options):
        return None
    return _letter_in(_marked_segments(_without_restated_lists(body)), options)


# --- numbers --------------------------------------------------------------------------------------------


def _number_answer(text: str) -> str | None:
    """The committed number, SEVERAL, or None. Each stage below is tried in turn."""
    # 1. "The answer is X", "Final answer: X", \boxed{X}: the last one.
    for rest in _strong_segments(text):
        value = _value_of(rest, text)
        if value is not None:
            return value
    # 2. An "Answer:" headline.
    headline = _headline(text)
    if headline is not None:
        return headline
    # 3. The last concluding sentence, or else the final sentence, that states a number. A conclusion
    #    marker covers the rest of its line ("Finally, subtract ... This gives us 7 - 5 = 3.").
    by_line = _sentences_by_line(text)
    sentences = [s for s, _ in by_line]
    concluding = [bool(CONCLUSION.match(s)) for s in sentences]
    for i in range(1, len(by_line)):
        concluding[i] = concluding[i] or (concluding[i - 1] and by_line[i][1] == by_line[i - 1][1])
    reasoning = any(concluding) or "=" in text or re.search(r"\d\s*[-+x*/]\s*\$?\d", text)
    several = None
    for i in range(len(sentences) - 1, -1, -1):
        s = sentences[i]
        if not (concluding[i] or i == len(sentences) - 1):
            continue
        complete = s[-1] in ".!" or re.search(r"\([^)]*$", s)  # or cut off inside its own working "(53 x 41"
        if not (concluding[i] or reasoning or complete or SHORT_ANSWER.match(s)):
            continue  # a fragment cut off mid-narration ("Then, Haley grew 5") commits to nothing
        if REFUSAL.search(s) and not _numbers(s):
            return None  # "Therefore, we cannot determine ..."
        value = _value_of(s, text)
        if value is not None:
            if concluding[i] or not _parallel_to_previous(s, sentences[:i]):
                return value
            several = SEVERAL  # the last of several parallel partial results
            break
    # 4. An answer stated first, before "Here's the reasoning:".
    opener = OPENER_FOLLOWED.search(text)
    if opener:
        stated = [s for s in _sentences(text[: opener.start()]) if _numbers(s)]
        value = _value_of(stated[-1], text) if stated else None
        if value is not None:
            return value
    if several is not None:
        return several
    # 5. A text that declines to answer; else the result of the last equation.
    if REFUSAL.search(text):
        return None
    equations = [s for s in sentences if re.search(r"=\s*-?[$€£]?\s?\d", PARENTHETICAL.sub(" ", s))]
    if equations:
        return SEVERAL if _parallel_to_previous(equations[-1], equations[:-1]) else _value_of(equations[-1], text)
    # 6. A complete text whose last number comes before a closing remark ("... weighs 51 kg. To find this, ...").
    stated = [s for s in sentences if _numbers(s)]
    if stated and sentences[-1][-1] in ".!" and stated[-1][-1] in ".!":
        return _value_of(stated[-1], text)
    return None


def _strong_segments(text: str) -> list[str]:
    """What follows each "the answer is" / "final answer:" / \\boxed{} marker, the last marker first.

    A marker that ends its line ("The answer is:") takes the next non-empty line.
    """
    found = []
    for pattern in (ANSWER_IS, BOXED):
        for m in pattern.finditer(text):
            rest = m.group(0) if pattern is BOXED else text[m.end():].split("\n", 1)[0].strip()
            if not rest.strip(" :*"):
                following = [line for line in text[m.end():].split("\n") if line.strip()]
                rest = following[0] if following else ""
            found.append((m.start(), rest))
    return [rest for _, rest in sorted(found, reverse=True)]


def _value_of(segment: str, text: str) -> str | None:
    """The number a sentence (or what follows a marker) states as its result; SEVERAL; or None."""
    boxed = BOXED.search(segment)
    if boxed:
        return _boxed_number(boxed.group("rest"))
    segment = segment.strip()
    if not segment or segment.endswith(":"):
        return None
    letter = re.match(r"^(?:option\s+)?\(?([A-J])\)(?:\s*$|\s*[.,])|^\(?([A-J])\)?\s*\.?$", segment)
    if letter:  # "Answer: B)" pointing at lettered options the text wrote itself
        return _own_option_number(letter.group(1) or letter.group(2), text)
    body = PARENTHETICAL.sub(" ", segment)
    results = list(RESULT.finditer(body))
    if results:  # "... = 145", "which gives us 145": the number right after the last one
        lhs, rhs = body[: results[-1].start()], body[results[-1].end():]
        found = _numbers(rhs)
        if found and found[0].start() < 8:
            bare = re.fullmatch(r"\s*-?[$€£]?\s?\d[\d,.]*\s*", lhs)
            if bare and results[-1].group(0) == "=" and _to_fraction(lhs) != _to_fraction(found[0].group("num")):
                return SEVERAL  # "11 = 18": a contradiction, not a result
            return None if _unsolved(lhs) else _canonical(found[0])
    body = CONCLUSION.sub("", body, count=1).lstrip(" ,:")
    main = SUBORDINATE.sub("", body, count=1)
    if main == body and re.match(r"^\s*(?:if|when|to|since|because)\b", body, re.I):
        return None  # only a subordinate clause ("If you have 104"): nothing is stated
    clause = CONCLUDING_CLAUSE.split(main)[-1]
    if TWO_QUANTITIES.search(clause) or RANGE.search(clause):
        return SEVERAL
    for part in (clause, main):  # the first number, skipping one that names a group ("his 3 friends")
        found = next((m for m in NUMBER.finditer(part)
                      if not POSSESSIVE_BEFORE.search(part[max(0, m.start() - 20): m.start()])), None)
        if found:
            return _canonical(found)
    word = re.match(r"^\W*(?:is\s+)?([a-z]+)\b", main, re.I)  # "The answer is twelve."
    if word and word.group(1).lower() in NUMBER_WORDS:
        return str(NUMBER_WORDS[word.group(1).lower()])
    return None


def _unsolved(lhs: str) -> bool:
    """An equation still to be solved ("x - 8 = 40", "2x = 8"), not a result ("x = 4", "8 x 74 = 592")."""
    lhs = lhs.strip().lower()
    if re.search(r"\d\s+x\s+\$?\d", lhs) or not re.fullmatch(r"[\d\s.+\-*/()]*[a-z][\d\s.+\-*/()]*", lhs):
        return False
    return re.fullmatch(r"[a-z]", lhs) is None


def _headline(text: str) -> str | None:
    """The value of the last "Answer:" line; SEVERAL when it lists parts; None when it only heads working."""
    labels = list(ANSWER_LABEL.finditer(text))
    if not labels:
        return None
    block = [labels[-1].group("rest")] + text[labels[-1].end():].split("\n")
    lines = []
    for line in block:
        if SECTION.match(line):
            break
        if line.strip():
            lines.append(LIST_PREFIX.sub("", line).strip())
    if not lines or WORKING_OPENER.match(lines[0]):
        return None
    if lines[0].endswith(":") and len(lines) > 1 and "=" in lines[1]:  # "The total is:" / "57 + 26 = 83"
        lines = [lines[0] + " " + lines[1]] + lines[2:]
    first = lines[0]
    value = _value_of(first, text)
    if value is None:
        return None
    stated = [line for line in lines[1:4] if _numbers(line)]
    if stated and _parallel(first, stated[0]):  # "Math homework: 8 pages" / "Biology homework: 3"
        total = [line for line in lines if re.match(r"^\s*(?:total|in total|altogether|together)\b", line, re.I)]
        return (_value_of(total[-1], text) or SEVERAL) if total else SEVERAL
    if stated and len(first.split()) > 6:
        return None  # a long first line and more working after it: "Answer:" only heads a derivation
    return value


def _parallel(a: str, b: str) -> bool:
    """Whether two lines give parallel partial results ("Math: 8 pages" / "Biology: 3"): alike in shape,
    about different things, and ``b`` not computed from ``a``'s result."""
    def split(line: str) -> tuple[str, str]:
        line = PARENTHETICAL.sub(" ", line)
        if "=" in line:
            return line.split("=", 1)[0], line.rsplit("=", 1)[1]
        head, _, tail = line.partition(":")
        return (head, tail) if tail else ("", line)

    (lhs_a, rhs_a), (lhs_b, _) = split(a), split(b)
    mask_a, mask_b = (re.sub(r"\d[\d,.]*", "#", s.lower()).strip() for s in (a, b))
    if min(len(mask_a), len(mask_b)) < 12 or lhs_a.strip() == lhs_b.strip() or not lhs_b.strip():
        return False
    result, b_numbers = _numbers(rhs_a), _numbers(b)
    if result and result[-1].group("num") in {m.group("num") for m in b_numbers[:-1]}:
        return False  # a chain of steps
    n = min(len(mask_a), len(mask_b))  # the later line is often cut off: compare equal lengths too
    similarity = max(SequenceMatcher(None, mask_a, mask_b).ratio(),
                     SequenceMatcher(None, mask_a[:n], mask_b[:n]).ratio())
    return similarity >= (0.7 if "=" in a + b else 0.6)  # "label: value" lines are short: a lower bar


def _parallel_to_previous(line: str, before: list[str]) -> bool:
    """Whether ``line`` is the last of several parallel partial results."""
    previous = [s for s in before if ("=" in s if "=" in line else _numbers(s))]
    if not previous or not _parallel(previous[-1], line):
        return False
    return not (COMBINING.search(line) and not COMBINING.search(previous[-1]))


def _own_option_number(letter: str, text: str) -> str | None:
    option = re.search(r"^\s*\(?" + letter + r"[).:]\s*(?P<rest>.*)$", text, re.M)
    found = _numbers(option.group("rest")) if option else []
    return _canonical(found[0]) if found else None


def _boxed_number(content: str) -> str | None:
    found = _numbers(content)
    if found and re.fullmatch(r"\s*[-$€£\d.,/\s%]*", content):
        return _canonical(found[0])
    try:  # LaTeX in the box (\frac{1}{2}, \dfrac, ...): math-verify reads it
        from math_verify import parse

        main_thread = threading.current_thread() is threading.main_thread()  # its timeout uses signals
        parsed = parse("\\boxed{" + content + "}", parsing_timeout=5 if main_thread else None)
        return _format(Fraction(str(parsed[0]))) if parsed else None
    except (ImportError, ValueError, TypeError, ZeroDivisionError):
        return _canonical(found[0]) if found else None


def _canonical(match: re.Match) -> str | None:
    value = _to_fraction(match.group("num"))
    if value is None:
        return None
    if match.group("den"):
        if int(match.group("den")) == 0:
            return None
        value /= int(match.group("den"))
    return _format(-value if match.group("sign") else value)


def _format(value: Fraction) -> str:
    """145, 0.5, -3; "1/3" only when no finite decimal exists."""
    den = value.denominator
    for factor in (2, 5):
        while den % factor == 0:
            den //= factor
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return "0" if text in ("-0", "") else text


def _to_fraction(text: str) -> Fraction | None:
    """"$1,052.50" -> 2105/2; "25%" -> 25; "3/4" -> 3/4; anything else -> None."""
    text = re.sub(r"[$€£,%\s]", "", text.strip()).rstrip(".")
    try:
        if re.fullmatch(r"[-+]?\d+/\d+", text):
            num, den = text.split("/")
            return Fraction(int(num), int(den)) if int(den) else None
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError):
        return None


# --- yes / no -------------------------------------------------------------------------------------------


def _to_bool(text: str) -> str | None:
    """"true"/"false" from "yes", "False.", or the reference data's "false.\\t<facts>"."""
    word = re.match(r"^\W*(true|false|yes|no)\b", text.strip(), re.I)
    return None if not word else ("true" if word.group(1).lower() in ("true", "yes") else "false")


def _first_clause(segment: str) -> str:
    return re.split(r"[.;\n,]|\bbecause\b", segment.strip().replace("\\boxed", ""), maxsplit=1)[0][:40]


def _verdict(segment: str) -> str | None:
    """The one verdict a short segment gives; None when it gives none or both."""
    words = {"true" if w.lower() in ("true", "yes", "correct") else "false" for w in VERDICT_WORD.findall(segment)}
    return words.pop() if len(words) == 1 else None


def _marked_verdicts(text: str) -> list[str]:
    """The verdict of each "the answer is ..." / \\boxed{} marker that gives one, the latest first."""
    return [v for v in (_verdict(_first_clause(rest)) for rest in _strong_segments(text)) if v]


def _verdict_lines(text: str) -> list[str]:
    """The lines of ``text`` that may carry a verdict: not blank, not an aside, not a question."""
    return [line for line in text.split("\n")
            if line.strip() and not ASIDE_LINE.match(line) and not line.rstrip().endswith("?")]


def _explicit_verdict(lines: list[str]) -> str | None:
    """The explicit steps of a yes/no answer, for :func:`_explicit` and :func:`_bool_answer` alike: 1. "The
    answer is false", "Final answer: yes", \\boxed{yes}: the last one ("" when they disagree); 2. "Answer:
    False"; 3. a line that opens with its verdict ("False. The Pope ...", "No, ...", also after a label:
    "Explanation: False. ..."). None when there is none."""
    body = "\n".join(lines)
    marked = _marked_verdicts(body)
    if marked:
        return marked[0] if len(set(marked)) == 1 else ""
    for m in ANSWER_LABEL.finditer(body):
        value = _verdict(_first_clause(m.group("rest")))
        if value:
            return value
    for line in lines:
        m = VERDICT_LED.match(re.sub(r"^\s*[A-Za-z]+\s*:\s*", "", LIST_PREFIX.sub("", line)))
        if m:
            return "true" if m.group(1).lower() in ("true", "yes") else "false"
    return None


def _bool_answer(text: str) -> str | None:
    lines = _verdict_lines(text)
    body = "\n".join(lines)
    explicit = _explicit_verdict(lines)  # steps 1-3
    if explicit is not None:
        return explicit or None
    # 4. "I believe this is true", "the statement is not true": the last one.
    stated = list(STATEMENT_VERDICT.finditer(body))
    if stated:
        negated, word = stated[-1].group(1) is not None, stated[-1].group(2).lower()
        return "false" if negated == (word == "true") else "true"
    # 5. No verdict word: the polarity of the last concluding sentence, unless the text is a quiz.
    if REQUEST.search(text):
        return None
    concluding = [s for s in _sentences(body) if CONCLUSION.match(s) or GUESS.match(s)]
    if concluding:
        last = CONCESSION.sub(" ", CONCLUSION.sub("", concluding[-1], count=1))
        if NEGATIVE.search(last):
            return "false"
        if POSITIVE.search(last) or (GUESS.match(last) and not HEDGE.search(last)):
            return "true"  # "it is likely that ...", "I believe that a dolphin can ..."
    return None


# --- choices --------------------------------------------------------------------------------------------

# Words between a marker and its letter: "The answer is indeed D", "the answer is clearly (B)".
FILLER = re.compile(r"^\W*(?:(?:indeed|clearly|therefore|thus|most\s+likely|likely|probably|definitely|actually|"
                    r"simply|now)\b\W*)+", re.I)
# A line that lists an option: "A. text", "(B) text", "Option C: text", "- D) text".
OPTION_LINE = re.compile(r"^\s*(?:[-*•]\s*)?(?:option\s+|choice\s+)?\(?(?-i:(?P<letter>[A-J]))(?:[.):]|\s*-)(?:\s|$)",
                         re.I)


def _to_letter(text: str) -> str | None:
    m = re.match(r"^\s*(?:option\s+)?\(?([A-Ja-j])\)?\s*[.:)]?\s*$", text)
    return m.group(1).upper() if m else None


def _segment_choice(segment: str, options: list[str] | None) -> str | None:
    """The letter one committing segment names ("B", "(B).", "option B", "C is correct", \\boxed{D},
    an option's text); "" for a letter that is not among the options; None when it names none."""
    allowed = LETTERS[: len(options)] if options else LETTERS
    boxed = BOXED.search(segment)
    if boxed and boxed.start() < 3:
        segment = boxed.group("rest")
    segment = FILLER.sub("", segment)
    m = LETTER_FIRST.match(segment) or LETTER_NAMED.search(segment) or LETTER_IS_CORRECT.search(segment)
    if m:
        return m.group("letter") if m.group("letter") in allowed else ""
    return _option_named(segment, options) if options else None


def _letter_in(segments: list[str], options: list[str] | None) -> str | None:
    """The letter of the first segment that names one (segments come latest commitment first)."""
    for segment in segments:
        letter = _segment_choice(segment, options)
        if letter is not None:
            return letter or None
    return None


LISTED_OPTION = re.compile(r"^\s*(?:[-*•]\s*)?(?:.{0,40}?\b(?:answer|option|choice)\s+(?:is|would\s+be)\s*:?\s*)?"
                           r"(?:option\s+|choice\s+)?\(?(?-i:(?P<letter>[A-J]))(?:[.):]|\s+-)(?:\s|$)", re.I)


def _without_restated_lists(text: str) -> str:
    """The text less its runs of option lines in letter order ("A. ...\nB. ...\nC. ..."), even when the
    first is glued to a marker ("The answer is A. <A's text>\nB. <B's text>"): restating the options
    commits to none of them."""
    lines = text.split("\n")
    keep = [True] * len(lines)
    items = [(i, m.group("letter")) for i, m in ((i, LISTED_OPTION.match(line)) for i, line in enumerate(lines)) if m]
    filled = [i for i, line in enumerate(lines) if line.strip()]
    following = {a: b for a, b in zip(filled, filled[1:])}
    letter_at = dict(items)
    for i, letter in items:
        j = following.get(i)
        if j is not None and letter_at.get(j) == LETTERS[(LETTERS.index(letter) + 1) % len(LETTERS)]:
            keep[i] = keep[j] = False
    return "\n".join(line for line, kept in zip(lines, keep) if kept)


def _marked_segments(text: str) -> list[str]:
    """What follows each marker and "Answer:" label, the latest first."""
    return _strong_segments(text) + [m.group("rest") for m in ANSWER_LABEL.finditer(text)][::-1]


def _conflicting_letters(segments: list[str], options: list[str] | None) -> bool:
    """Markers that name different letters: a text that runs through "The correct answer is A. ... B.
    ... C." commits to none of them."""
    return len({letter for letter in (_segment_choice(s, options) for s in segments) if letter}) > 1


def _choice_answer(text: str, options: list[str] | None) -> str | None:
    if _conflicting_letters(_marked_segments(text), options):
        return None
    text = _without_restated_lists(text)
    marked = _marked_segments(text)
    # lines that restate or go through the options one by one ("A. ...\nB. ...\nC. ...") commit to none
    listed = {m.group("letter") for m in map(OPTION_LINE.match, text.split("\n")) if m}
    lines = text.split("\n")
    if len(listed) >= 2:
        lines = [line for line in lines if not OPTION_LINE.match(line)]
    sentences = _sentences("\n".join(lines))
    segments = marked + [s for s in sentences if CONCLUSION.match(s)][::-1] + sentences[-1:]
    return _letter_in(segments, options)


def _option_named(segment: str, options: list[str]) -> str | None:
    """The letter of the one option whose text the segment contains (the longest, if one contains another)."""
    def squash(s: str) -> str:
        return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()

    padded = f" {squash(segment)} "
    named = sorted(((len(squash(o)), LETTERS[i]) for i, o in enumerate(options)
                    if squash(o) and f" {squash(o)} " in padded), reverse=True)
    if not named:
        return None
    return named[0][1] if len(named) == 1 or named[0][0] > named[1][0] else None


def _is_strict(text: str, answer: str, kind: str, options: list[str] | None) -> bool:
    """Whether the text's last sentence is "The answer is X." with X the extracted answer."""
    sentences = _sentences(text)
    m = STRICT.match(sentences[-1]) if sentences else None
    if not m:
        return False
    value = m.group("value")
    if kind == "number":
        return _value_of(value, text) == answer
    if kind == "bool":
        return _verdict(value) == answer
    return _segment_choice(value, options) == answer
