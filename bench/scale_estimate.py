"""A GSM8K-size round on 8 GPUs, on paper: calls, tokens, hours and dollars per stage, teachers live and batch.

    python bench/scale_estimate.py [--config configs/paper-committee.yaml] [--gpus 8] [--markdown]

Nothing runs: the figures are computed from what the project defines or measured, so they move when the code
does. From the code and the config (``--config``, default configs/paper-committee.yaml, over mapd's defaults):
the committee (teachers, their prices, ``max_concurrency``, ``requests_per_minute``, ``max_tokens``,
``batch_price_factor``), ``review.max_reviewers``, ``student.max_new_tokens``, the train settings (epochs,
batch sizes, ``max_length``, gradient checkpointing), the prompt templates (``mapd.prompts``, measured at
mapd's own ~4 characters a token, ``CHARS_PER_TOKEN``) and the build rule (``mixed``: one feedback and one
accepted rationale per mistake). From the data: GSM8K's 7,473 training and 1,319 test questions and their
mean length (read from ``$MAPD_SHARED_DATA/gsm8k`` when it is set; else the figures docs/batch.md measured).

The rest are assumptions, each a flag, printed with the result: the student's error rate on the training split,
the lengths of replies (docs/batch.md: 250-token feedback and rationales, 120-token reviews, a 150-token student
answer; the paper's SVAMP files average 111-639 characters), the share of mistakes with an accepted rationale,
one call's latency, and the GPU figures (no GPU was available to measure them: H100 SXM peak bf16 989 TFLOP/s at
a 35 % model FLOPs utilisation for training, 1,500 generated tokens/s per GPU for a 7B student on vLLM at high
concurrency, 3 USD per GPU-hour).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = {"train": 7473, "test": 1319, "question_chars": 235}  # docs/batch.md, measured on the shared data


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "paper-committee.yaml"))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--wrong-fraction", type=float, default=0.6, help="Student errors on the train split.")
    parser.add_argument("--usable-fraction", type=float, default=0.9,
                        help="Mistakes with at least one accepted rationale (the others make no pair).")
    parser.add_argument("--student-answer-tokens", type=int, default=150)
    parser.add_argument("--reply-tokens", type=int, default=250, help="A feedback or a rationale.")
    parser.add_argument("--review-tokens", type=int, default=120)
    parser.add_argument("--call-latency-s", type=float, default=6.0, help="One live teacher call, end to end.")
    parser.add_argument("--batch-window-h", type=float, default=24.0, help="A batch's completion window.")
    parser.add_argument("--student-params", type=float, default=6.74e9, help="Llama-2-7B.")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="Peak dense bf16 TFLOP/s per GPU.")
    parser.add_argument("--mfu", type=float, default=0.35, help="Model FLOPs utilisation while training.")
    parser.add_argument("--decode-tokens-per-s", type=float, default=1500.0, help="Student generation, per GPU.")
    parser.add_argument("--gpu-usd-per-hour", type=float, default=3.0)
    parser.add_argument("--markdown", action="store_true", help="Print the table as Markdown (docs/scaling.md).")
    return parser.parse_args()


def gsm8k_sizes() -> tuple[dict, str]:
    """Question counts and mean question length: from $MAPD_SHARED_DATA/gsm8k when set, else docs/batch.md's."""
    folder = Path(os.environ.get("MAPD_SHARED_DATA", "/nonexistent")) / "gsm8k"
    if not (folder / "train.jsonl").is_file():
        return GSM8K, "docs/batch.md"
    rows = {split: [json.loads(line) for line in (folder / f"{split}.jsonl").open() if line.strip()]
            for split in ("train", "test")}
    chars = round(sum(len(row["question"]) for row in rows["train"]) / len(rows["train"]))
    return {"train": len(rows["train"]), "test": len(rows["test"]), "question_chars": chars}, "$MAPD_SHARED_DATA/gsm8k"


def estimate(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """The rows of the table (one per stage, teach split per teacher) and the notes saying where inputs come from."""
    from mapd.config_file import load_config
    from mapd.llm.openai_provider import CHARS_PER_TOKEN
    from mapd.prompts import answer_messages, feedback_messages, review_messages

    config = load_config(args.config)
    sizes, source = gsm8k_sizes()
    prompts, kind = config.prompts, "number"
    question = "q" * sizes["question_chars"]

    def tokens(messages: list[dict], *, filler_tokens: int = 0) -> int:
        return round(sum(len(m["content"]) for m in messages) / CHARS_PER_TOKEN) + filler_tokens

    answer_in = tokens(answer_messages(prompts, question, kind))
    feedback_in = tokens(feedback_messages(prompts, question, "", "7", kind), filler_tokens=args.student_answer_tokens)
    review_in = tokens(review_messages(prompts, question, "", "7", kind), filler_tokens=args.reply_tokens)

    teachers = config.teachers
    reviewers = min(config.review.max_reviewers or len(teachers) - 1, len(teachers) - 1) if config.review.enabled else 0
    mistakes = round(sizes["train"] * args.wrong_fraction)
    rows: list[dict] = []

    def student_generation(stage: str, questions: int) -> None:
        out = questions * min(args.student_answer_tokens, config.student.max_new_tokens)
        hours = out / (args.decode_tokens_per_s * args.gpus) / 3600
        rows.append({"stage": stage, "calls": questions, "input_tokens": questions * answer_in, "output_tokens": out,
                     "hours_live": hours, "usd_live": hours * args.gpus * args.gpu_usd_per_hour})

    student_generation("eval_before", sizes["test"])
    student_generation("mine", sizes["train"])
    for teacher in teachers:
        made = {"feedback": (mistakes, feedback_in, min(args.reply_tokens, teacher.max_tokens)),
                "rationale": (mistakes, answer_in, min(args.reply_tokens, teacher.max_tokens)),
                "review": (mistakes * reviewers, review_in, min(args.review_tokens, teacher.max_tokens))}
        calls = sum(n for n, _, _ in made.values())
        tokens_in = sum(n * t for n, t, _ in made.values())
        tokens_out = sum(n * t for n, _, t in made.values())
        per_s = teacher.max_concurrency / args.call_latency_s
        if teacher.requests_per_minute:
            per_s = min(per_s, teacher.requests_per_minute / 60)
        usd = teacher.cost(tokens_in, tokens_out)
        rows.append({"stage": f"teach: {teacher.name}", "calls": calls, "input_tokens": tokens_in,
                     "output_tokens": tokens_out, "hours_live": calls / per_s / 3600, "usd_live": usd,
                     "hours_batch": 2 * args.batch_window_h if reviewers else args.batch_window_h,
                     "usd_batch": teacher.cost(tokens_in, tokens_out, batch=True)})
    pairs = round(mistakes * args.usable_fraction)  # each: one feedback pair and one rationale pair (mixed)
    pair_tokens = min(feedback_in + args.reply_tokens, config.train.max_length) + \
        min(answer_in + args.reply_tokens, config.train.max_length)
    train_tokens = pairs * pair_tokens * config.train.num_train_epochs
    flops = 6 * args.student_params * train_tokens * (4 / 3 if config.train.gradient_checkpointing else 1)
    hours = flops / (args.gpus * args.gpu_tflops * 1e12 * args.mfu) / 3600
    global_batch = config.train.per_device_train_batch_size * args.gpus * config.train.gradient_accumulation_steps
    rows.append({"stage": "build", "calls": 0, "input_tokens": 0, "output_tokens": 0, "hours_live": 0.0,
                 "usd_live": 0.0})
    rows.append({"stage": "train", "calls": round(2 * pairs * config.train.num_train_epochs / global_batch),
                 "input_tokens": train_tokens, "output_tokens": 0, "hours_live": hours,
                 "usd_live": hours * args.gpus * args.gpu_usd_per_hour})
    student_generation("eval_after", sizes["test"])
    train = config.train
    checkpointing = " x 4/3 for checkpointing" if train.gradient_checkpointing else ""
    notes = [
        f"data: {sizes['train']:,} training and {sizes['test']:,} test questions of {sizes['question_chars']} "
        f"characters on average ({source}); {args.wrong_fraction:.0%} wrong: {mistakes:,} mistakes",
        f"config: {_shown(args.config)}: {len(teachers)} teachers ({', '.join(t.name for t in teachers)}), "
        f"{reviewers} reviews per rationale; student.max_new_tokens {config.student.max_new_tokens}; train: "
        f"{train.num_train_epochs:g} epochs, batch {train.per_device_train_batch_size} x {args.gpus} GPUs x "
        f"{train.gradient_accumulation_steps} = {global_batch}, max_length {train.max_length}, "
        f"gradient checkpointing {'on' if train.gradient_checkpointing else 'off'}",
        f"input tokens per call (templates at {CHARS_PER_TOKEN} characters a token): answer/rationale {answer_in}, "
        f"feedback {feedback_in} (with a {args.student_answer_tokens}-token student answer), review {review_in} "
        f"(with a {args.reply_tokens}-token rationale)",
        f"assumed: replies {args.reply_tokens} tokens (reviews {args.review_tokens}), a live call "
        f"{args.call_latency_s:g} s; {args.usable_fraction:.0%} of mistakes usable: {pairs:,} x 2 pairs of "
        f"{pair_tokens / 2:.0f} tokens on average",
        f"assumed GPUs: {args.gpus} x {args.gpu_tflops:g} TFLOP/s at {args.mfu:.0%} MFU (training, 6 x "
        f"{args.student_params / 1e9:.2f} B parameters x tokens{checkpointing}), "
        f"{args.decode_tokens_per_s:g} generated tokens/s per GPU, {args.gpu_usd_per_hour:g} USD per GPU-hour",
        f"teach hours: live, calls / min(max_concurrency / latency, requests_per_minute / 60) per teacher, the "
        f"teachers in parallel; batch: up to {args.batch_window_h:g} h per submission round, "
        f"{2 if reviewers else 1} rounds (reviews need the rationales)",
    ]
    return rows, notes


def _shown(path: str) -> str:
    """``path`` relative to the repository when it is inside it."""
    resolved = Path(os.path.abspath(path))
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def render(rows: list[dict], notes: list[str], markdown: bool) -> str:
    header = ["stage", "calls (train: steps)", "input Mtok (train: trained)", "output Mtok", "hours, live",
              "USD, live", "hours, batch", "USD, batch"]
    teach = [r for r in rows if r["stage"].startswith("teach")]
    total_teach = {"stage": "teach (all teachers)", "calls": sum(r["calls"] for r in teach),
                   "input_tokens": sum(r["input_tokens"] for r in teach),
                   "output_tokens": sum(r["output_tokens"] for r in teach),
                   "hours_live": max(r["hours_live"] for r in teach), "usd_live": sum(r["usd_live"] for r in teach),
                   "hours_batch": max(r["hours_batch"] for r in teach), "usd_batch": sum(r["usd_batch"] for r in teach)}
    body = rows[: rows.index(teach[-1]) + 1] + [total_teach] + rows[rows.index(teach[-1]) + 1:]
    other = [r for r in rows if not r["stage"].startswith("teach")]
    total = {"stage": "round", "calls": sum(r["calls"] for r in other) + total_teach["calls"],
             "input_tokens": sum(r["input_tokens"] for r in other) + total_teach["input_tokens"],
             "output_tokens": sum(r["output_tokens"] for r in other) + total_teach["output_tokens"],
             "hours_live": sum(r["hours_live"] for r in other) + total_teach["hours_live"],
             "usd_live": sum(r["usd_live"] for r in other) + total_teach["usd_live"]}
    gpu_usd = sum(r["usd_live"] for r in other)
    total["hours_batch"] = sum(r["hours_live"] for r in other) + total_teach["hours_batch"]
    total["usd_batch"] = gpu_usd + total_teach["usd_batch"]
    body.append(total)

    def cells(r: dict) -> list[str]:
        batch = "hours_batch" in r
        return [r["stage"], f"{r['calls']:,}", f"{r['input_tokens'] / 1e6:.2f}", f"{r['output_tokens'] / 1e6:.2f}",
                f"{r['hours_live']:.2f}", f"{r['usd_live']:.2f}", f"{r['hours_batch']:.2f}" if batch else "(same)",
                f"{r['usd_batch']:.2f}" if batch else "(same)"]

    lines = [cells(r) for r in body]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(f"**{c}**" if line[0] == "round" else c for c in line) + " |" for line in lines]
    else:
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
               for row in [header, *lines]]
    return "\n".join(out + [""] + [f"- {note}" for note in notes])


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO / "src"))
    rows, notes = estimate(args)
    print(render(rows, notes, args.markdown))


if __name__ == "__main__":
    main()
