"""reasoning-gym generators (``reasoning_gym:<dataset>``): procedurally made questions, no download."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import Example, Task, bool_text, number_text


def make(config: TaskConfig, dataset: str) -> Task:
    """A task whose splits are generated: train with ``config.seed``, any other split with seed + 1."""
    try:
        import reasoning_gym
    except ImportError:  # pragma: no cover - it is a dependency
        raise MapdError("task reasoning_gym: the reasoning-gym package is not installed") from None

    kind = config.answer_kind or "number"
    if kind == "choice":
        raise MapdError(f"task reasoning_gym:{dataset}: answer_kind 'choice' needs options, which generated tasks lack")
    gold_text = number_text if kind == "number" else bool_text

    def load(split: str) -> list[Example]:
        seed = config.seed if split == config.train_split else config.seed + 1
        try:
            items = reasoning_gym.create_dataset(dataset, size=config.size, seed=seed)
        except Exception as exc:  # unknown dataset name or bad arguments
            raise MapdError(f"task reasoning_gym:{dataset}: {exc}") from None
        return [
            Example(id=f"{split}-{index}", question=item["question"].strip(),
                    gold=gold_text(item["answer"], f"reasoning_gym:{dataset}[{split}] item {index}"))
            for index, item in enumerate(items)
        ]

    return Task(f"reasoning_gym:{dataset}", kind, load)
