"""`mapd config`: a config as YAML with every field's help text as a comment above it."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from mapd.config import RunConfig, section_model


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
        elif value == [] and (item := section_model(info.annotation)) is not None:  # e.g. no teachers yet
            lines.append(f"{indent}{name}: []")
            lines.append(f"{indent}# each item's fields, their defaults and help text:")
            lines.extend(f"{indent}#   {field}: {'(required)' if about.is_required() else _yaml_value(about.get_default(call_default_factory=True))}"
                         f"  # {about.description}" for field, about in item.model_fields.items())
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
