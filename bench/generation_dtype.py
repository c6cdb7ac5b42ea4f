"""In-process generation in float32 against bfloat16, one model, the same prompts (docs/default-run.md):

    python bench/generation_dtype.py                       # the default's teacher, 16 chain_sum prompts, 48 tokens
    python bench/generation_dtype.py --model embedded:smollm2-135m-instruct

Loads the model in each type (loading excluded from the figures), times one batched greedy generation,
and prints the seconds, the ratio and how many of the texts are the same in both types.
"""

from __future__ import annotations

import argparse
import time

import reasoning_gym

from mapd.config import PromptConfig
from mapd.generation import generate, load_model
from mapd.prompts import answer_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    items = reasoning_gym.create_dataset("chain_sum", size=args.prompts, seed=5, min_terms=2, max_terms=3,
                                         max_digits=1)
    prompts = [answer_messages(PromptConfig(), item["question"], "number") for item in items]
    seconds, texts = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_model(args.model, dtype=dtype)
        began = time.perf_counter()
        texts[dtype] = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=args.tokens,
                                                 batch_size=len(prompts))]
        seconds[dtype] = time.perf_counter() - began
        print(f"{dtype}: {seconds[dtype]:.1f} s for {args.prompts} prompts x up to {args.tokens} tokens", flush=True)
        del model
    same = sum(a == b for a, b in zip(texts["float32"], texts["bfloat16"]))
    print(f"bfloat16 {seconds['float32'] / seconds['bfloat16']:.2f}x faster; {same} of {args.prompts} texts identical")


if __name__ == "__main__":
    main()
