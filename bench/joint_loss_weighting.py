"""The weight each kind's loss really gets when batches are grouped by length.

    python bench/joint_loss_weighting.py [--data RUN/train.jsonl] [--epochs 10] [--batch-sizes 8,4]
                                         [--accumulation 2] [--alpha 0.5] [--max-length 512] [--verify]

mapd.stages.train computes, per micro-batch, ``alpha * L_feedback + (1 - alpha) * L_rationale`` where each
term is the token mean over that kind's completion tokens in the micro-batch, and 0 when the
micro-batch holds no pair of that kind. The expected loss per micro-batch is therefore

    alpha * P(feedback present) * E[L_feedback | present] + (1 - alpha) * P(rationale present) * E[...]

so the effective weights are ``alpha * P(feedback present)`` and ``(1 - alpha) * P(rationale present)``.
This script replays the trainer's own dataloader (mapd.stages.train.make_trainer, the Trainer's seed, the
epoch reshuffles of its training loop) over ``--epochs`` epochs and prints, per batch size and
sampler: the share of micro-batches holding both kinds / only feedback / only rationale, the
effective weights, their sum (1 when every micro-batch is mixed), how unevenly each kind's weight
falls on its target tokens (by pair-length quartile; a pair that is its kind's only one in a mixed
micro-batch carries its kind's whole term), and, for comparison, the tokens per epoch of a sampler
that groups by length within each kind and deals every micro-batch its share of both (simulated,
not in mapd).

Pairs: ``--data`` (a train.jsonl), else the reference SVAMP round-0 files in $MAPD_REFERENCE_DATA
(bench/_common.py) imported and built with mode "mixed" (as ``mapd import-reference`` + ``mapd build
--mode mixed``).
Tokenizer: the embedded SmolLM2-135M-Instruct's, with its chat template (mapd.stages.train.tokenize_pair).
``--verify`` also runs the real ``Trainer.train()`` loop for two epochs of batch 8 (a no-op loss on a
tiny model) and checks that it sees the same micro-batches as the replay.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for bench._common

from bench._common import svamp_reference_files  # noqa: E402

STUDENT = "embedded:smollm2-135m-instruct"


def build_pairs(out: Path) -> Path:
    """train.jsonl (mode mixed) from the reference SVAMP files, through the CLI."""
    files = svamp_reference_files()
    mapd = [sys.executable, "-m", "mapd.cli"]
    subprocess.run(mapd + ["import-reference", "--task", "svamp", "--mistakes", str(files[0]), "--feedback",
                           str(files[1]), "--rationale", str(files[2]), "--out", str(out)], check=True)
    subprocess.run(mapd + ["build", "--run", str(out), "--mode", "mixed"], check=True)
    return out / "train.jsonl"


def train_config(**fields):
    from mapd.config import TrainConfig

    return TrainConfig(**fields)


def tiny_model(tokenizer):
    """The dataloader needs a model only to exist."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))


def replay(trainer, epochs: int) -> list[list[list[int]]]:
    """Per epoch, the dataset positions of each micro-batch the training loop would see.

    The trainer's own dataloader is iterated as ``Trainer._inner_training_loop`` does (``set_epoch``
    before each epoch), after the Trainer's ``set_seed``; nothing else draws from the RNG between.
    """
    loader = trainer.get_train_dataloader()
    epochs_seen = []
    for epoch in range(epochs):
        batches = []
        epochs_seen.append(batches)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)
        for batch in loader:
            batches.append(batch["row"].tolist())
    return epochs_seen


class IndexedCollator:
    """mapd's JointCollator, plus each feature's dataset position (to identify the batches)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, features):
        import torch

        batch = self.collator(features)
        batch["row"] = torch.tensor([f["row"] for f in features])
        return batch


def make(config, tokenizer, features, scratch: Path):
    from mapd.stages.train import make_trainer

    trainer = make_trainer(config, tiny_model(tokenizer), tokenizer, features, scratch, bf16=False)
    trainer.data_collator = IndexedCollator(trainer.data_collator)
    return trainer


def figures(epochs, features, alpha: float, accumulation: int) -> dict:
    kinds = [f["is_feedback"] for f in features]
    targets = [sum(label != -100 for label in f["labels"][1:]) for f in features]
    lengths = [len(f["input_ids"]) for f in features]
    both = only_f = only_r = 0
    weight = [0.0] * len(features)  # summed over micro-batches: the pair's share of its kind's term
    processed = 0
    batches = [rows for epoch in epochs for rows in epoch]
    for rows in batches:
        n_f = sum(kinds[i] for i in rows)
        both += 0 < n_f < len(rows)
        only_f += n_f == len(rows)
        only_r += n_f == 0
        processed += len(rows) * max(lengths[i] for i in rows)
        for is_feedback, c in ((True, alpha), (False, 1 - alpha)):
            tokens = sum(targets[i] for i in rows if kinds[i] == is_feedback)
            for i in rows:
                if kinds[i] == is_feedback:
                    weight[i] += c * targets[i] / tokens
    m = len(batches)
    steps = [epoch[i : i + accumulation] for epoch in epochs for i in range(0, len(epoch), accumulation)]
    step_both = sum(len({kinds[i] for rows in step for i in rows}) == 2 for step in steps) / len(steps)
    out = {"micro_batches": m, "both": both / m, "only_feedback": only_f / m, "only_rationale": only_r / m,
           "step_both": step_both, "processed": processed}
    out["w_feedback"] = alpha * (both + only_f) / m
    out["w_rationale"] = (1 - alpha) * (both + only_r) / m
    # How evenly each kind's weight falls on its tokens: weight per target token, by length quartile
    # of the pairs within the kind, relative to the kind's mean weight per target token (1 everywhere
    # when every token of a kind counts the same, as in one token mean over the whole epoch).
    spread = {}
    for is_feedback, name in ((True, "feedback"), (False, "rationale")):
        mine = sorted((lengths[i], weight[i], targets[i]) for i in range(len(features)) if kinds[i] == is_feedback)
        mean = sum(w for _, w, _ in mine) / sum(t for _, _, t in mine)
        q = len(mine) // 4
        quartiles = [mine[k * q : (k + 1) * q if k < 3 else len(mine)] for k in range(4)]
        per_pair = [w / t / mean for _, w, t in mine]
        spread[name] = {
            "quartiles": [sum(w for _, w, _ in part) / sum(t for _, _, t in part) / mean for part in quartiles],
            "max": max(per_pair),
            "min": min(per_pair),
            "length_bounds": [part[0][0] for part in quartiles] + [mine[-1][0]],
        }
    out["spread"] = spread
    return out


def stratified(features, batch_size: int, accumulation: int, epochs: int, seed: int) -> tuple[float, float]:
    """What option (b) would cost: length grouping *within each kind*, every micro-batch dealt an
    equal share of each kind's sorted pairs from the same megabatches as transformers' sampler.
    Returns (tokens processed per epoch, share of micro-batches holding both kinds)."""
    import torch

    lengths = [len(f["input_ids"]) for f in features]
    kinds = [f["is_feedback"] for f in features]
    n = len(features)
    megabatch = (min(n // (batch_size * accumulation * 4), 50) or 1) * batch_size * accumulation
    generator = torch.Generator().manual_seed(seed)
    processed = mixed = count = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, megabatch):
            chunk = order[start : start + megabatch]
            batches = -(-len(chunk) // batch_size)
            parts = []
            for kind in (True, False):
                mine = sorted((i for i in chunk if kinds[i] == kind), key=lambda i: -lengths[i])
                parts.append([mine[len(mine) * j // batches : len(mine) * (j + 1) // batches] for j in range(batches)])
            for rows in (f + r for f, r in zip(*parts)):
                processed += len(rows) * max(lengths[i] for i in rows)
                mixed += len({kinds[i] for i in rows}) == 2
                count += 1
    return processed / epochs, mixed / count


def verify(tokenizer, features, scratch: Path, expected: list[list[int]], accumulation: int) -> bool:
    """Run the real Trainer.train() loop for two epochs and compare its micro-batches with the replay."""
    config = train_config(per_device_train_batch_size=8, gradient_accumulation_steps=accumulation, num_train_epochs=2,
                         save_steps=10**6, logging_steps=10**6)
    trainer = make(config, tokenizer, features, scratch)
    seen = []

    def no_op_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        seen.append(inputs["row"].tolist())
        return sum(p.sum() for p in model.parameters()) * 0.0

    trainer.compute_loss = no_op_loss
    trainer.train()
    return seen == expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="A train.jsonl (default: built from the reference SVAMP files).")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-sizes", default="8,4")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--verify", action="store_true", help="Check the replay against the real training loop.")
    args = parser.parse_args()

    from mapd.generation import load_model
    from mapd.stages.train import load_pairs, tokenize_pair

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = args.data or build_pairs(scratch / "run")
        _, tokenizer = load_model(STUDENT)
        tokenizer.padding_side = "right"
        pairs = load_pairs(data, args.alpha)
        features = [tokenize_pair(tokenizer, pair, args.max_length) | {"row": i} for i, pair in enumerate(pairs)]
        n_f = sum(f["is_feedback"] for f in features)
        mean_len = {k: sum(len(f["input_ids"]) for f in features if f["is_feedback"] == k) / max(1, n)
                    for k, n in ((True, n_f), (False, len(features) - n_f))}
        print(f"{data}: {n_f} feedback + {len(features) - n_f} rationale pairs, mean length "
              f"{mean_len[True]:.0f} vs {mean_len[False]:.0f} tokens; alpha {args.alpha}, "
              f"accumulation {args.accumulation}, {args.epochs} epochs, seed {train_config().seed}")
        replays = {}
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            for grouped in (True, False):
                config = train_config(per_device_train_batch_size=batch_size, alpha=args.alpha,
                                     gradient_accumulation_steps=args.accumulation, max_length=args.max_length,
                                     group_by_length=grouped)
                batches = replay(make(config, tokenizer, features, scratch / "out"), args.epochs)
                replays[batch_size, grouped] = batches
                r = figures(batches, features, args.alpha, args.accumulation)
                total = r["w_feedback"] + r["w_rationale"]
                print(f"\nbatch {batch_size}, {'grouped by length (default)' if grouped else 'random batches'}: "
                      f"{r['micro_batches']} micro-batches, tokens processed {r['processed'] // args.epochs} per epoch")
                print(f"  micro-batches: both kinds {r['both']:.1%}, only feedback {r['only_feedback']:.1%}, "
                      f"only rationale {r['only_rationale']:.1%}; optimizer steps holding both kinds "
                      f"{r['step_both']:.1%}")
                print(f"  expected weight per micro-batch: feedback {r['w_feedback']:.3f} (alpha {args.alpha}), "
                      f"rationale {r['w_rationale']:.3f} (1 - alpha {1 - args.alpha:.1f}); sum {total:.3f}; "
                      f"feedback share {r['w_feedback'] / total:.3f}")
                if grouped:
                    tokens, mixed = stratified(features, batch_size, args.accumulation, args.epochs, config.seed)
                    print(f"  (b) length grouping within each kind, mixed micro-batches (simulated): {tokens:.0f} "
                          f"tokens per epoch ({tokens / (r['processed'] / args.epochs):.2f}x), both kinds {mixed:.1%}")
                for kind, s in r["spread"].items():
                    bounds = s["length_bounds"]
                    quart = ", ".join(f"{w:.2f}" for w in s["quartiles"])
                    print(f"  {kind}: weight per target token / the kind's mean, by pair-length quartile "
                          f"({bounds[0]}-{bounds[1]}-{bounds[2]}-{bounds[3]}-{bounds[4]} tokens): {quart}; "
                          f"pairs from {s['min']:.2f} to {s['max']:.2f}")
        if args.verify:
            expected = [rows for epoch in replays[8, True][:2] for rows in epoch]
            same = verify(tokenizer, features, scratch / "verify", expected, args.accumulation)
            print(f"\nverify: the real training loop's micro-batches (batch 8, 2 epochs) "
                  f"{'match' if same else 'DO NOT match'} the replay")
            if not same:
                sys.exit(1)


if __name__ == "__main__":
    main()
