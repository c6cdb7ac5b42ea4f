"""Mine the student's mistakes (docs/method.md#1-mistakes): answer the train split, keep what it got wrong."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from contextlib import nullcontext

from mapd.config import PromptConfig, StudentConfig, TaskConfig
from mapd.io import check_folder, folder_lock
from mapd.layout import RoundLayout
from mapd.log import say
from mapd.models import resolve_model
from mapd.records import Mistake, Prediction, write_records
from mapd.stages.evaluate import predict_split, warn_if_cut_off
from mapd.tasks import get_task


def mine(predictions: list[Prediction]) -> list[Mistake]:
    """Mistake records of the predictions that are not correct: "wrong" when an answer was
    extracted, "unparsed" when none was, "truncated" when the text was cut off before it committed to
    one. A correct prediction is never a mistake."""
    return [
        Mistake(id=p.id, question=p.question, gold=p.gold, output=p.output, answer=p.answer,
                status="wrong" if p.status == "ok" else p.status, cut_off=p.cut_off)
        for p in predictions
        if not p.correct
    ]


def run_mine(folder: RoundLayout, *, task: TaskConfig, student: StudentConfig, prompts: PromptConfig,
             cache_path: str | None = None, lock: bool = False) -> dict:
    """Answer the train split with ``student`` (greedy or sampled as it says), write folder/mistakes.jsonl,
    print and return ``{n, correct, wrong, unparsed, truncated, accuracy, seconds}``. The data and the model path are
    checked before anything is made; then ``lock`` (``mapd mine``) holds the folder's lock while it works."""
    loaded = get_task(task)
    examples = loaded.load(task.train_split, task.train_limit)  # bad data fails here, before the folder is made
    if not student.base_url:  # and so does a mistyped model path (a running server's model is only a name)
        resolve_model(student.model, student.gguf_file)
    check_folder(folder.dir, [folder.mistakes])
    with folder_lock(folder.dir) if lock else nullcontext():
        predictions, seconds = predict_split(
            student, loaded, examples, prompts, greedy=False, stage="mine", desc="mine",
            cache_path=Path(cache_path) if cache_path else folder.default_cache, log_path=folder.server_log,
        )
        mistakes = mine(predictions)
        write_records(folder.mistakes, mistakes)
    status = Counter(m.status for m in mistakes)
    n = len(predictions)
    summary = {"n": n, "correct": n - len(mistakes), "wrong": status["wrong"], "unparsed": status["unparsed"],
               "truncated": status["truncated"], "accuracy": (n - len(mistakes)) / n, "seconds": round(seconds, 2)}
    say(f"mine {task.name}/{task.train_split}: accuracy {summary['accuracy']:.1%} on {n} questions, "
        f"{status['wrong']} wrong, {status['unparsed']} unparsed, {status['truncated']} cut off before an answer "
        f"-> {folder.mistakes}")
    warn_if_cut_off(predictions, student.max_new_tokens)
    return summary
