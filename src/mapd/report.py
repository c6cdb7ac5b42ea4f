"""``mapd report``: a self-contained report.html (plots inline as PNG) and a short report.md.

The input is a full ``mapd run`` folder (manifest.json + round-N/) or one round folder made by
``mapd teach`` / ``mapd import-reference``. The report shows what is there and says plainly what
is absent; artifacts may be mid-write, so a partial last JSONL line is dropped. Every artifact is
read as its typed record (mapd.records), so a malformed line is one error naming ``file:line: field``;
every file name comes from mapd.layout.

Gold checks of rationales need the task's answer kind: it comes from manifest.json's task when
present, else it is inferred from the golds (all true/false: bool; all single letters: choice;
else number).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict

from mapd.errors import MapdError
from mapd.io import read_json, write_text_atomic
from mapd.layout import EvalLayout, RoundLayout, RunLayout
from mapd.records import (
    Feedback,
    Metrics,
    Mistake,
    Prediction,
    Rationale,
    Review,
    TeacherStats,
    TeachStats,
    TrainingPair,
    TrainLogLine,
    parse_record,
    read_document,
    read_records,
)
from mapd.stats import PairedComparison, format_p, paired_comparison, wilson_interval

SCORES = [1, 2, 3, 4, 5]
N_WRONG_SHOWN = 3
N_CHANGED_SHOWN = 20  # rows of the table of questions whose verdict changed
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
# file names in texts that are not about one round's folder (a round's own files are named by its layout)
_NAMES = RoundLayout(Path())


# ---------------------------------------------------------------- document blocks

@dataclass
class Link:
    """A table cell that links to a file relative to the run folder."""

    text: str
    href: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]
    md: bool = True  # also in report.md


@dataclass
class Text:
    text: str
    md: bool = True


@dataclass
class Plot:
    png: bytes
    alt: str


@dataclass
class Html:
    """Markup already escaped where needed; report.html only."""

    html: str


@dataclass
class Section:
    level: int
    title: str
    blocks: list[Table | Text | Plot | Html] = field(default_factory=list)


# ---------------------------------------------------------------- reading

R = TypeVar("R", bound=BaseModel)


def _records(path: Path, model: type[R]) -> list[R] | None:
    """The typed records of a JSONL artifact (a partial last line dropped), or None when it is absent."""
    return read_records(path, model, partial_tail_ok=True) if path.is_file() else None


def _document(path: Path, model: type[R]) -> R | None:
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
        return Evaluation(label, layout, _document(layout.metrics, Metrics), _records(layout.predictions, Prediction))


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


def _load_round(layout: RoundLayout) -> Round:
    stats = _document(layout.teach_stats, TeachStats)
    return Round(
        layout=layout,
        mistakes=_records(layout.mistakes, Mistake),
        feedback=_records(layout.feedback, Feedback),
        rationales=_records(layout.rationales, Rationale),
        teach_stats=None if stats is None else stats.root,
        train=_records(layout.train, TrainingPair),
        train_log=_records(layout.train_log, TrainLogLine),
        before=Evaluation.load(layout.eval_before, "before training"),
        after=Evaluation.load(layout.eval_after, "after training"),
    )


# ---------------------------------------------------------------- small helpers

def _pct(part: float | None, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole and part is not None else "—"


def _num(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _short(text: str | None, limit: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _valid_scores(reviews: list[Review]) -> list[tuple[str, int]]:
    return [(v.reviewer, v.score) for v in reviews if v.score is not None]


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _teachers(rounds: list[Round], manifest: dict | None) -> list[str]:
    """Teacher names: the manifest's committee order first, then any other name met in the artifacts."""
    names = [t.get("name") for t in ((manifest or {}).get("config") or {}).get("teachers") or []]
    for r in rounds:
        names.extend(x.teacher for x in r.feedback or [])
        for x in r.rationales or []:
            names.append(x.teacher)
            names.extend(v.reviewer for v in x.reviews)
        names.extend(r.teach_stats or {})
    return [n for n in dict.fromkeys(names) if n]


# ---------------------------------------------------------------- answer kind and gold check

def answer_kind(manifest: dict | None, golds: list[str]) -> str:
    """The task's answer kind: from the manifest's task config when it names one, else inferred from golds."""
    task = ((manifest or {}).get("config") or {}).get("task")
    if task:
        from mapd.tasks import TaskConfig, get_task

        try:
            return get_task(TaskConfig.model_validate(task)).answer_kind
        except (MapdError, ValueError):
            pass  # an unknown or outdated task config: fall back to the golds
    from mapd.tasks.base import infer_answer_kind

    return infer_answer_kind(golds)


def _rationale_right(record: Rationale, gold: str, kind: str) -> bool:
    """Whether a rationale's own final answer equals the gold (extracted from its text if not recorded)."""
    from mapd.answers import extract, is_correct

    recorded = "answer" in record.model_fields_set  # an explicit null is recorded: no answer
    answer = record.answer if recorded else extract(record.text, kind).answer
    return answer is not None and bool(is_correct(answer, gold, kind))


# ---------------------------------------------------------------- sections of one round

def _inventory(r: Round, run_dir: Path) -> Section:
    rows = []
    for path, content in r.files():
        if content is None:
            rows.append([r.rel(path), "absent"])
        else:
            size = f"{len(content):,} records" if isinstance(content, list) else "present"
            rows.append([Link(r.rel(path), path.relative_to(run_dir).as_posix()), size])
    return Section(3, "Files", [Table(["file", "status"], rows, md=False)])


def _funnel(r: Round, questions: int | None) -> Section:
    mistakes, feedback, rationales, train = r.mistakes, r.feedback, r.rationales, r.train
    fed = None if feedback is None else [x for x in feedback if x.text is not None]
    written = None if rationales is None else [x for x in rationales if x.text is not None]
    accepted = None if written is None else [x for x in written if x.accepted]
    status, kinds = Counter(m.status for m in mistakes or []), Counter(x.kind for x in train or [])
    layout = r.layout
    stages = [  # (stage, records or None when the file is absent, file, note)
        ("mistakes", mistakes, layout.mistakes, f"{status['wrong']:,} wrong, {status['unparsed']:,} unparsed"),
        ("feedback", fed, layout.feedback, f"{len(feedback or []) - len(fed or []):,} failed"),
        ("rationales", written, layout.rationales, f"{len(rationales or []) - len(written or []):,} failed"),
        ("accepted", accepted, layout.rationales, f"{_pct(len(accepted or []), len(written or []))} of rationales"),
        ("training pairs", train, layout.train, f"{kinds['feedback']:,} feedback, {kinds['rationale']:,} rationale"),
    ]
    rows = [["questions", "not recorded" if questions is None else _num(questions), "—", ""]]
    rows += [[name, "absent", "—", f"{r.rel(file)} absent"] if records is None
             else [name, _num(len(records)), _num(len({x.id for x in records})), note]
             for name, records, file, note in stages]
    shown = [("questions", questions)] if questions is not None else []
    shown += [(name, len(records)) for name, records, _, _ in stages if records is not None]
    blocks = [Table(["stage", "count", "mistakes covered", "note"], rows)]
    if shown:
        fig, ax = _figure(4.6, 0.4 * len(shown) + 0.7)
        labels, counts = [n for n, _ in shown][::-1], [c for _, c in shown][::-1]
        bars = ax.barh(labels, counts, color=COLORS[0])
        ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3)
        ax.set_xlabel("count")
        ax.margins(x=0.12)
        blocks.append(Plot(_png(fig), "funnel: counts per stage"))
    return Section(3, "Funnel", blocks)


def _stats_cells(s: TeacherStats | None) -> list[str]:
    """calls, cache hits, tokens in / out, cost, latency p50 / p95 of one teacher (dashes when not recorded)."""
    if s is None:
        return ["—", "—", "— / —", "—", "— / —"]
    return [_num(s.calls), _num(s.cache_hits), f"{_num(s.input_tokens)} / {_num(s.output_tokens)}",
            f"${s.cost_usd:,.4f}", f"{_num(s.latency_p50_s)} / {_num(s.latency_p95_s)}"]


def _batch_cells(s: TeacherStats | None) -> list[str]:
    """Of the calls, those a batch answered (and the batches submitted), their tokens and cost (docs/batch.md)."""
    if s is None:
        return ["—", "— / —", "—"]
    return [f"{_num(s.batch_calls)} ({_num(s.batches)})", f"{_num(s.batch_input_tokens)} / {_num(s.batch_output_tokens)}",
            f"${s.batch_cost_usd:,.4f}"]


def _teacher_table(r: Round, teachers: list[str]) -> Section:
    feedback, rationales, stats = r.feedback, r.rationales, r.teach_stats
    files = [(r.layout.feedback, feedback), (r.layout.rationales, rationales), (r.layout.teach_stats, stats)]
    if feedback is None and rationales is None and stats is None:
        names = [r.rel(path) for path, _ in files]
        return Section(3, "Teachers", [Text(f"No teacher outputs: {names[0]}, {names[1]} and {names[2]} are absent.")])
    batched = any(s.batch_calls or s.batches for s in (stats or {}).values())
    rows = []
    for t in teachers:
        own = [x for x in rationales or [] if x.teacher == t and x.text is not None]
        accepted = sum(x.accepted for x in own)
        received = [s for x in own for _, s in _valid_scores(x.reviews)]
        given = [s for x in rationales or [] for who, s in _valid_scores(x.reviews) if who == t]
        failures = (sum(x.teacher == t and x.error is not None for x in feedback or [])
                    + sum(x.teacher == t and x.error is not None for x in rationales or [])
                    + sum(v.reviewer == t and v.error is not None for x in rationales or [] for v in x.reviews))
        row = [t, _num(len(own)), _num(accepted), _pct(accepted, len(own)), _num(_mean(received)),
               _num(_mean(given)), _num(failures)]
        if stats is not None:
            row += _stats_cells(stats.get(t)) + (_batch_cells(stats.get(t)) if batched else [])
        rows.append(row)
    headers = ["teacher", "rationales", "accepted", "acceptance", "mean score received", "mean score given", "failures"]
    if stats is not None:
        headers += ["calls", "cache hits", "tokens in / out", "cost", "latency p50 / p95 s"]
        headers += ["of which batch (batches)", "batch tokens in / out", "batch cost"] if batched else []
    blocks = [Table(headers, rows)]
    notes = [r.rel(path) for path, content in files if content is None]
    blocks.append(Text(" ".join(["Failures count feedback, rationale and review calls whose error is set.",
                                 *([f"Absent: {', '.join(notes)}."] if notes else [])])))
    return Section(3, "Teachers", blocks)


def _alpha(matrix: np.ndarray) -> float | None:
    """Krippendorff's alpha (ordinal, scores 1-5) of a reviewers x rationales matrix; None when undefined."""
    import krippendorff

    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            value = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal", value_domain=SCORES)
    except ValueError:  # no rationale scored by two reviewers
        return None
    return None if math.isnan(value) else float(value)


def _peer_review(r: Round, teachers: list[str]) -> Section:
    rationales = [x for x in r.rationales or [] if x.text is not None]
    reviews = [v for x in rationales for v in x.reviews]
    if not reviews:
        what = f"{r.rel(r.layout.rationales)} is absent" if r.rationales is None else "no rationale has a review"
        return Section(3, "Peer review", [Text(f"No peer reviews: {what}.")])
    reviewers = [t for t in teachers if any(v.reviewer == t for v in reviews)]
    counts = {who: Counter(v.score for v in reviews if v.reviewer == who) for who in reviewers}  # None: invalid

    fig, ax = _figure(5.5, 2.8)
    width = 0.8 / len(reviewers)
    xs = np.arange(len(SCORES) + 1)
    for i, who in enumerate(reviewers):
        heights = [counts[who].get(s, 0) for s in SCORES] + [counts[who].get(None, 0)]
        offset = (i - (len(reviewers) - 1) / 2) * width
        ax.bar(xs + offset, heights, width, label=str(who), color=COLORS[i % len(COLORS)])
    ax.set_xticks(xs, [str(s) for s in SCORES] + ["invalid"])
    ax.set_xlabel("score given")
    ax.set_ylabel("reviews")
    ax.legend(title="reviewer", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    rows = [[who, *(_num(counts[who].get(s, 0)) for s in SCORES), _num(counts[who].get(None, 0))] for who in reviewers]
    blocks = [Plot(_png(fig), "histogram of review scores per reviewer"),
              Table(["reviewer", *map(str, SCORES), "invalid"], rows)]

    matrix = np.full((len(reviewers), len(rationales)), np.nan)
    for j, x in enumerate(rationales):
        for who, score in _valid_scores(x.reviews):
            if who in reviewers:
                matrix[reviewers.index(who), j] = score
    overall = _alpha(matrix)
    pairs = [[a, b, _num(_alpha(matrix[[i, k]]), 3)]
             for i, a in enumerate(reviewers) for k, b in enumerate(reviewers) if i < k]
    blocks.append(Text(
        f"Agreement between reviewers, Krippendorff's alpha (ordinal; units = {len(rationales):,} rationales, "
        f"coders = {len(reviewers)} reviewers, invalid or missing scores left out): "
        + (f"{overall:.3f}." if overall is not None
           else "undefined (no rationale scored by two reviewers, or no variation).")))
    if pairs:
        blocks.append(Table(["reviewer", "reviewer", "alpha"], pairs))
    return Section(3, "Peer review", blocks)


def _confusion(checked: list[tuple[Rationale, bool]]) -> tuple[int, int, int, int]:
    """(accepted and right, accepted and wrong, rejected and right, rejected and wrong)."""
    cells = Counter((x.accepted, right) for x, right in checked)
    return cells[True, True], cells[True, False], cells[False, True], cells[False, False]


def _gold_check(r: Round, kind: str) -> Section:
    mistakes, rationales = r.mistakes, r.rationales
    if mistakes is None or rationales is None:
        files = [(r.layout.mistakes, mistakes), (r.layout.rationales, rationales)]
        absent = " and ".join(r.rel(path) for path, content in files if content is None)
        return Section(3, "Peer review against the gold answer", [Text(
            f"Needs {r.rel(r.layout.mistakes)} (gold answers) and {r.rel(r.layout.rationales)}; {absent} absent.")])
    golds = {m.id: m.gold for m in mistakes}
    checked = [(x, _rationale_right(x, golds[x.id], kind)) for x in rationales if x.text is not None and x.id in golds]
    if not checked:
        return Section(3, "Peer review against the gold answer", [Text("No rationale with a known gold answer.")])
    counts = _confusion(checked)
    acc_right, acc_wrong, rej_right, rej_wrong = counts
    table = Table(["", "answer right", "answer wrong", "total"], [
        ["accepted by review", _num(acc_right), _num(acc_wrong), _num(acc_right + acc_wrong)],
        ["rejected by review", _num(rej_right), _num(rej_wrong), _num(rej_right + rej_wrong)],
    ])
    per = []
    for t in dict.fromkeys(x.teacher for x, _ in checked):
        a_right, a_wrong, r_right, r_wrong = _confusion([(x, right) for x, right in checked if x.teacher == t])
        per.append([t, *map(_num, (a_right + a_wrong, a_wrong, r_right + r_wrong, r_right, a_right + r_right))])
    text = (f"Each rationale's own final answer is compared with the mistake's gold answer (answer kind: {kind}). "
            f"Accepted but wrong: {acc_wrong:,} ({_pct(acc_wrong, acc_right + acc_wrong)} of accepted); "
            f"rejected but right: {rej_right:,} ({_pct(rej_right, rej_right + rej_wrong)} of rejected). "
            f"Precision of acceptance {_pct(acc_right, acc_right + acc_wrong)}, "
            f"recall {_pct(acc_right, acc_right + rej_right)}.")
    return Section(3, "Peer review against the gold answer", [Text(text), table, Table(
        ["teacher", "accepted", "accepted but wrong", "rejected", "rejected but right", "answer right"], per)])


def _training(r: Round, summary: dict) -> Section:
    """The round's loss curves; ``summary`` (the train stage's, manifest.json) gives the processes it ran on."""
    log, name = r.train_log, r.rel(r.layout.train_log)
    if log is None:
        return Section(3, "Training", [Text(f"{name} is absent: this round has not been trained (yet).")])
    keys = [k for k in ("loss", "loss_feedback", "loss_rationale") if any(getattr(x, k) is not None for x in log)]
    if not keys:
        return Section(3, "Training", [Text(f"{name} holds no logged loss yet.")])
    fig, ax = _figure(5.5, 2.8)
    for i, key in enumerate(keys):
        points = [(x.step, getattr(x, key)) for x in log if getattr(x, key) is not None]
        ax.plot(*zip(*points), label=key, color=COLORS[i], marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    rows = [[k, _num(next(getattr(x, k) for x in log if getattr(x, k) is not None), 4),
             _num(next(getattr(x, k) for x in reversed(log) if getattr(x, k) is not None), 4)] for k in keys]
    processes = f" on {summary['world_size']} processes" if isinstance(summary.get("world_size"), int) else ""
    return Section(3, "Training", [Text(f"{len(log):,} logged steps, last step {log[-1].step}{processes}."),
                                    Plot(_png(fig), "training loss per step"), Table(["loss", "first", "last"], rows)])


def _e(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value))


def _pre(text: Any) -> str:
    return f"<pre>{_e(text)}</pre>"


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


def _wrong_predictions(predictions: list[Prediction]) -> Html:
    wrong = [p for p in predictions if not p.correct][:N_WRONG_SHOWN]
    rows = "".join(
        f"<tr><td>{_e(p.id)}</td><td class='wrap'>{_e(_short(p.question))}</td>"
        f"<td>{_e(p.gold)}</td><td>{_e(p.answer or p.status)}</td>"
        f"<td>{_details('show', _pre(p.output))}</td></tr>"
        for p in wrong)
    head = "".join(f"<th>{h}</th>" for h in ("id", "question", "gold", "answer", "output"))
    return Html(f"<table><tr>{head}</tr>{rows}</table>")


def _example(title: str, record: Rationale | Feedback, mistake: Mistake | None) -> str:
    """One rationale or feedback as a card: the question, the student's answer, the text, the reviews."""
    rationale = isinstance(record, Rationale)
    score = f", mean score {_e(_num(record.mean_score))}" if rationale else ""
    out = [f"<div class='example wide'><h4>{_e(title)} by {_e(record.teacher)}{score}</h4>"]
    if mistake:
        out.append(f"<p class='muted'>Question {_e(record.id)} (gold {_e(mistake.gold)}):</p>" + _pre(mistake.question))
        out.append(_details(f"student's answer ({mistake.answer})", _pre(mistake.output)))
    out.append(f"<p class='muted'>{'Rationale' if rationale else 'Feedback'}:</p>" + _pre(record.text))
    if rationale and record.reviews:
        body = "".join(
            f"<p><b>{_e(v.reviewer)}</b>: score {_e(_num(v.score))}"
            + (f" (error: {_e(v.error)})" if v.error else "") + "</p>"
            + (_pre(v.raw) if v.raw else "<p class='muted'>(no review text recorded)</p>")
            for v in record.reviews)
        scores = ", ".join(f"{v.reviewer} {_num(v.score)}" for v in record.reviews)
        out.append(_details(f"{len(record.reviews)} reviews: {scores}", body))
    return "".join(out) + "</div>"


def _examples(r: Round) -> Section:
    mistakes = {m.id: m for m in r.mistakes or []}
    written = [x for x in r.rationales or [] if x.text is not None]
    picks = [("Accepted rationale", next((x for x in written if x.accepted), None)),
             ("Rejected rationale", next((x for x in written if not x.accepted), None)),
             ("Feedback", next((x for x in r.feedback or [] if x.text is not None), None))]
    cards = [_example(title, record, mistakes.get(record.id)) for title, record in picks if record is not None]
    return Section(3, "Examples", [Html("".join(cards)) if cards else Text("No rationale or feedback yet.", md=False)])


# ---------------------------------------------------------------- whole run

def _eval_rows(rounds: list[Round], run_dir: Path) -> tuple[list[list[Any]], list[tuple[str, float]], list[Html]]:
    rows, bars, samples = [], [], []
    for r in rounds:
        for e in r.evals:
            metrics, predictions = e.metrics, e.predictions
            if metrics is None and predictions is None:
                continue
            link: Any = "absent"
            if predictions is not None:
                wrong = sum(not p.correct for p in predictions)
                link = Link(f"{wrong:,} wrong of {len(predictions):,}",
                            e.layout.predictions.relative_to(run_dir).as_posix())
                samples.append(Html(f"<p class='muted'>{_e(r.name)}, {e.label}: first wrong predictions</p>"))
                samples.append(_wrong_predictions(predictions))
            if metrics is None:
                rows.append([r.name, e.label, "—", "—", "—", "—", "—", "—", link])
                continue
            rows.append([r.name, e.label, _num(metrics.n), _pct(metrics.accuracy, 1), _interval(metrics),
                         _pct(metrics.strict_accuracy, 1), _pct(metrics.unparsed_rate, 1), _num(metrics.seconds, 1),
                         link])
            bars.append((f"{r.name}\n{e.label.split()[0]}", metrics.accuracy))
    return rows, bars, samples


def _evaluation(rounds: list[Round], run_dir: Path) -> Section:
    rows, bars, samples = _eval_rows(rounds, run_dir)
    if not rows:
        folders = f"{_NAMES.eval_before.dir.name}/ or {_NAMES.eval_after.dir.name}/"
        return Section(2, "Accuracy", [Text(f"No evaluation yet: no {folders} folder.")])
    blocks: list = []
    if bars:
        fig, ax = _figure(max(3.5, 1.3 * len(bars)), 2.8)
        drawn = ax.bar([b for b, _ in bars], [100 * a for _, a in bars], color=COLORS[: len(bars)])
        ax.bar_label(drawn, labels=[f"{100 * a:.1f}%" for _, a in bars], padding=2)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        blocks.append(Plot(_png(fig), "accuracy before and after training"))
    blocks.append(Table(["round", "model", "n", "accuracy", "95 % interval", "strict", "unparsed", "seconds",
                         "predictions"], rows))
    blocks.append(Text("95 % interval: the Wilson score interval of the accuracy."))
    return Section(2, "Accuracy", blocks + samples)


def _ci95(metrics: Metrics) -> tuple[float, float]:
    """The 95 % Wilson interval of an evaluation's accuracy."""
    return wilson_interval(round(metrics.accuracy * metrics.n), metrics.n)


def _interval(metrics: Metrics) -> str:
    low, high = _ci95(metrics)
    return f"{100 * low:.1f}% – {100 * high:.1f}%"


def _paired(before: list[Prediction], after: list[Prediction]) -> PairedComparison:
    """Two evaluations matched by question id."""
    return paired_comparison({p.id: p.correct for p in before}, {p.id: p.correct for p in after})


def _answer(prediction: Prediction) -> str:
    return prediction.answer if prediction.answer is not None else f"none ({prediction.status})"


def _changed_rows(comparison: PairedComparison, before: list[Prediction], after: list[Prediction]) -> list[list[str]]:
    """Up to N_CHANGED_SHOWN questions whose verdict changed, gained first (each kind gets at least half the
    rows when it has that many)."""
    old, new = {p.id: p for p in before}, {p.id: p for p in after}
    gained, lost = comparison.gained_ids, comparison.lost_ids
    shown_gained = min(len(gained), max(N_CHANGED_SHOWN // 2, N_CHANGED_SHOWN - len(lost)))
    picked = [(i, "gained") for i in gained[:shown_gained]]
    picked += [(i, "lost") for i in lost[:N_CHANGED_SHOWN - shown_gained]]
    return [[i, _short(new[i].question, 90), _answer(old[i]), _answer(new[i]), new[i].gold, change]
            for i, change in picked]


def _comparison(rounds: list[Round]) -> Section:
    """Each round's trained student against the base student (round 0 before training), question by question:
    gained, lost, the exact McNemar test, and the questions whose verdict changed."""
    title = "Before and after training: is the difference real?"
    base = rounds[0].before.predictions if rounds else None
    trained = [(r, r.after.predictions) for r in rounds if r.after.predictions is not None]
    if base is None or not trained:
        return Section(2, title, [Text(
            f"No paired comparison yet: it needs the base student's predictions (round 0, "
            f"{_NAMES.eval_before.predictions.as_posix()}) and a trained student's "
            f"({_NAMES.eval_after.predictions.as_posix()}).")])
    blocks: list = [Text(
        "Each trained student is compared with the base student (round 0, before training) on the same test "
        "questions, matched by id. Gained: right only after training; lost: right only before. The test is the "
        "exact McNemar test: a two-sided exact binomial test of gained against lost at 1/2.")]
    rows, details = [], []
    for r, after in trained:
        comparison = _paired(base, after)
        n = comparison.n
        rows.append([r.name, _num(n), f"{_num(comparison.before_correct)} ({_pct(comparison.before_correct, n)})",
                     f"{_num(comparison.after_correct)} ({_pct(comparison.after_correct, n)})",
                     _num(comparison.gained), _num(comparison.lost), format_p(comparison.p_value)])
        details.append(Text(f"{r.name}: {comparison.sentence()}"))
        changed = _changed_rows(comparison, base, after)
        if changed:
            rest = comparison.gained + comparison.lost - len(changed)
            more = f" ({rest:,} more not shown: see the predictions files)" if rest else ""
            details.append(Text(f"{r.name}: questions whose verdict changed{more}."))
            details.append(Table(["id", "question", "before", "after", "gold", "change"], changed))
    blocks.append(Table(["round", "paired questions", "right before", "right after", "gained", "lost",
                         "exact McNemar p"], rows))
    return Section(2, title, blocks + details)


def eval_summary(before: EvalLayout, after: EvalLayout) -> dict[str, Any]:
    """What the eval_after stage summary records beside the metrics (manifest.json): ``accuracy_ci95`` (the 95 %
    Wilson interval of ``after``'s accuracy) and, when both have predictions, the paired comparison with
    ``before`` (``paired_n``, ``before_correct``, ``after_correct``, ``gained``, ``lost``, ``mcnemar_p``)."""
    summary: dict[str, Any] = {}
    metrics = _document(after.metrics, Metrics)
    if metrics is not None:
        summary["accuracy_ci95"] = [round(bound, 4) for bound in _ci95(metrics)]
    old, new = _records(before.predictions, Prediction), _records(after.predictions, Prediction)
    if old is not None and new is not None:
        summary.update(_paired(old, new).summary())
    return summary


def _manifest_section(manifest: dict | None, layout: RunLayout) -> Section:
    if manifest is None:
        return Section(2, "Run", [Text(
            f"{layout.manifest.name} is absent (a folder made by mapd teach or import-reference).")])
    config = manifest.get("config") or {}
    teachers = ", ".join(f"{t.get('name')} ({t.get('model')})" for t in config.get("teachers") or []) or "—"
    versions = manifest.get("versions") or {}
    facts = [("task", (config.get("task") or {}).get("name")), ("student", (config.get("student") or {}).get("model")),
             ("teachers", teachers), ("rounds", config.get("rounds")),
             ("build mode", (config.get("build") or {}).get("mode")),
             ("seeds", ", ".join(f"{k} {v}" for k, v in (manifest.get("seeds") or {}).items())),
             ("versions", ", ".join(f"{k} {versions[k]}" for k in ("mapd", "torch", "transformers") if k in versions)),
             ("created", manifest.get("created")), ("finished", manifest.get("finished") or "not finished")]
    blocks = [Table(["", ""], [[k, _num(v) if v else "—"] for k, v in facts])]
    stages = [[str(entry.get("round", i)), name, str(record.get("status", "—")), _num(record.get("seconds"), 1)]
              for i, entry in enumerate(manifest.get("rounds") or []) if isinstance(entry, dict)
              for name, record in (entry.get("stages") or {}).items() if isinstance(record, dict)]
    blocks.append(Table(["round", "stage", "status", "seconds"], stages) if stages else Text("No stage has started."))
    return Section(2, "Run", blocks)


def _stage_summary(manifest: dict | None, index: int, stage: str) -> dict:
    """The summary the runner recorded for one stage of one round, or {}."""
    rounds = (manifest or {}).get("rounds")
    entry = rounds[index] if isinstance(rounds, list) and index < len(rounds) else None
    entry = entry if isinstance(entry, dict) else {}
    summary = ((entry.get("stages") or {}).get(stage) or {}).get("summary")
    return summary if isinstance(summary, dict) else {}


def _cards(rounds: list[Round], manifest: dict | None) -> list[tuple[str, str]]:
    config = (manifest or {}).get("config") or {}
    cards = []
    if config.get("task"):
        cards.append(("task", str(config["task"].get("name"))))
    if config.get("student"):
        cards.append(("student", str(config["student"].get("model")).removeprefix("embedded:")))
    cards.append(("rounds", f"{len(rounds)}" + (f" of {config['rounds']}" if config.get("rounds") else "")))
    written = [x for r in rounds for x in r.rationales or [] if x.text is not None]
    accepted = sum(x.accepted for x in written)
    if any(r.mistakes is not None for r in rounds):
        cards.append(("mistakes", f"{sum(len(r.mistakes or []) for r in rounds):,}"))
    if any(r.rationales is not None for r in rounds):
        cards.append(("rationales", f"{len(written):,}"))
        cards.append(("accepted", f"{accepted:,} ({_pct(accepted, len(written))})"))
    if any(r.train is not None for r in rounds):
        cards.append(("training pairs", f"{sum(len(r.train or []) for r in rounds):,}"))
    before = next((r.before.metrics for r in rounds if r.before.metrics is not None), None)
    after = next((r.after.metrics for r in reversed(rounds) if r.after.metrics is not None), None)
    for label, metrics in (("accuracy before", before), ("accuracy after", after)):
        if metrics is not None:
            cards.append((label, _pct(metrics.accuracy, 1)))
    return cards


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


def _manifest(path: Path) -> dict | None:
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


def _sections(run_dir: Path) -> tuple[str, list[tuple[str, str]], list[Section]]:
    """The report's title, header cards and sections for a run folder (shared by the HTML and Markdown writers)."""
    layout = RunLayout(Path(run_dir))
    if not layout.dir.is_dir():
        raise MapdError(f"{layout.dir}: run folder not found")
    manifest = _manifest(layout.manifest)
    round_layouts = layout.rounds()
    single = round_layouts == [RoundLayout(layout.dir)]
    rounds = [_load_round(round_layout) for round_layout in round_layouts]
    if manifest is None and not rounds:
        raise MapdError(f"{layout.dir}: not a run folder (no {layout.manifest.name}, round-N/ folder, "
                        f"{_NAMES.mistakes.name}, ...)")
    golds = [m.gold for r in rounds for m in r.mistakes or []]
    kind = answer_kind(manifest, golds)
    teachers = _teachers(rounds, manifest)

    sections = [_manifest_section(manifest, layout), _evaluation(rounds, layout.dir), _comparison(rounds)]
    if not rounds:
        sections.append(Section(2, "Rounds", [Text("No round has started: no round-N/ folder yet.")]))
    for index, r in enumerate(rounds):
        sections.append(Section(2, f"Round {r.name}" if single else r.name.replace("-", " ").capitalize()))
        questions = _stage_summary(manifest, index, "mine").get("n")
        questions = questions if isinstance(questions, int) and not isinstance(questions, bool) else None
        sections += [_funnel(r, questions), _teacher_table(r, teachers), _peer_review(r, teachers),
                     _gold_check(r, kind), _training(r, _stage_summary(manifest, index, "train")), _examples(r),
                     _inventory(r, layout.dir)]
    return f"mapd report — {layout.dir.resolve().name}", _cards(rounds, manifest), sections


# ---------------------------------------------------------------- writers

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 16px; }
h2 { border-bottom: 2px solid #e3e6ea; padding-bottom: 4px; margin-top: 40px; }
h3 { margin-top: 28px; color: #34495e; } h4 { margin: 0 0 8px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #eef3f8; border-radius: 8px; padding: 10px 16px; min-width: 110px; }
.card .label { font-size: 12px; text-transform: uppercase; color: #5b6b7b; letter-spacing: .04em; }
.card .value { font-size: 20px; font-weight: 600; overflow-wrap: anywhere; }
.flow { display: flex; flex-wrap: wrap; gap: 0 40px; align-items: flex-start; }
.flow > p, .flow > .wide { flex: 1 1 100%; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e3e6ea; padding: 4px 10px; text-align: left; vertical-align: top; }
td { white-space: nowrap; } td.wrap { white-space: normal; min-width: 240px; }
th { background: #f3f5f7; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: 8px 0; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f8fa; border-radius: 6px; padding: 8px 10px;
      font-size: 13px; max-height: 320px; overflow-y: auto; margin: 4px 0; }
details summary { cursor: pointer; color: #2c5d8f; }
.example { border: 1px solid #e3e6ea; border-radius: 8px; padding: 12px 16px; margin: 12px 0; box-sizing: border-box; }
.muted { color: #5b6b7b; margin: 6px 0 2px; }
"""


def _html_cell(cell: Any) -> str:
    link = isinstance(cell, Link)
    return f'<td><a href="{_e(cell.href)}">{_e(cell.text)}</a></td>' if link else f"<td>{_e(cell)}</td>"


def _md_text(value: Any) -> str:
    """``value`` as Markdown text: a name or record (a teacher name, an id) brings no HTML and no link."""
    return html.escape(str(value), quote=False).replace("[", "\\[").replace("]", "\\]")


def _md_cell(cell: Any) -> str:
    text = f"[{_md_text(cell.text)}]({cell.href})" if isinstance(cell, Link) else _md_text(cell)
    return text.replace("|", "\\|").replace("\n", " ")


def _md_row(cells: list[Any]) -> str:
    return "| " + " | ".join(map(_md_cell, cells)) + " |"


def _render_html(title: str, cards: list[tuple[str, str]], sections: list[Section]) -> str:
    """The report as one self-contained HTML page."""
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
           f"<style>{CSS}</style></head><body><main><h1>{_e(title)}</h1><div class='cards'>"]
    out += [f"<div class='card'><div class='label'>{_e(k)}</div><div class='value'>{_e(v)}</div></div>"
            for k, v in cards]
    out.append("</div>")
    for section in sections:
        out.append(f"<h{section.level}>{_e(section.title)}</h{section.level}><div class='flow'>")
        for block in section.blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{_e(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(map(_html_cell, row)) + "</tr>" for row in block.rows)
                out.append(f"<table>{f'<tr>{head}</tr>' if any(block.headers) else ''}{body}</table>")
            elif isinstance(block, Text):
                out.append(f"<p>{_e(block.text)}</p>")
            elif isinstance(block, Plot):
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<img alt="{_e(block.alt)}" src="data:image/png;base64,{data}">')
            else:
                out.append(block.html)
        out.append("</div>")
    out.append("</main></body></html>\n")
    return "\n".join(out)


def _render_markdown(title: str, cards: list[tuple[str, str]], sections: list[Section], html_name: str) -> str:
    """The report's key numbers and tables in Markdown (plots and examples are in ``html_name`` beside it)."""
    out = [f"# {title}", "", f"Plots and examples: [{html_name}]({html_name}).", "",
           "| | |", "|---|---|", *(_md_row([k, v]) for k, v in cards)]
    for section in sections:
        blocks = [b for b in section.blocks if isinstance(b, (Table, Text)) and b.md]
        if not blocks and section.level > 2:
            continue
        out += ["", f"{'#' * section.level} {section.title}"]
        for block in blocks:
            if isinstance(block, Text):
                out += ["", _md_text(block.text)]
            else:
                out += ["", _md_row(block.headers), "|" + "---|" * len(block.headers), *map(_md_row, block.rows)]
    return "\n".join(out) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write ``report.html`` (self-contained) and ``report.md`` into ``run_dir``; return the HTML path."""
    layout = RunLayout(Path(run_dir))
    title, cards, sections = _sections(layout.dir)
    for path in (layout.report_md, layout.report_html):  # both or neither
        if path.is_dir():
            raise MapdError(f"{path}: is a folder, expected a file (the report writes it)")
    write_text_atomic(layout.report_md, _render_markdown(title, cards, sections, layout.report_html.name))
    return write_text_atomic(layout.report_html, _render_html(title, cards, sections))
