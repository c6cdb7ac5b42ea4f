"""Evaluation: batched generation on a task's split, answer extraction and scoring.

Mining the student's mistakes is the same thing on the train split (see mapd.stages.mine).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

from tqdm import tqdm

from mapd import generation
from mapd.answers import extract, is_correct
from mapd.config import PromptConfig, StudentConfig, TaskConfig
from mapd.io import folder_lock
from mapd.layout import EvalLayout, RoundLayout
from mapd.log import say
from mapd.models import resolve_model
from mapd.prompts import answer_messages
from mapd.generation import Generation
from mapd.records import Metrics, Prediction, write_document, write_records
from mapd.student import served_answers, trained_student
from mapd.tasks import Example, Task, get_task

log = logging.getLogger("mapd.stages.evaluate")
CUT_OFF_WARNING = 0.05  # the share of outputs stopped at the token limit above which mapd says so


def evaluate(
    model,
    tokenizer,
    examples: list[Example],
    answer_kind: str,
    prompts: PromptConfig,
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    desc: str = "eval",
) -> list[Prediction]:
    """Answer every example and score it: one prediction record per example, in order. When sampling, each
    question samples with its own seed (from ``seed`` and its id), whatever else shares its batch."""
    messages = [answer_messages(prompts, example.question, answer_kind) for example in examples]
    with tqdm(total=len(examples), desc=desc, unit="question") as bar:
        outputs = generation.generate(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            batch_size=batch_size, on_batch=bar.update,
            seeds=None if seed is None else [generation.key_seed(seed, example.id) for example in examples],
        )
    return score(examples, outputs, answer_kind)


def score(examples: list[Example], outputs: list[Generation], answer_kind: str) -> list[Prediction]:
    """One prediction record per example: its answer (a text cut off at the token limit commits only
    explicitly), status and correctness."""
    predictions = []
    for example, output in zip(examples, outputs, strict=True):  # the outputs come in example order
        cut_off = output.cut_off  # None: the endpoint did not say, and the extractor judges from the text
        extraction = extract(output.text, answer_kind, example.options,
                             complete=None if cut_off is None else not cut_off)
        predictions.append(Prediction(
            id=example.id, question=example.question, output=output.text, answer=extraction.answer,
            status=extraction.status, cut_off=cut_off, strict=extraction.strict, gold=example.gold,
            correct=is_correct(extraction.answer, example.gold, answer_kind),
        ))
    return predictions


def metrics(predictions: list[Prediction], *, task: str, split: str, model: str, seconds: float) -> Metrics:
    """Accuracy, strict_accuracy (correct in the strict answer format), unparsed_rate (no answer),
    cut_off_rate (stopped at the token limit) and truncated_rate (cut off before any answer)."""
    n = len(predictions)
    counts = {
        "accuracy": sum(p.correct for p in predictions),
        "strict_accuracy": sum(p.correct and p.strict for p in predictions),
        "unparsed_rate": sum(p.status != "ok" for p in predictions),
        "cut_off_rate": sum(bool(p.cut_off) for p in predictions),
        "truncated_rate": sum(p.status == "truncated" for p in predictions),
    }
    return Metrics(task=task, split=split, model=model, n=n, seconds=round(seconds, 2),
                   **{name: count / n if n else 0.0 for name, count in counts.items()})


def predict_split(
    student: StudentConfig,
    task: Task,
    examples: list[Example],
    prompts: PromptConfig,
    *,
    greedy: bool,
    stage: str,
    cache_path: Path,
    log_path: Path,
    desc: str,
) -> tuple[list[Prediction], float]:
    """The student's scored answers to ``examples`` of ``task``, and the seconds spent answering (loading
    excluded). Greedy, or sampled as ``student`` says; in-process, or through the call path when
    ``student.serve`` / ``student.base_url`` is set (mapd.student)."""
    if student.served:
        outputs, seconds = served_answers(student, examples, task.answer_kind, prompts, greedy=greedy, stage=stage,
                                          cache_path=cache_path, log_path=log_path, desc=desc)
        return score(examples, outputs, task.answer_kind), seconds
    sampling = {} if greedy else {"temperature": student.temperature, "top_p": student.top_p, "seed": student.seed}
    loaded, tokenizer = generation.load_model(student.model, student.gguf_file, dtype=student.dtype,
                                              device=generation.generation_device())
    start = time.perf_counter()
    predictions = evaluate(loaded, tokenizer, examples, task.answer_kind, prompts, desc=desc,
                           batch_size=student.batch_size, max_new_tokens=student.max_new_tokens, **sampling)
    return predictions, time.perf_counter() - start


def evaluate_model(out: EvalLayout, *, student: StudentConfig, task: TaskConfig, split: str, limit: int | None,
                   prompts: PromptConfig, cache_path: str | Path | None = None, lock: bool = False) -> Metrics:
    """Greedy evaluation of ``student.model`` on a split: writes predictions.jsonl and metrics.json, prints a
    summary and returns the metrics. A served student's calls are cached in ``cache_path`` (default
    ``out/cache.sqlite``) and its server writes ``out/server.log``. The data and the model path are checked
    before anything is made; then ``lock`` (``mapd eval``) holds the folder's lock (and mapd.log) while it works."""
    loaded = get_task(task)
    examples = loaded.load(split, limit)  # bad data fails before any model loads
    if not student.base_url:  # and so does a mistyped model path (a running server's model is only a name)
        resolve_model(student.model, student.gguf_file)
    with folder_lock(out.dir) if lock else nullcontext():
        return _evaluate_into(out, student, loaded, examples, prompts, split, cache_path)


def _evaluate_into(out: EvalLayout, student: StudentConfig, task: Task, examples: list[Example],
                   prompts: PromptConfig, split: str, cache_path: str | Path | None) -> Metrics:
    """evaluate_model's work once its inputs are valid."""
    predictions, seconds = predict_split(
        student, task, examples, prompts, greedy=True, stage=f"eval {split}", desc=f"eval {task.name}/{split}",
        cache_path=Path(cache_path) if cache_path else out.default_cache, log_path=out.server_log,
    )
    result = metrics(predictions, task=task.name, split=split, model=student.model, seconds=seconds)
    write_records(out.predictions, predictions)
    write_document(out.metrics, result)
    say(f"{task.name}/{split}: accuracy {result.accuracy:.1%} (strict {result.strict_accuracy:.1%}, "
        f"unparsed {result.unparsed_rate:.1%}, cut off {result.cut_off_rate:.1%}) on {result.n} questions in "
        f"{seconds:.0f} s -> {out.dir}")
    warn_if_cut_off(predictions, student.max_new_tokens)
    return result


def warn_if_cut_off(predictions: list[Prediction], max_new_tokens: int) -> None:
    """Say so when more than CUT_OFF_WARNING of the outputs stopped at the token limit (it is too low)."""
    cut = sum(bool(p.cut_off) for p in predictions)
    if predictions and cut / len(predictions) > CUT_OFF_WARNING:
        truncated = sum(p.status == "truncated" for p in predictions)
        log.warning("%d of %d outputs (%.0f %%) stopped at max_new_tokens=%d, %d of them before committing to an "
                    "answer: raise the token limit (student.max_new_tokens, mapd eval --max-new-tokens)",
                    cut, len(predictions), 100 * cut / len(predictions), max_new_tokens, truncated)


def run_eval_before(folder: RoundLayout, *, task: TaskConfig, student: StudentConfig, prompts: PromptConfig,
                    cache_path: str | None) -> dict:
    """The student before this round's training, on the test split: ``round/eval_before``."""
    return evaluate_model(folder.eval_before, student=student, task=task, split=task.test_split,
                          limit=task.test_limit, prompts=prompts, cache_path=cache_path).model_dump()


def run_eval_after(folder: RoundLayout, *, task: TaskConfig, student: StudentConfig, prompts: PromptConfig,
                   cache_path: str | None) -> dict:
    """The student this round trained (``round/model``), on the test split: ``round/eval_after``."""
    return evaluate_model(folder.eval_after, student=trained_student(student, folder.model), task=task,
                          split=task.test_split, limit=task.test_limit, prompts=prompts,
                          cache_path=cache_path).model_dump()
