"""Teacher rationales (METHOD.md step 3): every teacher answers each mistaken question step by step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mapd.answers import extract
from mapd.llm.base import Call, CallResult
from mapd.prompts import PromptConfig

if TYPE_CHECKING:
    from mapd.llm import Dispatcher


def rationale_calls(mistakes: list[dict], answer_kind: str, teachers: list[str], prompts: PromptConfig) -> list[Call]:
    """One call per (mistake, teacher): the same step-by-step prompt the student gets."""
    return [
        Call(teacher=teacher, messages=prompts.answer_messages(mistake["question"], answer_kind))
        for mistake in mistakes
        for teacher in teachers
    ]


def rationale_record(id_: str, teacher: str, text: str | None, error: str | None, answer_kind: str) -> dict:
    """``{id, teacher, text, error, answer}`` with the rationale's own extracted final answer."""
    answer = None if text is None else extract(text, answer_kind).answer
    return {"id": id_, "teacher": teacher, "text": text, "error": error, "answer": answer}


def rationale_records(
    mistakes: list[dict], answer_kind: str, teachers: list[str], results: list[CallResult]
) -> list[dict]:
    """Records for the results of :func:`rationale_calls`."""
    pairs = [(mistake["id"], teacher) for mistake in mistakes for teacher in teachers]
    return [
        rationale_record(id_, teacher, r.text, r.error, answer_kind)
        for (id_, teacher), r in zip(pairs, results, strict=True)
    ]


def rationales(
    mistakes: list[dict], answer_kind: str, teachers: list[str], dispatcher: Dispatcher, prompts: PromptConfig
) -> list[dict]:
    """Every teacher's step-by-step rationale for every mistaken question: one record per (id, teacher)."""
    results = dispatcher.run(rationale_calls(mistakes, answer_kind, teachers, prompts), desc="rationales")
    return rationale_records(mistakes, answer_kind, teachers, results)
