"""Reading a config file: strict YAML with the line of every field, size limits, the schema
(mapd.config), the train.args names (transformers' TrainingArguments) and the task's own checks (mapd.tasks).

mapd.config is the schema and imports nothing of mapd but errors; loading a file needs the io helpers and
the task loaders, so it lives here, a layer above both (docs/architecture.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mapd.config import EMBEDDED_DEFAULT, RunConfig, field_path, parse_config
from mapd.errors import MapdError
from mapd.io import lone_surrogate, read_text
from mapd.log import say
from mapd.tasks import get_task

MAX_CONFIG_VALUES = 100_000  # YAML aliases can make a short file expand to billions of values


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML itself keeps the last one silently)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"field '{key.value}' appears twice (also on line {seen[key.value]})",
                            key.start_mark)
                    seen[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _line_finder(root: yaml.Node | None) -> Callable[[tuple], int | None]:
    """Maps a field's location (``("teachers", 0, "model")``) to the line of the deepest part of it
    that the file holds (a missing field: its section's line)."""

    def line_of(location: tuple) -> int | None:
        node, line = root, None
        for part in location:
            if isinstance(node, yaml.MappingNode):
                match = next(((k, v) for k, v in node.value
                              if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
                if match is None:
                    break
                line, node = match[0].start_mark.line + 1, match[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        if line is None and root is not None:
            line = root.start_mark.line + 1
        return line

    return line_of


def _check_size(data: Any, path: Path, line_of: Callable[[tuple], int | None]) -> None:
    """Refuse a config that refers to itself or expands past MAX_CONFIG_VALUES (YAML aliases), a .nan or .inf, and
    text holding a lone surrogate escape (it reads, but no file or request can carry it)."""
    count, stack = 0, [((), data, frozenset())]
    while stack:
        location, item, above = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise MapdError(f"{path}: the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases?)")
        if isinstance(item, float) and math.isnan(item):  # .nan compares false with everything: thresholds never pass
            raise MapdError(f"{path}:{line_of(location)}: field '{field_path(location)}': .nan is not a number")
        if isinstance(item, float) and math.isinf(item):  # also in free-form fields (extra_body): JSON has no Infinity
            raise MapdError(f"{path}:{line_of(location)}: field '{field_path(location)}': {item} is not a finite number")
        if isinstance(item, (dict, list)):
            if id(item) in above:
                raise MapdError(f"{path}:{line_of(location)}: field '{field_path(location)}' contains itself "
                                "(a YAML alias inside its own anchor)")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend(((*location, key), child, above | {id(item)}) for key, child in children)
    field = lone_surrogate(data)
    if field is not None:
        location = tuple(int(p) if p.isdigit() else p for p in field.split("."))
        raise MapdError(f"{path}:{line_of(location)}: field '{field}': a lone surrogate escape "
                        "(\\ud800-\\udfff) is not text")


def _check_training_args(args: dict[str, Any], path: Path, line_of: Callable[[tuple], int | None]) -> None:
    """Every train.args name is a field of transformers' TrainingArguments (imported only when there are any);
    an unknown one is a MapdError naming its line and the closest field."""
    if not args:
        return
    from dataclasses import fields
    from difflib import get_close_matches

    from transformers import TrainingArguments

    known = [field.name for field in fields(TrainingArguments) if field.init]
    for name in args:
        if name not in known:
            close = get_close_matches(str(name), known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise MapdError(f"{path}:{line_of(('train', 'args', name))}: train.args.{name}: not a Hugging Face "
                            f"TrainingArguments option{hint}")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file, the task's own checks included (mapd.tasks.get_task); every error
    is one MapdError naming the file, and the line and field where there is one."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise MapdError(f"{path}: is a folder, expected a YAML config file")
    if not path.is_file():
        raise MapdError(f"{path}: config file not found")
    text = read_text(path)
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise MapdError(f"{where}: not valid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise MapdError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise MapdError(f"{path}: not valid YAML (nested too deeply to read)") from None
    except ValueError as exc:  # an integer past Python's int-digits limit
        long = re.search(r"\d{4000,}", text)
        where = f"{path}:{text.count(chr(10), 0, long.start()) + 1}" if long else str(path)
        raise MapdError(f"{where}: a number too long to read ({str(exc).split(':')[0]})") from None
    finally:
        loader.dispose()
    if data is not None and not isinstance(data, dict):
        raise MapdError(f"{path}: expected a mapping of config sections at the top level, got "
                        f"{type(data).__name__}")
    line_of = _line_finder(root)
    _check_size(data, path, line_of)
    config = parse_config(data or {}, str(path), line_of)
    _check_training_args(config.train.args, path, line_of)
    try:
        get_task(config.task)  # the task's own checks: a jsonl task's path, a generator's dataset and options
    except MapdError as exc:
        line = line_of(("task", "name"))
        raise MapdError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}") from exc
    return config


def embedded_default_config() -> RunConfig:
    """The offline demonstration config shipped with the package (``mapd run`` with no config)."""
    return load_config(EMBEDDED_DEFAULT)


def template_file(name: str) -> Path:
    """The starter config ``mapd init NAME`` copies (shipped in mapd/configs/; offline-default is the demo)."""
    return EMBEDDED_DEFAULT if name == "offline-default" else EMBEDDED_DEFAULT.with_name(f"{name}.yaml")


def write_template(name: str, folder: Path) -> Path:
    """Copy the starter config ``name`` to ``folder/<name>.yaml``; MapdError when that file exists already."""
    target = Path(folder) / f"{name}.yaml"
    try:
        with open(target, "x", encoding="utf-8") as file:  # never overwrites a config a user edited
            file.write(template_file(name).read_text(encoding="utf-8"))
    except FileExistsError:
        raise MapdError(f"{target}: exists already; remove it or run `mapd init` in another folder") from None
    say(f"wrote {target}: edit it, then `mapd check {target.name}` and `mapd run {target.name}`")
    return target
