"""Multi-process (data-parallel) training: `mapd train` under `accelerate launch` with 2 CPU processes
(gloo) gives the same per-step losses and the same final weights as one process.

What is compared with what, and why:

- The joint loss is a per-*micro-batch* quantity (a token mean per kind, 0 for a kind the micro-batch
  lacks; mapd.train), so the unit that must match is the micro-batch, not the global batch. Two
  processes at ``per_device_train_batch_size`` 2 each run a micro-batch of 2 and DDP averages the two
  gradients; the one-process run that computes the same thing is batch 2 with
  ``gradient_accumulation_steps`` 2 (the Trainer divides each micro-batch's loss by 2 and sums the
  gradients). One process at batch 4 is a *different* objective here: its per-kind means pool 4 pairs,
  and it meets fewer single-kind micro-batches (measured on these pairs: its logged loss differs by up
  to 5.3 at the same step). docs/scaling.md says what this means for choosing per-device batch sizes.
- Data order: both runs draw the same permutation (accelerate's seedable sampler, seeded with
  ``train.seed``; the length-grouped sampler from the same torch seed), and accelerate hands global
  micro-batches 2k and 2k+1 to ranks 0 and 1, which are exactly the two micro-batches the one-process
  run accumulates into step k. With ``group_by_length`` the Trainer groups within "megabatches" of
  50 x per-device batch x accumulation pairs, which differ between the two set-ups (100 vs 200 pairs);
  the 16 pairs here fit in one, so the order matches. (On 120 pairs the runs part at step 3.)
- Tolerance: with 2 ranks the arithmetic is the same up to the order of one addition: DDP computes
  (g0 + g1) / 2, accumulation g0 / 2 + g1 / 2, and halving is exact in binary floating point, so the
  runs are bitwise equal here (observed: difference 0.0 in every loss and weight). The test allows
  1e-5 relative on losses and 1e-5 absolute on weights, room for a gloo or BLAS build that reduces in
  another order, far below the 1e-2 step-to-step changes (learning rate 1e-2) a wrong data order or
  a wrong gradient scale would make.

Launching: ``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.x (its CPU
path is a plain launcher, or mpirun with a hostfile; huggingface/accelerate#2741), so the test uses
accelerate's torchrun path (``--multi_gpu``) with ``ACCELERATE_USE_CPU=true``, which makes the Trainer
join a 2-process gloo group on CPU. The test checks that two processes really shared the data (the
epoch fraction per step), since a silent single process would otherwise also train.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mapd.io import read_jsonl, write_jsonl
from mapd.serve import free_port
from tests.test_train import pairs

STEPS = 8  # two epochs of the 16 pairs at a global batch of 4: the epoch reshuffle is compared too


def train_config(path: Path, *, batch: int, accumulation: int, group_by_length: bool) -> Path:
    path.write_text(yaml.safe_dump({"train": {
        "learning_rate": 1e-2, "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "bf16": False,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "max_length": 96, "max_steps": STEPS, "save_steps": 100, "group_by_length": group_by_length,
    }}))
    return path


def run(command: list[str], cwd: Path) -> None:
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
                        "TOKENIZERS_PARALLELISM": "false"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the launcher sets them; a one-process run must see none
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("group_by_length", [False, True], ids=["random-batches", "grouped-by-length"])
def test_two_processes_train_as_one_with_accumulation(tiny_model_dir, tmp_path, group_by_length):
    import torch

    data = write_jsonl(tmp_path / "train.jsonl", pairs())  # 16 pairs, both kinds
    cli = ["-m", "mapd.cli", "train", "--model", str(tiny_model_dir), "--data", str(data)]

    one = tmp_path / "one"
    config = train_config(tmp_path / "one.yaml", batch=2, accumulation=2, group_by_length=group_by_length)
    run([sys.executable, *cli, "--out", str(one), "--config", str(config)], tmp_path)

    two = tmp_path / "two"
    config = train_config(tmp_path / "two.yaml", batch=2, accumulation=1, group_by_length=group_by_length)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    run([*launch, *cli, "--out", str(two), "--config", str(config)], tmp_path)

    one_log, two_log = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == list(range(1, STEPS + 1))
    # both processes took part: each step consumed 4 of the 16 pairs (one process at batch 2: 2)
    assert [r["epoch"] for r in two_log] == pytest.approx([step * 4 / 16 for step in range(1, STEPS + 1)])
    for a, b in zip(one_log, two_log):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), f"step {a['step']}"
    assert one_log[-1]["loss"] < one_log[0]["loss"]  # it did learn

    expected, got = weights(one), weights(two)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-5), name
    # the start differs from the end by far more than the tolerance: the comparison means something
    start = weights(tiny_model_dir)
    assert max((start[k] - expected[k]).abs().max().item() for k in expected) > 1e-2
    assert (two / "tokenizer_config.json").exists()  # the model folder is complete, as one process leaves it
