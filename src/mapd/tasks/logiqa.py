"""LogiQA: logical reading comprehension with four options (hub: lucasmccabe/logiqa)."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import (
    CHOICE_LETTERS, Example, Task, examples_from_rows, format_options, load_rows, require, require_options,
    require_text,
)


def _example(index: int, where: str, row: dict) -> Example:
    context = require_text(row, "context", where)
    query = require_text(row, "query", where)
    options = require_options(row, "options", where)
    correct = require(row, "correct_option", where)
    if not isinstance(correct, int) or isinstance(correct, bool) or not 0 <= correct < len(options):
        raise MapdError(f"{where}: field 'correct_option' is {correct!r}, expected 0..{len(options) - 1}")
    question = format_options(f"{context}\n{query}", options)
    return Example(id=str(row.get("id", index)), question=question, gold=CHOICE_LETTERS[correct], options=options)


def make(config: TaskConfig) -> Task:
    """The LogiQA task, from ``config.path`` or the hub (its train split is only on the hub)."""
    return Task(
        "logiqa",
        "choice",
        lambda split: examples_from_rows(load_rows("logiqa", config.path, split, "lucasmccabe/logiqa"), _example),
    )
