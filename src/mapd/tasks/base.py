"""What every task is: examples with a gold answer of one kind, loaded from a file or the hub."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapd.answers import LETTERS
from mapd.config import AnswerKind
from mapd.errors import MapdError
from mapd.io import read_jsonl_lines

CHOICE_LETTERS = LETTERS  # the option letters A-J, defined once in mapd.answers
NUMBER_TEXT = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


@dataclass(frozen=True)
class Example:
    """One question. ``gold`` is canonical: a number string, "true"/"false", or an option letter."""

    id: str
    question: str
    gold: str
    options: list[str] | None = field(default=None)


@dataclass(frozen=True)
class Task:
    """A benchmark: its name, answer kind and a loader of examples per split."""

    name: str
    answer_kind: AnswerKind
    loader: Callable[[str], list[Example]]

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """Load a split (its first ``limit`` examples); an empty split is an error, not an empty run."""
        if limit is not None and limit < 1:
            raise MapdError(f"task {self.name}: limit must be at least 1, got {limit}")
        examples = self.loader(split)
        if not examples:
            raise MapdError(f"task {self.name}: split '{split}' is empty")
        return examples[:limit]


def require(row: dict[str, Any], key: str, where: str) -> Any:
    """``row[key]``, or a MapdError naming the place and the missing field."""
    if key not in row or row[key] is None:
        raise MapdError(f"{where}: missing field '{key}'")
    return row[key]


def require_text(row: dict[str, Any], key: str, where: str) -> str:
    """``row[key]`` as stripped text; a missing, non-string or blank field is a MapdError."""
    value = require(row, key, where)
    if not isinstance(value, str) or not value.strip():
        raise MapdError(f"{where}: field '{key}' must be non-empty text, got {value!r}")
    return value.strip()


def require_options(row: dict[str, Any], key: str, where: str) -> list[str]:
    """``row[key]`` as a list of 2 to 10 option texts; anything else is a MapdError."""
    options = require(row, key, where)
    if not isinstance(options, list) or not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise MapdError(f"{where}: field '{key}' must be a list of 2 to {len(CHOICE_LETTERS)} options")
    return [str(option).strip() for option in options]


def number_text(value: Any, where: str) -> str:
    """A gold number (145, 145.0, "1,052.50", "-3") as text without separators or a trailing ".0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).replace(",", "").strip()
    if isinstance(value, bool) or not NUMBER_TEXT.fullmatch(text):
        raise MapdError(f"{where}: gold answer is {value!r}, expected a number")
    return text


def bool_text(value: Any, where: str) -> str:
    """A gold yes/no answer (bool, "true"/"yes", "false"/"no") as "true" or "false"."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in {"true", "yes"}:
        return "true"
    if text in {"false", "no"}:
        return "false"
    raise MapdError(f"{where}: gold answer is {value!r}, expected true or false")


KIND_NAMES = {"number": "numbers", "bool": "true or false", "choice": "option letters A-J"}


def gold_problem(gold: str, kind: AnswerKind) -> str | None:
    """Why ``gold`` is not a canonical gold answer of ``kind`` (what :func:`number_text`, :func:`bool_text`
    or an option letter give), or None when it is one."""
    if kind == "number":
        if NUMBER_TEXT.fullmatch(gold):
            return None
        try:
            fix = f": write {number_text(gold, '')}"
        except MapdError:
            fix = " (e.g. 42, -3.5 or 1/2)"
        return f"{gold!r} is not a number as mapd writes one{fix}"
    if kind == "bool":
        return None if gold in ("true", "false") else f"{gold!r} is not true or false"
    return None if len(gold) == 1 and gold in CHOICE_LETTERS else f"{gold!r} is not an option letter A-J"


def infer_answer_kind(golds: Iterable[str]) -> AnswerKind:
    """The answer kind of gold answers when no task says it: ``bool`` when every gold is true or false,
    ``choice`` when every gold is one option letter (either case, surrounding space ignored), else ``number``."""
    values = {str(gold).strip() for gold in golds}
    if values and {value.lower() for value in values} <= {"true", "false"}:
        return "bool"
    if values and all(len(value) == 1 and value.upper() in CHOICE_LETTERS for value in values):
        return "choice"
    return "number"


def check_mistakes(path: str | Path, mistakes: list, kind: AnswerKind, task: str) -> None:
    """MapdError ``file:line: field '...': ...`` for the first mistake (as ``mapd.records.read_mistakes``
    reads them: one per non-blank line) whose gold is not of the task's answer kind or whose question
    is blank."""
    for index, mistake in enumerate(mistakes):
        problem = gold_problem(mistake.gold, kind)
        if problem is not None:
            problem = f"field 'gold': {problem} (task {task} has answers that are {KIND_NAMES[kind]})"
        elif not mistake.question.strip():
            problem = "field 'question': blank"
        if problem is not None:
            line = [number for number, _ in read_jsonl_lines(path)][index]
            raise MapdError(f"{path}:{line}: {problem}")


def format_options(question: str, options: list[str]) -> str:
    """Question text followed by lettered options, as every choice prompt shows them."""
    lines = [question, ""] + [f"{CHOICE_LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines)


def load_rows(task: str, path: str | None, split: str, hub_id: str | None = None, hub_config: str | None = None):
    """Rows of a split with a location label per row, from local JSONL or the hub.

    Yields ``(where, row)`` where ``where`` names the file and line (or hub split and
    row) so that a bad row can be reported precisely.
    """
    if path is not None:
        base = Path(path)
        file = base / f"{split}.jsonl" if base.is_dir() else base
        if not file.exists():
            raise MapdError(f"task {task}: no data file {file} for split '{split}'")
        return [(f"{file}:{number}", row) for number, row in read_jsonl_lines(file)]
    if hub_id is None:
        raise MapdError(f"task {task}: set task.path to a local JSONL file or folder")
    from datasets import load_dataset  # imported lazily: slow, and unused for local files

    try:
        dataset = load_dataset(hub_id, hub_config, split=split)
    except Exception as exc:  # network, unknown split, missing dataset: report in one line
        raise MapdError(f"task {task}: cannot load {hub_id} split '{split}' from the hub: {exc}") from exc
    return [(f"{hub_id}[{split}] row {index}", row) for index, row in enumerate(dataset)]


def examples_from_rows(rows: Iterable[tuple[str, dict[str, Any]]], convert) -> list[Example]:
    """Convert located rows with ``convert(index, where, row) -> Example``; ids must be unique."""
    examples, seen = [], set()
    for index, (where, row) in enumerate(rows):
        example = convert(index, where, row)
        if example.id in seen:
            raise MapdError(f"{where}: duplicate id '{example.id}'")
        seen.add(example.id)
        examples.append(example)
    return examples
