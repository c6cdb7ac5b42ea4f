"""GSM8K: grade-school math word problems with a numeric answer (hub: openai/gsm8k, config main)."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import Example, Task, examples_from_rows, load_rows, number_text, require_text


def _example(index: int, where: str, row: dict) -> Example:
    question = require_text(row, "question", where)
    gold = row.get("final")
    if gold is None:  # hub format: the solution ends with "#### <answer>"
        solution = require_text(row, "answer", where)
        if "####" not in solution:
            raise MapdError(f"{where}: field 'answer' has no '#### <number>' final line")
        gold = solution.rsplit("####", 1)[1]
    return Example(id=str(row.get("id", index)), question=question, gold=number_text(gold, where))


def make(config: TaskConfig) -> Task:
    """The GSM8K task, from ``config.path`` or the hub."""
    return Task(
        "gsm8k",
        "number",
        lambda split: examples_from_rows(load_rows("gsm8k", config.path, split, "openai/gsm8k", "main"), _example),
    )
