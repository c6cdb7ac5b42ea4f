"""A teacher's calls through its endpoint's Batch API (docs/batch.md): OpenAI's input files (one chat
completion request per line, ``custom_id`` = the call's cache key; ``vllm run-batch`` reads them too),
batches, and output and error files.

Calls wait in a queue until the whole run is calm (no live call working, nothing new asked for a moment):
then the queue goes out, one input file per teacher, split at the provider's limits. A committee thus
submits twice: feedback with rationales, then the reviews of the rationales that came back. Every
uploaded file is recorded in the call cache before its batch is created, and every batch id as soon as
it is; a request stays pending there until its answer is cached or its batch gave it up, so a rerun
(after Ctrl-C, a crash or SIGKILL, hours later) polls the batches already submitted instead of
submitting again. Requests a batch did not answer (errors, expiry, cancellation) go out again, in the
next batch or live (``batch_retry_live``), up to ``batch_max_submissions``; a failed batch stops the
teacher with the provider's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import openai

from mapd.llm.base import Call, CallResult
from mapd.llm.cache import CacheUnavailable, CallCache
from mapd.llm.openai_provider import (PROVIDER_ERRORS, OpenAIProvider, TeacherStopped, UnusableReply, request_body,
                                      transient_status)

ENDPOINT = "/v1/chat/completions"
TERMINAL = ("completed", "expired", "cancelled", "failed", "lost")  # "lost": the endpoint no longer knows it
CALM_TICK_S = 0.1  # the queue goes out after two ticks in a row with the run calm
MALFORMED_POLLS = 5  # malformed replies in a row to a batch's poll before its calls fail (it stays pending)
FAILED_POLLS = 5  # polls in a row that fail (each after the retry policy) before its calls fail (it stays pending)
REFRESH_S = 10.0  # --batch-status: one attempt per batch, at most this long; the endpoint down: last-known states
log = logging.getLogger("mapd.llm")


@dataclass(frozen=True)
class Unanswered:
    """A batch gave up on a request (an error line, expiry, cancellation, a lost batch): why."""

    input_file_id: str
    reason: str


Outcome = CallResult | Unanswered


class BatchProvider:
    """One teacher's batches. ``calm()`` is the dispatcher's view of the run: None while a call is being
    worked on, else a mark that changes whenever a call is asked for. ``reclaim(call, key)`` claims a call
    again before it is resubmitted (None once claimed, else its answer), ``reserve(call)`` is the budget a
    request holds while its batch runs, and ``on_status(line)`` shows the batches' progress. ``owner`` names
    this process in the cache; its uploads are its own for ``lease_s`` (renewed with its claims). ``slots`` is
    the dispatcher's limit on the teacher's requests in flight (max_concurrency): a call made live takes one."""

    def __init__(self, live: OpenAIProvider, cache: CallCache, *, owner: str, lease_s: float,
                 calm: Callable[[], int | None],
                 reclaim: Callable[[Call, str], Awaitable[CallResult | None]], reserve: Callable[[Call], float],
                 on_status: Callable[[str], None], slots: asyncio.Semaphore) -> None:
        self.live, self.teacher, self.cache, self.owner, self.lease_s = live, live.teacher, cache, owner, lease_s
        self.calm, self.reclaim, self.reserve, self.on_status, self.slots = calm, reclaim, reserve, on_status, slots
        self.submitted = 0  # batches this process created
        self._queue: dict[str, tuple[Call, asyncio.Future]] = {}  # cache key -> its call, waiting to go out
        self._submitting: dict[str, tuple[Call, asyncio.Future]] = {}  # taken from the queue, not yet in a batch
        self._waiting: dict[str, dict[str, tuple[Call, asyncio.Future]]] = {}  # input file -> its requests' waiters
        self._next_poll: dict[str, float] = {}
        self._states: dict[str, str] = {}  # input file -> status line part
        self._malformed: dict[str, int] = {}  # input file -> malformed poll replies in a row
        self._failed_polls: dict[str, int] = {}  # input file -> polls in a row that failed
        self._loop_task: asyncio.Task | None = None

    async def complete(self, call: Call, key: str, pending: str | None = None, *, in_slot: bool = False) -> CallResult:
        """The answer to ``call`` from a batch: the one that holds it already (``pending``, an input file id), or
        the next one submitted. The caller holds the call's claim when it is not pending. ``in_slot``: the caller
        holds one of ``slots`` already; a call made live uses it instead of taking another."""
        started = time.perf_counter()
        input_file_id = pending
        while True:
            outcome = await self._wait(call, key, input_file_id)
            if isinstance(outcome, CallResult):
                return outcome.of(call.key, latency_s=time.perf_counter() - started)
            self.cache.settle(outcome.input_file_id, key)
            times = self.cache.submissions(key)
            if times >= self.teacher.batch_max_submissions and self.teacher.batch and not self.teacher.batch_retry_live:
                return CallResult(call.key, None, f"BatchUnanswered: {outcome.reason} (submitted {times} times)",
                                  latency_s=time.perf_counter() - started, attempts=times)
            answered = await self.reclaim(call, key)
            if answered is not None:
                return answered.of(call.key)
            if self.teacher.batch_retry_live or not self.teacher.batch:  # (a teacher now live: a pending batch gave up)
                log.info("%s: batch gave it up (%s); made live", call.key, outcome.reason)
                async with contextlib.nullcontext() if in_slot else self.slots:
                    return await self.live.complete(call)
            input_file_id = None

    async def refresh(self, input_file_id: str) -> str | None:
        """Ask the provider for a batch's state and record it (nothing is collected or submitted): one attempt of
        at most REFRESH_S. None when recorded, else why not (the state shown stays the last known)."""
        row = self.cache.batch(input_file_id)
        try:
            batch = await asyncio.wait_for(self.live.client.batches.retrieve(row["batch_id"], timeout=REFRESH_S),
                                           REFRESH_S)
            problem = malformed(batch)
        except PROVIDER_ERRORS as exc:  # (TimeoutError included); a bug in mapd raises
            problem = self.live.describe(exc) if str(exc) else f"no answer within {REFRESH_S:g} s"
        if problem is not None:
            log.warning("teacher %s: batch %s: %s", self.teacher.name, row["batch_id"], problem)
            return problem
        self._note(input_file_id, batch, show=False)
        return None

    def forget(self) -> None:
        """Drop what a finished (or interrupted) run left waiting; the batches themselves run on."""
        open_batches = {self._states.get(f, f) for f in self._waiting}
        if open_batches:
            log.warning("teacher %s: %d batches still running at the provider (%s); a rerun collects them and "
                        "submits nothing twice", self.teacher.name, len(open_batches), "; ".join(sorted(open_batches)))
        self._clear()
        self._next_poll.clear()
        self._states.clear()
        self._loop_task = None

    def _clear(self) -> None:
        """Stop tracking every waiting call: queued, being submitted, or in a batch."""
        self._queue.clear()
        self._submitting.clear()
        self._waiting.clear()

    # -- waiting ----------------------------------------------------------------------------------

    def _wait(self, call: Call, key: str, input_file_id: str | None) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if input_file_id is None:
            self._queue[key] = (call, future)
        else:
            self._waiting.setdefault(input_file_id, {})[key] = (call, future)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._run())
        return future

    async def _run(self) -> None:
        """Submit the queue when the run is calm; poll the open batches every ``batch_poll_s``. Whatever ends it
        early (an unexpected error) reaches every call waiting on it."""
        try:
            await self._submit_and_poll()
        except Exception as exc:  # (a cancelled run cancels its waiting calls itself)
            waiting = [*self._queue.values(), *self._submitting.values(),
                       *(w for batch in self._waiting.values() for w in batch.values())]
            for call, future in waiting:
                if future.done():
                    continue
                if isinstance(exc, CacheUnavailable):  # the batches run on; a rerun collects them
                    future.set_result(CallResult(call.key, None, f"CacheUnavailable: {exc}", attempts=0))
                else:
                    future.set_exception(exc)
            self._clear()
            if not isinstance(exc, CacheUnavailable):
                raise

    async def _submit_and_poll(self) -> None:
        loop = asyncio.get_running_loop()
        last_mark, calm_ticks = None, 0
        while self._queue or self._waiting:
            began = loop.time()
            await asyncio.sleep(CALM_TICK_S)
            lagging = loop.time() - began > 2 * CALM_TICK_S  # the loop is busy: calls are still being asked for
            mark = self.calm()
            mark = None if mark is None or lagging else (mark, len(self._queue))
            calm_ticks = calm_ticks + 1 if mark is not None and mark == last_mark else 0
            last_mark = mark
            if self._queue and calm_ticks >= 2:
                await self._submit()
            for input_file_id in list(self._waiting):
                if loop.time() >= self._next_poll.get(input_file_id, 0.0):
                    self._next_poll[input_file_id] = loop.time() + self.teacher.batch_poll_s
                    await self._poll(input_file_id)

    def _deliver(self, input_file_id: str, outcomes: Callable[[str, Call], Outcome]) -> None:
        """Answer every waiter of a batch and stop polling it."""
        for key, (call, future) in self._waiting.pop(input_file_id, {}).items():
            try:
                outcome = outcomes(key, call)
            except Exception as exc:  # one unreadable line fails its own call, never the others
                outcome = CallResult(call.key, None, self.live.describe_text(f"BatchCollect: {type(exc).__name__}: {exc}"))
            if not future.done():
                future.set_result(outcome)
        self._next_poll.pop(input_file_id, None)
        self._show(input_file_id, None)

    # -- submitting -------------------------------------------------------------------------------

    async def _submit(self) -> None:
        """Everything queued, in input files within the provider's limits, each recorded, then its batch created."""
        self._submitting, self._queue = self._queue, {}
        for chunk in self._chunks(self._submitting):
            waiters = {key: self._submitting.pop(key) for key, _ in chunk}
            try:
                await self._submit_file(chunk, waiters)
            except Exception as exc:  # the calls of this file fail; the others go on
                error = f"BatchUpload: {self.live.describe(exc)}"
                for call, future in waiters.values():
                    if not future.done():
                        future.set_result(CallResult(call.key, None, error))

    async def _submit_file(self, chunk: list[tuple[str, bytes]], waiters: dict[str, tuple[Call, asyncio.Future]]) -> None:
        data = b"".join(line for _, line in chunk)
        uploaded = await self.live.request(lambda: self.live.client.files.create(
            file=(f"mapd-{self.teacher.name}.jsonl", data, "application/jsonl"), purpose="batch"))
        self._check_id(uploaded.id)
        self.cache.add_batch_file(uploaded.id, self.teacher.name,
                                  [(key, str(call.key), self.reserve(call)) for key, (call, _) in waiters.items()],
                                  self.owner, self.lease_s)
        self._waiting[uploaded.id] = waiters
        self._next_poll[uploaded.id] = asyncio.get_running_loop().time() + self.teacher.batch_poll_s
        await self._create(uploaded.id, fresh=True)

    def _check_id(self, value: str) -> None:
        """Refuse an id that carries a credential (an endpoint that echoes them): it would be stored and shown."""
        if self.live.describe_text(value) != value:
            self.live.stop("the endpoint returned an id that contains a credential; it is not stored")
            raise TeacherStopped(self.live.stopped)

    def _chunks(self, queued: dict[str, tuple[Call, asyncio.Future]]) -> list[list[tuple[str, bytes]]]:
        """The queued requests as input file lines, cut at batch_max_requests and batch_max_bytes."""
        chunks: list[list[tuple[str, bytes]]] = [[]]
        size = 0
        for key, (call, _) in queued.items():
            line = json.dumps({"custom_id": key, "method": "POST", "url": ENDPOINT,
                               "body": request_body(self.teacher, call.messages)}, ensure_ascii=False).encode() + b"\n"
            if chunks[-1] and (len(chunks[-1]) >= self.teacher.batch_max_requests
                               or size + len(line) > self.teacher.batch_max_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((key, line))
            size += len(line)
        return [chunk for chunk in chunks if chunk]

    async def _create(self, input_file_id: str, *, fresh: bool = False) -> None:
        """Create the batch of an uploaded file and record its id. A file recorded by an earlier process, and
        any retry of a create whose reply was lost, may have its batch already: it is looked for first."""
        tries = 0

        async def find_or_create() -> tuple[openai.types.Batch, bool]:
            nonlocal tries
            tries += 1
            if (tries > 1 or not fresh) and (found := await self._find_batch(input_file_id)) is not None:
                batch, created = found, False
            else:
                batch, created = await self.live.client.batches.create(
                    input_file_id=input_file_id, endpoint=ENDPOINT,
                    completion_window=self.teacher.batch_completion_window,
                    metadata={"mapd_teacher": self.teacher.name}), True
            if (problem := malformed(batch)) is not None:
                raise UnusableReply(f"a malformed batch ({problem})")
            return batch, created

        try:
            batch, created = await self.live.request(find_or_create)
            self._check_id(batch.id)
        except Exception as exc:  # the file stays recorded and its requests pending: a rerun creates the batch
            error = f"BatchCreate: {self.live.describe(exc)}"
            self._deliver(input_file_id, lambda key, call: CallResult(call.key, None, error))
            return
        self.submitted += created
        self._note(input_file_id, batch, record_id=True)
        log.info("teacher %s: batch %s %s (%d requests)", self.teacher.name, batch.id,
                 "submitted" if created else "found at the provider", len(self._waiting.get(input_file_id, ())))

    async def _find_batch(self, input_file_id: str) -> openai.types.Batch | None:
        """The provider's batch of ``input_file_id`` if there is one (newest first, back to the upload); one
        attempt (the caller retries)."""
        since, after = self.cache.batch(input_file_id)["created"] - 60, None
        while True:
            page = await self.live.client.batches.list(limit=100, **({"after": after} if after else {}))
            for batch in page.data:
                if batch.input_file_id == input_file_id:
                    return batch
            if not page.data or not page.has_more or page.data[-1].created_at < since:
                return None
            after = page.data[-1].id

    # -- polling and collecting -------------------------------------------------------------------

    async def _poll(self, input_file_id: str) -> None:
        row = self.cache.batch(input_file_id)
        if row["batch_id"] is None:  # uploaded, batch not recorded: its process is creating it, or died first
            if row["owner"] == self.owner or row["expires"] > time.time():
                return None  # that process is alive: the next poll sees its batch
            return await self._create(input_file_id)
        try:
            batch = await self.live.request(lambda: self.live.client.batches.retrieve(row["batch_id"]),
                                            missing_ok=True)
        except openai.NotFoundError as exc:
            self.cache.update_batch(input_file_id, status="lost", error=self.live.describe(exc))
            return self._deliver(input_file_id, lambda key, call: Unanswered(input_file_id, f"batch {row['batch_id']} "
                                                                             "not found at the endpoint"))
        except TeacherStopped as exc:
            error = f"TeacherStopped: {exc}"
            return self._deliver(input_file_id, lambda key, call: CallResult(call.key, None, error))
        except PROVIDER_ERRORS as exc:  # the batch runs on; the next poll asks again, up to FAILED_POLLS in a row
            self._failed_polls[input_file_id] = times = self._failed_polls.get(input_file_id, 0) + 1
            log.warning("teacher %s: polling batch %s failed, %d in a row%s: %s", self.teacher.name, row["batch_id"],
                        times, "" if times < FAILED_POLLS else "; its calls fail for now, a rerun polls it again",
                        self.live.describe(exc))
            if times >= FAILED_POLLS:
                error = self.live.describe_text(f"BatchUnreachable: batch {row['batch_id']}: {times} polls in a row "
                                                f"failed, the last: {self.live.describe(exc)}")
                self._deliver(input_file_id, lambda key, call: CallResult(call.key, None, error))
            return None
        self._failed_polls.pop(input_file_id, None)
        if (problem := malformed(batch)) is not None:  # a warning on this batch, never a record in the cache
            self._malformed[input_file_id] = times = self._malformed.get(input_file_id, 0) + 1
            log.warning("teacher %s: batch %s: the endpoint's reply is malformed (%s), %d in a row%s",
                        self.teacher.name, row["batch_id"], problem, times,
                        "" if times < MALFORMED_POLLS else "; its calls fail for now, a rerun polls it again")
            if times >= MALFORMED_POLLS:
                error = self.live.describe_text(f"BatchMalformed: batch {row['batch_id']}: {problem}")
                self._deliver(input_file_id, lambda key, call: CallResult(call.key, None, error))
            return None
        self._malformed.pop(input_file_id, None)
        self._note(input_file_id, batch)
        if batch.status == "failed":
            return self._failed(input_file_id, batch)
        if batch.status in TERMINAL:
            await self._collect(input_file_id, batch)
        return None

    def _note(self, input_file_id: str, batch: openai.types.Batch, show: bool = True, record_id: bool = False) -> None:
        """Record a batch's state as the provider reports it, and show it. Its id is recorded only by ``_create``
        (``record_id``), which checked it: a later reply's id never replaces it."""
        counts = _counts(batch)
        self.cache.update_batch(input_file_id, batch_id=batch.id if record_id else None, status=batch.status, **counts)
        if not show:
            return
        total = batch.request_counts.total if batch.request_counts and batch.request_counts.total else \
            self.cache.batch(input_file_id)["requests"]
        self._show(input_file_id, f"{batch.id} {batch.status} {counts['completed'] + counts['failed']}/{total}")

    def _show(self, input_file_id: str, state: str | None) -> None:
        if state is None:
            self._states.pop(input_file_id, None)
        elif self._states.get(input_file_id) != state:
            self._states[input_file_id] = state
            log.info("teacher %s: batch %s", self.teacher.name, state)
        self.on_status("; ".join(self._states.values()))

    def _failed(self, input_file_id: str, batch: openai.types.Batch) -> None:
        """A failed batch (its input refused): loud, and the teacher stops, since its next batch would fail alike."""
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        message = "; ".join(e.message or e.code or "" for e in errors) or "no message"
        reason = self.live.describe_text(f"batch {batch.id} failed: {message}")
        self.cache.update_batch(input_file_id, status="failed", error=reason)
        self.cache.settle(input_file_id)
        self.live.stop(reason)
        self._deliver(input_file_id, lambda key, call: CallResult(call.key, None, f"BatchFailed: {reason}"))
        for call, future in self._queue.values():
            if not future.done():
                future.set_result(CallResult(call.key, None, f"TeacherStopped: {reason}"))
        self._queue.clear()

    async def _collect(self, input_file_id: str, batch: openai.types.Batch) -> None:
        """Read a finished batch's output and error files; each waiter gets its line, found by custom_id."""
        lines: dict[str, dict] = {}
        twice: dict[str, str] = {}  # custom_id -> why it is unanswered: two different lines for it in one file
        for file_id in (batch.error_file_id, batch.output_file_id):  # an answer wins over an error line
            if not file_id:
                continue
            try:
                content = await self.live.request(lambda: self.live.client.files.content(file_id), missing_ok=True)
            except openai.NotFoundError:  # deleted by the provider (OpenAI keeps them 30 days): those go again
                log.warning("teacher %s: file %s of batch %s is gone; its requests without an answer go out again",
                            self.teacher.name, file_id, batch.id)
                continue
            except Exception as exc:  # the batch is recorded: the next poll (or a rerun) reads its files again
                log.warning("teacher %s: reading the files of batch %s failed: %s", self.teacher.name, batch.id,
                            self.live.describe(exc))
                self._next_poll[input_file_id] = asyncio.get_running_loop().time() + self.teacher.batch_poll_s
                return
            found: dict[str, tuple[int, dict]] = {}
            differing: dict[str, str] = {}
            # JSON Lines end at "\n" only: str.splitlines() would also cut at U+2028 and the like inside a string
            for number, text in enumerate(content.content.decode("utf-8", "replace").split("\n"), 1):
                line = _parse_line(text, file_id, number) if text.strip() else None
                if line is None:
                    continue
                custom_id = line["custom_id"]
                if custom_id in found:  # never silently the last one
                    first, same = found[custom_id][0], found[custom_id][1] == line
                    log.warning("batch file %s lines %d and %d: custom_id %s twice%s", file_id, first, number,
                                custom_id, ", the same line: taken once" if same else
                                " with different contents: neither is taken, its request counts as unanswered")
                    if not same:
                        differing[custom_id] = f"custom_id twice in file {file_id} (lines {first}, {number})"
                    continue
                found[custom_id] = (number, line)
            for custom_id, (_, line) in found.items():  # this file's word replaces the error file's
                lines[custom_id] = line
                twice.pop(custom_id, None)
            twice.update(differing)
        self._deliver(input_file_id, lambda key, call: Unanswered(input_file_id, twice[key]) if key in twice
                      else self._outcome(input_file_id, batch, call, lines.get(key)))

    def _outcome(self, input_file_id: str, batch: openai.types.Batch, call: Call, line: dict | None) -> Outcome:
        """One request's outcome from its line of the output or error file (None: neither has it)."""
        if line is None:
            return Unanswered(input_file_id, f"not in the files of batch {batch.id} ({batch.status})")
        response = line.get("response") if isinstance(line.get("response"), dict) else {}
        if response.get("status_code") == 200:
            try:
                result = self.live.parse_reply(call, response.get("body"))
            except (UnusableReply, AttributeError, KeyError, TypeError, ValueError) as exc:  # a malformed body
                return Unanswered(input_file_id, self.live.describe_text(f"unusable reply: {type(exc).__name__}: {exc}"))
            return result.of(call.key, batch=input_file_id)
        error = line.get("error") if isinstance(line.get("error"), dict) else None
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        error = error or (body.get("error") if isinstance(body.get("error"), dict) else {})
        status = response.get("status_code")
        reason = self.live.describe_text(f"{f'HTTP {status}: ' if status else ''}"
                                         f"{error.get('code') or error.get('type') or ''} {error.get('message') or ''}")
        if isinstance(status, int) and 400 <= status < 500 and not transient_status(status):
            return CallResult(call.key, None, f"BatchRequestRefused: {reason.strip()}", batch=input_file_id)
        return Unanswered(input_file_id, reason.strip())  # a server error, expiry, cancellation: worth another go


def _counts(batch: openai.types.Batch) -> dict[str, int]:
    """The batch's completed and failed request counts (0 for what the provider left out or malformed)."""
    counts = batch.request_counts
    values = {name: getattr(counts, name, None) for name in ("completed", "failed")}
    return {name: value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
            for name, value in values.items()}


def malformed(batch: object) -> str | None:
    """What makes a Batch API reply unusable (no id or status, a file id that is not text); None when usable.
    The SDK builds its reply objects without validating them."""
    if not isinstance(getattr(batch, "id", None), str) or not batch.id:
        return "no batch id"
    if not isinstance(getattr(batch, "status", None), str) or not batch.status:
        return "no status"
    for name in ("output_file_id", "error_file_id"):
        if not isinstance(getattr(batch, name, None), (str, type(None))):
            return f"{name} is not text"
    return None


def _parse_line(text: str, file_id: str, number: int) -> dict | None:
    """One line of a batch output or error file; None, with a warning naming the file and line, when it is
    not one (its request then counts as unanswered)."""
    try:
        line = json.loads(text)
    except ValueError:
        line = None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        log.warning("batch file %s line %d: not a JSON object with a custom_id; its request is resubmitted",
                    file_id, number)
        return None
    return line
