"""reasoning-gym generators (``reasoning_gym:<dataset>``): procedurally made questions, no download."""

from mapd.errors import MapdError
from mapd.config import TaskConfig
from mapd.tasks.base import Example, Task, bool_text, number_text


def make(config: TaskConfig, dataset: str) -> Task:
    """A task whose splits are generated: train with ``config.seed``, any other split with seed + 1."""
    try:
        import reasoning_gym
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise MapdError("task reasoning_gym: the reasoning-gym package is not installed") from exc

    kind = config.answer_kind or "number"
    if kind == "choice":
        raise MapdError(f"task reasoning_gym:{dataset}: answer_kind 'choice' needs options, which generated tasks lack")
    gold_text = number_text if kind == "number" else bool_text

    def create(size: int, seed: int) -> list[dict]:
        try:
            return list(reasoning_gym.create_dataset(dataset, size=size, seed=seed, **config.options))
        except Exception as exc:  # an unknown dataset, an unknown option (TypeError) or a bad value (assert)
            detail = str(exc) or type(exc).__name__
            raise MapdError(f"task reasoning_gym:{dataset}: {detail} (task.options: {config.options})") from exc

    create(1, config.seed)  # the name and task.options are checked with the config, before anything runs

    def load(split: str) -> list[Example]:
        seed = config.seed if split == config.train_split else config.seed + 1
        items = create(config.size, seed)
        return [
            Example(id=f"{split}-{index}", question=item["question"].strip(),
                    gold=gold_text(item["answer"], f"reasoning_gym:{dataset}[{split}] item {index}"))
            for index, item in enumerate(items)
        ]

    return Task(f"reasoning_gym:{dataset}", kind, load)
