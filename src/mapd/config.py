"""The YAML config: one pydantic model per section, every field documented.

``mapd config --show`` prints the defaults with their help text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from mapd.errors import MapdError
from mapd.llm.base import TeacherConfig
from mapd.prompts import PromptConfig
from mapd.stages.review import ReviewConfig
from mapd.tasks.base import TaskConfig
from mapd.train import TrainConfig


EMBEDDED_DEFAULT = Path(__file__).parent / "configs" / "default.yaml"


class StudentConfig(BaseModel):
    """The student model and how it answers when its mistakes are mined and when it is evaluated."""

    model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Hub id, local folder, .gguf file, or embedded:<name> (a model shipped by a PyPI package).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside the model folder, if any.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens generated per answer (the paper: 512).")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Mining temperature; 0 is greedy (the paper samples at 0.3, top-p 0.9)."
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Mining top-p when sampling.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (mining and evaluation).")
    seed: int = Field(731, description="Seed of the mining samples when temperature > 0.")

    model_config = {"extra": "forbid"}


class BuildConfig(BaseModel):
    """How instruction data is made from mistakes, feedback and rationales (METHOD.md step 5)."""

    mode: str = Field(
        "mixed",
        description="mixed (the method), single:<teacher> (one teacher, no review), no-review, or all.",
    )
    seed: int = Field(731, description="Seed of the random choice among teachers.")

    model_config = {"extra": "forbid"}


class RunConfig(BaseModel):
    """A whole mapd run: task, student, teacher committee, prompts, review, data, training."""

    task: TaskConfig = Field(default_factory=TaskConfig, description="The benchmark and its data.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student model.")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="The teacher committee (at least one).")
    prompts: PromptConfig = Field(default_factory=PromptConfig, description="Prompt templates.")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Peer review and acceptance.")
    build: BuildConfig = Field(default_factory=BuildConfig, description="Instruction data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Joint-loss fine-tuning.")
    rounds: int = Field(1, ge=1, description="Rounds: each mines the mistakes of the student trained in the last.")
    cache_path: str | None = Field(
        None, description="SQLite call cache; default <run dir>/cache.sqlite. Share one path between runs to reuse calls."
    )
    max_budget_usd: float | None = Field(
        None, gt=0, description="Stop cleanly before teacher spending exceeds this many USD (needs prices)."
    )

    model_config = {"extra": "forbid"}

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> "RunConfig":
        names = [teacher.name for teacher in self.teachers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"teacher names must be unique, repeated: {', '.join(duplicates)}")
        return self

    def teacher(self, name: str) -> TeacherConfig:
        """The teacher called ``name``; an unknown name is a MapdError listing the committee."""
        for teacher in self.teachers:
            if teacher.name == name:
                return teacher
        known = ", ".join(t.name for t in self.teachers) or "none"
        raise MapdError(f"teacher '{name}' is not in the config (teachers: {known})")


def _field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; errors name the source and every bad field."""
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MapdError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise MapdError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MapdError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise MapdError(f"{path}: expected a mapping of config sections at the top level")
    return parse_config(data or {}, str(path))


def embedded_default_config() -> RunConfig:
    """The offline demonstration config shipped with the package (``mapd run`` with no config)."""
    return load_config(EMBEDDED_DEFAULT)


def public_dump(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data for manifests: key *names* only, credentials in URLs redacted."""
    from mapd.secrets import redact_url

    data = config.model_dump(mode="json")
    for teacher in data["teachers"]:
        if teacher.get("base_url"):
            teacher["base_url"] = redact_url(teacher["base_url"])
    return data


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _documented_lines(model: BaseModel, indent: str = "", comments: bool = True) -> list[str]:
    lines = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if comments and info.description:
            lines.append(f"{indent}# {info.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.extend(_documented_lines(value, indent + "  ", comments))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{indent}{name}:")
            for number, item in enumerate(value):  # help text once, on the first item
                item_lines = _documented_lines(item, indent + "    ", comments and number == 0)
                first = next(i for i, line in enumerate(item_lines) if not line.lstrip().startswith("#"))
                item_lines[first] = f"{indent}  - " + item_lines[first].lstrip()
                lines.extend(item_lines)
        else:
            lines.append(f"{indent}{name}: {_yaml_value(value)}")
    return lines


def default_config_yaml(config: RunConfig) -> str:
    """``config`` as YAML with every field's help text as a comment above it."""
    return "\n".join(_documented_lines(config)) + "\n"
