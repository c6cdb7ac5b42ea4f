"""Multi-process (data-parallel) training: `mapd train` under `accelerate launch` with 2 CPU processes
(gloo) gives the same per-step losses and the same final weights as one process.

What is compared with what, and why:

- The joint loss is a per-*micro-batch* quantity (a token mean per kind, 0 for a kind the micro-batch
  lacks; mapd.stages.train), so the unit that must match is the micro-batch, not the global batch. Two
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

import contextlib
import json
import os
import subprocess
import sys
import time
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


def _launched(out: Path) -> list:
    """The processes still running whose command line names the run folder ``out`` (a launcher, its workers)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(out) in part for part in process.info["cmdline"] or []) and process.status() != "zombie":
                found.append(process)
    return found


@pytest.mark.slow
def test_mapd_run_trains_under_a_launcher_and_resumes_after_sigkill(tiny_model_dir, tmp_path):
    """`mapd run` with train.launch: every stage done, the train stage on 2 processes (manifest and report);
    killed (SIGKILL) mid-training, no launcher or worker is left, and the rerun resumes from a checkpoint."""
    from tests.openai_server import FakeOpenAIServer
    from tests.reliability_kit import CountingReply, mapd_argv, run_killed, write_pipeline_setup

    server = FakeOpenAIServer(reply=CountingReply()).start()
    try:
        config_path, config = write_pipeline_setup(tmp_path, server.base_url, tiny_model_dir)
        steps = 16  # the kill lands at the first checkpoint: enough steps are left after it
        config["train"].update(launch="accelerate launch --multi_gpu --num_processes 2", max_steps=steps,
                               save_steps=1, save_total_limit=2)
        config_path.write_text(yaml.safe_dump(config))
        out = tmp_path / "run"
        model = out / "round-0" / "model"
        env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
                            "TOKENIZERS_PARALLELISM": "false"}
        for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)

        def checkpointed() -> bool:
            return any((c / "trainer_state.json").is_file() for c in model.glob("checkpoint-*"))

        assert run_killed(["run", str(config_path), "--out", str(out)], checkpointed, env=env,
                          log=tmp_path / "killed.log"), "the run ended before it could be killed"
        deadline = time.monotonic() + 60  # the watchdog stops the launcher and both workers
        while _launched(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _launched(out), "a training process outlived the killed mapd"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["rounds"][0]["stages"]["train"]["status"] == "running"

        done = subprocess.run(mapd_argv("run", str(config_path), "--out", str(out)), env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "resumed from checkpoint-" in done.stdout  # the launched child's output, streamed through
        manifest = json.loads((out / "manifest.json").read_text())
        stages = manifest["rounds"][0]["stages"]
        assert list(stages) == ["eval_before", "mine", "teach", "build", "train", "eval_after"]
        assert all(stage["status"] == "done" for stage in stages.values())
        assert stages["train"]["summary"]["world_size"] == 2
        assert stages["train"]["summary"]["steps"] == steps
        assert [r["step"] for r in read_jsonl(model / "train_log.jsonl")] == list(range(1, steps + 1))
        assert "resumed from checkpoint-" in (model / "launch.log").read_text()
        assert "on 2 processes" in (out / "report.html").read_text()
        assert not _launched(out)
    finally:
        server.close()


def test_a_failed_launch_is_one_line_with_the_log_tail(tmp_path):
    """A launcher that fails: CommandFailed (exit code 1), one line naming the command and quoting its log."""
    from mapd.config import TrainConfig
    from mapd.serve import CommandFailed
    from mapd.stages.train import launch_train

    launcher = f"{sys.executable} -c \"import sys; print('launcher broke', sys.argv[1:4]); sys.exit(3)\""
    with pytest.raises(CommandFailed) as failed:
        launch_train(TrainConfig(launch=launcher, seed=5), "some-model", tmp_path / "train.jsonl", tmp_path / "model")
    message = str(failed.value)
    assert failed.value.exit_code == 1 and "\n" not in message
    assert message.startswith("train.launch: `") and "exited with code 3" in message
    assert f"last lines of {tmp_path / 'model' / 'launch.log'}: launcher broke ['-m', 'mapd.cli', 'train']" in message
    settings = yaml.safe_load((tmp_path / "model" / "launch.yaml").read_text())["train"]  # what the child trains with
    assert settings["seed"] == 5 and "launch" not in settings


def test_a_launcher_that_cannot_be_found_is_refused_before_any_stage(tiny_model_dir, tmp_path, capsys):
    from mapd.cli import main
    from tests.reliability_kit import dead_url, write_pipeline_setup

    config_path, config = write_pipeline_setup(tmp_path, dead_url(), tiny_model_dir)
    config["train"]["launch"] = "no-such-launcher-xyz --num_processes 2"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["run", str(config_path), "--out", str(tmp_path / "run")]) == 2
    assert f"{config_path}: train.launch: no-such-launcher-xyz: no such command" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
