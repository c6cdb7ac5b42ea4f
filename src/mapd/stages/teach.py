"""Teach (docs/method.md#2-feedback to #4-peer-review): every teacher explains each mistake and writes
its own rationale, and the other teachers review each rationale.

One coroutine per mistake: its feedback and rationale calls go out together, and each rationale's
reviews go out as soon as that rationale arrives. Every call carries its key and goes through the
dispatcher (cache, budget, limits, retries), so a rerun pays only for the calls not yet made.
Records come back in mistake order, then committee order.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from functools import partial
from pathlib import Path

from mapd.config import PromptConfig, ReviewConfig, TaskConfig, TeacherConfig
from mapd.errors import IncompleteStage, MapdError
from mapd.log import say
from mapd.io import check_folder, folder_lock
from mapd.layout import RoundLayout, RunLayout
from mapd.llm import BudgetExceeded, Call, CallCache, CallKey, Dispatcher
from mapd.llm.cache import check_cache_path
from mapd.llm.tally import summary_table
from mapd.models import check_local_teachers, checkpoint_identity
from mapd.prompts import answer_messages, feedback_messages, review_messages
from mapd.records import (Feedback, Mistake, Rationale, Review, TeacherStats, TeachStats, read_mistakes, write_document,
                          write_records)
from mapd.secrets import check_credentials
from mapd.review_score import parse_score
from mapd.stages.review import check_committee, judged, needs_review, reviewers
from mapd.tasks import get_task
from mapd.tasks.base import check_mistakes


class Committee:
    """The committee's work on one mistake: the calls it makes and the records it returns."""

    def __init__(self, dispatcher: Dispatcher, committee: list[str], prompts: PromptConfig, review: ReviewConfig,
                 answer_kind: str) -> None:
        self.dispatcher, self.committee, self.prompts = dispatcher, committee, prompts
        self.review, self.answer_kind = review, answer_kind

    async def mistake(self, mistake: Mistake) -> tuple[list[Feedback], list[Rationale]]:
        """Every teacher's feedback on ``mistake`` and every teacher's reviewed rationale, in committee order."""
        feedback, rationales = await asyncio.gather(
            asyncio.gather(*(self.feedback(mistake, teacher) for teacher in self.committee)),
            asyncio.gather(*(self.rationale(mistake, teacher) for teacher in self.committee)),
        )
        return list(feedback), list(rationales)

    async def feedback(self, mistake: Mistake, teacher: str) -> Feedback:
        messages = feedback_messages(self.prompts, mistake.question, mistake.output, mistake.gold, self.answer_kind)
        result = await self.dispatcher.complete(Call(CallKey("feedback", mistake.id, teacher), messages))
        return Feedback(id=mistake.id, teacher=teacher, text=result.text, error=result.error, cut_off=result.cut_off)

    async def rationale(self, mistake: Mistake, teacher: str) -> Rationale:
        messages = answer_messages(self.prompts, mistake.question, self.answer_kind)
        result = await self.dispatcher.complete(Call(CallKey("rationale", mistake.id, teacher), messages))
        reviewed = result.text is not None and (result.dry_run or needs_review(  # an estimate counts every review
            result.text, gold=mistake.gold, answer_kind=self.answer_kind, config=self.review, cut_off=result.cut_off))
        reviews = await asyncio.gather(*(self.peer_review(mistake, teacher, result.text, reviewer)
                                         for reviewer in reviewers(teacher, self.committee, self.review))
                                       ) if reviewed else []
        return judged(mistake.id, teacher, result.text, result.error, list(reviews), gold=mistake.gold,
                      answer_kind=self.answer_kind, config=self.review, cut_off=result.cut_off)

    async def peer_review(self, mistake: Mistake, teacher: str, rationale: str, reviewer: str) -> Review:
        messages = review_messages(self.prompts, mistake.question, rationale, mistake.gold, self.answer_kind)
        result = await self.dispatcher.complete(Call(CallKey("review", mistake.id, teacher, reviewer), messages))
        score = None if result.text is None else parse_score(result.text)
        return Review(reviewer=reviewer, score=score, raw=result.text, error=result.error)


def teach(mistakes: list[Mistake], dispatcher: Dispatcher, *, committee: list[str], prompts: PromptConfig,
          review: ReviewConfig, answer_kind: str) -> tuple[list[Feedback], list[Rationale]]:
    """(feedback records, reviewed rationale records) for ``mistakes``: every mistake taught at once."""
    check_committee(committee, review)
    committee_work = Committee(dispatcher, committee, prompts, review, answer_kind)

    async def every_mistake() -> list[tuple[list[Feedback], list[Rationale]]]:
        return await asyncio.gather(*(committee_work.mistake(mistake) for mistake in mistakes))

    taught = dispatcher.run(every_mistake(), desc="feedback + rationales + reviews")
    return [f for feedback, _ in taught for f in feedback], [r for _, rationales in taught for r in rationales]


def _print_estimate(dispatcher: Dispatcher) -> None:
    say("dry run: nothing was called or written; calls still to make (cached ones excluded):")
    for name, row in dispatcher.estimated.items():
        say(f"  {name}: {row.to_call} calls, ~{row.input_tokens:,} input tokens, "
            f"at most {row.max_output_tokens:,} output tokens, at most {row.cost_usd:.4f} USD")


def _acceptance_line(feedback: list[Feedback], rationales: list[Rationale]) -> str:
    accepted = Counter(r.teacher for r in rationales if r.accepted)
    written = Counter(r.teacher for r in rationales)
    per_teacher = ", ".join(f"{name} {accepted[name]}/{n}" for name, n in written.items())
    return (f"accepted {sum(accepted.values())} of {len(rationales)} rationales ({per_teacher}); failed calls: "
            f"{sum(r.text is None for r in feedback)} feedback, {sum(r.text is None for r in rationales)} rationales")


def run_teach(folder: RoundLayout, *, task: TaskConfig, teachers: list[TeacherConfig], prompts: PromptConfig,
              review: ReviewConfig, cache_path: str | None, max_budget_usd: float | None,
              dry_run: bool = False, lock: bool = False) -> dict:
    """Teach ``folder.mistakes``: write feedback.jsonl, rationales.jsonl and teach_stats.json and return
    counts. A dry run prints the estimate and writes nothing. Every input is checked before anything is
    made (no folder, lock or cache); then ``lock`` (``mapd teach``) holds the folder's lock while it works."""
    committee = [teacher.name for teacher in teachers]
    check_committee(committee, review)
    answer_kind = get_task(task).answer_kind
    mistakes = read_mistakes(folder.mistakes)
    check_mistakes(folder.mistakes, mistakes, answer_kind, task.name)
    check_local_teachers(teachers, assemble=not dry_run)  # a dry run loads no model: it writes nothing
    cache_file = _cache_file(folder, cache_path)
    if not dry_run:
        check_folder(folder.dir, [folder.feedback, folder.rationales, folder.teach_stats])
        check_credentials(teachers)  # an unset key variable, before the cache file is made
    with folder_lock(folder.dir) if lock and not dry_run else nullcontext():
        return _teach_into(folder, mistakes, committee=committee, answer_kind=answer_kind, cache_file=cache_file,
                           teachers=teachers, prompts=prompts, review=review, max_budget_usd=max_budget_usd,
                           dry_run=dry_run)


def _cache_file(folder: RoundLayout, cache_path: str | None) -> Path:
    """The teach call cache: ``cache_path``, else the round folder's own; checked, nothing made."""
    return check_cache_path(Path(cache_path) if cache_path else folder.default_cache)


def run_batch_status(folder: RoundLayout, *, teachers: list[TeacherConfig], cache_path: str | None) -> None:
    """Print the batches recorded in the teach call cache, the running ones asked for their state first
    (``mapd teach --batch-status``; needs no lock, so it works while the teach run polls). The cache is
    ``cache_path``, else that of the ``mapd run`` folder ``folder`` is (or is a round of), else the round's own."""
    runs = [RunLayout(path) for path in (folder.dir, folder.dir.parent)]
    run = next((run for run in runs if run.manifest.is_file()), None)
    cache_file = _cache_file(folder, cache_path or (run and str(run.cache)))
    if not cache_file.exists():
        raise MapdError(f"{cache_file}: no call cache yet, so no batch was submitted")
    with CallCache(cache_file) as cache, Dispatcher(teachers, cache) as dispatcher:
        say(dispatcher.batch_table())


def _served_teachers(teachers: list[TeacherConfig], folder: RoundLayout, stack: ExitStack
                     ) -> tuple[list[TeacherConfig], dict[str, str], dict[str, Callable[[], str]]]:
    """The committee with every ``serve:`` teacher pointed at the server it would start (its model the name
    requests carry, known before it starts), the checkpoint identities that key those teachers' calls in the
    cache, and for each a starter: it starts the server (stopped when ``stack`` closes) and returns its
    base_url. The dispatcher calls it before the teacher's first call that is not cached."""
    from mapd.models import servable
    from mapd.serve import NOT_STARTED, served, served_model_name

    ready, identities, starters = [], {}, {}
    for teacher in teachers:
        if teacher.serve:
            model = servable(teacher.model, teacher.gguf_file)
            context = partial(served, teacher.serve, model, name=teacher.name, host=teacher.host,
                              ready_timeout_s=teacher.ready_timeout_s,
                              log_path=folder.dir / f"server-{teacher.name}.log")
            starters[teacher.name] = lambda context=context: stack.enter_context(context()).base_url
            identities[teacher.name] = checkpoint_identity(teacher.model, teacher.gguf_file)
            teacher = teacher.model_copy(update={"base_url": NOT_STARTED, "serve": None, "gguf_file": None,
                                                 "model": served_model_name(teacher.serve, model, teacher.name)})
        ready.append(teacher)
    return ready, identities, starters


def _teach_into(folder: RoundLayout, mistakes: list[Mistake], *, committee: list[str], answer_kind: str,
                cache_file: Path, teachers: list[TeacherConfig], prompts: PromptConfig, review: ReviewConfig,
                max_budget_usd: float | None, dry_run: bool) -> dict:
    """run_teach's work once its inputs are valid."""
    with ExitStack() as stack:
        if dry_run and not cache_file.exists():  # nothing cached yet, and a dry run leaves no file behind
            cache_file = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "cache.sqlite"
        cache = stack.enter_context(CallCache(cache_file))
        teachers, identities, starters = (teachers, {}, {}) if dry_run else _served_teachers(teachers, folder, stack)
        dispatcher = stack.enter_context(Dispatcher(teachers, cache, max_budget_usd=max_budget_usd, dry_run=dry_run,
                                                    identities=identities, starters=starters))
        try:
            feedback, rationales = teach(mistakes, dispatcher, committee=committee, prompts=prompts, review=review,
                                         answer_kind=answer_kind)
        finally:  # also when the budget stops the run: what was spent
            if not dry_run:  # the call path's plain statistics, as the record teach_stats.json holds
                stats = TeachStats({name: TeacherStats.from_counts(counts)
                                    for name, counts in dispatcher.summary().items()})
                say(summary_table(stats.model_dump()))
    if dry_run:
        _print_estimate(dispatcher)
        return {"dry_run": {name: vars(row) for name, row in dispatcher.estimated.items()}}
    write_records(folder.feedback, feedback)
    write_records(folder.rationales, rationales)
    write_document(folder.teach_stats, stats)
    say(_acceptance_line(feedback, rationales))
    _raise_if_incomplete(feedback, rationales, dispatcher, stats)
    return {
        "mistakes": len(mistakes),
        "feedback_failed": sum(r.text is None for r in feedback),
        "rationales_failed": sum(r.text is None for r in rationales),
        "accepted": sum(r.accepted for r in rationales),
        "teachers": stats.model_dump(),
    }


def _raise_if_incomplete(feedback: list[Feedback], rationales: list[Rationale], dispatcher: Dispatcher,
                         stats: TeachStats) -> None:
    """IncompleteStage (BudgetExceeded when the budget stopped it) when any call failed or was not made, or
    when paid replies could not be written to the call cache; the records are written by then, and a rerun
    makes only the missing calls."""
    errors = [r.error for r in [*feedback, *rationales] if r.text is None]
    errors += [v.error for r in rationales for v in r.reviews if v.raw is None]
    if not errors and not dispatcher.cache.unwritten:
        return
    kinds = Counter(error.split(":", 1)[0] for error in errors)
    stopped = [f"{name} ({row.stopped})" for name, row in stats.root.items() if row.stopped]
    what = (f"{len(errors)} calls failed or were not made ({', '.join(f'{n} {k}' for k, n in kinds.most_common())})"
            if errors else "every call was answered") + (f"; stopped teachers: {'; '.join(stopped)}" if stopped else "")
    if trouble := dispatcher.cache_trouble():
        raise IncompleteStage(f"teach incomplete: {what}. {trouble}")
    if dispatcher.budget_reached:
        raise BudgetExceeded(f"teacher budget max_budget_usd={dispatcher.max_budget_usd:g} reached: {what}. "
                             "The records are written; raise max_budget_usd and rerun to make the missing calls.")
    raise IncompleteStage(f"teach incomplete: {what}. The records are written; fix the cause and rerun "
                          "to make only the missing calls.")
