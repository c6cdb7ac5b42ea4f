"""The report's numbers and tables from the loaded run: accuracy rows, the paired comparison (mapd.stats),
acceptance against the gold answer, reviewer agreement, costs. Each section is a ``Section`` of blocks that
hold data only; mapd.report.render turns them into Markdown, HTML and plots.

Gold checks of rationales need the task's answer kind: it comes from manifest.json's task when present, else
it is inferred from the golds (all true/false: bool; all single letters: choice; else number).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mapd.errors import MapdError
from mapd.layout import EvalLayout, RoundLayout, RunLayout
from mapd.records import Feedback, Metrics, Mistake, Prediction, Rationale, Review, TeacherStats
from mapd.report.load import Round, load_document, load_manifest, load_records, load_round
from mapd.stats import PairedComparison, accuracy_interval, format_p, paired_comparison

SCORES = [1, 2, 3, 4, 5]
N_WRONG_SHOWN = 3
N_CHANGED_SHOWN = 20  # rows of the table of questions whose verdict changed
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
class FunnelChart:
    """Counts per stage (horizontal bars)."""

    shown: list[tuple[str, int]]


@dataclass
class ScoreChart:
    """Review scores per reviewer; a None score is an invalid one."""

    reviewers: list[str]
    counts: dict[str, Counter]


@dataclass
class LossChart:
    """Logged losses per step, one series per loss key."""

    series: dict[str, list[tuple[int, float]]]


@dataclass
class AccuracyChart:
    """Accuracy per evaluation (label, accuracy)."""

    bars: list[tuple[str, float]]


@dataclass
class WrongPredictions:
    """The first wrong predictions of an evaluation, under a caption; report.html only."""

    caption: str
    predictions: list[Prediction]


@dataclass
class Examples:
    """Example cards (title, rationale or feedback, its mistake if known); report.html only."""

    picks: list[tuple[str, Rationale | Feedback, Mistake | None]]


Chart = FunnelChart | ScoreChart | LossChart | AccuracyChart
Block = Table | Text | Chart | WrongPredictions | Examples


@dataclass
class Section:
    level: int
    title: str
    blocks: list[Block] = field(default_factory=list)


# ---------------------------------------------------------------- small helpers

def pct(part: float | None, whole: float) -> str:
    """``part`` of ``whole`` as a percentage with one decimal, or a dash."""
    return f"{100 * part / whole:.1f}%" if whole and part is not None else "—"


def num(value: Any, digits: int = 2) -> str:
    """A number with thousands separators (``digits`` decimals for floats), or a dash when absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def short(text: str | None, limit: int = 160) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _valid_scores(reviews: list[Review]) -> list[tuple[str, int]]:
    return [(v.reviewer, v.score) for v in reviews if v.score is not None]


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
    from mapd.answers import is_correct
    from mapd.stages.review import own_answer

    recorded = "answer" in record.model_fields_set  # an explicit null is recorded: no answer
    answer = record.answer if recorded else own_answer(record.text, kind, record.cut_off)
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
        ("accepted", accepted, layout.rationales, f"{pct(len(accepted or []), len(written or []))} of rationales"),
        ("training pairs", train, layout.train, f"{kinds['feedback']:,} feedback, {kinds['rationale']:,} rationale"),
    ]
    rows = [["questions", "not recorded" if questions is None else num(questions), "—", ""]]
    rows += [[name, "absent", "—", f"{r.rel(file)} absent"] if records is None
             else [name, num(len(records)), num(len({x.id for x in records})), note]
             for name, records, file, note in stages]
    shown = [("questions", questions)] if questions is not None else []
    shown += [(name, len(records)) for name, records, _, _ in stages if records is not None]
    blocks = [Table(["stage", "count", "mistakes covered", "note"], rows)]
    if shown:
        blocks.append(FunnelChart(shown))
    return Section(3, "Funnel", blocks)


def _stats_cells(s: TeacherStats | None) -> list[str]:
    """calls, cache hits, tokens in / out, cost, latency p50 / p95 of one teacher (dashes when not recorded)."""
    if s is None:
        return ["—", "—", "— / —", "—", "— / —"]
    return [num(s.calls), num(s.cache_hits), f"{num(s.input_tokens)} / {num(s.output_tokens)}",
            f"${s.cost_usd:,.4f}", f"{num(s.latency_p50_s)} / {num(s.latency_p95_s)}"]


def _batch_cells(s: TeacherStats | None) -> list[str]:
    """Of the calls, those a batch answered (and the batches submitted), their tokens and cost (docs/batch.md)."""
    if s is None:
        return ["—", "— / —", "—"]
    return [f"{num(s.batch_calls)} ({num(s.batches)})", f"{num(s.batch_input_tokens)} / {num(s.batch_output_tokens)}",
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
        row = [t, num(len(own)), num(accepted), pct(accepted, len(own)), num(_mean(received)),
               num(_mean(given)), num(failures)]
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

    rows = [[who, *(num(counts[who].get(s, 0)) for s in SCORES), num(counts[who].get(None, 0))] for who in reviewers]
    blocks = [ScoreChart(reviewers, counts),
              Table(["reviewer", *map(str, SCORES), "invalid"], rows)]

    matrix = np.full((len(reviewers), len(rationales)), np.nan)
    for j, x in enumerate(rationales):
        for who, score in _valid_scores(x.reviews):
            if who in reviewers:
                matrix[reviewers.index(who), j] = score
    overall = _alpha(matrix)
    pairs = [[a, b, num(_alpha(matrix[[i, k]]), 3)]
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
        ["accepted by review", num(acc_right), num(acc_wrong), num(acc_right + acc_wrong)],
        ["rejected by review", num(rej_right), num(rej_wrong), num(rej_right + rej_wrong)],
    ])
    per = []
    for t in dict.fromkeys(x.teacher for x, _ in checked):
        a_right, a_wrong, r_right, r_wrong = _confusion([(x, right) for x, right in checked if x.teacher == t])
        per.append([t, *map(num, (a_right + a_wrong, a_wrong, r_right + r_wrong, r_right, a_right + r_right))])
    text = (f"Each rationale's own final answer is compared with the mistake's gold answer (answer kind: {kind}). "
            f"Accepted but wrong: {acc_wrong:,} ({pct(acc_wrong, acc_right + acc_wrong)} of accepted); "
            f"rejected but right: {rej_right:,} ({pct(rej_right, rej_right + rej_wrong)} of rejected). "
            f"Precision of acceptance {pct(acc_right, acc_right + acc_wrong)}, "
            f"recall {pct(acc_right, acc_right + rej_right)}.")
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
    series = {key: [(x.step, getattr(x, key)) for x in log if getattr(x, key) is not None] for key in keys}
    rows = [[k, num(next(getattr(x, k) for x in log if getattr(x, k) is not None), 4),
             num(next(getattr(x, k) for x in reversed(log) if getattr(x, k) is not None), 4)] for k in keys]
    processes = f" on {summary['world_size']} processes" if isinstance(summary.get("world_size"), int) else ""
    return Section(3, "Training", [Text(f"{len(log):,} logged steps, last step {log[-1].step}{processes}."),
                                    LossChart(series), Table(["loss", "first", "last"], rows)])


def _examples(r: Round) -> Section:
    mistakes = {m.id: m for m in r.mistakes or []}
    written = [x for x in r.rationales or [] if x.text is not None]
    picks = [("Accepted rationale", next((x for x in written if x.accepted), None)),
             ("Rejected rationale", next((x for x in written if not x.accepted), None)),
             ("Feedback", next((x for x in r.feedback or [] if x.text is not None), None))]
    cards = [(title, record, mistakes.get(record.id)) for title, record in picks if record is not None]
    return Section(3, "Examples", [Examples(cards) if cards else Text("No rationale or feedback yet.", md=False)])


# ---------------------------------------------------------------- whole run

def _eval_rows(rounds: list[Round], run_dir: Path,
               ) -> tuple[list[list[Any]], list[tuple[str, float]], list[WrongPredictions]]:
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
                wrong_first = [p for p in predictions if not p.correct][:N_WRONG_SHOWN]
                samples.append(WrongPredictions(f"{r.name}, {e.label}: first wrong predictions", wrong_first))
            if metrics is None:
                rows.append([r.name, e.label, "—", "—", "—", "—", "—", "—", link])
                continue
            rows.append([r.name, e.label, num(metrics.n), pct(metrics.accuracy, 1), _interval(metrics),
                         pct(metrics.strict_accuracy, 1), pct(metrics.unparsed_rate, 1), num(metrics.seconds, 1),
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
        blocks.append(AccuracyChart(bars))
    blocks.append(Table(["round", "model", "n", "accuracy", "95 % interval", "strict", "unparsed", "seconds",
                         "predictions"], rows))
    blocks.append(Text("95 % interval: the Wilson score interval of the accuracy."))
    return Section(2, "Accuracy", blocks + samples)


def _interval(metrics: Metrics) -> str:
    low, high = accuracy_interval(metrics.accuracy, metrics.n)
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
    return [[i, short(new[i].question, 90), _answer(old[i]), _answer(new[i]), new[i].gold, change]
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
        rows.append([r.name, num(n), f"{num(comparison.before_correct)} ({pct(comparison.before_correct, n)})",
                     f"{num(comparison.after_correct)} ({pct(comparison.after_correct, n)})",
                     num(comparison.gained), num(comparison.lost), format_p(comparison.p_value)])
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
    metrics = load_document(after.metrics, Metrics)
    if metrics is not None:
        summary["accuracy_ci95"] = [round(bound, 4) for bound in accuracy_interval(metrics.accuracy, metrics.n)]
    old, new = load_records(before.predictions, Prediction), load_records(after.predictions, Prediction)
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
    blocks = [Table(["", ""], [[k, num(v) if v else "—"] for k, v in facts])]
    stages = [[str(entry.get("round", i)), name, str(record.get("status", "—")), num(record.get("seconds"), 1)]
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
        cards.append(("accepted", f"{accepted:,} ({pct(accepted, len(written))})"))
    if any(r.train is not None for r in rounds):
        cards.append(("training pairs", f"{sum(len(r.train or []) for r in rounds):,}"))
    before = next((r.before.metrics for r in rounds if r.before.metrics is not None), None)
    after = next((r.after.metrics for r in reversed(rounds) if r.after.metrics is not None), None)
    for label, metrics in (("accuracy before", before), ("accuracy after", after)):
        if metrics is not None:
            cards.append((label, pct(metrics.accuracy, 1)))
    return cards


def analyse_run(run_dir: Path) -> tuple[str, list[tuple[str, str]], list[Section]]:
    """The report's title, header cards and sections for a run folder (shared by the HTML and Markdown writers)."""
    layout = RunLayout(Path(run_dir))
    if not layout.dir.is_dir():
        raise MapdError(f"{layout.dir}: run folder not found")
    manifest = load_manifest(layout.manifest)
    round_layouts = layout.rounds()
    single = round_layouts == [RoundLayout(layout.dir)]
    rounds = [load_round(round_layout) for round_layout in round_layouts]
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


