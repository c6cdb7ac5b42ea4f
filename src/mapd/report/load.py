"""Reading a run folder into typed objects: manifest.json (its shape checked), and each round's artifacts as
their mapd.records models. An absent file is None; a partial last JSONL line (mid-write) is dropped."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from mapd.errors import MapdError
from mapd.io import read_json
from mapd.layout import EvalLayout, RoundLayout
from mapd.records import (
    Feedback,
    Metrics,
    Mistake,
    Prediction,
    Rationale,
    TeacherStats,
    TeachStats,
    TrainingPair,
    TrainLogLine,
    parse_record,
    read_document,
    read_records,
)

R = TypeVar("R", bound=BaseModel)


def load_records(path: Path, model: type[R]) -> list[R] | None:
    """The typed records of a JSONL artifact (a partial last line dropped), or None when it is absent."""
    return read_records(path, model, partial_tail_ok=True) if path.is_file() else None


def load_document(path: Path, model: type[R]) -> R | None:
    """A typed JSON artifact, or None when it is absent."""
    return read_document(path, model) if path.is_file() else None


@dataclass
class Evaluation:
    """One evaluation folder of a round; absent files are None."""

    label: str  # "before training" / "after training"
    layout: EvalLayout
    metrics: Metrics | None
    predictions: list[Prediction] | None

    @staticmethod
    def load(layout: EvalLayout, label: str) -> Evaluation:
        """The evaluation folder at ``layout``, named ``label`` in the report."""
        return Evaluation(label, layout, load_document(layout.metrics, Metrics),
                          load_records(layout.predictions, Prediction))


@dataclass
class Round:
    """One round folder's artifacts as typed records; an absent file is None."""

    layout: RoundLayout
    mistakes: list[Mistake] | None
    feedback: list[Feedback] | None
    rationales: list[Rationale] | None
    teach_stats: dict[str, TeacherStats] | None
    train: list[TrainingPair] | None
    train_log: list[TrainLogLine] | None
    before: Evaluation
    after: Evaluation

    @property
    def name(self) -> str:
        return self.layout.dir.name

    @property
    def evals(self) -> list[Evaluation]:
        return [self.before, self.after]

    def rel(self, path: Path) -> str:
        """``path`` relative to the round folder, as the report names it."""
        return path.relative_to(self.layout.dir).as_posix()

    def files(self) -> list[tuple[Path, Any]]:
        """Every artifact the report reads, in inventory order, with its content (None when absent)."""
        return [(self.layout.mistakes, self.mistakes), (self.layout.feedback, self.feedback),
                (self.layout.rationales, self.rationales), (self.layout.teach_stats, self.teach_stats),
                (self.layout.train, self.train), (self.layout.train_log, self.train_log),
                *((path, content) for e in self.evals
                  for path, content in ((e.layout.metrics, e.metrics), (e.layout.predictions, e.predictions)))]


def load_round(layout: RoundLayout) -> Round:
    """A round folder's artifacts."""
    stats = load_document(layout.teach_stats, TeachStats)
    return Round(
        layout=layout,
        mistakes=load_records(layout.mistakes, Mistake),
        feedback=load_records(layout.feedback, Feedback),
        rationales=load_records(layout.rationales, Rationale),
        teach_stats=None if stats is None else stats.root,
        train=load_records(layout.train, TrainingPair),
        train_log=load_records(layout.train_log, TrainLogLine),
        before=Evaluation.load(layout.eval_before, "before training"),
        after=Evaluation.load(layout.eval_after, "after training"),
    )


class _Lenient(BaseModel):
    """A part of manifest.json as the report reads it: the fields it shows must have their types, any other
    field is kept as it is (a manifest of valid JSON but the wrong shape is one error naming the field)."""

    model_config = ConfigDict(extra="allow", strict=True)


class _TaskView(_Lenient):
    name: str | None = None


class _TeacherView(_Lenient):
    name: str | None = None
    model: str | None = None


class _BuildView(_Lenient):
    mode: str | None = None


class _ConfigView(_Lenient):
    task: _TaskView | None = None
    student: _TeacherView | None = None
    teachers: list[_TeacherView] | None = None
    build: _BuildView | None = None
    rounds: int | None = None


class _StageView(_Lenient):
    status: str | None = None
    seconds: float | None = None
    summary: dict[str, Any] | None = None


class _RoundView(_Lenient):
    round: int | None = None
    stages: dict[str, _StageView] | None = None


class _ManifestView(_Lenient):
    config: _ConfigView | None = None
    rounds: list[_RoundView] | None = None
    versions: dict[str, Any] | None = None
    seeds: dict[str, Any] | None = None
    created: str | None = None
    finished: str | None = None


def load_manifest(path: Path) -> dict | None:
    """manifest.json as plain data, its shape checked (a MapdError ``file: field 'x': ...`` otherwise), or
    None when it is absent."""
    if not path.is_file():
        return None
    data = read_json(path, dict)
    try:
        parse_record(_ManifestView, data, str(path))
    except MapdError as exc:  # pydantic names the view class; the reader needs only the field
        raise MapdError(re.sub(r" or instance of _\w+", "", str(exc))) from None
    return data
