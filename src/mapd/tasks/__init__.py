"""Tasks: the four benchmarks of the paper, your own JSONL, and reasoning-gym generators."""

from mapd.errors import MapdError
from mapd.tasks import gsm8k, jsonl, logiqa, strategyqa, svamp
from mapd.tasks import reasoning_gym as reasoning_gym_task
from mapd.config import AnswerKind, TaskConfig, unknown_task
from mapd.tasks.base import Example, Task

BENCHMARKS = {"gsm8k": gsm8k.make, "svamp": svamp.make, "strategyqa": strategyqa.make, "logiqa": logiqa.make}


def get_task(config: TaskConfig) -> Task:
    """The task named by ``config.name``; an unknown name is a MapdError listing the known ones."""
    if config.name in BENCHMARKS:
        return BENCHMARKS[config.name](config)
    if config.name == "jsonl":
        return jsonl.make(config)
    if config.name.startswith("reasoning_gym:"):
        return reasoning_gym_task.make(config, config.name.split(":", 1)[1])
    raise MapdError(unknown_task(config.name) or f"task.name: {config.name!r} has no loader")


__all__ = ["AnswerKind", "Example", "Task", "TaskConfig", "get_task"]
