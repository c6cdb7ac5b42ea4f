"""SVAMP: one- and two-step arithmetic word problems with a numeric answer (hub: ChilleD/SVAMP)."""

from mapd.errors import MapdError
from mapd.tasks.base import Example, Task, TaskConfig, examples_from_rows, load_rows, require


def _number_text(value) -> str:
    """145.0 -> "145"; other values as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _example(index: int, where: str, row: dict) -> Example:
    question = row.get("question") or row.get("question_concat")
    if question is None:  # the original SVAMP layout
        question = f"{require(row, 'Body', where).strip()} {require(row, 'Question', where).strip()}"
    gold = row.get("final", row.get("Answer"))
    if gold is None:
        raise MapdError(f"{where}: missing field 'final' (or 'Answer')")
    return Example(id=str(row.get("id", row.get("ID", index))), question=question.strip(), gold=_number_text(gold))


def make(config: TaskConfig) -> Task:
    """The SVAMP task, from ``config.path`` or the hub."""
    return Task(
        "svamp", "number", lambda split: examples_from_rows(load_rows("svamp", config.path, split, "ChilleD/SVAMP"), _example)
    )
