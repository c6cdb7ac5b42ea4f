"""SVAMP: one- and two-step arithmetic word problems with a numeric answer (hub: ChilleD/SVAMP)."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import Example, Task, examples_from_rows, load_rows, number_text, require_text


def _example(index: int, where: str, row: dict) -> Example:
    key = next((key for key in ("question", "question_concat") if row.get(key) is not None), None)
    if key is None:  # the original SVAMP layout
        question = f"{require_text(row, 'Body', where)} {require_text(row, 'Question', where)}"
    else:
        question = require_text(row, key, where)
    gold = row.get("final", row.get("Answer"))
    if gold is None:
        raise MapdError(f"{where}: missing field 'final' (or 'Answer')")
    return Example(id=str(row.get("id", row.get("ID", index))), question=question, gold=number_text(gold, where))


def make(config: TaskConfig) -> Task:
    """The SVAMP task, from ``config.path`` or the hub."""
    return Task(
        "svamp", "number", lambda split: examples_from_rows(load_rows("svamp", config.path, split, "ChilleD/SVAMP"), _example)
    )
