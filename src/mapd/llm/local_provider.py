"""An in-process transformers teacher: the model loads once, calls run in batches.

``complete`` is blocking; the dispatcher runs it in a worker thread so the event loop keeps
serving the HTTP teachers, and results are delivered (and cached) as each batch ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from itertools import groupby

from mapd.generation import generate, load_model
from mapd.llm.base import Call, CallResult, TeacherConfig


class LocalProvider:
    """Generates for one local teacher; ``model`` is loaded lazily by the first ``complete``."""

    def __init__(self, teacher: TeacherConfig) -> None:
        self.teacher = teacher
        self._loaded = None
        self._load_lock = threading.Lock()

    def _model(self):
        with self._load_lock:
            if self._loaded is None:
                self._loaded = load_model(self.teacher.model, self.teacher.gguf_file)
            return self._loaded

    def complete(
        self,
        calls: list[Call],
        on_result: Callable[[int, CallResult], None],
        may_start: Callable[[list[int]], bool] = lambda batch: True,
    ) -> None:
        """Complete ``calls`` in batches of ``max_concurrency``; ``on_result(index, result)`` after each batch.

        Calls are grouped by sample index and batch ``b`` of sample ``s`` is seeded with
        ``s * 100003 + b``, so the same calls sample the same text. ``may_start(indices)`` is
        asked before each batch; False stops (the budget). A generation error (e.g. out of
        memory) becomes a failed result for its batch; a model that cannot load raises MapdError.
        """
        teacher = self.teacher
        model, tokenizer = self._model()
        size = teacher.max_concurrency
        length = {i: sum(len(str(m.get("content", ""))) for m in call.messages) for i, call in enumerate(calls)}
        order = sorted(range(len(calls)), key=lambda i: (calls[i].sample, -length[i]))  # similar lengths batch together
        for sample, group in groupby(order, key=lambda i: calls[i].sample):
            group = list(group)
            for number, start in enumerate(range(0, len(group), size)):
                batch = group[start : start + size]
                if not may_start(batch):
                    return
                began = time.perf_counter()
                try:
                    generations = generate(
                        model, tokenizer, [calls[i].messages for i in batch],
                        max_new_tokens=teacher.max_tokens, temperature=teacher.temperature, top_p=teacher.top_p,
                        batch_size=size, seed=sample * 100003 + number,
                    )
                except RuntimeError as exc:  # torch reports out-of-memory and device errors as RuntimeError
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    generations = [None] * len(batch)
                seconds = time.perf_counter() - began
                for index, generation in zip(batch, generations):
                    if generation is None:
                        result = CallResult(None, error, latency_s=seconds)
                    elif not generation.text.strip():
                        result = CallResult(None, "UnusableReply: the model generated no text",
                                            generation.input_tokens, generation.output_tokens, seconds)
                    else:
                        result = CallResult(generation.text, None, generation.input_tokens,
                                            generation.output_tokens, seconds)
                    on_result(index, result)
