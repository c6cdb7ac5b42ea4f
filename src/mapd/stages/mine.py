"""Stage 1: mine the student's mistakes, i.e. evaluate it on the train split and keep what it got wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mapd.config import RunConfig
from mapd.evaluate import predict_split
from mapd.io import write_jsonl


def mine(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mistake records of the predictions that are not correct: "wrong" when an answer was
    extracted, "unparsed" when none was. A correct prediction is never a mistake."""
    return [
        {"id": p["id"], "question": p["question"], "gold": p["gold"], "output": p["output"], "answer": p["answer"],
         "status": "unparsed" if p["status"] == "unparsed" else "wrong"}
        for p in predictions
        if not p["correct"]
    ]


def run_mine(config: RunConfig, out_dir: Path, model: str | None = None) -> dict[str, Any]:
    """Answer the train split with the student (``model`` overrides ``config.student.model``, e.g.
    the last round's checkpoint), greedy or sampled as config.student says; write
    out_dir/mistakes.jsonl; print and return ``{n, correct, wrong, unparsed, accuracy, seconds}``."""
    student = config.student
    model = model or student.model
    predictions, seconds = predict_split(
        model, config.task, config.task.train_split, config.task.train_limit, config.prompts,
        gguf_file=student.gguf_file if model == student.model else None, desc="mine",
        batch_size=student.batch_size, max_new_tokens=student.max_new_tokens, temperature=student.temperature,
        top_p=student.top_p, seed=student.seed,
    )
    mistakes = mine(predictions)
    write_jsonl(Path(out_dir) / "mistakes.jsonl", mistakes)
    unparsed = sum(m["status"] == "unparsed" for m in mistakes)
    n = len(predictions)
    summary = {"n": n, "correct": n - len(mistakes), "wrong": len(mistakes) - unparsed, "unparsed": unparsed,
               "accuracy": (n - len(mistakes)) / n, "seconds": round(seconds, 2)}
    print(f"mine {config.task.name}/{config.task.train_split}: accuracy {summary['accuracy']:.1%} on {n} questions, "
          f"{summary['wrong']} wrong, {unparsed} unparsed -> {Path(out_dir) / 'mistakes.jsonl'}")
    return summary
