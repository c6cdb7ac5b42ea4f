"""Batched vs one-prompt-at-a-time greedy generation: tokens/s, questions/minute, identical outputs.

    python bench/generation_batching.py [--data DIR] [--n 16] [--batch-size 16] [--threads N]

``--data`` is a folder of SVAMP <split>.jsonl files, by default $MAPD_SHARED_DATA/svamp (bench/_common.py).

Mining is evaluation on the train split (mapd.stages.mine reuses mapd.stages.evaluate), and answer
extraction costs microseconds, so the questions/minute printed here is the mining throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench._common

from bench._common import shared_data  # noqa: E402

from mapd.config import PromptConfig, TaskConfig  # noqa: E402
from mapd.generation import generate, load_model  # noqa: E402
from mapd.prompts import answer_messages  # noqa: E402
from mapd.tasks import get_task  # noqa: E402


def timed(model, tokenizer, prompts, batch_size: int, max_new_tokens: int):
    """``(generations, wall seconds, CPU seconds)`` of one greedy generate() call. CPU time (all
    threads of this process) is less disturbed than wall time when others share the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    generations = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return generations, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, help="SVAMP folder (default: $MAPD_SHARED_DATA/svamp).")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=16, help="Questions.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task(TaskConfig(name="svamp", path=str(args.data or shared_data() / "svamp")))
    examples = task.load(args.split, args.n)
    prompts = [answer_messages(PromptConfig(), example.question, task.answer_kind) for example in examples]
    model, tokenizer = load_model(args.model)
    print(f"{args.model} ({model.dtype}), {len(prompts)} SVAMP questions, max_new_tokens {args.max_new_tokens}, "
          f"{torch.get_num_threads()} threads")
    timed(model, tokenizer, prompts[:1], 1, 4)  # warm-up

    modes = {"one at a time": 1, f"batch {args.batch_size}": args.batch_size}
    prefill_cpu = {label: timed(model, tokenizer, prompts, size, 1)[2] for label, size in modes.items()}
    runs = {label: timed(model, tokenizer, prompts, size, args.max_new_tokens) for label, size in modes.items()}
    (single, single_s, single_cpu), (batched, batched_s, batched_cpu) = runs.values()
    same = sum(a.text == b.text for a, b in zip(single, batched))
    print(f"prompt tokens: {sum(g.input_tokens for g in single)}   generated tokens: "
          f"{sum(g.output_tokens for g in single)}")
    for label, (generations, wall, cpu) in runs.items():
        tokens = sum(g.output_tokens for g in generations)
        print(f"{label:>14}: {wall:6.1f} s wall, {cpu:6.1f} s CPU (prefill alone {prefill_cpu[label]:5.1f} s CPU)  "
              f"{tokens / wall:5.1f} tokens/s  {60 * len(prompts) / wall:5.1f} questions/min")
    single_decode, batched_decode = (runs[label][2] - prefill_cpu[label] for label in modes)
    print(f"speed-up: {single_s / batched_s:.2f}x wall, {single_cpu / batched_cpu:.2f}x CPU time, "
          f"{single_decode / batched_decode:.2f}x CPU time without the prefill   "
          f"identical outputs: {same}/{len(prompts)}")
    if same != len(prompts):
        raise SystemExit("batched greedy outputs differ from one-at-a-time outputs")


if __name__ == "__main__":
    main()
