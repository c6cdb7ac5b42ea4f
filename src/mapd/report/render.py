"""Rendering the analysed report: plots as PNG, report.html (self-contained, plots inline) and report.md.
Every string that reaches HTML passes through ``_e`` here, and Markdown text through ``_md_text``."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mapd.errors import MapdError
from mapd.io import write_text_atomic
from mapd.layout import RunLayout
from mapd.records import Feedback, Mistake, Rationale
from mapd.report.analyse import (
    SCORES,
    AccuracyChart,
    Chart,
    Examples,
    FunnelChart,
    Link,
    LossChart,
    ScoreChart,
    Section,
    Table,
    Text,
    WrongPredictions,
    analyse_run,
    num,
    short,
)

COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


# ---------------------------------------------------------------- plots

def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _figure(width: float, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    ax = fig.add_subplot()
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _funnel_plot(chart: FunnelChart) -> Figure:
    shown = chart.shown
    fig, ax = _figure(4.6, 0.4 * len(shown) + 0.7)
    labels, counts = [n for n, _ in shown][::-1], [c for _, c in shown][::-1]
    bars = ax.barh(labels, counts, color=COLORS[0])
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3)
    ax.set_xlabel("count")
    ax.margins(x=0.12)
    return fig


def _score_plot(chart: ScoreChart) -> Figure:
    reviewers, counts = chart.reviewers, chart.counts
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
    return fig


def _loss_plot(chart: LossChart) -> Figure:
    fig, ax = _figure(5.5, 2.8)
    for i, (key, points) in enumerate(chart.series.items()):
        ax.plot(*zip(*points), label=key, color=COLORS[i], marker="." if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    return fig


def _accuracy_plot(chart: AccuracyChart) -> Figure:
    bars = chart.bars
    fig, ax = _figure(max(3.5, 1.3 * len(bars)), 2.8)
    drawn = ax.bar([b for b, _ in bars], [100 * a for _, a in bars], color=COLORS[: len(bars)])
    ax.bar_label(drawn, labels=[f"{100 * a:.1f}%" for _, a in bars], padding=2)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    return fig


# chart type -> (drawing, alt text)
_PLOTS: dict[type, tuple[Any, str]] = {
    FunnelChart: (_funnel_plot, "funnel: counts per stage"),
    ScoreChart: (_score_plot, "histogram of review scores per reviewer"),
    LossChart: (_loss_plot, "training loss per step"),
    AccuracyChart: (_accuracy_plot, "accuracy before and after training"),
}


def _plot_html(chart: Chart) -> str:
    draw, alt = _PLOTS[type(chart)]
    data = base64.b64encode(_png(draw(chart))).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- HTML pieces

def _e(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return html.escape(str(value))


def _pre(text: Any) -> str:
    return f"<pre>{_e(text)}</pre>"


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{_e(summary)}</summary>{body}</details>"


def _wrong_predictions(block: WrongPredictions) -> str:
    rows = "".join(
        f"<tr><td>{_e(p.id)}</td><td class='wrap'>{_e(short(p.question))}</td>"
        f"<td>{_e(p.gold)}</td><td>{_e(p.answer or p.status)}</td>"
        f"<td>{_details('show', _pre(p.output))}</td></tr>"
        for p in block.predictions)
    head = "".join(f"<th>{h}</th>" for h in ("id", "question", "gold", "answer", "output"))
    return f"<p class='muted'>{_e(block.caption)}</p>\n<table><tr>{head}</tr>{rows}</table>"


def _example(title: str, record: Rationale | Feedback, mistake: Mistake | None) -> str:
    """One rationale or feedback as a card: the question, the student's answer, the text, the reviews."""
    rationale = isinstance(record, Rationale)
    score = f", mean score {_e(num(record.mean_score))}" if rationale else ""
    out = [f"<div class='example wide'><h4>{_e(title)} by {_e(record.teacher)}{score}</h4>"]
    if mistake:
        out.append(f"<p class='muted'>Question {_e(record.id)} (gold {_e(mistake.gold)}):</p>" + _pre(mistake.question))
        out.append(_details(f"student's answer ({mistake.answer})", _pre(mistake.output)))
    out.append(f"<p class='muted'>{'Rationale' if rationale else 'Feedback'}:</p>" + _pre(record.text))
    if rationale and record.reviews:
        body = "".join(
            f"<p><b>{_e(v.reviewer)}</b>: score {_e(num(v.score))}"
            + (f" (error: {_e(v.error)})" if v.error else "") + "</p>"
            + (_pre(v.raw) if v.raw else "<p class='muted'>(no review text recorded)</p>")
            for v in record.reviews)
        scores = ", ".join(f"{v.reviewer} {num(v.score)}" for v in record.reviews)
        out.append(_details(f"{len(record.reviews)} reviews: {scores}", body))
    return "".join(out) + "</div>"



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
            elif isinstance(block, WrongPredictions):
                out.append(_wrong_predictions(block))
            elif isinstance(block, Examples):
                out.append("".join(_example(title, record, mistake) for title, record, mistake in block.picks))
            else:
                out.append(_plot_html(block))
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
    title, cards, sections = analyse_run(layout.dir)
    for path in (layout.report_md, layout.report_html):  # both or neither
        if path.is_dir():
            raise MapdError(f"{path}: is a folder, expected a file (the report writes it)")
    write_text_atomic(layout.report_md, _render_markdown(title, cards, sections, layout.report_html.name))
    return write_text_atomic(layout.report_html, _render_html(title, cards, sections))
