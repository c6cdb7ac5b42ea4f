"""Collect real model outputs for the cut-off-aware extraction set (tests/data/answers_cutoff.jsonl).

    OMP_NUM_THREADS=1 python bench/answers_collect.py --model smollm2 --max-new-tokens 96 --per-task 20

For each of GSM8K, SVAMP, StrategyQA and LogiQA (test splits, read from $MAPD_SHARED_DATA, see
bench/_common.py), a seeded random draw of questions (the seed is the model, the token limit and the
task, so each model and limit gets its own questions) is answered greedily with the pipeline's
answer prompt (mapd.prompts.answer_messages with the default PromptConfig). Each output is appended to
``tests/data/answers_raw_<model>_<limit>.jsonl`` as soon as its batch ends (a rerun skips what is
there) with: model, task, split, ref id, max_new_tokens, output_tokens, cut_off (the model used all
max_new_tokens: it was stopped by the limit), text and gold. Questions and options are not stored:
they stay in the datasets folder and the tests read them from there.

The set in the repository was made with:
    smollm2 at 96 and 256 tokens, --per-task 20; qwen at 96 and 256 tokens, --per-task 12;
    both at 160 tokens, --per-task 12 (holdout2).
A person then read each text and added ``label``, ``why`` and ``sample`` (bench/answers_cutoff.py
``sample_of``), and the raw files were merged into tests/data/answers_cutoff.jsonl.

One generation process at a time, one thread (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench._common

from bench._common import shared_data  # noqa: E402

MODELS = {"smollm2": "embedded:smollm2-135m-instruct", "qwen": "embedded:qwen2.5-coder-0.5b-instruct"}
TASKS = ("gsm8k", "svamp", "strategyqa", "logiqa")
SPLIT = "test"


KINDS = {"gsm8k": "number", "svamp": "number", "strategyqa": "bool", "logiqa": "choice"}


def question_of(task: str, row: dict) -> tuple[str, str]:
    """(question as the pipeline shows it, gold) for one row of $MAPD_SHARED_DATA/<task>/<split>.jsonl."""
    if task == "logiqa":
        lines = [f"{row['context']}\n{row['query']}", ""] + [f"{'ABCD'[i]}. {o}" for i, o in enumerate(row["options"])]
        return "\n".join(lines), "ABCD"[row["correct_option"]]
    if task == "strategyqa":
        return row["question"], "true" if row["answer"] else "false"
    return row["question"], str(row["final"])


def draw(task: str, model: str, limit: int, n: int) -> list[dict]:
    """The seeded draw of ``n`` test rows of ``task`` for one model and token limit."""
    rows = [json.loads(line) for line in (shared_data() / task / f"{SPLIT}.jsonl").read_text().splitlines()]
    rng = random.Random(f"answers-cutoff/{model}/{limit}/{task}")
    return rng.sample(rows, n)


def messages(task: str, row: dict) -> list[dict[str, str]]:
    """The pipeline's answer prompt for one row (mapd's default prompts)."""
    from mapd.config import PromptConfig
    from mapd.prompts import answer_messages

    question, _ = question_of(task, row)
    return answer_messages(PromptConfig(), question, KINDS[task])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", default=",".join(TASKS))
    args = parser.parse_args()

    import torch

    from mapd.generation import generate, load_model

    torch.set_num_threads(1)
    out = REPO / "tests" / "data" / f"answers_raw_{args.model}_{args.max_new_tokens}.jsonl"
    done = set()
    if out.exists():
        done = {(r["task"], r["ref_id"]) for r in map(json.loads, out.read_text().splitlines())}
    model, tokenizer = load_model(MODELS[args.model])
    for task in args.tasks.split(","):
        rows = draw(task, args.model, args.max_new_tokens, args.per_task)
        todo = [row for row in rows if (task, str(row["id"])) not in done]
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start : start + args.batch_size]
            began = time.time()
            outputs = generate(model, tokenizer, [messages(task, row) for row in batch],
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            with out.open("a") as f:
                for row, gen in zip(batch, outputs):
                    stopped = getattr(gen, "finish_reason", "length") == "stop"  # ended exactly at the limit
                    cut_off = gen.output_tokens >= args.max_new_tokens and not stopped
                    f.write(json.dumps({
                        "model": args.model, "task": task, "split": SPLIT, "ref_id": str(row["id"]),
                        "kind": KINDS[task], "max_new_tokens": args.max_new_tokens,
                        "output_tokens": gen.output_tokens, "cut_off": cut_off, "text": gen.text,
                        "gold": question_of(task, row)[1],
                    }) + "\n")
            tokens = sum(g.output_tokens for g in outputs)
            print(f"{args.model} {args.max_new_tokens} {task} +{len(batch)}: {tokens} tokens in "
                  f"{time.time() - began:.0f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
