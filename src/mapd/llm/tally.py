"""What the call path did, as plain values and printable tables: one teacher's :class:`TeacherTally` (its
``summary()`` is what the teach stage stores as records.TeacherStats), the teacher-calls table and the table of
the batches a cache records. No artifact record here: the call path knows none (docs/architecture.md).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any

from rich.console import Console
from rich.table import Table

from mapd.llm.base import CallResult


@dataclass
class TeacherTally:
    """What one teacher did in this process (cache hits cost nothing and are not calls); its summary is plain
    values, which the teach stage stores as the record records.TeacherStats."""

    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    not_made: int = 0
    usage_estimated: int = 0
    stopped: str | None = None
    batch_calls: int = 0
    batch_input_tokens: int = 0
    batch_output_tokens: int = 0
    batch_cost_usd: float = 0.0
    batches: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, result: CallResult, spent_usd: float) -> None:
        """Count one call made (live or in a batch) that cost ``spent_usd``."""
        if result.batch is not None:
            self.batch_calls += 1
            self.batch_input_tokens += result.input_tokens
            self.batch_output_tokens += result.output_tokens
            self.batch_cost_usd += spent_usd
        self.calls += 1
        self.failures += result.text is None
        self.usage_estimated += result.usage_estimated
        self.input_tokens += result.input_tokens
        self.output_tokens += result.output_tokens
        self.latencies.append(result.latency_s)
        self.cost_usd += spent_usd

    def summary(self) -> dict[str, Any]:
        """This teacher's statistics as plain values (the teach stage stores them as records.TeacherStats, a line
        of teach_stats.json: docs/formats.md)."""
        ordered = sorted(self.latencies)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "latencies"}
        values.update(
            cost_usd=round(self.cost_usd, 6), batch_cost_usd=round(self.batch_cost_usd, 6),
            seconds=round(self.seconds, 3),
            latency_p50_s=round(statistics.median(ordered), 3) if ordered else None,
            latency_p95_s=round(ordered[math.ceil(0.95 * len(ordered)) - 1], 3) if ordered else None,
        )
        return values


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """``{teacher: its summary}`` (TeacherTally.summary) as a printable table."""
    table = Table(title="teacher calls")
    columns = list(next(iter(rows.values()), {}))
    table.add_column("teacher")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for name, values in rows.items():
        table.add_row(name, *("-" if values[c] is None else str(values[c]) for c in columns))
    return _render(table)


def batch_table(rows: list[dict[str, Any]], stale: dict[str, str], cache_path: object) -> str:
    """The batches a cache records (CallCache.batches()) as a printable table; a batch whose input file is in
    ``stale`` (input file -> why) is marked as showing its last known state."""
    columns = ("teacher", "batch_id", "status", "requests", "completed", "failed", "unsettled", "created", "error")
    table = Table(title="batches (unsettled: requests still waiting for their batch)")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right" if column in columns[3:7] else "left")
    for row in rows:
        row["created"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"]))
        if row["input_file_id"] in stale:
            row["status"] += " *"
        table.add_row(*("-" if row[c] is None else str(row[c]) for c in columns))
    note = "".join(f"* the last known state (as of its last poll), not asked now: {why}\n"
                   for why in dict.fromkeys(stale.values()))
    return f"batches in {cache_path}\n" + _render(table) + note  # the path on its own line: never wrapped


def _render(table: Table) -> str:
    console = Console(file=io.StringIO(), width=160)
    console.print(table)
    return console.file.getvalue()
