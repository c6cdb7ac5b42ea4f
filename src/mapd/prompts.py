"""Every prompt the pipeline sends, in one place: defaults here, overridable from the config.

Templates are ``str.format`` strings. Fields available:
``{question}`` (with lettered options for choice tasks), ``{answer_format}`` (how to end the
answer, per answer kind), ``{student_answer}``, ``{gold}`` (the correct final answer) and
``{rationale}`` (a teacher's rationale under review).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

ANSWER_FORMATS = {
    "number": 'End with the line "The answer is N." where N is the final number.',
    "bool": 'End with the line "The answer is true." or "The answer is false."',
    "choice": 'End with the line "The answer is X." where X is the letter of the correct option.',
}


class PromptConfig(BaseModel):
    """Prompt templates. Override any of them in the config's ``prompts:`` section."""

    system: str | None = Field(None, description="Optional system message sent before every prompt.")
    answer: str = Field(
        "Question: {question}\n\nLet's think step by step. {answer_format}",
        description="The student's (and each teacher's rationale) prompt: answer step by step.",
    )
    feedback: str = Field(
        "You are a teacher. A student answered the question below and made mistakes.\n\n"
        "Question: {question}\n\nStudent's answer:\n{student_answer}\n\n"
        "Hint: the correct final answer is {gold}.\n\n"
        "Point out each mistake in the student's answer and explain why it is wrong and how to fix it. "
        "Do not just restate the correct answer.",
        description="Mistake-aware feedback prompt: question, the student's wrong answer and a correct-answer hint.",
    )
    review: str = Field(
        "You are reviewing another teacher's solution.\n\nQuestion: {question}\n\n"
        "Solution under review:\n{rationale}\n\nHint: the correct final answer is {gold}.\n\n"
        "Judge whether the reasoning is correct and sound, step by step. You may explain briefly, "
        "then finish with a single integer score from 1 (wrong) to 5 (fully correct and sound) "
        "in square brackets, for example [4].",
        description="Peer-review prompt. The reply must end with an integer score 1-5 in brackets, e.g. [4].",
    )

    model_config = {"extra": "forbid"}

    def messages(self, template: str, **fields: str) -> list[dict[str, str]]:
        """Chat messages for one filled-in template (with the system message, if any)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": template.format(**fields)}]

    def answer_messages(self, question: str, answer_kind: str) -> list[dict[str, str]]:
        """Messages asking for a step-by-step answer in the task's answer format."""
        return self.messages(self.answer, question=question, answer_format=ANSWER_FORMATS[answer_kind])
