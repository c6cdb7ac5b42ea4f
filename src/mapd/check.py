"""``mapd check``: a config, its keys and its endpoints checked, and an upper bound of what teaching may
cost, before anything is spent. It writes nothing, anywhere: no run folder, no call cache, no model
download (local models are not loaded; a hub dataset is read only from the Hugging Face cache).

The bound counts every question of the train split as a mistake, in every round, and every call as
using all of its ``max_tokens``, at the teacher's prices (its batch prices where ``batch: true``). The
calls are the ones ``mapd teach`` makes for a mistake (its Committee), tallied by the estimate a
``--dry-run`` prints (mapd.llm.estimate.Estimate).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from unittest.mock import patch

from mapd.config import RunConfig, TeacherConfig
from mapd.config_file import embedded_default_config, load_config
from mapd.errors import MapdError
from mapd.llm.base import Call, CallResult
from mapd.llm.estimate import Estimate, dry_run_reply, longest_reply
from mapd.log import log, say
from mapd.records import Mistake
from mapd.secrets import Endpoint, Redactor, api_key, endpoint

PROBE_TIMEOUT_S = 20.0


def check(path: str | None, *, offline: bool = False) -> None:
    """Check the config at ``path`` (None: the embedded demo) and say what teaching may cost; a MapdError
    (exit 2) when any problem was found, each problem logged first as one ``error:`` line naming the
    teacher and the field."""
    from mapd.runner import run_problems

    source = path or "the embedded default config"
    config = load_config(path) if path else embedded_default_config()
    problems = [str(problem) for problem in run_problems(config, source, assemble=False)]  # nothing assembled
    for index, teacher in enumerate(config.teachers):
        problems += [f"{source}: teachers.{index} ({teacher.name}): {problem}"
                     for problem in _teacher_problems(teacher, offline)]
    problem = _say_cost(config)
    if problem:
        problems.append(f"{source}: {problem}")
    for problem in problems:
        log.error("error: %s", problem)
    if problems:
        raise MapdError(f"{source}: {len(problems)} problem(s) above; nothing was called or written")
    say(f"{source}: ok" + (" (endpoints not probed: --offline)" if offline else ""))


def _teacher_problems(teacher: TeacherConfig, offline: bool) -> list[str]:
    """What is wrong with one endpoint teacher: an unset key variable, an endpoint that does not answer or does not
    serve its model (a local model's path: ``run_problems``)."""
    if not teacher.base_url:  # in-process, or a server mapd starts (serve:): nothing to reach yet
        return []
    try:
        key = api_key(teacher.api_key_env, teacher.name)
    except MapdError as exc:
        return [f"api_key_env: {exc}"]
    try:
        where = endpoint(teacher, key)
    except MapdError as exc:
        return [f"headers_env / query_env: {exc}"]
    if offline:
        held = "its key variable set" if teacher.api_key_env else "no key needed (api_key_env unset)"
        say(f"  {teacher.name}: {held}; endpoint not probed (--offline)")
        return []
    problem = _probe(teacher, key, where)
    return [problem] if problem else []


def _probe(teacher: TeacherConfig, key: str, where: Endpoint) -> str | None:
    """Ask the endpoint for its models list (a free request); the problem, or None when it serves the model."""
    import openai

    redact = Redactor(where.secrets, key_like=True)
    client = openai.OpenAI(base_url=where.base_url, api_key=key, default_headers=where.headers or None,
                           default_query=where.query or None, timeout=min(teacher.timeout_s, PROBE_TIMEOUT_S),
                           max_retries=1)
    try:
        served = [model.id for model in client.models.list()]
    except openai.AuthenticationError as exc:
        return f"api_key_env: the endpoint refused the key in {teacher.api_key_env} (401: {redact(str(exc))[:200]})"
    except openai.PermissionDeniedError as exc:
        return f"api_key_env: the key in {teacher.api_key_env} may not use this endpoint (403: {redact(str(exc))[:200]})"
    except openai.NotFoundError:
        say(f"  {teacher.name}: the endpoint answers but lists no models (404 on /models): model not checked")
        return None
    except openai.APIStatusError as exc:
        return f"base_url: the endpoint answered {exc.status_code} to its models list ({redact(str(exc))[:200]})"
    except openai.APIConnectionError as exc:
        cause = exc.__cause__ or exc
        return f"base_url: the endpoint does not answer ({type(cause).__name__}: {redact(str(cause))[:200]})"
    finally:
        client.close()
    names = {name.removeprefix("models/") for name in served}  # Gemini lists "models/gemini-..."
    if teacher.model not in names:
        listed = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
        return f"model: {teacher.model!r} is not served by this endpoint (it lists: {listed or 'nothing'})"
    say(f"  {teacher.name}: endpoint up, serves {teacher.model}")
    return None


class _Tally:
    """Stands in for the Dispatcher under ``mapd teach``'s Committee: every call is tallied at its worst case
    and answered with the longest reply its teacher may give."""

    def __init__(self, config: RunConfig) -> None:
        self.teachers = {teacher.name: teacher for teacher in config.teachers}
        self.estimated = {name: Estimate() for name in self.teachers}

    async def complete(self, call: Call) -> CallResult:
        teacher = self.teachers[call.key.caller]
        self.estimated[teacher.name].add(teacher, call)
        return dry_run_reply(teacher, call)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face libraries read only their cache meanwhile: their variables for a library not imported
    yet, their constants for one already imported (it read the variables then)."""
    with ExitStack() as stack:
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            stack.enter_context(patch.dict(os.environ, {name: "1"}))
        for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                             ("datasets.config", "HF_DATASETS_OFFLINE")):
            if module in sys.modules and hasattr(sys.modules[module], name):
                stack.enter_context(patch.object(sys.modules[module], name, True))
        yield


def teaching_bound(config: RunConfig) -> tuple[int, dict[str, Estimate]]:
    """(questions in the train split, per teacher the worst case of teaching them all as mistakes in every
    round); MapdError when the split cannot be read without a download."""
    from mapd.stages.teach import Committee
    from mapd.tasks import get_task

    task = get_task(config.task)
    with _hub_offline():
        examples = task.load(config.task.train_split, config.task.train_limit)
    tally = _Tally(config)
    committee = Committee(tally, list(tally.teachers), config.prompts, config.review, task.answer_kind)
    student_answer = longest_reply("student", config.student.max_new_tokens)

    async def every_question() -> None:
        for example in examples:
            await committee.mistake(Mistake(id=example.id, question=example.question, gold=example.gold,
                                            output=student_answer))

    asyncio.run(every_question())
    for row in tally.estimated.values():
        row.calls = row.to_call = row.to_call * config.rounds
        row.input_tokens *= config.rounds
        row.max_output_tokens *= config.rounds
        row.cost_usd *= config.rounds
    return len(examples), tally.estimated


def _say_cost(config: RunConfig) -> str | None:
    """Print the teaching cost bound per teacher and in total, against max_budget_usd; the problem when the
    config's own train data (task.path) cannot be read."""
    try:
        questions, rows = teaching_bound(config)
    except MapdError as exc:
        if config.task.path is not None:
            return f"task.path: {exc}"
        log.warning("teaching cost: not bounded: mapd check downloads nothing, and the train split is not on this "
                    "machine (set task.path to local JSONL, or check again once a run has fetched the dataset): %s",
                    str(exc)[:160])
        return None
    per_mistake = sum(row.to_call for row in rows.values()) // max(1, questions * config.rounds)
    say(f"teaching cost, at most (every one of the {questions} questions of {config.task.name}/"
        f"{config.task.train_split} a mistake, in {config.rounds} round(s); {per_mistake} calls per mistake; "
        "every reply max_tokens long):")
    for name, row in rows.items():
        teacher = config.teacher(name)
        priced = ("batch prices" if teacher.batch and not teacher.batch_retry_live else "prices") if (
            teacher.price_input_per_mtok or teacher.price_output_per_mtok) else "no price set"
        say(f"  {name}: {row.to_call:,} calls, ~{row.input_tokens:,} input tokens, at most "
            f"{row.max_output_tokens:,} output tokens: at most {row.cost_usd:.2f} USD ({priced})")
    total = sum(row.cost_usd for row in rows.values())
    budget = config.max_budget_usd
    verdict = ("no max_budget_usd set" if budget is None else
               f"within max_budget_usd {budget:g}" if total <= budget else
               f"more than max_budget_usd {budget:g}: the run stops at the budget (exit 3) unless fewer questions are "
               "mistakes")
    say(f"  total: at most {total:.2f} USD, {verdict}")
    return None
