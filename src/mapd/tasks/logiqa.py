"""LogiQA: logical reading comprehension with four options (hub: lucasmccabe/logiqa)."""

from mapd.errors import MapdError
from mapd.tasks.base import CHOICE_LETTERS, Example, Task, TaskConfig, examples_from_rows, format_options, load_rows, require


def _example(index: int, where: str, row: dict) -> Example:
    context = require(row, "context", where).strip()
    query = require(row, "query", where).strip()
    options = require(row, "options", where)
    correct = require(row, "correct_option", where)
    if not isinstance(options, list) or len(options) < 2:
        raise MapdError(f"{where}: field 'options' must be a list of at least two options")
    if not isinstance(correct, int) or not 0 <= correct < len(options):
        raise MapdError(f"{where}: field 'correct_option' is {correct!r}, expected 0..{len(options) - 1}")
    options = [str(option).strip() for option in options]
    question = format_options(f"{context}\n{query}", options)
    return Example(id=str(row.get("id", index)), question=question, gold=CHOICE_LETTERS[correct], options=options)


def make(config: TaskConfig) -> Task:
    """The LogiQA task, from ``config.path`` or the hub (its train split is only on the hub)."""
    return Task(
        "logiqa",
        "choice",
        lambda split: examples_from_rows(load_rows("logiqa", config.path, split, "lucasmccabe/logiqa"), _example),
    )
