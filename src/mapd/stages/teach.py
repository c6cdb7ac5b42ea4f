"""``mapd teach``: feedback, rationales and peer review for a mistakes file (METHOD.md steps 2-4).

The three stages are pure functions (mapd.stages.feedback, .rationales, .review); this module
reads and writes the files around them. Feedback and rationales do not depend on each other, so
their calls go to the dispatcher together, and each rationale's reviews start as soon as that
rationale arrives (no stage waits for the slowest call of the one before). Every call goes through
the call cache, so a rerun (or a run resumed after a crash) pays only for the calls not yet made.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from mapd.config import RunConfig
from mapd.errors import MapdError
from mapd.io import read_jsonl, write_json, write_jsonl
from mapd.llm import Call, CallCache, CallResult, Dispatcher
from mapd.stages.feedback import feedback_calls, feedback_records
from mapd.stages.rationales import rationale_calls, rationale_records
from mapd.stages.review import check_committee, review_calls, review_records
from mapd.tasks import get_task

REQUIRED = ("id", "question", "gold", "output")


def read_mistakes(path: Path) -> list[dict]:
    """mistakes.jsonl records, each with the string fields ``id, question, gold, output`` and a unique id;
    errors name the file, line and field."""
    records = read_jsonl(path)
    lines = [n for n, text in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if text.strip()]
    seen: dict[str, int] = {}
    for line, record in zip(lines, records):
        for key in REQUIRED:
            if not isinstance(record.get(key), str):
                problem = "missing" if record.get(key) is None else f"{record[key]!r} is not a string"
                raise MapdError(f"{path}:{line}: field '{key}': {problem}")
        if record["id"] in seen:
            raise MapdError(f"{path}:{line}: field 'id': {record['id']!r} already on line {seen[record['id']]}")
        seen[record["id"]] = line
    return records


def teach(mistakes: list[dict], config: RunConfig, dispatcher: Dispatcher, answer_kind: str) -> tuple[list, list]:
    """(feedback records, reviewed rationale records) for ``mistakes``, no files involved. Feedback and
    rationale calls go to ``dispatcher`` in one batch (they are independent), and each rationale's reviews
    start as soon as that rationale arrives."""
    teachers = [teacher.name for teacher in config.teachers]
    check_committee(teachers, config.review)
    first = feedback_calls(mistakes, answer_kind, teachers, config.prompts)
    second = rationale_calls(mistakes, answer_kind, teachers, config.prompts)
    reviews: list[list[Call]] = [[] for _ in second]  # the review calls of each rationale

    def then(index: int, result: CallResult) -> list[Call]:
        if index < len(first):
            return []
        position = index - len(first)
        mistake, teacher = mistakes[position // len(teachers)], teachers[position % len(teachers)]
        text = result.text
        if text is None and dispatcher.dry_run:  # not written yet: reviewed at its longest (~4 characters a token)
            text = f"{teacher} on {mistake['id']}: ".ljust(4 * config.teacher(teacher).max_tokens, ".")
        draft = {"teacher": teacher, "text": text}
        reviews[position] = review_calls(draft, mistake, teachers, config.prompts, config.review,
                                         answer_kind=answer_kind)
        return reviews[position]

    results = dispatcher.run(first + second, desc="feedback + rationales + reviews", then=then)
    done = len(first) + len(second)
    feedback = feedback_records(mistakes, teachers, results[: len(first)])
    rationales = rationale_records(mistakes, answer_kind, teachers, results[len(first) : done])
    return feedback, review_records(rationales, mistakes, reviews, results[done:], config.review,
                                    answer_kind=answer_kind)


def _print_estimate(dispatcher: Dispatcher) -> None:
    print("dry run: nothing was called or written; calls still to make (cached ones excluded):")
    for name, row in dispatcher.estimated.items():
        print(f"  {name}: {row['to_call']} calls, ~{row['input_tokens']:,} input tokens, "
              f"at most {row['max_output_tokens']:,} output tokens, at most {row['cost_usd']:.4f} USD")


def _acceptance_line(feedback: list[dict], rationales: list[dict]) -> str:
    accepted = Counter(r["teacher"] for r in rationales if r["accepted"])
    written = Counter(r["teacher"] for r in rationales)
    failed_feedback = sum(r["text"] is None for r in feedback)
    failed_rationales = sum(r["text"] is None for r in rationales)
    per_teacher = ", ".join(f"{name} {accepted[name]}/{n}" for name, n in written.items())
    return (f"accepted {sum(accepted.values())} of {len(rationales)} rationales ({per_teacher}); "
            f"failed calls: {failed_feedback} feedback, {failed_rationales} rationales")


def run_teach(config: RunConfig, mistakes_path: Path, out_dir: Path, *, dry_run: bool = False) -> dict:
    """Teach the mistakes in ``mistakes_path``: write feedback.jsonl, rationales.jsonl and
    teach_stats.json to ``out_dir`` and return counts. A dry run prints the estimate and writes nothing."""
    if not config.teachers:
        raise MapdError("teachers: the committee needs at least one teacher")
    check_committee([teacher.name for teacher in config.teachers], config.review)
    answer_kind = get_task(config.task).answer_kind
    mistakes = read_mistakes(Path(mistakes_path))
    out_dir = Path(out_dir)
    cache_path = Path(config.cache_path).expanduser() if config.cache_path else out_dir / "cache.sqlite"
    with ExitStack() as stack:
        if dry_run and not cache_path.exists():  # nothing cached yet, and a dry run leaves no file behind
            cache_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "cache.sqlite"
        cache = stack.enter_context(CallCache(cache_path))
        dispatcher = stack.enter_context(
            Dispatcher(config.teachers, cache, max_budget_usd=config.max_budget_usd, dry_run=dry_run))
        if dry_run:  # keys are not needed to estimate
            teach(mistakes, config, dispatcher, answer_kind)
            _print_estimate(dispatcher)
            return {"dry_run": dispatcher.estimated}
        dispatcher.check_keys()
        try:
            feedback, rationales = teach(mistakes, config, dispatcher, answer_kind)
        finally:  # also when the budget stops the run: what was spent
            print(dispatcher.summary_table())
    write_jsonl(out_dir / "feedback.jsonl", feedback)
    write_jsonl(out_dir / "rationales.jsonl", rationales)
    write_json(out_dir / "teach_stats.json", dispatcher.summary())
    print(_acceptance_line(feedback, rationales))
    return {
        "mistakes": len(mistakes),
        "feedback_failed": sum(r["text"] is None for r in feedback),
        "rationales_failed": sum(r["text"] is None for r in rationales),
        "accepted": sum(r["accepted"] for r in rationales),
        "teachers": dispatcher.summary(),
    }
