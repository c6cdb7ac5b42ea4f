"""Resume after a config change (docs/reliability.md#resume-after-a-config-change): which fields of a dumped
config determine results, and which fields changed between two. A field marked operational (how calls are made:
URLs, keys, timeouts, concurrency) changes no result."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mapd.config import RunConfig, section_model


def _is_operational(info: Any) -> bool:
    extra = info.json_schema_extra if info is not None else None
    return isinstance(extra, dict) and bool(extra.get("operational"))


def result_fields(data: Any, model: type[BaseModel] | None = RunConfig) -> Any:
    """A dumped config (or section, or list of sections) without its operational fields, at every depth:
    what is left determines results. A list item (a teacher) stays in its position."""
    if isinstance(data, list):
        return [result_fields(item, model) for item in data]
    if not isinstance(data, dict) or model is None:
        return data
    kept = {}
    for key, value in data.items():
        info = model.model_fields.get(key)
        if _is_operational(info):
            continue
        kept[key] = result_fields(value, section_model(info.annotation) if info is not None else None)
    return kept


_ABSENT = object()


def _dumped_default(info: Any) -> Any:
    """A field's default as a dumped config holds it."""
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json")
    if isinstance(default, list):
        return [item.model_dump(mode="json") if isinstance(item, BaseModel) else item for item in default]
    return default


def config_changes(old: Any, new: Any, model: type[BaseModel] | None = RunConfig,
                   prefix: str = "") -> list[tuple[str, bool]]:
    """``(dotted path, operational)`` for every field that differs between two dumped configs, e.g.
    ``("teachers.1.temperature", False)``, ``("max_budget_usd", True)``. Lists of sections are compared by
    position: an added or removed teacher is ``teachers.2`` (never operational); plain dicts by key. A field
    the old config lacks and the new one holds at its default (added by a later mapd) is no change."""
    if isinstance(old, dict) and isinstance(new, dict):
        order = list(model.model_fields) if model is not None else []
        keys = [k for k in order if k in old or k in new] + sorted(
            (k for k in {*old, *new} if k not in order), key=str)
        changes: list[tuple[str, bool]] = []
        for key in keys:
            a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
            info = model.model_fields.get(key) if model is not None else None
            if a == b or (a is _ABSENT and info is not None and b == _dumped_default(info)):
                continue  # a field a later mapd added, at its default, changes nothing
            path = f"{prefix}{key}"
            if _is_operational(info):
                changes.append((path, True))
            elif a is _ABSENT or b is _ABSENT:
                changes.append((path, False))
            else:
                sub = section_model(info.annotation) if info is not None else None
                changes.extend(config_changes(a, b, sub, f"{path}."))
        return changes
    if isinstance(old, list) and isinstance(new, list) and model is not None:
        changes = []
        for index in range(max(len(old), len(new))):
            path = f"{prefix}{index}"
            if index >= len(old) or index >= len(new):
                changes.append((path, False))
            elif old[index] != new[index]:
                changes.extend(config_changes(old[index], new[index], model, f"{path}."))
        return changes
    return [] if old == new else [(prefix.removesuffix(".") or "(top level)", False)]
