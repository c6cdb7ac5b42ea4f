"""mapd.answers: unit tests of the API, and accuracy on the labelled sample of real model outputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from mapd.answers import Extraction, extract, is_correct

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MAPD_REFERENCE_DATA", REPO.parent / "shared" / "reference-data"))


# --- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("The answer is 145.", "145"),
        ("So each box holds 1,052 pens. The answer is 1,052.", "1052"),
        ("The answer is $1,234.50.", "1234.5"),
        ("The answer is €12.", "12"),
        ("The answer is £ 7.", "7"),
        ("She pays $ 17 in total. The answer is $ 17.", "17"),
        ("The answer is 25%.", "25"),
        ("The answer is 3.0.", "3"),
        ("The answer is 0.50.", "0.5"),
        ("The answer is -3.", "-3"),
        ("The difference is 9,976 - 21,844 = -$11,868. The answer is -$11,868.", "-11868"),
        ("The answer is 1/3.", "1/3"),
        ("The answer is **12**.", "12"),
        ("The answer is \\boxed{42}.", "42"),
        ("The answer is \\boxed{\\frac{1}{2}}.", "0.5"),
        ("The answer is twelve.", "12"),
        ("The answer is 5kg.", "5"),
        ("Final answer: 7", "7"),
        ("The answer is: 57 + 26 + 27 = 110", "110"),
    ],
)
def test_number_marker(text: str, answer: str) -> None:
    assert extract(text, "number").answer == answer


@pytest.mark.parametrize(
    ("text", "answer", "why"),
    [
        ("Answer: Bob has 20 apples.\n\nExplanation:\nAdam has 4 + 4 = 8 apples.\nBob has 16 + 6 = 22", "20",
         "a headline answer beats later working"),
        ("Answer: 412 - 90 = 322\n\nExplanation:\nHe lost 412 - 20 = 392", "322", "headline equation"),
        ("Answer:\nThe total is:\n57 + 26 + 27 = 100", "100", "a headline that ends with a colon"),
        ("Answer:\nLet's start.\nTotal = 610769 + 66554\n= 677323", "677323", "'Answer:' only heads working"),
        ("Therefore, each group has 145 bananas.\nNote: the oranges give 87 / 93 = 0.92.", "145",
         "a concluding sentence beats a later note"),
        ("The bananas: 290 / 2 = 145 per group. So Marco's strawberries weighed 19 pounds.", "19",
         "concluding sentence"),
        ("Each friend gets 2 + 3 = 5 cookies. Therefore, each group has 145 bananas.", "145", "conclusion"),
        ("Therefore, they made $6 per day in the first 20 days.", "6", "the first number of the conclusion"),
        ("Since he got 3 emails in the afternoon, the number he got in the afternoon is 3.", "3",
         "a leading subordinate clause is skipped"),
        ("Therefore, Matthew gave each of his 3 friends 2 crackers.", "2", "'his 3 friends' names a group"),
        ("Jill has 19 - 12 = 7 peaches.\nJake has 7 + 72 = 79 peaches.", "79", "a chain of steps"),
        ("3 + x = 8 + x\n2x = 8\nx = 4", "4", "solved for x"),
        ("He has 5 apples, x 2 makes 10 apples in total.", "10", "'x 2' is a multiplication"),
        ("A) 728 sacks\nB) 1,052 sacks\nC) 1,304 sacks\n\nAnswer: B)", "1052", "its own lettered options"),
        ("Josh now has 42 marbles. (22 marbles + 20 marbles = 42 marbles)", "42", "parenthetical working"),
        ("You would have 2,190 cookies (53 bags x 41", "2190", "a cut-off parenthesis"),
        ("Therefore, she has 15 apples.\n\nHow many apples does she have after giving 3 away?", "15",
         "a trailing question is not an answer"),
        ("53 inches", "53", "a bare answer"),
        ("Jessie now weighs 51 kilograms. To find this, subtract the weight she lost (20 kg) from her weight (71 kg).",
         "51",
         "a closing remark after the answer"),
        (" Allan brought 8 balloons.\n\nHere's the logic behind this:\n1. He had 5\n2. He bought 3", "8",
         "an answer stated before 'Here's the logic'"),
        ("Ryan spends 7/2 = 3.5 hours.\nSo, 3.5 hours/day - 2 hours/day = 1.5", "1.5", "decimals"),
        ("**Therefore, there are 926 pupils in that school.**", "926", "bold conclusion"),
    ],
)
def test_number_commitment(text: str, answer: str, why: str) -> None:
    assert extract(text, "number").answer == answer, why


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   \n ", "blank"),
        ("I cannot answer this question from the provided context.", "refusal"),
        ("There is no way to know without more details.", "no number at all"),
        ("If you have 104", "cut off restating the question"),
        ("Haley grew 9 trees in her backyard.\nAfter a typhoon, 4 of the trees died.\nThen, Haley grew 5", "narration"),
        ("Answer:\nMath homework: 8 pages\nBiology homework: 3", "a list of parts, never combined"),
        ("6 hours/day x 5 days = 30 hours on English\n7 hours/day x 5 days = 35", "parallel partial results"),
        ("Therefore, each person would eat 14 crackers and 15 cakes.", "two quantities"),
        ("It takes between 5 and 10 days.", "a range"),
        ("Total seats = 95 x 118 = 11,110\nWe cannot determine the number of students from this.", "declines"),
        ("So, the equation is:\nx - 8 = 40", "an equation set up but never solved"),
    ],
)
def test_number_unparsed(text: str, why: str) -> None:
    result = extract(text, "number")
    assert result == Extraction(None, "unparsed", False), why


def test_strict_only_for_the_requested_final_line() -> None:
    assert extract("3 + 4 = 7.\nThe answer is 7.", "number").strict
    assert extract("The answer is **7**", "number").strict
    assert extract("The answer is \\boxed{7}.", "number").strict
    assert not extract("The answer is 7. Let me double-check: 3 + 4 = 7.", "number").strict
    assert not extract("Answer: 7", "number").strict
    assert not extract("So she has 7 apples.", "number").strict
    assert extract("the answer is false.", "bool").strict
    assert extract("The answer is C.", "choice").strict


# --- yes / no -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Yes, a pound sterling is valuable.", "true"),
        ("No, the Pope would not appear on that show.", "false"),
        ("the answer is no", "false"),
        ("The answer is True.", "true"),
        ("False.", "false"),
        ("**No**", "false"),
        ("Answer: False\n\nExplanation: Toilet paper is made from trees, which is true.", "false"),
        ("My answer: True", "true"),
        ("False. A bowling pin is not a weapon. Therefore, the answer is false.", "false"),
        ("Hint: it is not possible.\n\nAnswer: Yes", "true"),
        ("Explanation: grapes are the main ingredient. Therefore, the answer is true.", "true"),
        ("True or False: Grapes are essential.\n\nExplanation: ... Therefore, the statement is true.", "true"),
        ("I believe this is true because pickling preserves food.", "true"),
        ("Therefore, it is false to say that Hawaii cuisine is vegan.", "false"),
        ("The statement is not true.", "false"),
        ("The answer is \\boxed{\\text{no}}.", "false"),
        ("True or False: A recipe can be made with The Onion.\n\nExplanation: It is a satirical website. "
         "Therefore, it is unlikely that a delicious recipe could be made with The Onion.", "false"),
        ("Overall, while his height could help, his age would likely make it difficult for him to compete.", "false"),
        ("Therefore, it is possible that Fitzgerald was influenced by Orwell, even if he did not say so.", "true"),
    ],
)
def test_bool(text: str, answer: str) -> None:
    assert extract(text, "bool").answer == answer


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Yes and no.", "both, no commitment"),
        ("It depends on the season.", "no verdict"),
        ("Hint: Think about the size of the bee hummingbird.", "a hint only"),
        ("I will give you a hint: it's not possible to swim to Miami from New York.", "a hint to the reader"),
        ("True or False: An astronomer is interested in drosophila.", "the question restated"),
        ("Is it true? Please answer \"true\" or \"false\" and explain your reasoning.", "a quiz for the reader"),
        ("True or False: Breakdancing is safe.\n\nExplanation: It stresses tendons. Therefore, it is not "
         "recommended.\n\nPlease provide your answer and explanation.", "asks the reader for the answer"),
        ("Answer: _____________", "a blank template"),
    ],
)
def test_bool_unparsed(text: str, why: str) -> None:
    assert extract(text, "bool").answer is None, why


# --- choices (LogiQA-style, hand-written: there is no recorded LogiQA output) ---------------------------

OPTIONS = [
    "Some managers do not drink coffee.",
    "All managers attend the Monday meeting.",
    "No one who attends the Monday meeting drinks tea.",
    "Every employee drinks coffee.",
]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Premise 1 says every manager attends. Premise 2 rules out tea. Therefore, the answer is (C).", "C"),
        ("Answer: B", "B"),
        ("**Answer: (A)**\n\nOption A follows because some managers skip coffee.", "A"),
        ("Option D would weaken the argument the most. So the correct option is D.", "D"),
        ("A and C are both tempting, but only one follows. The answer is C.", "C"),
        ("Checking each option in turn, B is correct.", "B"),
        ("The answer is: all managers attend the Monday meeting.", "B"),
        ("If the premises hold, then it must be true that no one who attends the Monday meeting drinks tea.", "C"),
        ("Options A and B fail. The conclusion follows from option C. The answer is option C.", "C"),
        ("A manager who drinks tea cannot attend, so the assumption is option A.", "A"),
    ],
)
def test_choice(text: str, answer: str) -> None:
    assert extract(text, "choice", OPTIONS).answer == answer


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("I cannot determine which option is correct.", "no option named"),
        ("The answer is E.", "E is not one of four options"),
        ("A manager attends the meeting on Mondays.", "'A' is an article here"),
        ("", "empty"),
    ],
)
def test_choice_unparsed(text: str, why: str) -> None:
    assert extract(text, "choice", OPTIONS).answer is None, why


def test_choice_without_options_accepts_letters_up_to_j() -> None:
    assert extract("The answer is (H).", "choice").answer == "H"


# --- is_correct and the API -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "gold", "kind", "expected"),
    [
        ("145", "145", "number", True),
        ("145", "145.0", "number", True),
        ("1052", "1,052", "number", True),
        ("$1,052", "1052", "number", True),
        ("0.50", "0.5", "number", True),
        ("25", "25%", "number", True),
        ("-3", "-3.00", "number", True),
        ("1/2", "0.5", "number", True),
        ("0.33", "1/3", "number", False),
        ("144.9999", "145", "number", False),
        ("146", "145", "number", False),
        (None, "145", "number", False),
        ("abc", "145", "number", False),
        ("true", "true", "bool", True),
        ("yes", "true", "bool", True),
        ("false", "false.\tPer capita, Hawaiians eat a lot of Spam.", "bool", True),
        ("true", "false", "bool", False),
        (None, "false", "bool", False),
        ("C", "C", "choice", True),
        ("(C)", "c", "choice", True),
        ("B", "C", "choice", False),
        (None, "A", "choice", False),
    ],
)
def test_is_correct(answer: str | None, gold: str, kind: str, expected: bool) -> None:
    assert is_correct(answer, gold, kind) is expected


def test_api_contract() -> None:
    result = extract("The answer is 5.", "number")
    assert result == Extraction("5", "ok", True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.answer = "6"  # type: ignore[misc]
    with pytest.raises(ValueError):
        extract("The answer is 5.", "date")
    with pytest.raises(ValueError):
        is_correct("5", "5", "date")
    unparsed = extract("no idea", "number")
    assert (unparsed.answer, unparsed.status, unparsed.strict) == (None, "unparsed", False)


def test_extracted_numbers_compare_with_gold() -> None:
    answer = extract("Each group holds $1,052.50, so the answer is $1,052.50.", "number").answer
    assert answer == "1052.5" and is_correct(answer, "1052.50", "number")


# --- the labelled sample of real outputs ----------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("answers_accuracy", REPO / "bench" / "answers_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def labelled():
    if not REFERENCE.is_dir():
        pytest.skip(f"the reference data ({REFERENCE}) is absent: the labelled texts are read from there")
    bench = _bench()
    return bench, bench.load_labels(), bench.load_texts(REFERENCE)


def test_labels_are_the_seeded_draws(labelled) -> None:
    """The labelled texts are exactly the seeded random draws plus the marked extras: nothing cherry-picked."""
    bench, labels, texts = labelled
    extra = {(x["source"], x["ref_id"]) for x in labels if x["sample"] == "extra"}
    draws = bench.draws(REFERENCE, extra)
    for name, refs in draws.items():
        assert sorted(refs) == sorted((x["source"], x["ref_id"]) for x in labels if x["sample"] == name), name
    assert len(labels) == len({(x["source"], x["ref_id"]) for x in labels})
    for x in labels:
        assert (x["source"], x["ref_id"]) in texts
        assert x["kind"] == ("bool" if x["source"] == "strategyqa_student" else "number")
        assert x["label"] is None or x["label"] == (extract(f"The answer is {x['label']}.", x["kind"]).answer)


def test_labelled_accuracy(labelled) -> None:
    """Ours is right on >= 95% of each group and beats the naive rule (last number; first true/false)."""
    bench, labels, texts = labelled
    rows, misses = bench.measure(labels, texts)
    print("\n" + bench.table(rows, list(bench.GROUPS) + [f"svamp_rationale:{t}" for t in bench.TEACHERS]))
    for group in bench.GROUPS:
        row = rows[group]
        assert row.n >= 60
        assert row.ours_rate >= 0.95, (group, row, [(m["source"], m["ref_id"]) for m in misses])
        assert row.naive_rate < row.ours_rate, (group, row)
    assert sum(rows[g].n for g in bench.GROUPS) >= 150
