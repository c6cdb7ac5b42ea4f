"""What the call path did, as plain values and printable tables: one teacher's :class:`TeacherTally` (its
``summary()`` is what the teach stage stores as records.TeacherStats), the teacher-calls table and the table of
the batches a cache records. No artifact record here: the call path knows none (docs/architecture.md).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from mapd.llm.base import CallResult


class TeacherTally:
    """What one teacher did in this process (cache hits cost nothing and are not calls), counted by name. It
    declares no list of fields: records.TeacherStats does, once, and the teach stage stores this tally's
    ``summary()`` as that record (a counter it does not know is refused there, one never counted is 0)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.cost: Counter[str] = Counter()  # USD: cost_usd, batch_cost_usd
        self.seconds = 0.0
        self.stopped: str | None = None
        self.latencies: list[float] = []

    def add(self, result: CallResult, spent_usd: float) -> None:
        """Count one call made (live or in a batch) that cost ``spent_usd``."""
        made = Counter(calls=1, failures=result.text is None, usage_estimated=result.usage_estimated,
                       input_tokens=result.input_tokens, output_tokens=result.output_tokens)
        self.cost["cost_usd"] += spent_usd
        if result.batch is not None:
            made.update(batch_calls=1, batch_input_tokens=result.input_tokens,
                        batch_output_tokens=result.output_tokens)
            self.cost["batch_cost_usd"] += spent_usd
        self.counts.update(made)
        self.latencies.append(result.latency_s)

    def summary(self) -> Counter[str]:
        """This teacher's statistics as plain values: what it counted, its cost, time and latency percentiles
        (the teach stage stores them as records.TeacherStats, a line of teach_stats.json: docs/formats.md). A
        Counter, so a count never made reads 0."""
        ordered = sorted(self.latencies)
        return Counter({
            **{name: int(value) for name, value in self.counts.items()},
            **{name: round(value, 6) for name, value in self.cost.items()},
            "seconds": round(self.seconds, 3), "stopped": self.stopped,
            "latency_p50_s": round(statistics.median(ordered), 3) if ordered else None,
            "latency_p95_s": round(ordered[math.ceil(0.95 * len(ordered)) - 1], 3) if ordered else None,
        })


def summary_table(rows: dict[str, dict[str, Any]]) -> str:
    """``{teacher: its statistics}``, every row with the same fields (records.TeacherStats), as a printable
    table."""
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
