"""Mistake-aware feedback (METHOD.md step 2): every teacher explains every mistake, given the gold hint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mapd.llm.base import Call, CallResult
from mapd.prompts import ANSWER_FORMATS, PromptConfig

if TYPE_CHECKING:
    from mapd.llm import Dispatcher


def feedback_calls(mistakes: list[dict], answer_kind: str, teachers: list[str], prompts: PromptConfig) -> list[Call]:
    """One call per (mistake, teacher), mistakes in order and teachers in committee order."""
    return [
        Call(
            teacher=teacher,
            messages=prompts.messages(
                prompts.feedback, question=mistake["question"], student_answer=mistake["output"],
                gold=mistake["gold"], answer_format=ANSWER_FORMATS[answer_kind],
            ),
        )
        for mistake in mistakes
        for teacher in teachers
    ]


def feedback_records(mistakes: list[dict], teachers: list[str], results: list[CallResult]) -> list[dict]:
    """``{id, teacher, text, error}`` records for the results of :func:`feedback_calls`."""
    pairs = [(mistake["id"], teacher) for mistake in mistakes for teacher in teachers]
    return [
        {"id": id_, "teacher": teacher, "text": r.text, "error": r.error}
        for (id_, teacher), r in zip(pairs, results, strict=True)
    ]


def feedback(
    mistakes: list[dict], answer_kind: str, teachers: list[str], dispatcher: Dispatcher, prompts: PromptConfig
) -> list[dict]:
    """Every teacher's feedback on every mistake: one record per (id, teacher)."""
    results = dispatcher.run(feedback_calls(mistakes, answer_kind, teachers, prompts), desc="feedback")
    return feedback_records(mistakes, teachers, results)
