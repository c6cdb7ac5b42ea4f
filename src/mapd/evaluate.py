"""Evaluation: batched generation on a task's split, answer extraction and scoring.

Mining the student's mistakes is the same thing on the train split (see mapd.stages.mine).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mapd import generation
from mapd.answers import extract, is_correct
from mapd.io import write_json, write_jsonl
from mapd.prompts import PromptConfig
from mapd.tasks import Example, TaskConfig, get_task


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
) -> list[dict[str, Any]]:
    """Answer every example and score it: one prediction record per example, in order."""
    messages = [prompts.answer_messages(example.question, answer_kind) for example in examples]
    with tqdm(total=len(examples), desc=desc, unit="question") as bar:
        outputs = generation.generate(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            batch_size=batch_size, seed=seed, on_batch=bar.update,
        )
    predictions = []
    for example, output in zip(examples, outputs):
        extraction = extract(output.text, answer_kind, example.options)
        predictions.append({
            "id": example.id, "question": example.question, "output": output.text, "answer": extraction.answer,
            "status": extraction.status, "strict": extraction.strict, "gold": example.gold,
            "correct": is_correct(extraction.answer, example.gold, answer_kind),
        })
    return predictions


def metrics(predictions: list[dict[str, Any]]) -> dict[str, float | int]:
    """n, accuracy, strict_accuracy (correct in the strict answer format) and unparsed_rate."""
    n = len(predictions)
    counts = {
        "accuracy": sum(p["correct"] for p in predictions),
        "strict_accuracy": sum(p["correct"] and p["strict"] for p in predictions),
        "unparsed_rate": sum(p["status"] == "unparsed" for p in predictions),
    }
    return {"n": n, **{name: count / n if n else 0.0 for name, count in counts.items()}}


def predict_split(
    model: str,
    task_config: TaskConfig,
    split: str,
    limit: int | None,
    prompts: PromptConfig,
    *,
    gguf_file: str | None = None,
    desc: str = "eval",
    **generation_options: Any,
) -> tuple[list[dict[str, Any]], float]:
    """Load a task's split (first, so bad data fails before the model loads) and the model, then
    :func:`evaluate`; returns the predictions and the seconds spent answering (model load excluded).
    ``generation_options`` are evaluate()'s keywords (batch_size, max_new_tokens, temperature, ...)."""
    task = get_task(task_config)
    examples = task.load(split, limit)
    loaded, tokenizer = generation.load_model(model, gguf_file)
    start = time.perf_counter()
    predictions = evaluate(loaded, tokenizer, examples, task.answer_kind, prompts, desc=desc, **generation_options)
    return predictions, time.perf_counter() - start


def run_eval(
    model: str,
    task_config: TaskConfig,
    split: str,
    limit: int | None,
    batch_size: int,
    max_new_tokens: int,
    out_dir: Path,
    prompts: PromptConfig | None = None,
    gguf_file: str | None = None,
) -> dict[str, Any]:
    """Greedy evaluation of ``model`` on a split: writes predictions.jsonl and metrics.json
    in ``out_dir``, prints a summary and returns the metrics."""
    predictions, seconds = predict_split(
        model, task_config, split, limit, prompts or PromptConfig(), gguf_file=gguf_file,
        desc=f"eval {task_config.name}/{split}", batch_size=batch_size, max_new_tokens=max_new_tokens,
    )
    result = {"task": task_config.name, "split": split, "model": model, **metrics(predictions),
              "seconds": round(seconds, 2)}
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "metrics.json", result)
    print(f"{task_config.name}/{split}: accuracy {result['accuracy']:.1%} (strict {result['strict_accuracy']:.1%}, "
          f"unparsed {result['unparsed_rate']:.1%}) on {result['n']} questions in {seconds:.0f} s -> {out_dir}")
    return result
