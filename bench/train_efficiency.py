"""Training efficiency on the reference SVAMP pairs: padding waste, CPU seconds per epoch, peak memory.

    python bench/train_efficiency.py [--steps 5] [--batch-size 8] [--max-length 512] [--no-speed]
                                     [--modes full,lora] [--lora-dropout 0.05]

(a) Tokens processed per target (completion) token for one epoch of mapd's dataloader (dynamic
    padding, grouped by length; also without grouping) vs. padding every pair to 512 tokens as
    the reference implementation does.
(b) For SmolLM2-135M (embedded GGUF, dequantized to float32) on CPU, full fine-tune and LoRA,
    each in its own process: ``--steps`` optimizer steps, the first left out as warm-up. Seconds
    per epoch = measured seconds per processed token x the tokens one epoch processes (from (a)),
    an extrapolation. Peak RSS is the whole process's (loading included).

The pairs come from the reference's SVAMP round-0 files in $MAPD_REFERENCE_DATA (bench/_common.py),
converted by mapd.stages.import_reference and built with mode "mixed".
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench._common

from bench._common import svamp_reference_files  # noqa: E402

from mapd.config import TrainConfig  # noqa: E402

STUDENT = "embedded:smollm2-135m-instruct"
REFERENCE_PAD = 512  # the reference pads (and truncates) every pair to this many tokens


def build_pairs(out: Path) -> Path:
    """train.jsonl (mode mixed) built from the reference SVAMP files."""
    from mapd.config import BuildConfig, PromptConfig
    from mapd.stages.import_reference import import_reference
    from mapd.layout import RoundLayout
    from mapd.stages.build import run_build

    files = svamp_reference_files()
    folder = RoundLayout(out)
    import_reference("svamp", *files, folder)
    run_build(folder, task=None, build=BuildConfig(mode="mixed", seed=731), prompts=PromptConfig())
    return folder.train


def epoch_tokens(trainer) -> tuple[int, int, float]:
    """(tokens processed, target tokens, share of batches holding both kinds) over one epoch of
    the trainer's own dataloader."""
    processed = target = mixed = batches = 0
    for batch in trainer.get_train_dataloader():
        processed += batch["input_ids"].numel()
        target += int((batch["labels"] != -100).sum())
        mixed += 0 < int(batch["is_feedback"].sum()) < len(batch["is_feedback"])
        batches += 1
    return processed, target, mixed / batches


def padding_figures(data: Path, batch_size: int, max_length: int) -> int:
    """Print (a); return the tokens one grouped epoch processes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mapd.models import resolve_model
    from mapd.stages.train import load_pairs, make_trainer, tokenize_pair

    folder, gguf_file = resolve_model(STUDENT)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer.padding_side = "right"
    pairs = load_pairs(data, 0.5)
    features = [tokenize_pair(tokenizer, pair, max_length) for pair in pairs]
    target = sum(sum(label != -100 for label in f["labels"]) for f in features)
    # The dataloader needs a model only to exist: a tiny one will do.
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=1))
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for grouped in (True, False):
            config = TrainConfig(per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                                 max_length=max_length, group_by_length=grouped)
            torch.manual_seed(0)
            rows[grouped] = epoch_tokens(make_trainer(config, tiny, tokenizer, features, Path(scratch), bf16=False))
    lengths = sorted(len(f["input_ids"]) for f in features)
    print(f"(a) {len(pairs)} pairs, SmolLM2 tokenizer, max_length {max_length}, batch {batch_size}: "
          f"pair length median {lengths[len(lengths) // 2]}, max {lengths[-1]}, "
          f"{sum(n >= max_length for n in lengths)} truncated; {target} target tokens")
    reference = len(features) * REFERENCE_PAD
    for label, processed in (("pad every pair to 512 (reference)", reference),
                             ("dynamic padding, random batches", rows[False][0]),
                             ("dynamic padding, grouped by length (mapd)", rows[True][0]),
                             ("no padding at all (the floor)", sum(lengths))):
        print(f"    {label:<42} {processed:>8} tokens  {processed / target:5.2f} per target token  "
              f"{reference / processed:5.2f}x fewer than the reference")
    print(f"    batches holding both kinds: {rows[False][2]:.0%} random, {rows[True][2]:.0%} grouped by length")
    assert rows[True][1] == target, "the dataloader lost target tokens"
    return rows[True][0]


def measure(mode: str, data: Path, steps: int, batch_size: int, max_length: int, lora_dropout: float) -> dict:
    """Run in a child process: time ``steps`` optimizer steps of SmolLM2 (full or lora); return figures."""
    from transformers import TrainerCallback

    from mapd.stages.train import prepare_trainer

    config = TrainConfig(max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                         max_length=max_length, lora=mode == "lora", lora_dropout=lora_dropout, save_steps=10**6,
                         warmup_ratio=0.0)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        trainer, pairs = prepare_trainer(config, STUDENT, data, Path(out))
        load_s = time.perf_counter() - start
        processed = epoch_tokens(trainer)[0]
        sizes, times = [], []
        collate = trainer.data_collator

        def counting(features):
            batch = collate(features)
            sizes.append(batch["input_ids"].numel())
            return batch

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.perf_counter() - self.start)

        trainer.data_collator = counting
        trainer.add_callback(StepTimer())
        trainer.train()
    per_token = sum(times[1:]) / sum(sizes[1 : len(times)])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "mode": mode, "load_s": load_s, "steps_timed": len(times) - 1, "step_s": sum(times[1:]) / (len(times) - 1),
        "tokens_per_step": sum(sizes[1 : len(times)]) / (len(times) - 1), "epoch_tokens": processed,
        "epoch_steps": math.ceil(len(pairs) / batch_size), "epoch_s": per_token * processed,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "trainable": trainable,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per mode (the first is warm-up).")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--no-speed", action="store_true", help="Only (a).")
    parser.add_argument("--modes", default="full,lora", help="Comma-separated: full, lora.")
    parser.add_argument("--lora-dropout", type=float, default=TrainConfig().lora_dropout)
    parser.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.data, args.steps, args.batch_size, args.max_length,
                                 args.lora_dropout)))
        return

    import torch

    with tempfile.TemporaryDirectory() as scratch:
        data = build_pairs(Path(scratch))
        padding_figures(data, args.batch_size, args.max_length)
        if args.no_speed:
            return
        print(f"(b) {STUDENT} on CPU ({torch.get_num_threads()} threads), float32, batch {args.batch_size}, "
              f"max_length {args.max_length}, lora_dropout {args.lora_dropout}, {args.steps} steps per mode, "
              "the first left out; per epoch extrapolated")
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--child", mode, "--data", str(data), "--steps", str(args.steps),
                       "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                       "--lora-dropout", str(args.lora_dropout)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"    {mode:>4}: {r['trainable'] / 1e6:6.1f} M trainable, load {r['load_s']:4.0f} s, "
                  f"{r['step_s']:5.1f} s/step at {r['tokens_per_step']:.0f} tokens/step "
                  f"({r['steps_timed']} steps), epoch ({r['epoch_steps']} steps, {r['epoch_tokens']} tokens) "
                  f"~{r['epoch_s'] / 60:5.1f} min, peak RSS {r['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
