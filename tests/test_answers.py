"""mapd.answers: unit tests of the API, and accuracy on the labelled sample of real model outputs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from mapd.answers import Extraction, extract, is_correct, unfinished

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
        ("Answer:\nYou would have 2,190 cookies (53 bags x 41", "2190", "a headline the cut did not reach"),
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


# --- cut-off texts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "complete", "answer", "why"),
    [
        ("To find the total distance, we sum the distances: \\[ 1", "number", None, None, "cut inside a formula"),
        ("So the time is \\[ t = \\frac{10", "number", None, None, "cut inside a fraction"),
        ("So, 400 pounds * 4 = 1600 pounds of laundry Sarah does.", "number", False, None,
         "the last sentence of cut-off working is no commitment"),
        ("So, 400 pounds * 4 = 1600 pounds of laundry Sarah does.", "number", True, "1600", "finished: it is"),
        ("The answer is 9.\n\nLet's verify: 18 / 2 =", "number", False, "9", "a marker before the cut"),
        ("The total is \\boxed{12} apples.\n\nTo check, we", "number", False, "12", "a closed box before the cut"),
        ("Answer: 9 (61 - 52", "number", None, "9", "a headline whose value the cut did not reach"),
        ("Answer: Helen baked 46 cookies and 66 today, so she baked 20", "number", False, None,
         "cut off right after the number: it may be shortened"),
        ("The total cost is 500 + 294 = 794 dollars.\n\n\\boxed{79", "number", None, "794",
         "cut inside the final box: the conclusion before it counts"),
        ("Therefore, the total is \\[ 500 + 294 = 794 \\text{ dollars} \\]\n\nThe answer is 7", "number", False,
         "794", "cut inside the final marker"),
        ("The total cost is 500 + 294 = 794 dollars.\n\n\\boxed{12", "number", None, None,
         "a shortened box that disagrees with the conclusion"),
        ("So, Lewis pays $501,184 as rent.\n\nThe answer is \\(\\boxed", "number", False, "501184",
         "cut right after opening the final box"),
        ("We know 3 + 4 = 7 apples.\n\nThe answer is 12", "number", False, None, "a shortened marker, no conclusion"),
        ("It is not edible.\n\nThe answer is false", "bool", False, "false", "a whole verdict word before the cut"),
        ("No, the Pope would not appear on the show because", "bool", False, "false", "a verdict-led line"),
        ("Explanation: False. The virus is absent there.\n\nTrue or False: Zika can be prevented by insect", "bool",
         False, "false", "a verdict after a label"),
        (" Jerry added 11 action figures to the shelf.\n\nHere's the logic behind this:\n\n1. He started with 7 (as "
         "there are 10 fewer than 1", "number", None, "11", "an answer stated first, before the reasoning"),
        ("Let's think. The Pope is", "bool", False, None, "no verdict before the cut"),
        ("Let's look at each option:\n\nOption A: Jiushang is east.\nOption C: Jiushang Station is adjacent to "
         "Haoyun Station and west of Ha", "choice", None, None, "cut off going through the options"),
        ("A. F and W\nB. G and Y\nC. I and W\nD. I\n\nThe answer is indeed D. Most of the losses caused by",
         "choice", False, "D", "a marker before the cut"),
        ("The answer is A. Not to steal.\n\nThe correct answer is A.\n\nThe correct answer is B.\n\nThe correct "
         "answer is C. The", "choice", False, None, "runs through the options"),
    ],
)
def test_cut_off(text: str, kind: str, complete: bool | None, answer: str | None, why: str) -> None:
    result = extract(text, kind, OPTIONS if kind == "choice" else None, complete=complete)
    assert result.answer == answer, why
    if answer is None:
        assert result.status == ("unparsed" if complete else "truncated"), why


@pytest.mark.parametrize(
    ("text", "cut"),
    [
        ("So the answer is \\[ 1", True),
        ("x = \\frac{10", True),
        ("Now, we can multiply", True),
        ("So, we", True),
        ("Then we add 3 +", True),
        ("1. First, 3 + 4 = 7.\n2.", True),
        ("Option C: Jiushang Station is adjacent to Haoyun Station and west of Ha", True),
        ("You would have 2,190 cookies (53 bags x 41", True),
        ("The answer is 7.", False),
        ("53 inches", False),
        ("x = 4", False),
        ("Answer: Helen baked 46 cookies yesterday and 66 today, so she baked 20", False),
        ("168 pieces of gum + 84 pieces of candy = 504 pieces total", False),
        ("4. Therefore, the number of emails in the evening must be 10 - 9 = 1 email", False),
        ("4. **Calculate the time", True),
        ("```python\ntotal = 7 +", True),
        ("D. I is on the northernmost side of the island", False),
        ("The answer is B. If humans plunder", True),
        ("\\[ 3 + 4 = 7 \\]", False),
        ("The answer is \\boxed{7}", False),
        ("**No**", False),
    ],
)
def test_unfinished(text: str, cut: bool) -> None:
    assert unfinished(text) is cut


def test_truncated_status_only_for_cut_off_texts() -> None:
    assert extract("Let's start by adding 3 and", "number", complete=False).status == "truncated"
    assert extract("I cannot answer this question.", "number", complete=True).status == "unparsed"
    assert extract("", "number", complete=False).status == "unparsed"
    assert extract("The answer is 5.", "number", complete=False) == Extraction("5", "ok", False)


# --- choices: boxed letters and restated options ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Checking each premise in turn.\n\n\\boxed{D}", "D"),
        ("The answer is \\boxed{B}.", "B"),
        ("The answer is \\boxed{\\text{C}}", "C"),
        ("The answer is indeed D.", "D"),
        ("A. Some managers do not drink coffee.\nB. All managers attend.\nC. No one drinks tea.\nD. Every employee.\n\n"
         "The correct answer is D. Every employee drinks coffee.", "D"),
        ("A. Some managers do not drink coffee.\nB. All managers attend.\nC. No one drinks tea.\nD. Every employee.",
         None),
        ("The correct answer is A.\n\nThe correct answer is B.\n\nThe correct answer is C.", None),
        ("The answer is A. Some managers do not drink coffee.\nB. All managers attend.\nC. No one drinks tea.", None),
        ("The most suitable conclusion is:\n\nC. No one who attends the Monday meeting drinks tea.", "C"),
    ],
)
def test_choice_boxed_and_lists(text: str, answer: str | None) -> None:
    assert extract(text, "choice", OPTIONS).answer == answer


def test_bool_markers_that_disagree_commit_to_none() -> None:
    assert extract("The answer is false.\n\nThe answer is true.\n\nThe answer is true.", "bool").answer is None
    assert extract("The answer is false.\n\nThe answer is false because ...", "bool").answer == "false"


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


# --- the cut-off set: SmolLM2 / Qwen outputs on four tasks at two token limits ---------------------------


def _cutoff_bench():
    spec = importlib.util.spec_from_file_location("answers_cutoff", REPO / "bench" / "answers_cutoff.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_cutoff_set_is_what_the_docs_say() -> None:
    """At least 200 texts over four tasks, two models and two token limits, a third or more cut off, each
    labelled with a reason; the dev/holdout split is the seeded one; labels are canonical answers."""
    bench = _cutoff_bench()
    records = bench.load_set()
    assert len(records) >= 200
    assert {r["task"] for r in records} == set(bench.TASKS)
    assert {r["model"] for r in records} == set(bench.MODELS)
    assert len({r["max_new_tokens"] for r in records}) >= 2
    assert sum(r["cut_off"] for r in records) >= len(records) / 3
    assert len({(r["model"], r["max_new_tokens"], r["task"], r["ref_id"]) for r in records}) == len(records)
    kinds = {"gsm8k": "number", "svamp": "number", "strategyqa": "bool", "logiqa": "choice"}
    for r in records:
        assert r["kind"] == kinds[r["task"]] and r["why"], r
        assert r["sample"] == bench.sample_of(r), r
        assert r["output_tokens"] <= r["max_new_tokens"], r
        assert r["output_tokens"] == r["max_new_tokens"] or not r["cut_off"], r
        if r["label"] is not None:
            assert extract(f"The answer is {r['label']}.", r["kind"]).answer == r["label"], r
    assert {"dev", "holdout"} <= {r["sample"] for r in records} <= {"dev", "holdout", "holdout2"}


def test_cutoff_set_is_the_seeded_draws(shared) -> None:
    """Every text answers a question of the seeded draw for its model, limit and task: nothing picked."""
    spec = importlib.util.spec_from_file_location("answers_collect", REPO / "bench" / "answers_collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    records = _cutoff_bench().load_set()
    for (model, limit, task) in {(r["model"], r["max_new_tokens"], r["task"]) for r in records}:
        mine = {r["ref_id"]: r for r in records if (r["model"], r["max_new_tokens"], r["task"]) == (model, limit, task)}
        drawn = collect.draw(task, model, limit, len(mine))
        assert sorted(str(row["id"]) for row in drawn) == sorted(mine), (model, limit, task)
        for row in drawn:
            assert collect.question_of(task, row)[1] == mine[str(row["id"])]["gold"]


def test_cutoff_accuracy(shared) -> None:
    """Agreement with the person's labels: >= 95 % overall, >= 90 % for each model and task, above the
    naive rule; the held-out part (never read while writing the rules) is reported beside it."""
    bench = _cutoff_bench()
    rows, misses = bench.measure(bench.load_set(), bench.load_options(shared / "data"))
    print("\n" + bench.table(rows, ["all", "dev", "holdout", *(f"{m}/{t}" for m in bench.MODELS for t in bench.TASKS)]))
    n, naive_right, ours_right = rows["all"]
    assert ours_right / n >= 0.95, [(m["model"], m["task"], m["ref_id"]) for m in misses]
    assert naive_right < ours_right
    for model in bench.MODELS:
        for task in bench.TASKS:
            n, _, ours_right = rows[f"{model}/{task}"]
            assert ours_right / n >= 0.90, (model, task, rows[f"{model}/{task}"])


def test_collection_questions_are_the_pipelines(shared) -> None:
    """bench/answers_collect.py reads the data files itself; its questions and golds must be the pipeline's."""
    spec = importlib.util.spec_from_file_location("answers_collect", REPO / "bench" / "answers_collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    from mapd.config import TaskConfig
    from mapd.tasks import get_task

    for task in collect.TASKS:
        examples = {e.id: e for e in get_task(TaskConfig(name=task, path=str(shared / "data" / task))).load("test")}
        for row in collect.draw(task, "qwen", 96, 3):
            question, gold = collect.question_of(task, row)
            assert (question, gold) == (examples[str(row["id"])].question, examples[str(row["id"])].gold), task


@pytest.mark.parametrize("text, answer", [
    ("Explanation: False. The Pope cannot marry.", "false"),
    ("Reasoning: Yes, dolphins can swim.\nThey live in water", "true"),
])
def test_a_verdict_after_a_label_is_read_alike_in_a_complete_and_a_cut_text(text, answer):
    """The yes/no verdict steps are written once (answers._explicit_verdict): a finished text and one that was
    cut off read a label-led verdict ("Explanation: False. ...") the same way."""
    assert extract(text, "bool").answer == answer
    assert extract(text, "bool", complete=True).answer == answer
    assert extract(text, "bool", complete=False).answer == answer
