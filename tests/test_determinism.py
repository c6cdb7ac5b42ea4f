"""The same run on every machine: local generation is seeded per call (from its key) and mining per question,
so records do not depend on which calls happen to share a batch (docs/default-run.md#the-same-run-everywhere)."""

import pytest
import yaml

from mapd.cli import main

COMPARED = ["round-0/mistakes.jsonl", "round-0/feedback.jsonl", "round-0/rationales.jsonl", "round-0/train.jsonl",
            "round-0/eval_before/predictions.jsonl", "round-0/eval_after/predictions.jsonl"]


def _config(tmp_path, tiny_model_dir, max_concurrency: int):
    """A sampling run on the tiny model: a generated task, mining at temperature 0.7, two local teachers."""
    teachers = [{"name": name, "model": str(tiny_model_dir), "temperature": 0.8, "top_p": 0.95, "max_tokens": 12,
                 "max_concurrency": max_concurrency} for name in ("ta", "tb")]
    config = {
        "task": {"name": "reasoning_gym:chain_sum", "options": {"min_terms": 2, "max_terms": 3, "max_digits": 1},
                 "size": 6},
        "student": {"model": str(tiny_model_dir), "max_new_tokens": 8, "batch_size": max(2, max_concurrency // 4),
                    "temperature": 0.7},
        "teachers": teachers,
        "review": {"enabled": True},
        "build": {"mode": "no-review"},  # a random model writes no rationale a review would accept
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "max_length": 128, "save_steps": 1, "learning_rate": 1e-3},
    }
    path = tmp_path / f"config-{max_concurrency}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.timeout(600)
def test_one_at_a_time_and_in_batches_of_16_give_the_same_run(tmp_path, tiny_model_dir):
    """Two whole runs, one with every local call alone (max_concurrency 1) and one in batches of up to 16
    (and other mining batch sizes): the same mistakes, feedback, rationales, training pairs and predictions."""
    runs = []
    for max_concurrency in (1, 16):
        out = tmp_path / f"run-{max_concurrency}"
        assert main(["run", str(_config(tmp_path, tiny_model_dir, max_concurrency)), "--out", str(out)]) == 0
        runs.append(out)
    for name in COMPARED:
        first, second = ((run / name).read_text(encoding="utf-8") for run in runs)
        assert first == second, f"{name} differs between max_concurrency 1 and 16"
    assert (runs[0] / "round-0/feedback.jsonl").read_text(encoding="utf-8").count("\n") == 12  # 6 mistakes x 2
