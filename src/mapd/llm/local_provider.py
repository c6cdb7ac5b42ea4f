"""An in-process transformers model behind a micro-batching queue.

Calls wait in a queue; one worker takes them in batches of ``max_concurrency`` (one sample index
per batch, longest prompts first so each batch pads little) and generates each batch in a worker
thread, so the event loop keeps serving the HTTP teachers. Each result carries its call's key.
"""

from __future__ import annotations

import asyncio
import threading
import time

from mapd.config import EndpointConfig
from mapd.generation import generate, generation_device, key_seed, load_model
from mapd.llm.base import Call, CallResult


class LocalWeights:
    """One local model's weights, loaded by the first batch that needs them and shared by every teacher on
    that model (two names on one model are two voices, not two copies); one batch generates at a time."""

    def __init__(self, model: str, gguf_file: str | None, dtype: str = "auto") -> None:
        self.model, self.gguf_file, self.dtype = model, gguf_file, dtype
        self._loaded = None
        self.lock = threading.Lock()  # held while loading and while a batch generates

    def loaded(self):
        """``(model, tokenizer)``; the caller holds ``lock``."""
        if self._loaded is None:
            self._loaded = load_model(self.model, self.gguf_file, dtype=self.dtype, device=generation_device())
        return self._loaded


class LocalProvider:
    """Generates for one local teacher; its weights (``LocalWeights``, possibly shared) load with the first batch."""

    def __init__(self, teacher: EndpointConfig, weights: LocalWeights | None = None) -> None:
        self.teacher = teacher
        self.weights = weights or LocalWeights(teacher.model, teacher.gguf_file, teacher.dtype)
        self._queue: list[tuple[Call, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def complete(self, call: Call) -> CallResult:
        """Queue ``call`` and wait for the batch that answers it."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())
        return await future

    async def _work(self) -> None:
        while self._queue:
            await self._settle()
            batch = self._next_batch()
            waiting = {call.key: future for call, future in batch}
            try:
                results = await asyncio.to_thread(self._generate, [call for call, _ in batch])
            except asyncio.CancelledError:  # the run that queued these calls is over
                self._queue.clear()
                raise
            except Exception as exc:  # a model that cannot load: every waiting call fails with it
                for future in [*waiting.values(), *(f for _, f in self._queue)]:
                    if not future.done():
                        future.set_exception(exc)
                self._queue.clear()
                return
            for result in results:
                if not waiting[result.key].done():
                    waiting[result.key].set_result(result)

    async def _settle(self) -> None:
        """Let the callers that are ready queue their calls before a batch is cut."""
        count = -1
        while count != len(self._queue):
            count = len(self._queue)
            await asyncio.sleep(0)

    def _next_batch(self) -> list[tuple[Call, asyncio.Future]]:
        sample = min(call.key.sample for call, _ in self._queue)
        same = [item for item in self._queue if item[0].key.sample == sample]
        same.sort(key=lambda item: -sum(len(str(m.get("content", ""))) for m in item[0].messages))
        batch = same[: self.teacher.max_concurrency]
        chosen = {id(item) for item in batch}
        self._queue = [item for item in self._queue if id(item) not in chosen]
        return batch

    def _generate(self, calls: list[Call]) -> list[CallResult]:
        """One batch, each call sampled with the seed its key names (a call samples the same text whichever
        batch it lands in, so records do not depend on the machine's timing).

        A generation error (e.g. out of memory) fails the batch's calls; a model that cannot load raises."""
        with self.weights.lock:
            return self._generate_on(self.weights.loaded(), calls)

    def _generate_on(self, loaded, calls: list[Call]) -> list[CallResult]:
        teacher, (model, tokenizer) = self.teacher, loaded
        seeds = [key_seed(call.key.stage, call.key.id, call.key.teacher, call.key.reviewer, call.key.sample)
                 for call in calls]
        began = time.perf_counter()
        try:
            generations = generate(
                model, tokenizer, [call.messages for call in calls], max_new_tokens=teacher.max_tokens,
                temperature=teacher.temperature, top_p=teacher.top_p, batch_size=len(calls), seeds=seeds,
            )
        except RuntimeError as exc:  # torch reports out-of-memory and device errors as RuntimeError
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return [CallResult(call.key, None, error, latency_s=time.perf_counter() - began) for call in calls]
        seconds = time.perf_counter() - began
        results = []
        for call, generation in zip(calls, generations, strict=True):  # generate answers in input order
            text = generation.text if generation.text.strip() else None
            results.append(CallResult(
                call.key, text, None if text else "UnusableReply: the model generated no text",
                generation.input_tokens, generation.output_tokens, seconds, finish_reason=generation.finish_reason,
            ))
        return results
