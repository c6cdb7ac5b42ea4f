"""The student's answers (mining and evaluation): generated in-process, the default, or by a serving
engine through the same keyed call path as the teachers (cache, concurrency, retries, statistics).

``student.serve`` is a command that mapd starts and stops (mapd.serve); ``student.base_url`` is a
server that is already running. Servers are kept by a :func:`server_pool` while ``mapd run`` needs
them (eval before training and mining share one) and stopped before training needs the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from mapd.config import EndpointConfig, PromptConfig, StudentConfig
from mapd.errors import IncompleteStage
from mapd.generation import Generation
from mapd.llm import Call, CallCache, CallKey, Dispatcher
from mapd.llm.cache import cache_key
from mapd.models import checkpoint_identity
from mapd.prompts import answer_messages
from mapd.serve import NOT_STARTED
from mapd.tasks import Example

STUDENT = "student"  # the name of the student's endpoint in call keys and statistics
ROLE = "the student's server"  # how log lines and errors name it


def trained_student(student: StudentConfig, model_dir: Path) -> StudentConfig:
    """``student`` with its model replaced by the one a round trained (a folder, never a GGUF file)."""
    return student.model_copy(update={"model": str(model_dir), "gguf_file": None})


@dataclass(frozen=True)
class ServedStudent:
    """Where the student's requests go, and the model name they carry (a teacher's URL, headers and query
    are a secrets.Endpoint)."""

    base_url: str
    model_name: str


class ServerPool:
    """Student servers kept running between stages, one per (command, model); all stopped by :meth:`stop`."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], tuple[object, object]] = {}  # key -> (context manager, server)

    def get(self, student: StudentConfig, model: str, log_path: Path):
        """The server for ``model``, started with ``student.serve`` unless it already runs (any other is stopped)."""
        key = (student.serve, student.host, model)
        if key in self._open:
            server = self._open[key][1]
            server.check()
            return server
        self.stop()  # one student server at a time: the device belongs to the model in use
        context = _served(student, model, log_path)
        self._open[key] = (context, context.__enter__())
        return self._open[key][1]

    def stop(self) -> None:
        """Stop every server of the pool (and its whole process group)."""
        while self._open:
            _, (context, _) = self._open.popitem()
            context.__exit__(None, None, None)


_pool: ContextVar[ServerPool | None] = ContextVar("mapd_student_servers", default=None)


@contextmanager
def server_pool() -> Iterator[ServerPool]:
    """Keep student servers across the stages run inside the block; stop them all when it ends."""
    pool = ServerPool()
    token = _pool.set(pool)
    try:
        yield pool
    finally:
        _pool.reset(token)
        pool.stop()


@contextmanager
def serving(student: StudentConfig, reference: str, log_path: Path) -> Iterator[ServedStudent]:
    """The running server for ``student``: its base_url, or the one ``student.serve`` starts on ``reference``
    (a model a server can load, :func:`mapd.models.servable`), kept by the current :func:`server_pool`, else
    stopped when the block ends."""
    if student.base_url:
        yield ServedStudent(student.base_url, student.model)
        return
    pool = _pool.get()
    if pool is not None:
        server = pool.get(student, reference, log_path)
        yield ServedStudent(server.base_url, server.model_name)
        return
    with _served(student, reference, log_path) as server:
        yield ServedStudent(server.base_url, server.model_name)


def _served(student: StudentConfig, reference: str, log_path: Path):
    """The context manager that serves ``reference`` with ``student.serve`` (mapd.serve.served)."""
    from mapd.serve import served

    return served(student.serve, reference, name=STUDENT, log_path=log_path, host=student.host,
                  ready_timeout_s=student.ready_timeout_s)


def served_answers(student: StudentConfig, examples: list[Example], answer_kind: str, prompts: PromptConfig, *,
                   greedy: bool, stage: str, cache_path: Path, log_path: Path, desc: str
                   ) -> tuple[list[Generation], float]:
    """Each example's answer from the student's server, in example order, and the seconds it took. Every
    request carries its key (stage, example id); the cache key includes the checkpoint's identity, and a
    server is started only when some answer is not cached yet. A call that fails after its retries makes
    the stage incomplete (what was answered stays cached)."""
    sampling = not greedy and student.temperature > 0
    reference, name = _reference_and_name(student)
    config = EndpointConfig(  # the student's server, as the call path calls any endpoint
        name=STUDENT, model=name, base_url=student.base_url or NOT_STARTED,
        api_key_env=student.api_key_env, temperature=student.temperature if sampling else 0.0,
        top_p=student.top_p if sampling else 1.0, max_tokens=student.max_new_tokens,
        max_concurrency=student.max_concurrency, timeout_s=student.timeout_s,
        extra_body={"seed": student.seed} if sampling else {},
    )
    identity = checkpoint_identity(student.model, student.gguf_file)
    calls = {example.id: Call(CallKey(stage, example.id, STUDENT), answer_messages(prompts, example.question,
                                                                                 answer_kind))
             for example in examples}
    with CallCache(cache_path) as cache:
        missing = any(cache.get(cache_key(config, call, identity)) is None for call in calls.values())
        with (serving(student, reference, log_path) if missing
              else nullcontext(ServedStudent(config.base_url, config.model))) as where:
            config = config.model_copy(update={"base_url": where.base_url, "model": where.model_name})
            began = time.perf_counter()
            with Dispatcher([config], cache, identities={STUDENT: identity}, who={STUDENT: ROLE}) as dispatcher:
                results = dispatcher.complete_all(list(calls.values()), desc)
                trouble = dispatcher.cache_trouble() if dispatcher.cache.unwritten else None
            seconds = time.perf_counter() - began
    if trouble:
        raise IncompleteStage(f"{stage}: {trouble}")
    failed = [result for result in results.values() if result.text is None]
    if failed:
        raise IncompleteStage(f"{stage}: {len(failed)} of {len(calls)} student calls failed (the first: "
                              f"{failed[0].key}: {failed[0].error}); rerun to make only those")
    return [Generation(r.text, r.input_tokens, r.output_tokens, r.finish_reason)
            for r in (results[calls[example.id].key] for example in examples)], seconds


def _reference_and_name(student: StudentConfig) -> tuple[str, str]:
    """(the model the server loads, the name requests carry), known before any server starts."""
    if student.base_url:
        return student.model, student.model
    from mapd.models import servable
    from mapd.serve import served_model_name

    reference = servable(student.model, student.gguf_file)
    return reference, served_model_name(student.serve, reference, STUDENT)
