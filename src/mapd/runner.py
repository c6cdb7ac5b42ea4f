"""``mapd run``: every stage in order, each skipped when its artifacts are complete.

The run folder's ``manifest.json`` records the resolved config (no secrets), package
versions, seeds and, per round and stage, its status, timing and summary. A stage is
marked done only after its artifacts are written, so a crash or Ctrl-C at any moment
resumes at the first unfinished stage; teacher calls resume from the call cache and
training from its last checkpoint. A file lock keeps a second run out of the folder.
"""

from __future__ import annotations

import inspect
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mapd.config import RunConfig, embedded_default_config, load_config, public_dump
from mapd.errors import MapdError
from mapd.io import folder_lock, read_json, write_json
from mapd.layout import RoundLayout, RunLayout
from mapd.models import check_local_teachers, resolve_model

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

    def __init__(self, run_dir: RunLayout, config: RunConfig):
        self.path = run_dir.manifest
        resolved = public_dump(config)
        if self.path.exists():
            try:
                self.data = read_json(self.path, dict)
            except MapdError as exc:  # "<path>: corrupted manifest (<why>)", as every error names its file first
                why = str(exc).removeprefix(f"{self.path}: ")
                raise MapdError(f"{self.path}: corrupted manifest ({why}); move it away to start over") from None
            if self.data.get("manifest_version") != MANIFEST_VERSION:
                raise MapdError(f"{self.path}: written by another mapd version; use a new --out folder")
            if _comparable(self.data.get("config", {})) != _comparable(resolved):
                raise MapdError(
                    f"{run_dir.dir}: holds a run with a different config; use a new --out folder "
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


@dataclass(frozen=True)
class Stage:
    """One step of a round: ``run(round, **sections)`` gets the config fields its keyword-only
    parameters name (and only those); ``done(round)`` are the files that show it finished."""

    name: str
    run: Callable[..., Any]
    done: Callable[[RoundLayout], list[Path]]
    first_round_only: bool = False



def stage_sections(run: Callable[..., Any], config: RunConfig) -> dict[str, Any]:
    """The config fields a stage wrapper receives: those its keyword-only parameters name."""
    parameters = inspect.signature(run).parameters.values()
    return {p.name: getattr(config, p.name) for p in parameters
            if p.kind is p.KEYWORD_ONLY and p.name in RunConfig.model_fields}


def _stages() -> list[Stage]:
    from mapd.evaluate import run_eval_after, run_eval_before
    from mapd.stages.build import run_build
    from mapd.stages.mine import run_mine
    from mapd.stages.teach import run_teach
    from mapd.train import run_train

    return [
        Stage("eval_before", run_eval_before, lambda f: [f.eval_before.metrics], first_round_only=True),
        Stage("mine", run_mine, lambda f: [f.mistakes]),
        Stage("teach", run_teach, lambda f: [f.feedback, f.rationales]),
        Stage("build", run_build, lambda f: [f.train]),
        Stage("train", run_train, lambda f: [f.model_done]),
        Stage("eval_after", run_eval_after, lambda f: [f.eval_after.metrics]),
    ]


def _run_stage(manifest: Manifest, round_index: int, stage: Stage, folder: RoundLayout, config: RunConfig) -> Any:
    """Run ``stage`` unless it is done and its outputs exist; record timing and summary."""
    record = manifest.stage(round_index, stage.name)
    if record.get("status") == "done" and all(path.exists() for path in stage.done(folder)):
        print(f"[round {round_index}] {stage.name}: done earlier, skipped")
        return record.get("summary")
    print(f"[round {round_index}] {stage.name} ...")
    record.update(status="running", started=_now())
    manifest.save()
    start = time.perf_counter()
    summary = stage.run(folder, **stage_sections(stage.run, config))
    record.update(status="done", seconds=round(time.perf_counter() - start, 2), summary=summary, finished=_now())
    manifest.save()
    return summary


def default_run_dir(config_path: str | None) -> Path:
    """runs/<config file stem>, or runs/default for the embedded demo."""
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def run(config_path: str | None, out: Path | None = None) -> Path:
    """Run (or continue) every stage of every round; returns the run folder."""
    from mapd.report import write_report

    config = load_config(config_path) if config_path else embedded_default_config()
    if not config.teachers:
        raise MapdError(f"{config_path}: teachers: the committee needs at least one teacher")
    if config_path is None:
        print(
            "mapd: running the offline demonstration (embedded default). Its tiny local teachers test the "
            "machinery and do not teach well; for real teaching, point `teachers:` at real endpoints "
            "(see configs/paper-committee.yaml)."
        )
    run_dir = RunLayout(out or default_run_dir(config_path))
    # a mistyped local model path fails now, not after the stages before the one that loads it
    resolve_model(config.student.model, config.student.gguf_file)
    check_local_teachers(config.teachers)
    stages = _stages()
    with folder_lock(run_dir.dir):
        manifest = Manifest(run_dir, config)
        if config.cache_path is None:
            config = config.model_copy(update={"cache_path": str(run_dir.cache)})
        for round_index in range(config.rounds):
            folder = run_dir.round(round_index)
            for stage in stages:
                if stage.first_round_only and round_index > 0:
                    continue
                summary = _run_stage(manifest, round_index, stage, folder, config)
                if stage.name == "mine" and summary and summary.get("wrong", 0) + summary.get("unparsed", 0) == 0:
                    print(f"[round {round_index}] the student made no mistakes on the train split: nothing to teach")
                    break
            else:  # the next round mines the mistakes of the student this round trained
                trained = config.student.model_copy(update={"model": str(folder.model), "gguf_file": None})
                config = config.model_copy(update={"student": trained})
                continue
            break
        manifest.data["finished"] = _now()
        manifest.save()
        report = write_report(run_dir.dir)
        print(f"mapd: run complete: {run_dir.dir} (report: {report})")
        return run_dir.dir
