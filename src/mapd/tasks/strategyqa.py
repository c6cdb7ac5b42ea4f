"""StrategyQA: yes/no questions that need implicit multi-step reasoning (hub: ChilleD/StrategyQA)."""

from mapd.config import TaskConfig
from mapd.tasks.base import Example, Task, bool_text, examples_from_rows, load_rows, require, require_text


def _example(index: int, where: str, row: dict) -> Example:
    question = require_text(row, "question", where)
    gold = bool_text(require(row, "answer", where), where)
    return Example(id=str(row.get("id", row.get("qid", index))), question=question, gold=gold)


def make(config: TaskConfig) -> Task:
    """The StrategyQA task, from ``config.path`` or the hub."""
    return Task(
        "strategyqa",
        "bool",
        lambda split: examples_from_rows(load_rows("strategyqa", config.path, split, "ChilleD/StrategyQA"), _example),
    )
