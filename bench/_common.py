"""What several benches share: where the data that is not in the repository lives, and the naive answer rules.

Two environment variables say where that data is; neither folder ships with mapd:

    MAPD_SHARED_DATA     the benchmark datasets as JSONL, one folder per task (gsm8k/, svamp/,
                         strategyqa/, logiqa/), each holding <split>.jsonl
    MAPD_REFERENCE_DATA  the reference implementation's recorded outputs: Llama-2-7B's SVAMP and
                         StrategyQA mistakes and the committee's SVAMP feedback and rationales
                         (Llama-2-7b-chat-hf_svamp_{false,feedback,rationale}_round0.json,
                         Llama-2-7b-chat-hf_strategyQA_false_round0.json)

A bench that needs one and finds it unset stops with a message naming the variable. The tests set
both for themselves (tests/conftest.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SHARED_DATA = "MAPD_SHARED_DATA"
REFERENCE_DATA = "MAPD_REFERENCE_DATA"
SVAMP_REFERENCE = "Llama-2-7b-chat-hf_svamp_{}_round0.json"


class DataNotFound(SystemExit):
    """A data variable is unset or names no folder. Uncaught, it ends the script with its message (exit 1)."""


def _folder(variable: str, what: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise DataNotFound(f"{variable} is not set: point it at {what}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataNotFound(f"{variable}={value} is not a folder: point it at {what}")
    return path


def shared_data() -> Path:
    """The benchmark datasets folder, $MAPD_SHARED_DATA (holds gsm8k/, svamp/, strategyqa/, logiqa/)."""
    return _folder(SHARED_DATA, "the benchmark datasets folder (gsm8k/, svamp/, strategyqa/, logiqa/ of <split>.jsonl)")


def reference_data() -> Path:
    """The reference implementation's recorded outputs, $MAPD_REFERENCE_DATA."""
    return _folder(REFERENCE_DATA, "the reference implementation's recorded outputs (Llama-2-7b-chat-hf_*_round0.json)")


def svamp_reference_files() -> tuple[Path, Path, Path]:
    """The reference's SVAMP round-0 files (mistakes, feedback, rationales), as ``mapd import-reference`` takes them."""
    folder = reference_data()
    files = tuple(folder / SVAMP_REFERENCE.format(kind) for kind in ("false", "feedback", "rationale"))
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise DataNotFound(f"{REFERENCE_DATA}={folder} lacks {', '.join(missing)}")
    return files


# --- the naive answer rules the benches compare mapd.answers against ----------------------------------


def last_number(text: str) -> str | None:
    """The last number in the text, commas dropped and a trailing ".0" cut; None when there is none."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    return value[:-2] if value.endswith(".0") else value


def reference_rule(text: str, kind: str) -> str | None:
    """The reference implementation's rules: the last number; the first "true"/"false"."""
    if kind == "number":
        return last_number(text)
    word = re.search(r"\b(true|false)\b", text, re.I)
    return word.group(1).lower() if word else None


def naive(text: str, kind: str) -> str | None:
    """The naive rules on four tasks: the last number; the first "true"/"false"/"yes"/"no"; the last
    capital letter A-D on its own."""
    if kind == "number":
        return last_number(text)
    if kind == "bool":
        word = re.search(r"\b(true|false|yes|no)\b", text, re.I)
        return None if not word else ("true" if word.group(1).lower() in ("true", "yes") else "false")
    letters = re.findall(r"\b([A-D])\b", text)
    return letters[-1] if letters else None
