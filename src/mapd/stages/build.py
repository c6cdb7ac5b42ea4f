"""Instruction data (METHOD.md step 5): feedback and rationale pairs for each usable mistake.

Modes:
- ``mixed`` (the method): per mistake, one feedback and one *accepted* rationale, each drawn at
  random among the teachers that have one. The draw is seeded per mistake (``seed`` and the
  mistake's id), so a mistake's pairs do not change when other mistakes are added or removed.
- ``single:<teacher>``: that teacher's feedback and rationale; the rationale is used whether or
  not peer review accepted it (the paper's single-teacher baseline).
- ``no-review``: like ``mixed``, but every rationale with text counts as accepted.
- ``all``: every feedback and every accepted rationale, each its own pair.

A mistake is used only when it has at least one feedback with text and at least one usable
rationale. Otherwise it is dropped and counted under the first reason that applies: no feedback,
then no (accepted) rationale. When a file holds two lines for the same (id, teacher), the later
line wins (a rerun of a stage appends the newer result).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mapd.errors import MapdError
from mapd.io import read_jsonl, write_jsonl
from mapd.prompts import ANSWER_FORMATS, PromptConfig

FIELDS = {
    "mistakes": ("id", "question", "gold", "output"),
    "feedback": ("id", "teacher", "text"),
    "rationales": ("id", "teacher", "text", "accepted"),
}


def _checked(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """``records`` after checking that each has the fields of a ``name`` record."""
    for number, record in enumerate(records, start=1):
        missing = [key for key in FIELDS[name] if key not in record]
        if missing:
            raise MapdError(f"{name}.jsonl record {number}: missing field(s) {', '.join(missing)}")
    return records


def _by_mistake(records: list[dict[str, Any]], name: str, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by mistake id, one per teacher (the later line wins), sorted by teacher."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for number, record in enumerate(_checked(records, name), start=1):
        if str(record["id"]) not in ids:
            raise MapdError(f"{name}.jsonl record {number}: id '{record['id']}' is not in mistakes.jsonl")
        latest[(str(record["id"]), record["teacher"])] = record
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (mistake_id, _), record in sorted(latest.items()):
        grouped[mistake_id].append(record)
    return grouped


def infer_answer_kind(mistakes: list[dict[str, Any]]) -> str:
    """``bool`` when every gold is true/false, ``choice`` when every gold is one capital letter, else ``number``."""
    golds = {str(mistake["gold"]) for mistake in mistakes}
    if golds and golds <= {"true", "false"}:
        return "bool"
    if golds and all(re.fullmatch(r"[A-J]", gold) for gold in golds):
        return "choice"
    return "number"


def _pair(kind: str, mistake_id: str, teacher: str, prompt: str, completion: str) -> dict[str, str]:
    return {"id": mistake_id, "kind": kind, "teacher": teacher, "prompt": prompt, "completion": completion}


def build(
    mistakes: list[dict[str, Any]],
    feedback: list[dict[str, Any]],
    rationales: list[dict[str, Any]],
    *,
    mode: str,
    seed: int,
    prompts: PromptConfig,
    answer_kind: str,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Train records ``{id, kind, teacher, prompt, completion}`` and counts, for one build ``mode``.

    ``prompt`` is the plain user text (the trainer applies the student's chat template).
    """
    if answer_kind not in ANSWER_FORMATS:
        raise MapdError(f"answer kind '{answer_kind}': unknown (kinds: {', '.join(ANSWER_FORMATS)})")
    mistakes = _checked(mistakes, "mistakes")
    ids = [str(mistake["id"]) for mistake in mistakes]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise MapdError(f"mistakes.jsonl: duplicate id '{duplicate}'")
    feedback_by = _by_mistake(feedback, "feedback", set(ids))
    rationales_by = _by_mistake(rationales, "rationales", set(ids))
    teachers = sorted({r["teacher"] for r in feedback + rationales})

    single = mode.split(":", 1)[1] if mode.startswith("single:") else None
    if single is not None and single not in teachers:
        raise MapdError(f"build mode {mode}: unknown teacher '{single}' (teachers: {', '.join(teachers) or 'none'})")
    if single is None and mode not in {"mixed", "no-review", "all"}:
        raise MapdError(f"build mode '{mode}': unknown (modes: mixed, single:<teacher>, no-review, all)")

    def usable_rationale(record: dict[str, Any]) -> bool:
        if record["text"] is None or (single is not None and record["teacher"] != single):
            return False
        return single is not None or mode == "no-review" or bool(record["accepted"])

    records: list[dict[str, str]] = []
    counts = Counter()
    for mistake, mistake_id in zip(mistakes, ids):
        feedbacks = [f for f in feedback_by[mistake_id] if f["text"] is not None and single in (None, f["teacher"])]
        usable = [r for r in rationales_by[mistake_id] if usable_rationale(r)]
        if not feedbacks:
            counts["dropped_no_feedback"] += 1
            continue
        if not usable:
            counts["dropped_no_rationale"] += 1
            continue
        counts["mistakes_used"] += 1
        if mode != "all":
            rng = random.Random(f"{seed}:{mistake_id}")
            feedbacks, usable = [rng.choice(feedbacks)], [rng.choice(usable)]
        feedback_prompt = prompts.messages(
            prompts.feedback,
            question=mistake["question"],
            student_answer=mistake["output"],
            gold=mistake["gold"],
            answer_format=ANSWER_FORMATS[answer_kind],
        )[-1]["content"]
        answer_prompt = prompts.answer_messages(mistake["question"], answer_kind)[-1]["content"]
        records += [_pair("feedback", mistake_id, f["teacher"], feedback_prompt, f["text"]) for f in feedbacks]
        records += [_pair("rationale", mistake_id, r["teacher"], answer_prompt, r["text"]) for r in usable]
    kinds = Counter(record["kind"] for record in records)
    return records, {
        "mode": mode,
        "seed": seed,
        "answer_kind": answer_kind,
        "mistakes": len(mistakes),
        "mistakes_used": counts["mistakes_used"],
        "dropped_no_feedback": counts["dropped_no_feedback"],
        "dropped_no_rationale": counts["dropped_no_rationale"],
        "pairs": {"feedback": kinds["feedback"], "rationale": kinds["rationale"]},
    }


def run_build(
    run_dir: Path,
    mode: str,
    seed: int,
    prompts: PromptConfig | None = None,
    answer_kind: str | None = None,
) -> dict[str, Any]:
    """Read ``run_dir``/{mistakes,feedback,rationales}.jsonl, write ``run_dir``/train.jsonl, return the counts.

    ``answer_kind`` (how the rationale prompt asks the answer to end) defaults to the kind the
    gold answers show (see :func:`infer_answer_kind`); the counts record the kind used.
    """
    run_dir = Path(run_dir)
    mistakes, feedback, rationales = (
        read_jsonl(run_dir / f"{name}.jsonl") for name in ("mistakes", "feedback", "rationales")
    )
    if not mistakes:
        raise MapdError(f"{run_dir / 'mistakes.jsonl'}: no mistakes to build from")
    records, counts = build(
        mistakes,
        feedback,
        rationales,
        mode=mode,
        seed=seed,
        prompts=prompts or PromptConfig(),
        answer_kind=answer_kind or infer_answer_kind(_checked(mistakes, "mistakes")),
    )
    if not records:
        raise MapdError(
            f"{run_dir}: no usable mistake ({counts['dropped_no_feedback']} without feedback, "
            f"{counts['dropped_no_rationale']} without an accepted rationale)"
        )
    write_jsonl(run_dir / "train.jsonl", records)
    print(
        f"build {mode}: {counts['pairs']['feedback']} feedback + {counts['pairs']['rationale']} rationale pairs "
        f"from {counts['mistakes_used']}/{counts['mistakes']} mistakes (dropped: {counts['dropped_no_feedback']} "
        f"without feedback, {counts['dropped_no_rationale']} without a usable rationale) -> {run_dir / 'train.jsonl'}"
    )
    return counts
