"""``mapd run``: every stage in order, each skipped when its artifacts are complete.

The run folder's ``manifest.json`` records the resolved config (no secrets), package
versions, seeds and, per round and stage, its status, timing and summary. A stage is
marked done only after its artifacts are written, so a crash or Ctrl-C at any moment
resumes at the first unfinished stage; teacher calls resume from the call cache and
training from its last checkpoint. A file lock keeps a second run out of the folder.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mapd.config import RunConfig, embedded_default_config, load_config, public_dump
from mapd.errors import MapdError
from mapd.io import folder_lock, write_json
from mapd.models import resolve_model

MANIFEST_VERSION = 1
PACKAGES = ("mapd", "torch", "transformers", "datasets", "peft", "accelerate", "openai", "pydantic")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a config that must not change when a run resumes (rounds may grow)."""
    return {key: value for key, value in config.items() if key != "rounds"}


class Manifest:
    """manifest.json of a run folder, rewritten atomically after every change."""

    def __init__(self, run_dir: Path, config: RunConfig):
        self.path = run_dir / "manifest.json"
        resolved = public_dump(config)
        if self.path.exists():
            import json

            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise MapdError(f"{self.path}: corrupted manifest ({exc.msg}); move it away to start over") from None
            if self.data.get("manifest_version") != MANIFEST_VERSION:
                raise MapdError(f"{self.path}: written by another mapd version; use a new --out folder")
            if _comparable(self.data.get("config", {})) != _comparable(resolved):
                raise MapdError(
                    f"{run_dir}: holds a run with a different config; use a new --out folder "
                    "(only `rounds` may change when a run is continued)"
                )
        else:
            self.data = {"manifest_version": MANIFEST_VERSION, "created": _now(), "rounds": []}
        self.data.update(config=resolved, versions=_versions(), seeds=_seeds(config))
        self.save()

    def stage(self, round_index: int, name: str) -> dict[str, Any]:
        """The mutable record of one stage of one round."""
        while len(self.data["rounds"]) <= round_index:
            self.data["rounds"].append({"round": len(self.data["rounds"]), "stages": {}})
        return self.data["rounds"][round_index]["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seeds(config: RunConfig) -> dict[str, int]:
    return {"task": config.task.seed, "build": config.build.seed, "train": config.train.seed}


def _run_stage(manifest: Manifest, round_index: int, name: str, outputs: list[Path], work: Callable[[], Any]) -> Any:
    """Run ``work`` unless the stage is done and its outputs exist; record timing and summary."""
    record = manifest.stage(round_index, name)
    if record.get("status") == "done" and all(path.exists() for path in outputs):
        print(f"[round {round_index}] {name}: done earlier, skipped")
        return record.get("summary")
    print(f"[round {round_index}] {name} ...")
    record.update(status="running", started=_now())
    manifest.save()
    start = time.perf_counter()
    summary = work()
    record.update(status="done", seconds=round(time.perf_counter() - start, 2), summary=summary, finished=_now())
    manifest.save()
    return summary


def default_run_dir(config_path: str | None) -> Path:
    """runs/<config file stem>, or runs/default for the embedded demo."""
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def run(config_path: str | None, out: Path | None = None) -> Path:
    """Run (or continue) every stage of every round; returns the run folder."""
    from mapd.evaluate import run_eval
    from mapd.report import write_report
    from mapd.stages.build import run_build
    from mapd.stages.mine import run_mine
    from mapd.stages.teach import run_teach
    from mapd.tasks import get_task
    from mapd.train import run_train

    config = load_config(config_path) if config_path else embedded_default_config()
    if not config.teachers:
        raise MapdError(f"{config_path}: teachers: the committee needs at least one teacher")
    if config_path is None:
        print(
            "mapd: running the offline demonstration (embedded default). Its tiny local teachers test the "
            "machinery and do not teach well; for real teaching, point `teachers:` at real endpoints "
            "(see configs/paper-committee.yaml)."
        )
    run_dir = out or default_run_dir(config_path)
    answer_kind = get_task(config.task).answer_kind
    # a mistyped local model path fails now, not after the stages before the one that loads it
    resolve_model(config.student.model, config.student.gguf_file)
    for teacher in config.teachers:
        if teacher.provider == "local":
            resolve_model(teacher.model, teacher.gguf_file)
    with folder_lock(run_dir):
        manifest = Manifest(run_dir, config)
        if config.cache_path is None:
            config = config.model_copy(update={"cache_path": str(run_dir / "cache.sqlite")})
        student = config.student.model
        for round_index in range(config.rounds):
            round_dir = run_dir / f"round-{round_index}"

            def evaluate(model: str, folder: Path) -> dict:
                return run_eval(
                    model=model, task_config=config.task, split=config.task.test_split,
                    limit=config.task.test_limit, batch_size=config.student.batch_size,
                    max_new_tokens=config.student.max_new_tokens, out_dir=folder, prompts=config.prompts,
                    gguf_file=config.student.gguf_file if model == config.student.model else None,
                )

            if round_index == 0:
                _run_stage(manifest, 0, "eval_before", [round_dir / "eval_before" / "metrics.json"],
                           lambda: evaluate(student, round_dir / "eval_before"))
            mistakes = _run_stage(manifest, round_index, "mine", [round_dir / "mistakes.jsonl"],
                                  lambda: run_mine(config, round_dir, model=student))
            if mistakes and mistakes.get("wrong", 0) + mistakes.get("unparsed", 0) == 0:
                print(f"[round {round_index}] the student made no mistakes on the train split: nothing to teach")
                break
            _run_stage(manifest, round_index, "teach", [round_dir / "feedback.jsonl", round_dir / "rationales.jsonl"],
                       lambda: run_teach(config, round_dir / "mistakes.jsonl", round_dir))
            _run_stage(manifest, round_index, "build", [round_dir / "train.jsonl"],
                       lambda: run_build(round_dir, mode=config.build.mode, seed=config.build.seed,
                                         prompts=config.prompts, answer_kind=answer_kind))
            model_dir = round_dir / "model"
            _run_stage(manifest, round_index, "train", [model_dir / "config.json"],
                       lambda: run_train(config.train, model=student, data=round_dir / "train.jsonl", out_dir=model_dir,
                                         gguf_file=config.student.gguf_file if student == config.student.model else None))
            _run_stage(manifest, round_index, "eval_after", [round_dir / "eval_after" / "metrics.json"],
                       lambda: evaluate(str(model_dir), round_dir / "eval_after"))
            student = str(model_dir)
        manifest.data["finished"] = _now()
        manifest.save()
        report = write_report(run_dir)
        print(f"mapd: run complete: {run_dir} (report: {report})")
        return run_dir
