"""One typed record per artifact line, validated once, where it is read (docs/formats.md).

Every stage reads and writes these models, never raw dicts. ``read_records`` turns a bad line into
one MapdError ``file:line: field: reason``. Ids in users' files may be integers or strings and are
stored as strings; booleans must be JSON booleans (``"false"`` is refused, never counted as true).
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, StrictBool, StrictStr, ValidationError

from mapd.errors import MapdError
from mapd.io import read_json, read_jsonl_lines, write_json, write_jsonl


def _id_text(value: Any) -> Any:
    """An id as text: integers are accepted (users' own files) and stored as strings."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Id = Annotated[StrictStr, BeforeValidator(_id_text)]
Text = StrictStr


class Record(BaseModel):
    """Base of every artifact record: strict types, unknown fields kept out of the model."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Mistake(Record):
    """mistakes.jsonl: a training question the student got wrong, with its full output."""

    id: Id = Field(description="Unique id of the question (an integer in a user's file is stored as text).")
    question: Text = Field(description="The question as the student saw it (lettered options for choice tasks).")
    gold: Text = Field(description="Canonical gold answer: a number, true/false, or an option letter.")
    output: Text = Field(description="The student's whole answer text.")
    answer: Text | None = Field(None, description="The answer extracted from output, null when none.")
    status: Literal["wrong", "unparsed", "truncated"] = Field(
        "wrong", description="wrong: an answer was extracted; unparsed: none; truncated: cut off before committing.")
    cut_off: StrictBool | None = Field(
        None, description="The text stopped at its token limit (finish_reason length); null when unknown.")


class Feedback(Record):
    """feedback.jsonl: one teacher's explanation of one mistake."""

    id: Id = Field(description="The mistake's id.")
    teacher: Text = Field(description="The teacher that wrote it.")
    text: Text | None = Field(description="The feedback; null exactly when the call failed.")
    error: Text | None = Field(None, description="Why the call failed, null on success.")
    cut_off: StrictBool | None = Field(
        None, description="The text stopped at its token limit (finish_reason length); null when unknown.")


class Review(Record):
    """One reviewer's verdict on a rationale (inside rationales.jsonl)."""

    reviewer: Text = Field(description="The teacher that reviewed.")
    score: int | None = Field(ge=1, le=5, description="The parsed 1-5 score; null when the review is invalid or failed.")
    raw: Text | None = Field(description="The reviewer's whole reply; null when the call failed.")
    error: Text | None = Field(None, description="Why the call failed, null on success.")


class Rationale(Record):
    """rationales.jsonl: one teacher's step-by-step answer to a mistaken question, with its reviews."""

    id: Id = Field(description="The mistake's id.")
    teacher: Text = Field(description="The teacher that wrote it.")
    text: Text | None = Field(description="The rationale; null exactly when the call failed.")
    error: Text | None = Field(None, description="Why the call failed, null on success.")
    answer: Text | None = Field(None, description="The rationale's own extracted final answer.")
    cut_off: StrictBool | None = Field(
        None, description="The text stopped at its token limit (finish_reason length); null when unknown.")
    reviews: list[Review] = Field(default_factory=list, description="One per reviewer, in committee order.")
    mean_score: float | None = Field(None, description="Aggregate of the valid scores; null when none.")
    accepted: StrictBool = Field(description="Whether peer review accepted it (a JSON boolean).")


class TrainingPair(Record):
    """train.jsonl: one supervised pair in TRL's prompt-completion form, plus its system message."""

    id: Id = Field(description="The mistake's id.")
    kind: Literal["feedback", "rationale"] = Field(description="Which loss term the pair trains.")
    teacher: Text = Field(description="The teacher whose text is the completion.")
    system: Text | None = Field(None, description="The system message the student sees before prompt, if any.")
    prompt: Text = Field(min_length=1, description="The user message (the student's chat template is applied).")
    completion: Text = Field(min_length=1, description="The target text.")

    def messages(self) -> list[dict[str, str]]:
        """The chat messages of the prompt, exactly as evaluation sends them."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": self.prompt}]

    def conversational(self) -> dict[str, list[dict[str, str]]]:
        """The pair in TRL's conversational prompt-completion form (SFTTrainer applies the chat template)."""
        return {"prompt": self.messages(), "completion": [{"role": "assistant", "content": self.completion}]}


class Prediction(Record):
    """predictions.jsonl: one evaluated (or mined) answer of the student."""

    id: Id = Field(description="The question's id.")
    question: Text = Field(description="The question as the student saw it.")
    output: Text = Field(description="The student's whole answer text.")
    answer: Text | None = Field(description="The extracted final answer, null when none.")
    status: Literal["ok", "unparsed", "truncated"] = Field(
        description="ok: an answer was extracted; unparsed: none; truncated: cut off before committing to one.")
    cut_off: StrictBool | None = Field(
        None, description="The text stopped at its token limit (finish_reason length); null when unknown.")
    strict: StrictBool = Field(description="The text ends with the requested 'The answer is X.'.")
    gold: Text = Field(description="Canonical gold answer.")
    correct: StrictBool = Field(description="answer equals gold.")


class Metrics(Record):
    """metrics.json of an evaluation."""

    task: Text = Field(description="Task name.")
    split: Text = Field(description="Split evaluated.")
    model: Text = Field(description="The model evaluated.")
    n: int = Field(ge=0, description="Questions answered.")
    accuracy: float = Field(ge=0, le=1, description="Fraction correct.")
    strict_accuracy: float = Field(ge=0, le=1, description="Fraction correct and in the strict answer format.")
    unparsed_rate: float = Field(ge=0, le=1, description="Fraction with no extractable answer (truncated included).")
    cut_off_rate: float | None = Field(None, ge=0, le=1, description="Fraction stopped at max_new_tokens.")
    truncated_rate: float | None = Field(
        None, ge=0, le=1, description="Fraction cut off before committing to an answer (status truncated).")
    seconds: float = Field(ge=0, description="Time spent answering, model loading excluded.")


class TeacherStats(Record):
    """One teacher's line of teach_stats.json (calls made in one process; cache hits cost nothing). The one list
    of these statistics: the call path counts them by name (llm.tally), and :meth:`from_counts` makes the
    record of what it counted."""

    calls: int = Field(ge=0, description="Calls made to the teacher, cache hits not included.")
    cache_hits: int = Field(ge=0, description="Calls answered from the call cache.")
    failures: int = Field(ge=0, description="Made calls that ended with an error.")
    input_tokens: int = Field(ge=0, description="Prompt tokens of the made calls.")
    output_tokens: int = Field(ge=0, description="Completion tokens of the made calls.")
    cost_usd: float = Field(ge=0, description="Cost of the made calls at the teacher's prices.")
    seconds: float = Field(ge=0, description="Wall time the teacher had calls running.")
    not_made: int = Field(0, ge=0, description="Calls not made: the budget was reached or the teacher was stopped.")
    usage_estimated: int = Field(
        0, ge=0, description="Made calls whose token counts were estimated from the text (usage missing or unbelievable).")
    stopped: Text | None = Field(None, description="Why the teacher was stopped, if it was (redacted).")
    batch_calls: int = Field(0, ge=0, description="Of the made calls, those a batch answered (docs/batch.md).")
    batch_input_tokens: int = Field(0, ge=0, description="Prompt tokens of the calls a batch answered.")
    batch_output_tokens: int = Field(0, ge=0, description="Completion tokens of the calls a batch answered.")
    batch_cost_usd: float = Field(0.0, ge=0, description="Cost of the calls a batch answered, at batch prices.")
    batches: int = Field(0, ge=0, description="Batches this process submitted.")
    latency_p50_s: float | None = Field(description="Median latency per made call, retries included; null when none.")
    latency_p95_s: float | None = Field(description="95th percentile latency; null when none.")


    @classmethod
    def from_counts(cls, counts: Mapping[str, Any]) -> "TeacherStats":
        """The record of the call path's plain statistics (Dispatcher.summary()): a count never made is 0. A
        file read with :func:`read_document` must hold every field."""
        zeros = {name: 0 for name, info in cls.model_fields.items() if info.annotation in (int, float)}
        return cls.model_validate({**zeros, **counts})


class TeachStats(RootModel[dict[str, TeacherStats]]):
    """teach_stats.json: ``{teacher: TeacherStats}``."""


class TrainLogLine(Record):
    """model/train_log.jsonl: one logged optimizer step."""

    step: int = Field(ge=0, description="Optimizer step.")
    epoch: float | None = Field(None, description="Epoch reached.")
    loss: float | None = Field(None, description="Joint loss.")
    loss_feedback: float | None = Field(None, description="Mean feedback loss since the last log.")
    loss_rationale: float | None = Field(None, description="Mean rationale loss since the last log.")
    learning_rate: float | None = Field(None, description="Learning rate.")


R = TypeVar("R", bound=BaseModel)

# every model that has a line in docs/formats.md, by artifact file name
ARTIFACTS: dict[str, type[BaseModel]] = {
    "mistakes.jsonl": Mistake,
    "feedback.jsonl": Feedback,
    "rationales.jsonl": Rationale,
    "train.jsonl": TrainingPair,
    "predictions.jsonl": Prediction,
    "metrics.json": Metrics,
    "teach_stats.json": TeachStats,
    "train_log.jsonl": TrainLogLine,
}


def _reason(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(record)"
    if error["type"] == "missing":
        return f"field '{field}': missing"
    return f"field '{field}': {error['msg']} (got {error.get('input')!r:.60})"


def parse_record(model: type[R], data: Any, where: str) -> R:
    """``data`` validated as ``model``; a MapdError ``where: field 'x': reason`` otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MapdError(f"{where}: {_reason(exc.errors()[0])}") from None


def read_records(path: str | Path, model: type[R], *, partial_tail_ok: bool = False) -> list[R]:
    """Every line of a JSONL artifact as ``model``; the first bad line is a MapdError ``file:line: ...``."""
    return [parse_record(model, data, f"{path}:{line}")
            for line, data in read_jsonl_lines(path, partial_tail_ok=partial_tail_ok)]


def read_document(path: str | Path, model: type[R]) -> R:
    """One JSON artifact (metrics.json, teach_stats.json) as ``model``."""
    return parse_record(model, read_json(path, dict), str(path))


def write_records(path: str | Path, records: list[BaseModel]) -> Path:
    """Write records as JSONL atomically (fields in model order, as docs/formats.md lists them)."""
    return write_jsonl(path, [record.model_dump(mode="json") for record in records])


def write_document(path: str | Path, record: BaseModel) -> Path:
    """Write one JSON artifact atomically."""
    return write_json(path, record.model_dump(mode="json"))


def read_mistakes(path: str | Path) -> list[Mistake]:
    """mistakes.jsonl with unique ids; an empty file or a repeated id is a MapdError naming the line."""
    mistakes, seen = [], {}
    for line, data in read_jsonl_lines(path):
        mistake = parse_record(Mistake, data, f"{path}:{line}")
        if mistake.id in seen:
            raise MapdError(f"{path}:{line}: field 'id': {mistake.id!r} already on line {seen[mistake.id]}")
        seen[mistake.id] = line
        mistakes.append(mistake)
    if not mistakes:
        raise MapdError(f"{path}: no mistakes (the file is empty)")
    return mistakes
