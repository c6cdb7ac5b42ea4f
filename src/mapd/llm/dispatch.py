"""Every teacher call goes through the Dispatcher: cache first, then bounded concurrent calls,
rate limits, a budget, per-teacher statistics and a progress bar."""

from __future__ import annotations

import asyncio
import io
import math
import statistics
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from mapd.errors import MapdError
from mapd.llm.base import Call, CallResult, TeacherConfig
from mapd.llm.cache import CallCache, cache_key
from mapd.llm.local_provider import LocalProvider
from mapd.llm.openai_provider import Backoff, OpenAIProvider, approx_tokens
from mapd.secrets import api_key

DRY_RUN_ERROR = "DryRun: not called (dry run)"


class BudgetExceeded(MapdError):
    """Teacher spending would pass ``max_budget_usd``; the calls already made are cached."""


@dataclass
class TeacherStats:
    """What one teacher did in this process (cache hits cost nothing and are not calls)."""

    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        """The teach_stats.json fields (docs/formats.md)."""
        ordered = sorted(self.latencies)
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "failures": self.failures,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "seconds": round(self.seconds, 3),
            "latency_p50_s": round(statistics.median(ordered), 3) if ordered else None,
            "latency_p95_s": round(ordered[math.ceil(0.95 * len(ordered)) - 1], 3) if ordered else None,
        }


def _worst_case(teacher: TeacherConfig, call: Call) -> tuple[int, float]:
    """(estimated input tokens, worst-case cost: every reply uses max_tokens)."""
    tokens = approx_tokens(call.messages)
    return tokens, teacher.cost(tokens, teacher.max_tokens)


class Dispatcher:
    """Runs teacher calls for the stages. ``run`` is synchronous; inside it asyncio serves every
    HTTP teacher at once while local teachers generate in a worker thread.

    ``max_budget_usd`` counts what this process spends (cache hits are free). Before a call
    starts, its worst case (input estimate + ``max_tokens`` output) plus that of the calls in
    flight must fit in what is left; otherwise no new call starts, the ones in flight finish
    and are cached, and ``run`` raises BudgetExceeded. ``backoff`` sets the retry waits.
    """

    def __init__(
        self,
        teachers: list[TeacherConfig],
        cache: CallCache,
        *,
        max_budget_usd: float | None = None,
        dry_run: bool = False,
        backoff: Backoff = Backoff(),
    ) -> None:
        self.teachers = {teacher.name: teacher for teacher in teachers}
        self.cache = cache
        self.max_budget_usd = max_budget_usd
        self.dry_run = dry_run
        self.backoff = backoff
        self.stats = {name: TeacherStats() for name in self.teachers}
        self.estimated: dict[str, dict] = {}  # dry runs add their estimates here
        self.spent_usd = 0.0
        self._reserved_usd = 0.0
        self._stopped = False
        self._budget_lock = threading.Lock()  # the local worker thread reserves too
        self._local = {name: LocalProvider(t) for name, t in self.teachers.items() if t.provider == "local"}

    def check_keys(self, names: Iterable[str] | None = None) -> None:
        """MapdError when an HTTP teacher's key variable is unset (all teachers, or ``names``)."""
        for name in self.teachers if names is None else names:
            teacher = self.teachers[name]
            if teacher.provider == "openai":
                api_key(teacher.api_key_env, teacher.name)

    def run(self, calls: list[Call], desc: str = "teacher calls") -> list[CallResult]:
        """Results aligned with ``calls``. Cached successes are reused; identical calls are made once;
        a call that fails after its retries is a result with ``error`` set (never an exception)."""
        unknown = sorted({call.teacher for call in calls} - set(self.teachers))
        if unknown:
            raise MapdError(f"calls name unknown teachers {unknown} (teachers: {', '.join(self.teachers) or 'none'})")
        if not self.dry_run:
            self.check_keys({call.teacher for call in calls})
        return asyncio.run(self._run(calls, desc))

    def estimate(self, calls: list[Call]) -> dict[str, dict]:
        """Per teacher: calls, calls not yet cached (``to_call``), estimated input tokens of those
        (characters / 4, a rough rule), their maximum output tokens, and the worst-case cost."""
        out: dict[str, dict] = {}
        seen: set[str] = set()
        for call in calls:
            teacher = self.teachers[call.teacher]
            row = out.setdefault(call.teacher, {"calls": 0, "to_call": 0, "input_tokens": 0,
                                                "max_output_tokens": 0, "cost_usd": 0.0})
            row["calls"] += 1
            key = cache_key(teacher, call)
            if key in seen or self.cache.get(key) is not None:
                continue
            seen.add(key)
            tokens, cost = _worst_case(teacher, call)
            row["to_call"] += 1
            row["input_tokens"] += tokens
            row["max_output_tokens"] += teacher.max_tokens
            row["cost_usd"] += cost
        return out

    def summary(self) -> dict[str, dict]:
        """``{teacher: {calls, cache_hits, failures, ...}}`` as teach_stats.json stores it."""
        return {name: stats.summary() for name, stats in self.stats.items()}

    def summary_table(self) -> str:
        """The summary as a printable table."""
        table = Table(title="teacher calls")
        columns = ["calls", "cache_hits", "failures", "input_tokens", "output_tokens", "cost_usd", "seconds",
                   "latency_p50_s", "latency_p95_s"]
        table.add_column("teacher")
        for column in columns:
            table.add_column(column.replace("_", " "), justify="right")
        for name, row in self.summary().items():
            table.add_row(name, *("-" if row[c] is None else str(row[c]) for c in columns))
        console = Console(file=io.StringIO(), width=160)
        console.print(table)
        return console.file.getvalue()

    # -- the asynchronous part -------------------------------------------------------------

    async def _run(self, calls: list[Call], desc: str) -> list[CallResult]:
        results: list[CallResult | None] = [None] * len(calls)
        pending: dict[str, list[int]] = {}  # cache key -> indices of the identical calls
        with tqdm(total=len(calls), desc=desc, unit="call") as bar:
            for index, call in enumerate(calls):
                key = cache_key(self.teachers[call.teacher], call)
                hit = self.cache.get(key) if key not in pending else None
                if hit is not None:
                    results[index] = hit
                    self.stats[call.teacher].cache_hits += 1
                    bar.update()
                else:
                    pending.setdefault(key, []).append(index)
            if self.dry_run:
                self._add_estimate(calls)
                for indices in pending.values():
                    for index in indices:
                        results[index] = CallResult(None, DRY_RUN_ERROR)
                return results  # type: ignore[return-value]
            by_teacher: dict[str, list[tuple[str, list[int]]]] = {}
            for key, indices in pending.items():
                by_teacher.setdefault(calls[indices[0]].teacher, []).append((key, indices))

            def record(key: str, indices: list[int], result: CallResult, reserved: float) -> None:
                teacher = self.teachers[calls[indices[0]].teacher]
                self.cache.put(key, result, teacher.name)
                stats = self.stats[teacher.name]
                stats.calls += 1
                stats.failures += result.text is None
                stats.input_tokens += result.input_tokens
                stats.output_tokens += result.output_tokens
                stats.latencies.append(result.latency_s)
                cost = teacher.cost(result.input_tokens, result.output_tokens)
                stats.cost_usd += cost
                with self._budget_lock:
                    self.spent_usd += cost
                    self._reserved_usd -= reserved
                for index in indices:
                    results[index] = result
                bar.update(len(indices))

            jobs = [
                self._run_local(name, items, calls, record) if name in self._local
                else self._run_http(name, items, calls, record)
                for name, items in by_teacher.items()
            ]
            await asyncio.gather(*jobs)
        missing = sum(result is None for result in results)
        if missing:
            raise BudgetExceeded(
                f"teacher budget max_budget_usd={self.max_budget_usd:g} reached: spent {self.spent_usd:.4f} USD in "
                f"this run; {missing} of {len(calls)} calls of '{desc}' were not made (those made are cached). "
                "Raise max_budget_usd and rerun to continue."
            )
        return results  # type: ignore[return-value]

    def _reserve(self, cost: float) -> bool:
        """Claim ``cost`` of the budget for a call about to start; False (and stop) when it does not fit."""
        with self._budget_lock:
            if self.max_budget_usd is not None and (
                self._stopped or self.spent_usd + self._reserved_usd + cost > self.max_budget_usd
            ):
                self._stopped = True
                return False
            self._reserved_usd += cost
            return True

    async def _run_http(self, name: str, items: list[tuple[str, list[int]]], calls: list[Call], record) -> None:
        teacher = self.teachers[name]
        provider = OpenAIProvider(teacher, api_key(teacher.api_key_env, teacher.name), self.backoff)
        slots = asyncio.Semaphore(teacher.max_concurrency)
        began = time.perf_counter()

        async def one(key: str, indices: list[int]) -> None:
            call = calls[indices[0]]
            cost = _worst_case(teacher, call)[1]
            async with slots:
                if not self._reserve(cost):
                    return
                result = await provider.complete(call.messages)
            record(key, indices, result, cost)

        try:
            await asyncio.gather(*(one(key, indices) for key, indices in items))
        finally:
            await provider.aclose()
            self.stats[name].seconds += time.perf_counter() - began

    async def _run_local(self, name: str, items: list[tuple[str, list[int]]], calls: list[Call], record) -> None:
        teacher = self.teachers[name]
        loop = asyncio.get_running_loop()
        todo = [calls[indices[0]] for _, indices in items]
        costs = [_worst_case(teacher, call)[1] for call in todo]

        def deliver(position: int, result: CallResult) -> None:  # worker thread -> event loop
            key, indices = items[position]
            loop.call_soon_threadsafe(record, key, indices, result, costs[position])

        def may_start(batch: list[int]) -> bool:
            return self._reserve(sum(costs[position] for position in batch))

        began = time.perf_counter()
        try:
            await asyncio.to_thread(self._local[name].complete, todo, deliver, may_start)
        finally:
            self.stats[name].seconds += time.perf_counter() - began

    def _add_estimate(self, calls: list[Call]) -> None:
        for name, row in self.estimate(calls).items():
            total = self.estimated.setdefault(name, dict.fromkeys(row, 0))
            for column, value in row.items():
                total[column] += value
