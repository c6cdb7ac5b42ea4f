"""Every model call goes through ``Dispatcher.complete(call) -> result``: identical calls in flight are
made once, the cache answers what it holds, then the budget, the per-teacher concurrency, the
provider (HTTP with rate limits and retries, or an in-process model behind a micro-batching queue)
and the statistics. Each result carries its call's key, so callers never match results by position.

Stages are coroutines that await ``complete``; ``run(coroutine)`` drives one on the dispatcher's
event loop, which, with one HTTP client per teacher, lives as long as the dispatcher (docs/llm.md).
The statistics it keeps and their tables are mapd.llm.tally's; a dry run's estimates, mapd.llm.estimate's.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from tqdm import tqdm

from mapd.config import EndpointConfig
from mapd.errors import IncompleteStage, MapdError
from mapd.llm.base import Call, CallKey, CallResult
from mapd.llm.batch import TERMINAL, BatchProvider
from mapd.llm.cache import CacheUnavailable, CallCache, cache_key, process_owner
from mapd.llm.estimate import Estimate, dry_run_reply, worst_case
from mapd.llm.local_provider import LocalProvider, LocalWeights
from mapd.llm.openai_provider import Backoff, OpenAIProvider
from mapd.llm.tally import TeacherTally, batch_table
from mapd.secrets import api_key, check_credentials

T = TypeVar("T")
BUDGET_ERROR = "BudgetExceeded: not called (max_budget_usd reached)"
CLAIM_LEASE_S = 30.0  # a claim not renewed for this long belongs to a dead process
CLAIM_POLL_S = 0.5  # how often a call another process is making is looked for in the cache
log = logging.getLogger("mapd.llm")


class BudgetExceeded(IncompleteStage):
    """Teacher spending would pass ``max_budget_usd``; the calls already made are cached."""


async def _close_all(providers: dict[str, OpenAIProvider]) -> None:
    await asyncio.gather(*(provider.aclose() for provider in providers.values()))
    providers.clear()


async def _cancel_the_rest() -> None:
    """Cancel the tasks a run leaves on the loop (calls still in flight when its coroutine raised): they are
    not cached, so the next run makes them, and they cannot finish inside it (its timings start afresh)."""
    this = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not this]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def _shutdown(runner: asyncio.Runner, providers: dict[str, OpenAIProvider]) -> None:
    """Close the HTTP clients, then the event loop (``close()``, a collected Dispatcher, or exit). A
    Dispatcher collected while another event loop runs in this thread is left to the garbage collector."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop runs in this thread, so ours can
        if providers:
            runner.run(_close_all(providers))
        runner.close()


def _raise(exc: BaseException) -> None:
    raise exc


class Dispatcher:
    """The one call path for the committee's (and local models') calls.

    ``max_budget_usd`` bounds what every call paid through the cache cost, over all runs and processes
    that share it. Before a call starts, this process claims it in the cache with its worst case
    (input estimate + ``max_tokens`` output); the claim is refused when that, plus everything paid and
    every live claim, would pass the budget: the call is not made (its result says so), no later call
    starts, and the calls in flight finish and are cached. A call another process has claimed is
    waited for, not made again. A teacher whose provider stopped (an error every call would get, or
    its circuit breaker) gets no more requests. A dry run calls nothing: an uncached call gets a
    stand-in reply of the longest possible length (so that follow-up calls are estimated at their
    worst) and is tallied in ``estimated``. ``starters`` (teacher -> a function that starts its server and
    returns its base_url) start a served teacher before its first call that is not cached, so a rerun whose
    calls are all cached starts no server. ``who`` names an endpoint's role in log lines where it is not a
    teacher ("the student").
    """

    def __init__(
        self,
        teachers: list[EndpointConfig],
        cache: CallCache,
        *,
        max_budget_usd: float | None = None,
        dry_run: bool = False,
        backoff: Backoff = Backoff(),
        identities: dict[str, str] | None = None,
        starters: dict[str, Callable[[], str]] | None = None,
        who: dict[str, str] | None = None,
    ) -> None:
        self.teachers = {teacher.name: teacher for teacher in teachers}
        self.identities = identities or {}  # model name -> the checkpoint behind it, part of its cache keys
        self._starters = dict(starters or {})  # teacher -> starts its server: until then it has no client
        self._who = who or {}  # name -> its role in log lines when not "teacher <name>" (the student)
        self._starting: dict[str, asyncio.Lock] = {}
        self.cache = cache
        self.max_budget_usd = max_budget_usd
        self.dry_run = dry_run
        self.backoff = backoff
        self.stats = {name: TeacherTally() for name in self.teachers}
        self.estimated: dict[str, Estimate] = {}
        self.spent_usd = 0.0  # by this process
        self.budget_reached = False
        self.cache_problem: CacheUnavailable | None = None  # the cache could not be written: no new calls
        self.owner = process_owner()  # names this process's claims
        weights: dict[tuple, LocalWeights] = {}  # teachers on one local model (and dtype) share its weights
        self._local = {name: LocalProvider(t, weights.setdefault((t.model, t.gguf_file, t.dtype),
                                                                 LocalWeights(t.model, t.gguf_file, t.dtype)))
                       for name, t in self.teachers.items() if t.provider == "local"}
        self._http: dict[str, OpenAIProvider] = {}  # made inside the loop, kept until close()
        self._batches: dict[str, BatchProvider] = {}  # teacher -> its batches (made on first use)
        self._batch_status: dict[str, str] = {}  # teacher -> its running batches, for the progress bar
        self._working = 0  # calls being worked on now, batch calls waiting for their batch excepted
        self._asked = 0  # calls asked for so far: batches go out once this stops changing
        self._in_flight: dict[str, asyncio.Future] = {}  # cache key -> the call answering it
        self._estimated_keys: set[str] = set()
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._busy: dict[str, list[float]] = {}  # teacher -> [first start, last result] in this run
        self._bar: tqdm | None = None
        self._runner = asyncio.Runner()  # its loop starts with the first run
        self._finalizer = weakref.finalize(self, _shutdown, self._runner, self._http)

    def close(self) -> None:
        """Close the HTTP connections and the event loop; the dispatcher cannot run afterwards."""
        self._finalizer()

    def __enter__(self) -> "Dispatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- driving --------------------------------------------------------------------------------

    def run(self, work: Awaitable[T], desc: str | None = "calls") -> T:
        """Drive ``work`` (a coroutine that awaits :meth:`complete`) to its end on the dispatcher's loop,
        with a progress bar of the calls (and of the spend and the running batches), unless ``desc`` is None."""
        try:
            if not self._finalizer.alive:
                raise RuntimeError("this Dispatcher is closed")
            if not self.dry_run:  # an HTTP teacher's unset key, headers_env or query_env variable: MapdError
                check_credentials(self.teachers.values())
        except BaseException:
            if inspect.iscoroutine(work):
                work.close()  # refused before it started: no "coroutine was never awaited" warning
            raise
        return self._runner.run(self._drive(work, desc))

    def complete_all(self, calls: list[Call], desc: str = "calls") -> dict[CallKey, CallResult]:
        """Make ``calls`` concurrently; their results by key (keys must be distinct)."""
        keys = [call.key for call in calls]
        if len(set(keys)) != len(keys):
            raise MapdError(f"calls share a key: {next(str(k) for k in keys if keys.count(k) > 1)}")

        async def every() -> dict[CallKey, CallResult]:
            results = await asyncio.gather(*(self.complete(call) for call in calls))
            return {result.key: result for result in results}

        return self.run(every(), desc)

    async def _drive(self, work: Awaitable[T], desc: str | None) -> T:
        for name in self.teachers:  # every client before the first request
            self._slots.setdefault(name, asyncio.Semaphore(self.teachers[name].max_concurrency))
            if not self.dry_run and name not in self._local and name not in self._starters:
                self._provider(name)
        self._busy = {}
        self._bar = None if desc is None else tqdm(total=0, desc=desc, unit="call")
        heartbeat = asyncio.ensure_future(self._keep_claims())
        try:
            with self._bar or contextlib.nullcontext():
                done = await work
            self._flush(patient=True)  # the paid replies the cache could not take yet: one more bounded wait
            return done
        finally:  # also on an error or an interrupt: nothing of this run outlives it on the dispatcher's loop
            self._bar = None
            heartbeat.cancel()
            await _cancel_the_rest()
            self._flush(patient=False)  # (also on an interrupt: no long wait then)
            with contextlib.suppress(CacheUnavailable):  # (the claims expire by themselves)
                self.cache.release(self.owner)
            for batches in self._batches.values():
                batches.forget()
            for name, (first, last) in self._busy.items():
                self.stats[name].seconds += last - first

    async def _keep_claims(self) -> None:
        """Renew this process's claims while it lives; a killed process's claims expire after CLAIM_LEASE_S."""
        while True:
            await asyncio.sleep(CLAIM_LEASE_S / 3)
            with contextlib.suppress(CacheUnavailable):  # the next renewal tries again; a write says why it failed
                self.cache.renew(self.owner, CLAIM_LEASE_S)

    def _flush(self, *, patient: bool) -> None:
        """Write the paid replies the cache could not take yet; still unwritable: noted, they stay in memory."""
        try:
            self.cache.flush(patient=patient)
        except CacheUnavailable as exc:
            self._cache_trouble(exc)

    def cache_trouble(self) -> str | None:
        """Why the call cache did not take everything, when it did not: the condition, and how many paid replies
        are only in this run's results (a rerun pays those again); None when the cache took every reply."""
        if self.cache_problem is None:
            return None
        unwritten = len(self.cache.unwritten)
        return str(self.cache_problem) + (f" ({unwritten} paid replies are in the records but not in the cache: a "
                                          "rerun pays them again)" if unwritten else "")

    def _cache_trouble(self, exc: CacheUnavailable) -> None:
        """The cache cannot be written: no new call starts (the calls in flight finish, their replies kept)."""
        if self.cache_problem is None:
            self.cache_problem = exc
            log.error("%s; no new calls, the replies in flight are kept and written when it can take them", exc)

    # -- the call path --------------------------------------------------------------------------

    async def complete(self, call: Call) -> CallResult:
        """The result of ``call``, carrying its key: from an identical call in flight, the cache, or the
        model. A call that fails after its retries is a result with ``error`` set, never an exception."""
        name = call.key.caller
        if name not in self.teachers:
            raise MapdError(f"{call.key}: unknown teacher '{name}' (teachers: {', '.join(self.teachers) or 'none'})")
        teacher = self.teachers[name]
        key = cache_key(teacher, call, self.identities.get(name))
        self._asked += 1
        if self._bar is not None:
            self._bar.total += 1  # shown at the next update: a redraw per call would cost more than the call
        try:
            if key in self._in_flight:  # an identical call is being made: share its reply
                return (await asyncio.shield(self._in_flight[key])).of(call.key)
            try:
                hit = self.cache.get(key)
            except CacheUnavailable as exc:  # (then the claim is refused too: the call is not made)
                self._cache_trouble(exc)
                hit = None
            if hit is not None:
                self.stats[name].counts["cache_hits"] += 1
                if self.dry_run:  # a call asked (and already paid for): counted, not to call
                    self.estimated.setdefault(name, Estimate()).calls += 1
                return hit.of(call.key)
            if self.dry_run:
                return self._stand_in(teacher, call, key)
            made = self._in_flight[key] = asyncio.ensure_future(self._make(teacher, call, key))
            made.add_done_callback(lambda _: self._in_flight.pop(key, None))
            return (await asyncio.shield(made)).of(call.key)
        finally:
            if self._bar is not None:
                self._bar.update()

    async def _make(self, teacher: EndpointConfig, call: Call, key: str) -> CallResult:
        """One call to the model within the teacher's concurrency and the budget; cached and counted. A batch
        teacher's call waits for its batch; so does any call that a batch submitted earlier may still answer."""
        name = teacher.name
        self._working += 1  # a call waiting for its batch is not worked on: then batches may go out
        try:
            try:
                pending = None if name in self._local else self.cache.pending_batch(key)
            except CacheUnavailable:  # the claim says so
                pending = None
            if pending is not None:
                with self._idle(True):
                    result = await self._batch(name).complete(call, key, pending)
            else:
                await self._start(name)
                async with self._slot(teacher):
                    result = await self._not_made_or_claimed(teacher, call, key)
                    if result is None:  # claimed: this process makes the call
                        self._started(name)
                        if teacher.batch:
                            making = self._batch(name).complete(call, key)
                        else:
                            making = (self._local[name] if name in self._local else self._provider(name)).complete(call)
                        try:
                            with self._idle(teacher.batch):
                                result = await making
                        except BaseException:
                            with contextlib.suppress(CacheUnavailable):  # never hides the error (claims expire)
                                self.cache.release(self.owner, key)
                            raise
        finally:
            self._working -= 1
        if not result.cached and result.attempts:  # not a cached reply, nor a call not made
            self._record(teacher, key, result)
        return result

    def _limited(self, teacher: EndpointConfig) -> bool:
        """Whether ``_make`` holds a request slot while it makes the teacher's call (a local model's queue and
        batches need none; a batch's calls made live take one then)."""
        return teacher.name not in self._local and not teacher.batch

    def _slot(self, teacher: EndpointConfig) -> contextlib.AbstractAsyncContextManager:
        """Where the teacher's calls wait for a free request slot."""
        return self._slots[teacher.name] if self._limited(teacher) else contextlib.nullcontext()

    async def _not_made_or_claimed(self, teacher: EndpointConfig, call: Call, key: str,
                                   counted: bool = True) -> CallResult | None:
        """None once this process may make the call; else its answer (another process's) or why it is not made."""
        stopped = None if teacher.name in self._local else self._provider(teacher.name).stopped
        if stopped or self.budget_reached:
            return self._not_made(teacher, call, f"TeacherStopped: {stopped}" if stopped else BUDGET_ERROR)
        problem = self.cache_problem
        if problem is None:
            try:  # as the call starts: one waiting for a slot holds no budget
                return await self._claim(teacher, call, key, counted)
            except CacheUnavailable as exc:
                self._cache_trouble(problem := exc)
        return self._not_made(teacher, call, f"CacheUnavailable: the call cache is {problem.condition}")

    async def _claim(self, teacher: EndpointConfig, call: Call, key: str, counted: bool = True) -> CallResult | None:
        """None once this process holds the call; otherwise its answer: another process's reply, or not made.
        While it waits for another process (``counted``: the call counts as being worked on), it does not."""
        while True:
            verdict = self.cache.claim(key, self.owner, lease_s=CLAIM_LEASE_S, reserve_usd=worst_case(teacher, call)[1],
                                       budget_usd=self.max_budget_usd)
            if verdict == "claimed":
                return None
            if verdict == "answered" and (hit := self.cache.get(key)) is not None:
                self.stats[teacher.name].counts["cache_hits"] += 1
                return hit
            if verdict == "over budget":
                if not self.budget_reached:
                    self.budget_reached = True
                    log.warning("budget max_budget_usd=%g reached (%.4f USD paid through %s): no new calls",
                                self.max_budget_usd, self.cache.spent_usd(), self.cache.path)
                return self._not_made(teacher, call, BUDGET_ERROR)
            with self._idle(counted):  # another process is making this very call: wait for its reply
                await asyncio.sleep(CLAIM_POLL_S)
            hit = self.cache.get(key)
            if hit is not None:
                self.stats[teacher.name].counts["cache_hits"] += 1
                return hit
            pending = self.cache.pending_batch(key)
            if pending is not None:  # that process submitted it in a batch: wait for the batch
                in_slot = counted and self._limited(teacher)  # (``_make`` holds the call's slot: made live, it uses it)
                with self._idle(counted):
                    return await self._batch(teacher.name).complete(call, key, pending, in_slot=in_slot)

    @contextlib.contextmanager
    def _idle(self, counted: bool) -> Iterator[None]:
        """A counted call that waits (for its batch, or another process) is not worked on meanwhile: batches may
        go out."""
        self._working -= counted
        try:
            yield
        finally:
            self._working += counted

    def _not_made(self, teacher: EndpointConfig, call: Call, why: str) -> CallResult:
        self.stats[teacher.name].counts["not_made"] += 1
        return CallResult(call.key, None, why, attempts=0)

    def _record(self, teacher: EndpointConfig, key: str, result: CallResult) -> None:
        spent = teacher.cost(result.input_tokens, result.output_tokens, batch=result.batch is not None)
        try:
            self.cache.put(key, result, teacher.name, spent, self.owner)
        except CacheUnavailable as exc:  # paid: kept in memory (cache.unwritten), its result goes to the stage
            self._cache_trouble(exc)
        self.stats[teacher.name].add(result, spent)
        self.spent_usd += spent
        log.debug("call %s: teacher %s, %s, %d attempt(s), %.2f s, %d input + %d output tokens%s", result.key,
                  teacher.name, "ok" if result.text is not None else f"failed ({result.error})", result.attempts,
                  result.latency_s, result.input_tokens, result.output_tokens,
                  f", batch {result.batch}" if result.batch is not None else "")
        provider = self._http.get(teacher.name)
        if result.text is None and not (provider and provider.stopped):  # a stopped teacher said so once
            log.warning("%s failed: %s", result.key, result.error)
        if spent:
            self._show_progress()
        self._busy.setdefault(teacher.name, [time.perf_counter()] * 2)[1] = time.perf_counter()

    def _show_progress(self) -> None:
        """The progress bar's note: what was spent, and the running batches."""
        if self._bar is not None:
            notes = [f"{self.spent_usd:.4f} USD"] if self.spent_usd else []
            notes += [f"{name}: {line}" for name, line in self._batch_status.items() if line]
            self._bar.set_postfix_str("; ".join(notes), refresh=False)

    def _stand_in(self, teacher: EndpointConfig, call: Call, key: str) -> CallResult:
        """A dry run's reply: tallied once per distinct call, as long as the longest reply (CHARS_PER_TOKEN
        characters a token)."""
        row = self.estimated.setdefault(teacher.name, Estimate())
        row.calls += 1
        if key not in self._estimated_keys:
            self._estimated_keys.add(key)
            row.add(teacher, call)
        return dry_run_reply(teacher, call)

    def _started(self, name: str) -> None:
        self._busy.setdefault(name, [time.perf_counter()] * 2)

    def _batch(self, name: str) -> BatchProvider:
        """The teacher's batches (made on first use, and for any HTTP teacher: a call that a batch submitted
        earlier may answer is waited for even when the teacher now answers live)."""
        if name not in self._batches:
            teacher = self.teachers[name]

            def status(line: str) -> None:
                self._batch_status[name] = line
                self._show_progress()

            self._batches[name] = BatchProvider(
                self._provider(name), self.cache, owner=self.owner, lease_s=CLAIM_LEASE_S,
                calm=lambda: None if self._working else self._asked,
                reclaim=lambda call, key: self._not_made_or_claimed(teacher, call, key, counted=False),
                reserve=lambda call: worst_case(teacher, call)[1], on_status=status, slots=self._slots[name])
        return self._batches[name]

    async def _start(self, name: str) -> None:
        """Start the teacher's server (its starter, in a thread: the other teachers' calls go on) if it waits
        to be started; once, however many calls ask at the same moment."""
        if name not in self._starters:
            return
        async with self._starting.setdefault(name, asyncio.Lock()):
            if name in self._starters:  # (not started by a call that held the lock before this one)
                try:
                    base_url = await asyncio.to_thread(self._starters[name])
                except Exception as exc:  # the calls waiting here fail the same way, without another start
                    self._starters[name] = partial(_raise, exc)
                    raise
                self.teachers[name] = self.teachers[name].model_copy(update={"base_url": base_url})
                del self._starters[name]  # only now: until then every call waits here

    def _provider(self, name: str) -> OpenAIProvider:
        """The teacher's HTTP client, made on first use and kept until ``close()``."""
        if name not in self._http:
            teacher = self.teachers[name]
            self._http[name] = OpenAIProvider(teacher, api_key(teacher.api_key_env, teacher.name), self.backoff,
                                              who=self._who.get(name))
        return self._http[name]

    # -- reporting ------------------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{teacher: its statistics}`` as plain values (TeacherTally.summary)."""
        for name, provider in self._http.items():
            self.stats[name].stopped = provider.stopped
        for name, batches in self._batches.items():
            self.stats[name].counts["batches"] = batches.submitted
        return {name: stats.summary() for name, stats in self.stats.items()}

    def batch_table(self) -> str:
        """Every batch recorded in the cache, the running ones asked for their state first (one bounded attempt
        each; an endpoint that does not answer is asked once, and its batches' states are marked last known), as a
        printable table."""
        stale: dict[str, str] = {}  # input file -> why its state is the last known

        async def refresh() -> None:
            down: dict[str, str] = {}  # teacher -> why its endpoint did not answer
            for row in self.cache.batches():
                name = row["teacher"]
                teacher = self.teachers.get(name)
                if not row["batch_id"] or row["status"] in TERMINAL:
                    continue
                if not teacher or teacher.provider != "openai":
                    stale[row["input_file_id"]] = f"teacher {name} has no endpoint in this config"
                elif problem := down.get(name) or await self._batch(name).refresh(row["input_file_id"]):
                    stale[row["input_file_id"]] = down[name] = problem

        self.run(refresh(), desc=None)
        return batch_table(self.cache.batches(), stale, self.cache.path)

