"""Convert the reference implementation's JSON files into mapd's artifacts (docs/formats.md).

The reference (github.com/zhuochunli/Learn-from-Committee) stores each round as JSON lists:
a "false" file of student mistakes, a feedback file with ``<teacher>_feedback`` texts and a
rationale file with ``<teacher>_rationale = [text, score_by_other1, score_by_other2]``. Its
committee is gpt, gemini and mistral; acceptance is recomputed here with mapd's own rule.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from mapd.config import ReviewConfig, TaskConfig
from mapd.errors import MapdError
from mapd.log import say
from mapd.io import check_folder, folder_lock, read_json
from mapd.layout import RoundLayout
from mapd.records import Feedback, Mistake, Rationale, Review, write_records
from mapd.stages.review import judged
from mapd.tasks import get_task
from mapd.tasks.base import CHOICE_LETTERS, KIND_NAMES, NUMBER_TEXT, bool_text, format_options, gold_problem, number_text

TASKS = ("svamp", "strategyqa", "gsm8k", "logiqa")
# The reference's committee, and the reviewers behind the two recorded scores of each one's rationale.
REVIEWERS = {"gpt": ("gemini", "mistral"), "gemini": ("gpt", "mistral"), "mistral": ("gpt", "gemini")}
TEACHERS = tuple(REVIEWERS)
NO_ANSWER = "absolute_wrong_final_ans"  # the reference's marker for "no answer found" (any case)


def _load(path: Path) -> list[dict]:
    """A reference JSON file: a list of objects."""
    data = read_json(path, list)
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise MapdError(f"{path}: record {index}: expected an object, got {type(record).__name__}")
    return data


def _field(record: dict, key: str, where: str, kinds: tuple[type, ...] = (str,)) -> Any:
    """``record[key]`` of one of the expected types, or a MapdError naming file, record and field."""
    if key not in record:
        raise MapdError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        expected = " or ".join(kind.__name__ for kind in kinds)
        raise MapdError(f"{where}: field '{key}' is {value!r}, expected {expected}")
    return value


def _choice(value: str, options: list, where: str, key: str) -> str:
    """An option index as written by the reference ("2") -> its letter ("C")."""
    if not value.strip().isdigit() or int(value) >= len(options):
        raise MapdError(f"{where}: field '{key}' is {value!r}, expected an option index 0..{len(options) - 1}")
    return CHOICE_LETTERS[int(value)]


def _mistake(task: str, record: dict, where: str, answer_kind: str) -> Mistake:
    """One record of a reference "false" file as a mistakes.jsonl record; a gold that is not of the task's
    answer kind (StrategyQA's true/false under svamp) is a MapdError naming file, record and field."""
    gold = _field(record, "gold_answer", where).strip()
    student = _field(record, "student_wrong_final_answer", where).strip()
    question = _field(record, "question", where).strip()
    options: list = []
    if task == "strategyqa":  # "true.\t<facts>"
        gold = bool_text(gold.split("\t", 1)[0].strip().rstrip("."), f"{where}: field 'gold_answer'")
    elif task == "gsm8k":  # the whole worked solution, ending in "#### <number>"
        if "####" not in gold:
            raise MapdError(f"{where}: field 'gold_answer' has no '#### <number>' final line")
        gold = gold.rsplit("####", 1)[1].replace(",", "").strip()
    elif task == "logiqa":  # context, question and options apart; answers are option indices
        options = [str(option).strip() for option in _field(record, "options", where, (list,))]
        question = format_options(f"{_field(record, 'context', where).strip()}\n{question}", options)
        gold = _choice(gold, options, where, "gold_answer")
    if answer_kind == "number" and NUMBER_TEXT.fullmatch(gold.replace(",", "")):
        gold = number_text(gold, where)  # "1,052.50" -> "1052.50"
    problem = gold_problem(gold, answer_kind)
    if problem is not None:
        raise MapdError(f"{where}: field 'gold_answer': {problem} (task {task} has answers that are "
                        f"{KIND_NAMES[answer_kind]})")
    if not question:
        raise MapdError(f"{where}: field 'question': blank")
    if student.lower() == NO_ANSWER:
        answer = None
    elif task == "strategyqa":
        answer = bool_text(student, f"{where}: field 'student_wrong_final_answer'")
    elif task == "logiqa":
        answer = _choice(student, options, where, "student_wrong_final_answer")
    else:
        answer = student
    return Mistake(id=str(_field(record, "id", where, (str, int))), question=question, gold=gold,
                   output=_field(record, "student_wrong_pred", where), answer=answer,
                   status="unparsed" if answer is None else "wrong")


def _id(record: dict, where: str, known: set[str]) -> str:
    id_ = str(_field(record, "id", where, (str, int)))
    if id_ not in known:
        raise MapdError(f"{where}: field 'id' is {id_!r}, which is not in the mistakes file")
    return id_


def _feedback(path: Path, known: set[str]) -> list[Feedback]:
    records = []
    for index, record in enumerate(_load(path)):
        where = f"{path}: record {index}"
        id_ = _id(record, where, known)
        for teacher in TEACHERS:
            text = _field(record, f"{teacher}_feedback", where)
            error = None if text.strip() else "empty in the reference file"
            records.append(Feedback(id=id_, teacher=teacher, text=text if error is None else None, error=error))
    return records


def _score(value: Any, where: str, key: str) -> int | None:
    """A recorded score: the number if it is an integer in 1..5, else None (invalid)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MapdError(f"{where}: field '{key}' holds the score {value!r}, expected a number")
    return int(value) if float(value).is_integer() and 1 <= value <= 5 else None


def _rationales(path: Path, golds: dict[str, str], answer_kind: str) -> list[Rationale]:
    records, config, known = [], ReviewConfig(), set(golds)
    for index, record in enumerate(_load(path)):
        where = f"{path}: record {index}"
        id_ = _id(record, where, known)
        for teacher, reviewers in REVIEWERS.items():
            key = f"{teacher}_rationale"
            entry = _field(record, key, where, (list,))
            if len(entry) != 1 + len(reviewers) or not isinstance(entry[0], str):
                raise MapdError(f"{where}: field '{key}' must be [rationale text, score, score]")
            scores = [_score(value, where, key) for value in entry[1:]]
            written = bool(entry[0].strip())  # an empty rationale was not reviewed
            reviews = [Review(reviewer=reviewer, score=score, raw=str(value))
                       for reviewer, score, value in zip(reviewers, scores, entry[1:])] if written else []
            records.append(judged(id_, teacher, entry[0] if written else None,
                                  None if written else "empty in the reference file", reviews,
                                  gold=golds[id_], answer_kind=answer_kind, config=config))
    return records


def import_reference(task: str, mistakes: Path, feedback: Path | None, rationale: Path | None,
                     out: RoundLayout, *, lock: bool = False) -> dict:
    """Write the round's ``mistakes.jsonl`` (and ``feedback.jsonl``, ``rationales.jsonl`` when given);
    return the record counts. Everything is converted and checked before anything is made; then ``lock``
    (``mapd import-reference``) holds the folder's lock while it writes."""
    if task not in TASKS:
        raise MapdError(f"--task: the reference data covers {', '.join(TASKS)}, not '{task}'")
    answer_kind = get_task(TaskConfig(name=task)).answer_kind
    mistake_records, known = [], set()
    for index, record in enumerate(_load(mistakes)):
        mistake_records.append(_mistake(task, record, f"{mistakes}: record {index}", answer_kind))
        if mistake_records[-1].id in known:
            raise MapdError(f"{mistakes}: record {index}: field 'id' repeats {mistake_records[-1].id!r}")
        known.add(mistake_records[-1].id)
    if not mistake_records:
        raise MapdError(f"{mistakes}: no mistakes (the list is empty)")
    # everything is converted (and checked) before anything is written
    artifacts: dict[str, tuple[Path, list]] = {"mistakes": (out.mistakes, mistake_records)}
    if feedback is not None:
        artifacts["feedback"] = (out.feedback, _feedback(feedback, known))
    if rationale is not None:
        golds = {mistake.id: mistake.gold for mistake in mistake_records}
        artifacts["rationales"] = (out.rationales, _rationales(rationale, golds, answer_kind))
    check_folder(out.dir, [path for path, _ in artifacts.values()])
    with folder_lock(out.dir) if lock else nullcontext():
        for path, records in artifacts.values():
            write_records(path, records)
    counts = {name: len(records) for name, (_, records) in artifacts.items()}
    if rationale is not None:
        counts["accepted"] = sum(record.accepted for record in artifacts["rationales"][1])
    say(f"imported into {out.dir}: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    return counts
