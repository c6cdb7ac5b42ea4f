"""Mine the student's mistakes (docs/method.md#1-mistakes): answer the train split, keep what it got wrong."""

from __future__ import annotations

from mapd.config import PromptConfig, StudentConfig, TaskConfig
from mapd.evaluate import predict_split
from mapd.layout import RoundLayout
from mapd.records import Mistake, Prediction, write_records


def mine(predictions: list[Prediction]) -> list[Mistake]:
    """Mistake records of the predictions that are not correct: "wrong" when an answer was
    extracted, "unparsed" when none was. A correct prediction is never a mistake."""
    return [
        Mistake(id=p.id, question=p.question, gold=p.gold, output=p.output, answer=p.answer,
                status="unparsed" if p.status == "unparsed" else "wrong")
        for p in predictions
        if not p.correct
    ]


def run_mine(folder: RoundLayout, *, task: TaskConfig, student: StudentConfig, prompts: PromptConfig) -> dict:
    """Answer the train split with ``student`` (greedy or sampled as it says), write folder/mistakes.jsonl,
    print and return ``{n, correct, wrong, unparsed, accuracy, seconds}``."""
    predictions, seconds = predict_split(
        student.model, task, task.train_split, task.train_limit, prompts, gguf_file=student.gguf_file, desc="mine",
        batch_size=student.batch_size, max_new_tokens=student.max_new_tokens, temperature=student.temperature,
        top_p=student.top_p, seed=student.seed,
    )
    mistakes = mine(predictions)
    write_records(folder.mistakes, mistakes)
    unparsed = sum(m.status == "unparsed" for m in mistakes)
    n = len(predictions)
    summary = {"n": n, "correct": n - len(mistakes), "wrong": len(mistakes) - unparsed, "unparsed": unparsed,
               "accuracy": (n - len(mistakes)) / n, "seconds": round(seconds, 2)}
    print(f"mine {task.name}/{task.train_split}: accuracy {summary['accuracy']:.1%} on {n} questions, "
          f"{summary['wrong']} wrong, {unparsed} unparsed -> {folder.mistakes}")
    return summary
