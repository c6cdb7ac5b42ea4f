"""Every prompt the pipeline sends, filled in from the config's templates (config.PromptConfig).

Each prompt's reply contract sits beside the parser that reads the reply: the answer line
(``answers.ANSWER_FORMATS``, read by ``answers.extract``) and the review score
(``review_score.SCORE_FORMAT``, read by ``review_score.parse_score``). A training pair's prompt is
built by :func:`answer_messages` / :func:`feedback_messages`, exactly as evaluation and the teachers
see it, system message included.
"""

from __future__ import annotations

from mapd.answers import ANSWER_FORMATS
from mapd.config import PromptConfig
from mapd.review_score import SCORE_FORMAT

Messages = list[dict[str, str]]


def _messages(prompts: PromptConfig, template: str, **fields: str) -> Messages:
    """The system message (if any) and one user message: ``template`` filled in."""
    head = [{"role": "system", "content": prompts.system}] if prompts.system else []
    return head + [{"role": "user", "content": template.format(**fields)}]


def answer_messages(prompts: PromptConfig, question: str, answer_kind: str) -> Messages:
    """Ask for a step-by-step answer ending in the task's answer line (the student, and each teacher's rationale)."""
    return _messages(prompts, prompts.answer, question=question, answer_format=ANSWER_FORMATS[answer_kind])


def feedback_messages(prompts: PromptConfig, question: str, student_answer: str, gold: str,
                      answer_kind: str) -> Messages:
    """Ask a teacher to point out and explain the mistakes in the student's answer, given the gold hint."""
    return _messages(prompts, prompts.feedback, question=question, student_answer=student_answer, gold=gold,
                     answer_format=ANSWER_FORMATS[answer_kind])


def review_messages(prompts: PromptConfig, question: str, rationale: str, gold: str, answer_kind: str) -> Messages:
    """Ask a reviewer to judge a rationale, given the gold hint, and end with its bracketed 1-5 score."""
    return _messages(prompts, prompts.review, question=question, rationale=rationale, gold=gold,
                     answer_format=ANSWER_FORMATS[answer_kind], score_format=SCORE_FORMAT)
