"""Your own JSONL file: name the question, answer, options and id fields and the answer kind."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import (
    CHOICE_LETTERS, Example, Task, bool_text, examples_from_rows, format_options, load_rows, number_text,
    require, require_options, require_text,
)


def _choice_letter(gold, options: list[str], where: str, field: str) -> str:
    """A gold choice given as a letter, a 0-based index or the option's text, as a letter."""
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(options):
        return CHOICE_LETTERS[gold]
    text = str(gold).strip()
    if len(text) == 1 and text.upper() in CHOICE_LETTERS[: len(options)]:
        return text.upper()
    for index, option in enumerate(options):
        if text.lower() == str(option).strip().lower():
            return CHOICE_LETTERS[index]
    raise MapdError(f"{where}: field '{field}' is {gold!r}: not a letter, index or text of one of the options")


def make(config: TaskConfig) -> Task:
    """A task over local JSONL data with user-named fields."""
    if config.path is None:
        raise MapdError("task jsonl: set task.path to your JSONL file or a folder of <split>.jsonl files")
    kind = config.answer_kind or "number"
    if kind == "choice" and not config.options_field:
        raise MapdError("task jsonl: answer_kind 'choice' needs task.options_field")

    def convert(index: int, where: str, row: dict) -> Example:
        question = require_text(row, config.question_field, where)
        gold = require(row, config.answer_field, where)
        options = None
        if kind == "choice":
            options = require_options(row, config.options_field, where)
            gold = _choice_letter(gold, options, where, config.answer_field)
            question = format_options(question, options)
        elif kind == "bool":
            gold = bool_text(gold, where)
        else:
            gold = number_text(gold, where)
        example_id = str(require(row, config.id_field, where)) if config.id_field else str(index)
        return Example(id=example_id, question=question, gold=gold, options=options)

    return Task("jsonl", kind, lambda split: examples_from_rows(load_rows("jsonl", config.path, split), convert))
