"""Every teacher call goes through the Dispatcher: cache first, then bounded concurrent calls,
rate limits, a budget, per-teacher statistics and a progress bar. Follow-up calls chained to a
call's result start as soon as it arrives, and the clients live across runs (docs/llm.md)."""

from __future__ import annotations

import asyncio
import io
import math
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable
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


Then = Callable[[int, CallResult], list[Call]]  # then(index in calls, its result) -> follow-up calls


async def _close_all(providers: dict[str, OpenAIProvider]) -> None:
    await asyncio.gather(*(provider.aclose() for provider in providers.values()))
    providers.clear()


def _shutdown(runner: asyncio.Runner, providers: dict[str, OpenAIProvider]) -> None:
    """Close the HTTP clients, then the event loop (``close()``, a collected Dispatcher, or exit). A
    Dispatcher collected while another event loop runs in this thread is left to the garbage collector."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop runs in this thread, so ours can
        if providers:
            runner.run(_close_all(providers))
        runner.close()


class Dispatcher:
    """Runs teacher calls for the stages. ``run`` is synchronous; inside it asyncio serves every
    HTTP teacher at once while local teachers generate in a worker thread. The event loop and one
    HTTP client per teacher live as long as the dispatcher, so consecutive ``run`` calls reuse
    their connections; ``close()`` (or ``with Dispatcher(...) as dispatcher:``) releases them.

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
        self._http: dict[str, OpenAIProvider] = {}  # made on first use, inside the loop
        self._runner = asyncio.Runner()  # its loop starts with the first run
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._http)

    def close(self) -> None:
        """Close the HTTP connections and the event loop; the dispatcher cannot run afterwards."""
        self._finalizer()

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_keys(self, names: Iterable[str] | None = None) -> None:
        """MapdError when an HTTP teacher's key variable is unset (all teachers, or ``names``)."""
        for name in self.teachers if names is None else names:
            teacher = self.teachers[name]
            if teacher.provider == "openai":
                api_key(teacher.api_key_env, teacher.name)

    def run(self, calls: list[Call], desc: str = "teacher calls", *, then: Then | None = None) -> list[CallResult]:
        """Results aligned with ``calls``. Cached successes are reused; identical calls are made once;
        a call that fails after its retries is a result with ``error`` set (never an exception).

        ``then(index, result)``, when given, is called for each of ``calls`` as soon as its result is
        known (cached or made; in no particular order) and returns follow-up calls, which start at once.
        Their results come after those of ``calls``: grouped by ``index`` in increasing order, each
        group in the order ``then`` returned it. A local teacher's follow-ups wait until every one of
        ``calls`` is done and then generate together, in that order, as a second ``run`` would."""
        unknown = sorted({call.teacher for call in calls} - set(self.teachers))
        if unknown:
            raise MapdError(f"calls name unknown teachers {unknown} (teachers: {', '.join(self.teachers) or 'none'})")
        if not self._finalizer.alive:
            raise RuntimeError("this Dispatcher is closed")
        teachers = set(self.teachers) if then else {call.teacher for call in calls}  # follow-ups may go to any
        if not self.dry_run:
            self.check_keys(teachers)
        return self._runner.run(self._run(calls, desc, then, teachers))

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

    async def _run(self, calls: list[Call], desc: str, then: Then | None, teachers: set[str]) -> list[CallResult]:
        if not self.dry_run:  # every client before the first request, so that none is built while requests wait
            for name in teachers - set(self._local):
                self._provider(name)
        one = _Pass(self, calls, desc, then)
        results = await one.run()
        if self.dry_run:
            self._add_estimate(one.calls)
        missing = sum(result is None for result in results)
        if missing:
            raise BudgetExceeded(
                f"teacher budget max_budget_usd={self.max_budget_usd:g} reached: spent {self.spent_usd:.4f} USD in "
                f"this run; {missing} of {len(results)} calls of '{desc}' were not made (those made are cached). "
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

    def _provider(self, name: str) -> OpenAIProvider:
        """The teacher's HTTP client, made on first use and kept until ``close()``."""
        if name not in self._http:
            teacher = self.teachers[name]
            self._http[name] = OpenAIProvider(teacher, api_key(teacher.api_key_env, teacher.name), self.backoff)
        return self._http[name]

    def _add_estimate(self, calls: list[Call]) -> None:
        for name, row in self.estimate(calls).items():
            total = self.estimated.setdefault(name, dict.fromkeys(row, 0))
            for column, value in row.items():
                total[column] += value


class _Pass:
    """One ``Dispatcher.run``: its calls by position (``calls``, then the follow-ups as they come), their
    cache keys and results, and which positions one call answers."""

    def __init__(self, dispatcher: Dispatcher, calls: list[Call], desc: str, then: Then | None) -> None:
        self.dispatcher, self.n, self.then = dispatcher, len(calls), then
        self.calls = list(calls)
        self.keys = [""] * self.n
        self.results: list[CallResult | None] = [None] * self.n
        self.followups: dict[int, range] = {}  # index in ``calls`` -> positions of its follow-ups
        self.sharing: dict[str, list[int]] = {}  # key of a call to make -> the positions it answers
        self.local: dict[str, list[str]] = {name: [] for name in dispatcher._local}  # keys for the next job
        self.held: set[str] = set()  # keys of local follow-ups: made once ``calls`` are done
        self.busy: dict[str, list[float]] = {}  # teacher -> [first start, last result]
        self.slots = {name: asyncio.Semaphore(t.max_concurrency) for name, t in dispatcher.teachers.items()}
        self.tasks: list[asyncio.Future] = []
        self.over = False
        self.bar = tqdm(total=self.n, desc=desc, unit="call")

    async def run(self) -> list[CallResult | None]:
        """Results of ``calls``, then of the follow-ups by index in ``calls``; None for a call not made."""
        try:
            with self.bar:
                for position in range(self.n):
                    self.submit(position)
                await self.wait()  # every one of ``calls`` is done; HTTP follow-ups may still run
                self.release_held()
                await self.wait()
        finally:  # also on an error or an interrupt: nothing of this run outlives it on the dispatcher's loop
            self.over = True
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for name, (first, last) in self.busy.items():
                self.dispatcher.stats[name].seconds += last - first
        order = [*range(self.n), *(p for index in sorted(self.followups) for p in self.followups[index])]
        return [self.results[position] for position in order]

    async def wait(self) -> None:
        """Start a job per local teacher with its queued keys, then wait for every task started so far."""
        for name, keys in self.local.items():
            if keys:
                self.tasks.append(asyncio.ensure_future(self.generate(name, keys)))
                self.local[name] = []
        await asyncio.gather(*self.tasks)

    def release_held(self) -> None:
        """Queue the local follow-ups in the order of the results, as a second ``run`` would get them."""
        for index in sorted(self.followups):
            for position in self.followups[index]:
                if self.keys[position] in self.held:
                    self.held.discard(self.keys[position])
                    self.local[self.calls[position].teacher].append(self.keys[position])

    def submit(self, position: int) -> None:
        """Answer the call at ``position`` from the cache or an identical call, or queue it."""
        d, call = self.dispatcher, self.calls[position]
        if call.teacher not in d.teachers:
            raise MapdError(f"a follow-up call names unknown teacher '{call.teacher}'")
        key = self.keys[position] = cache_key(d.teachers[call.teacher], call)
        if key in self.sharing:  # an identical call of this run: made once
            self.sharing[key].append(position)
            if (done := self.results[self.sharing[key][0]]) is not None:
                self.finish(position, done)
            return
        hit = d.cache.get(key)
        if hit is not None:
            d.stats[call.teacher].cache_hits += 1
            return self.finish(position, hit)
        self.sharing[key] = [position]
        if d.dry_run:
            self.finish(position, CallResult(None, DRY_RUN_ERROR))
        elif call.teacher not in d._local:
            self.tasks.append(asyncio.ensure_future(self.request(call, key)))
        elif position < self.n:
            self.local[call.teacher].append(key)
        else:
            self.held.add(key)

    def finish(self, position: int, result: CallResult) -> None:
        """Set a result; for one of ``calls``, submit the follow-ups ``then`` gives for it."""
        self.results[position] = result
        self.bar.update()
        if self.then is None or position >= self.n:
            return
        more = self.then(position, result)
        start = len(self.calls)
        self.followups[position] = range(start, start + len(more))
        self.calls += more
        self.keys += [""] * len(more)
        self.results += [None] * len(more)
        self.bar.total += len(more)
        for follow in self.followups[position]:
            self.submit(follow)

    def record(self, key: str, result: CallResult, reserved: float) -> None:
        """Cache and count a call made, and finish every position it answers."""
        if self.over:  # a local batch that ended after the run was stopped
            return
        d = self.dispatcher
        teacher = d.teachers[self.calls[self.sharing[key][0]].teacher]
        d.cache.put(key, result, teacher.name)
        stats = d.stats[teacher.name]
        stats.calls += 1
        stats.failures += result.text is None
        stats.input_tokens += result.input_tokens
        stats.output_tokens += result.output_tokens
        stats.latencies.append(result.latency_s)
        cost = teacher.cost(result.input_tokens, result.output_tokens)
        stats.cost_usd += cost
        with d._budget_lock:
            d.spent_usd += cost
            d._reserved_usd -= reserved
        self.busy[teacher.name][1] = time.perf_counter()
        for position in list(self.sharing[key]):  # a follow-up identical to its call joins and finishes at once
            self.finish(position, result)

    def started(self, name: str) -> None:
        self.busy.setdefault(name, [time.perf_counter()] * 2)

    async def request(self, call: Call, key: str) -> None:
        """One HTTP call, within the teacher's ``max_concurrency`` and the budget."""
        provider = self.dispatcher._provider(call.teacher)
        cost = _worst_case(provider.teacher, call)[1]
        async with self.slots[call.teacher]:
            if not self.dispatcher._reserve(cost):
                return
            self.started(call.teacher)
            result = await provider.complete(call.messages)
        self.record(key, result, cost)

    async def generate(self, name: str, keys: list[str]) -> None:
        """One local job in a worker thread; each batch is recorded on the event loop as it ends."""
        d = self.dispatcher
        todo = [self.calls[self.sharing[key][0]] for key in keys]
        costs = [_worst_case(d.teachers[name], call)[1] for call in todo]
        loop = asyncio.get_running_loop()
        errors: list[Exception] = []

        def record(index: int, result: CallResult) -> None:  # an error stops the job and is raised below
            try:
                self.record(keys[index], result, costs[index])
            except Exception as exc:
                errors.append(exc)

        def deliver(index: int, result: CallResult) -> None:  # worker thread -> event loop
            loop.call_soon_threadsafe(record, index, result)

        def may_start(batch: list[int]) -> bool:
            return not (self.over or errors) and d._reserve(sum(costs[index] for index in batch))

        self.started(name)
        await asyncio.to_thread(d._local[name].complete, todo, deliver, may_start)
        if errors:
            raise errors[0]
