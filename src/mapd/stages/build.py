"""Instruction data (docs/method.md#5-instruction-data): feedback and rationale pairs for each usable mistake.

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
from collections import Counter, defaultdict
from contextlib import nullcontext

from mapd.config import BuildConfig, PromptConfig, TaskConfig, build_mode_problem
from mapd.errors import MapdError
from mapd.log import say
from mapd.io import check_folder, folder_lock, read_jsonl_lines
from mapd.layout import RoundLayout
from mapd.prompts import answer_messages, feedback_messages
from mapd.records import Feedback, Mistake, Rationale, TrainingPair, read_mistakes, read_records, write_records
from mapd.tasks import get_task
from mapd.tasks.base import check_mistakes, infer_answer_kind as infer_kind


def _by_mistake(records: list[Feedback] | list[Rationale], name: str, ids: set[str]) -> dict[str, list]:
    """Records grouped by mistake id, one per teacher (the later line wins), sorted by teacher."""
    latest: dict[tuple[str, str], Feedback | Rationale] = {}
    for number, record in enumerate(records, start=1):
        if record.id not in ids:
            raise MapdError(f"{name}: record {number}: field 'id': {record.id!r} is not in the mistakes file")
        latest[(record.id, record.teacher)] = record
    grouped: dict[str, list] = defaultdict(list)
    for (mistake_id, _), record in sorted(latest.items()):
        grouped[mistake_id].append(record)
    return grouped


def infer_answer_kind(mistakes: list[Mistake]) -> str:
    """The answer kind of the mistakes' gold answers (:func:`mapd.tasks.base.infer_answer_kind`)."""
    return infer_kind(mistake.gold for mistake in mistakes)


def _pair(kind: str, mistake: Mistake, teacher: str, messages: list[dict[str, str]], completion: str) -> TrainingPair:
    """A pair whose prompt is exactly the messages the student is shown (system message included)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    return TrainingPair(id=mistake.id, kind=kind, teacher=teacher, system=system, prompt=messages[-1]["content"],
                        completion=completion)


def build_pairs(
    mistakes: list[Mistake],
    feedback: list[Feedback],
    rationales: list[Rationale],
    *,
    build: BuildConfig,
    prompts: PromptConfig,
    answer_kind: str,
) -> tuple[list[TrainingPair], dict]:
    """Training pairs and counts for one build mode (``build.mode``, seeded by ``build.seed``)."""
    mode, seed = build.mode, build.seed
    ids = {mistake.id for mistake in mistakes}
    feedback_by = _by_mistake(feedback, "feedback", ids)
    rationales_by = _by_mistake(rationales, "rationales", ids)
    teachers = sorted({r.teacher for r in [*feedback, *rationales]})

    if (problem := build_mode_problem(mode)) is not None:
        raise MapdError(f"build.mode: {problem}")
    single = build.single
    if single is not None and single not in teachers:
        raise MapdError(f"build mode {mode}: unknown teacher '{single}' (teachers: {', '.join(teachers) or 'none'})")

    def usable_rationale(record: Rationale) -> bool:
        if not (record.text or "").strip() or (single is not None and record.teacher != single):
            return False
        return single is not None or mode == "no-review" or record.accepted

    pairs: list[TrainingPair] = []
    counts = Counter()
    for mistake in mistakes:
        feedbacks = [f for f in feedback_by[mistake.id] if (f.text or "").strip() and single in (None, f.teacher)]
        usable = [r for r in rationales_by[mistake.id] if usable_rationale(r)]
        if not feedbacks:
            counts["dropped_no_feedback"] += 1
            continue
        if not usable:
            counts["dropped_no_rationale"] += 1
            continue
        counts["mistakes_used"] += 1
        if mode != "all":
            rng = random.Random(f"{seed}:{mistake.id}")
            feedbacks, usable = [rng.choice(feedbacks)], [rng.choice(usable)]
        asked = feedback_messages(prompts, mistake.question, mistake.output, mistake.gold, answer_kind)
        answer = answer_messages(prompts, mistake.question, answer_kind)
        pairs += [_pair("feedback", mistake, f.teacher, asked, f.text) for f in feedbacks]
        pairs += [_pair("rationale", mistake, r.teacher, answer, r.text) for r in usable]
    kinds = Counter(pair.kind for pair in pairs)
    return pairs, {
        "mode": mode,
        "seed": seed,
        "answer_kind": answer_kind,
        "mistakes": len(mistakes),
        "mistakes_used": counts["mistakes_used"],
        "dropped_no_feedback": counts["dropped_no_feedback"],
        "dropped_no_rationale": counts["dropped_no_rationale"],
        "pairs": {"feedback": kinds["feedback"], "rationale": kinds["rationale"]},
    }


def run_build(folder: RoundLayout, *, task: TaskConfig | None, build: BuildConfig, prompts: PromptConfig,
              lock: bool = False) -> dict:
    """Read the round's mistakes, feedback and rationales, write its train.jsonl, return the counts.

    The answer kind (how the rationale prompt asks the answer to end) is the task's; with no task
    (``mapd build`` without ``--config``) it is inferred from the gold answers (:func:`infer_answer_kind`).
    """
    mistakes = read_mistakes(folder.mistakes)
    answer_kind = get_task(task).answer_kind if task is not None else infer_answer_kind(mistakes)
    if task is not None:
        check_mistakes(folder.mistakes, mistakes, answer_kind, task.name)
    feedback = read_records(folder.feedback, Feedback)
    rationales = read_records(folder.rationales, Rationale)
    ids = {mistake.id for mistake in mistakes}
    for path, records in ((folder.feedback, feedback), (folder.rationales, rationales)):
        stray = next((index for index, record in enumerate(records) if record.id not in ids), None)
        if stray is not None:  # named by its line (read_records: one record per non-blank line)
            line = [number for number, _ in read_jsonl_lines(path)][stray]
            raise MapdError(f"{path}:{line}: field 'id': {records[stray].id!r} is not in {folder.mistakes}")
    pairs, counts = build_pairs(mistakes, feedback, rationales, build=build, prompts=prompts, answer_kind=answer_kind)
    if not pairs:
        raise MapdError(
            f"{folder.dir}: no usable mistake ({counts['dropped_no_feedback']} without feedback, "
            f"{counts['dropped_no_rationale']} without an accepted rationale)"
        )
    check_folder(folder.dir, [folder.train])
    with folder_lock(folder.dir) if lock else nullcontext():  # every input read and checked: now write
        write_records(folder.train, pairs)
    say(
        f"build {build.mode}: {counts['pairs']['feedback']} feedback + {counts['pairs']['rationale']} rationale pairs "
        f"from {counts['mistakes_used']}/{counts['mistakes']} mistakes (dropped: {counts['dropped_no_feedback']} "
        f"without feedback, {counts['dropped_no_rationale']} without a usable rationale) -> {folder.train}"
    )
    return counts
