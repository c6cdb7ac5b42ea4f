"""``mapd run``: every stage in order, each skipped when its artifacts are complete.

The run folder's ``manifest.json`` records the resolved config (no secrets), package
versions, seeds and, per round and stage, its status, timing, summary and fingerprint. A stage is
marked done only after its artifacts are written, so a crash or Ctrl-C at any moment
resumes at the first unfinished stage; teacher calls resume from the call cache and
training from its last checkpoint. A stage that ends incomplete (``IncompleteStage``: calls failed
or were not made) is recorded ``incomplete`` and rerun by the next ``mapd run``. A file lock keeps
a second run out of the folder.

Resume after a config change (docs/reliability.md#resume-after-a-config-change): a stage's
fingerprint is the sha256 of the result-determining config fields its wrapper receives (the
fields not marked operational) chained with the fingerprint of the stage before it, so a stage is
stale when its own inputs or any earlier stage's changed. Operational changes (budget,
concurrency, rate limits, timeouts, retries, cache path, logging, rounds) are accepted; a change
that only reaches stages not run yet is accepted; a change that reaches a stage already run
(done, running or incomplete) is refused, naming the field and the first stage it changes.
``mapd run --from STAGE`` moves the outputs of round 0's STAGE and of every later stage of every
round to ``superseded/<UTC time>/`` (same relative paths) and runs them again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mapd.config import EMBEDDED_DEFAULT, RunConfig
from mapd.config_diff import config_changes, result_fields
from mapd.config_file import embedded_default_config, load_config
from mapd.errors import IncompleteStage, MapdError
from mapd.log import say
from mapd.io import folder_lock, read_json, write_json
from mapd.layout import RoundLayout, RunLayout
from mapd.model_card import card_from_run
from mapd.models import check_local_teachers, resolve_model
from mapd.secrets import Redactor, api_key, endpoint, public_dump
from mapd.student import server_pool, trained_student
from mapd.tasks import get_task

# 2: per-stage fingerprints, "incomplete" stages, "superseded" moves. A version-1 manifest is read
# as though every stage of its configured rounds had run: operational changes are accepted, any
# other change needs --from; it is rewritten as version 2 (fingerprints from its stored config).
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
PACKAGES = ("mapd", "torch", "transformers", "datasets", "peft", "accelerate", "openai", "pydantic")
# the stages of a round, in order (``_stages()`` builds them; kept here so the CLI need not import them)
STAGE_NAMES = ("eval_before", "mine", "teach", "build", "train", "eval_after")
SUPERSEDED = "superseded"

log = logging.getLogger("mapd.runner")


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass(frozen=True)
class Stage:
    """One step of a round: ``run(round, **sections)`` gets the config fields its keyword-only
    parameters name (and only those); ``done(round)`` are the files that show it finished;
    ``outputs(round)`` every file or folder it writes (moved aside by ``--from``)."""

    name: str
    run: Callable[..., Any]
    done: Callable[[RoundLayout], list[Path]]
    outputs: Callable[[RoundLayout], list[Path]]
    first_round_only: bool = False


@dataclass(frozen=True)
class Step:
    """One stage of one round, in run order, with the fingerprint of its result-determining inputs."""

    index: int
    round: int
    stage: Stage
    fingerprint: str


def stage_fields(run: Callable[..., Any]) -> list[str]:
    """The config fields a stage wrapper receives: its keyword-only parameters that name one."""
    return [p.name for p in inspect.signature(run).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name in RunConfig.model_fields]


def stage_sections(run: Callable[..., Any], config: RunConfig) -> dict[str, Any]:
    """The config fields a stage wrapper receives: those its keyword-only parameters name."""
    return {name: getattr(config, name) for name in stage_fields(run)}


def _steps(stages: list[Stage], resolved: dict[str, Any], rounds: int) -> list[Step]:
    """Every stage of ``rounds`` rounds in run order, each fingerprinted: sha256 of the canonical JSON of
    the result-determining fields it receives (``resolved`` is the dumped config), chained with the
    fingerprint of the step before it."""
    steps: list[Step] = []
    previous = ""
    for round_index in range(rounds):
        for stage in stages:
            if stage.first_round_only and round_index > 0:
                continue
            inputs = result_fields({name: resolved.get(name) for name in stage_fields(stage.run)})
            text = json.dumps({"after": previous, "stage": stage.name, "inputs": inputs},
                              sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
            previous = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
            steps.append(Step(len(steps), round_index, stage, previous))
    return steps


class Manifest:
    """manifest.json of a run folder, rewritten atomically after every change.

    Opening it checks the config against the one the run was made with (see the module docstring)
    and, with ``start`` (``--from``), moves the outputs of that stage and every later one aside.
    Nothing in the folder changes when the check refuses."""

    def __init__(self, run_dir: RunLayout, config: RunConfig, stages: list[Stage], *,
                 start: str | None = None, config_path: str | None = None):
        self.path = run_dir.manifest
        self.run_dir = run_dir
        resolved = public_dump(config)
        version = MANIFEST_VERSION
        if self.path.exists():
            try:
                self.data = read_json(self.path, dict)
            except MapdError as exc:  # "<path>: corrupted manifest (<why>)", as every error names its file first
                why = str(exc).removeprefix(f"{self.path}: ")
                raise MapdError(f"{self.path}: corrupted manifest ({why}); move it away to start over") from None
            version = self.data.get("manifest_version")
            if version not in READABLE_VERSIONS:
                raise MapdError(f"{self.path}: written by another mapd version; use a new --out folder")
            if not isinstance(self.data.get("rounds"), list) or not all(
                    isinstance(entry, dict) and isinstance(entry.get("stages"), dict) for entry in self.data["rounds"]):
                raise MapdError(f"{self.path}: corrupted manifest (rounds: expected a list of rounds with stages); "
                                "move it away to start over")
        else:
            self.data = {"manifest_version": MANIFEST_VERSION, "created": _now(), "rounds": []}
        rounds = max(config.rounds, len(self.data["rounds"]), _round_folders(run_dir))
        self.steps = _steps(stages, resolved, rounds)
        start_index = len(self.steps)
        if start is not None:
            start_index = next(step.index for step in self.steps if step.stage.name == start)
        if "config" in self.data:
            self._check(self.data.get("config") or {}, resolved, version, start_index, config_path)
        if start is not None:
            self._supersede(start, start_index)
        self.data.update(manifest_version=MANIFEST_VERSION, config=resolved, versions=_versions(),
                         seeds=_seeds(config))
        self.save()

    def _record(self, step: Step) -> dict[str, Any] | None:
        """The stored record of a step, or None when it never started."""
        if step.round >= len(self.data["rounds"]):
            return None
        return self.data["rounds"][step.round]["stages"].get(step.stage.name)

    def _check(self, old: dict[str, Any], new: dict[str, Any], version: int, start_index: int,
               config_path: str | None) -> None:
        """Refuse a result-determining change that reaches a stage already run (before ``start_index``);
        accept (and say) the rest. Raises before anything is written."""
        changes = config_changes(old, new)
        operational = [path for path, is_operational in changes if is_operational]
        determining = [path for path, is_operational in changes if not is_operational]
        # the first step that receives each changed field: it and every later step are stale
        first = {path: next((s.index for s in self.steps if path.split(".")[0] in stage_fields(s.stage.run)),
                            len(self.steps)) for path in determining}
        restamp = []
        for step in self.steps[:start_index]:
            record = self._record(step)
            has_run = version == 1 or (record is not None and record.get("status", "pending") != "pending")
            if not has_run or (record is not None and record.get("fingerprint") == step.fingerprint):
                continue
            culprits = sorted((path for path in determining if first[path] <= step.index), key=lambda p: first[p])
            if culprits:
                raise MapdError(self._refusal(culprits, first, version, config_path))
            if record is not None:  # same config, fingerprint missing (version 1) or made by another mapd version
                restamp.append((record, step.fingerprint))
        for record, fingerprint in restamp:
            record["fingerprint"] = fingerprint
        if operational:
            log.info("config changed in operational fields only (%s): accepted, they do not change results",
                     ", ".join(operational))
        if determining:
            step = self.steps[min(min(first.values()), len(self.steps) - 1)]
            why = (f"--from {self.steps[start_index].stage.name} redoes the stages they change"
                   if start_index < len(self.steps) and min(first.values()) >= start_index
                   else "no stage they change has run yet")
            log.info("config changed in %s (first changes stage '%s', round %d): accepted, %s",
                     ", ".join(determining), step.stage.name, step.round, why)

    def _refusal(self, culprits: list[str], first: dict[str, int], version: int, config_path: str | None) -> str:
        step = self.steps[first[culprits[0]]]
        more = f" (and {len(culprits) - 1} more: {', '.join(culprits[1:])})" if len(culprits) > 1 else ""
        command = " ".join(["mapd run", *([shlex.quote(config_path)] if config_path else []),
                            "--out", shlex.quote(str(self.run_dir.dir)), "--from", step.stage.name])
        older = (" (its manifest.json predates per-stage fingerprints: every stage counts as run)"
                 if version == 1 else "")
        return (f"{self.run_dir.dir}: holds a run with a different config{older}: config field {culprits[0]}{more} "
                f"changed since this run began; it changes stage '{step.stage.name}' (round {step.round}) and every "
                f"stage after it: rerun with `{command}` to redo them (their outputs are moved aside), "
                "or use a new --out folder")

    def _supersede(self, start: str, start_index: int) -> None:
        """Move the outputs of step ``start_index`` and every later step (and the report) to
        superseded/<UTC time>/, keeping their paths; mark those steps pending."""
        before = json.loads(json.dumps(self.data))  # as it was, kept beside the outputs it describes
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        root = self.run_dir.dir / SUPERSEDED / stamp
        suffix = 1
        while root.exists():
            suffix += 1
            root = self.run_dir.dir / SUPERSEDED / f"{stamp}-{suffix}"
        paths = [path for step in self.steps[start_index:]
                 for path in step.stage.outputs(self.run_dir.round(step.round))]
        paths += [self.run_dir.report_html, self.run_dir.report_md]
        moved = []
        for path in paths:
            if not (path.exists() or path.is_symlink()):
                continue
            target = root / path.relative_to(self.run_dir.dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved.append(str(path.relative_to(self.run_dir.dir)))
        redone = []
        for step in self.steps[start_index:]:
            record = self._record(step)
            if record is not None and record.get("status") != "pending":
                redone.append(f"{step.stage.name} (round {step.round})")
            if record is not None:
                self.data["rounds"][step.round]["stages"][step.stage.name] = {"status": "pending"}
        for step in self.steps[start_index:]:  # a later round folder left empty goes too
            folder = self.run_dir.round(step.round).dir
            if step.round > 0 and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if moved or redone:
            root.mkdir(parents=True, exist_ok=True)
            write_json(root / "manifest.json", before)
            self.data.setdefault("superseded", []).append(
                {"at": _now(), "from": start, "folder": str(root.relative_to(self.run_dir.dir)), "moved": moved})
            log.info("--from %s: %d output(s) moved aside to %s; redoing %s", start, len(moved), root,
                     ", ".join(redone) or "them")
        else:
            log.info("--from %s: nothing of it has run yet", start)
        self.data.pop("finished", None)

    def stage(self, round_index: int, name: str) -> dict[str, Any]:
        """The mutable record of one stage of one round."""
        while len(self.data["rounds"]) <= round_index:
            self.data["rounds"].append({"round": len(self.data["rounds"]), "stages": {}})
        return self.data["rounds"][round_index]["stages"].setdefault(name, {"status": "pending"})

    def fingerprint(self, round_index: int, name: str) -> str | None:
        return next((s.fingerprint for s in self.steps if s.round == round_index and s.stage.name == name), None)

    def save(self) -> None:
        self.data["updated"] = _now()
        write_json(self.path, self.data)


def _round_folders(run_dir: RunLayout) -> int:
    """How many rounds the folder's round-N/ folders reach (0 when none)."""
    numbers = run_dir.round_numbers()
    return numbers[-1] + 1 if numbers else 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _seeds(config: RunConfig) -> dict[str, int]:
    return {"task": config.task.seed, "build": config.build.seed, "train": config.train.seed}


def _stages() -> list[Stage]:
    from mapd.stages.evaluate import run_eval_after, run_eval_before
    from mapd.stages.build import run_build
    from mapd.stages.mine import run_mine
    from mapd.stages.teach import run_teach
    from mapd.stages.train import run_train

    stages = [
        Stage("eval_before", run_eval_before, lambda f: [f.eval_before.metrics], lambda f: [f.eval_before.dir],
              first_round_only=True),
        Stage("mine", run_mine, lambda f: [f.mistakes], lambda f: [f.mistakes]),
        Stage("teach", run_teach, lambda f: [f.feedback, f.rationales],
              lambda f: [f.feedback, f.rationales, f.teach_stats]),
        Stage("build", run_build, lambda f: [f.train], lambda f: [f.train]),
        Stage("train", run_train, lambda f: [f.model_done], lambda f: [f.model]),
        Stage("eval_after", run_eval_after, lambda f: [f.eval_after.metrics], lambda f: [f.eval_after.dir]),
    ]
    assert tuple(stage.name for stage in stages) == STAGE_NAMES
    return stages


def _record_comparison(manifest: Manifest, round_index: int, run_dir: RunLayout) -> None:
    """Add to a round's eval_after summary the 95 % interval of its accuracy and its paired comparison with
    the base student (round 0's eval_before): gained, lost, the exact McNemar p (mapd.report.eval_summary)."""
    from mapd.report import eval_summary

    record = manifest.stage(round_index, "eval_after")
    extra = eval_summary(run_dir.round(0).eval_before, run_dir.round(round_index).eval_after)
    record["summary"] = {**(record.get("summary") or {}), **extra}
    manifest.save()


def _redacted(config: RunConfig, text: str) -> str:
    """``text`` without the credentials of the config's endpoints (those whose variables are set) and anything
    that looks like a key, as the call path and ``mapd check`` redact an endpoint's errors."""
    secrets: list[str] = []
    for teacher in config.teachers:
        if teacher.base_url:
            try:
                secrets += endpoint(teacher, api_key(teacher.api_key_env, teacher.name)).secrets
            except MapdError:  # an unset variable: nothing of it can be in the text
                pass
    return Redactor(secrets, key_like=True)(text)


def _run_stage(manifest: Manifest, round_index: int, stage: Stage, folder: RoundLayout, config: RunConfig) -> Any:
    """Run ``stage`` unless it is done and its outputs exist; record timing, summary and fingerprint.
    An ``IncompleteStage`` is recorded as ``incomplete`` (with its message), an interrupt (Ctrl-C, SIGTERM)
    as ``interrupted``, any other exception as ``failed`` (with its redacted text); each is raised again."""
    record = manifest.stage(round_index, stage.name)
    if record.get("status") == "done" and all(path.exists() for path in stage.done(folder)):
        say(f"[round {round_index}] {stage.name}: done earlier, skipped")
        return record.get("summary")
    say(f"[round {round_index}] {stage.name} ...")
    record.pop("error", None)
    record.update(status="running", started=_now(), fingerprint=manifest.fingerprint(round_index, stage.name))
    manifest.save()
    start = time.perf_counter()
    try:
        summary = stage.run(folder, **stage_sections(stage.run, config))
    except BaseException as exc:  # whatever ends the stage, it is never left "running"
        seconds = round(time.perf_counter() - start, 2)
        if isinstance(exc, IncompleteStage):
            record.update(status="incomplete", seconds=seconds, error=str(exc), finished=_now())
            if exc.summary is not None:
                record["summary"] = exc.summary
        elif isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM (mapd.cli)
            record.update(status="interrupted", seconds=seconds, finished=_now())
        else:  # a server or command that failed, an OSError, a bug: its text, keys taken out
            record.update(status="failed", seconds=seconds, error=_redacted(config, str(exc) or type(exc).__name__),
                          finished=_now())
        manifest.save()
        raise
    record.update(status="done", seconds=round(time.perf_counter() - start, 2), summary=summary, finished=_now())
    manifest.save()
    return summary


@dataclass(frozen=True)
class RunProblem:
    """One thing ``mapd run`` refuses before its first stage: ``message`` is what ``mapd run`` raises; ``at`` the
    config file and field, where the message does not name them itself (a local model's error names the model)."""

    message: str
    at: str | None = None

    def __str__(self) -> str:
        return f"{self.at}: {self.message}" if self.at else self.message


def run_problems(config: RunConfig, source: str, *, assemble: bool = True) -> list[RunProblem]:
    """What fails a run only at a later stage, checked before the first one, every problem found (``mapd run``
    raises the first, ``mapd check`` lists them all): the committee (at least one teacher; two with peer review
    on), the teacher a ``single:<teacher>`` build mode names, the programs ``train.launch`` and the ``serve``
    templates run, and the local models of the student and the teachers (``assemble`` off: an embedded model is
    checked, not assembled, so nothing is written). ``source`` is the config file the problems name."""
    from mapd.serve import command_missing
    from mapd.stages.review import check_committee

    problems = []
    names = [teacher.name for teacher in config.teachers]
    try:
        check_committee(names, config.review, source)
    except MapdError as exc:
        problems.append(RunProblem(str(exc)))
    single = config.build.single
    if single is not None and single not in names:
        problems.append(RunProblem(f"{source}: build.mode: {config.build.mode}: teacher '{single}' is not in the "
                                   f"config (teachers: {', '.join(names)})"))
    commands = [("train.launch", config.train.launch), ("student.serve", config.student.serve)]
    commands += [(f"teachers.{i}.serve ({t.name})", t.serve) for i, t in enumerate(config.teachers)]
    for field, line in commands:
        if line and (program := command_missing(line)):
            problems.append(RunProblem(f"{source}: {field}: {program}: no such command, on PATH or beside mapd's "
                                       f"Python ({Path(sys.executable).parent})"))
    assemble = assemble and not problems  # a run refused already assembles nothing (the models are still checked)
    if not config.student.base_url:  # a running server's model is only a name
        try:
            resolve_model(config.student.model, config.student.gguf_file, assemble)
        except MapdError as exc:
            problems.append(RunProblem(str(exc), f"{source}: student.model"))
    for index, teacher in enumerate(config.teachers):
        try:
            check_local_teachers([teacher], assemble)
        except MapdError as exc:
            problems.append(RunProblem(str(exc), f"{source}: teachers.{index} ({teacher.name}): model"))
    return problems


def default_run_dir(config_path: str | None) -> Path:
    """runs/<config file stem>, or runs/default for the embedded demo."""
    return Path("runs") / (Path(config_path).stem if config_path else "default")


def run(config_path: str | None, out: Path | None = None, start: str | None = None) -> Path:
    """Run (or continue) every stage of every round; returns the run folder. ``start`` (``--from``): redo
    round 0's stage of that name and every stage after it, moving their outputs aside first."""
    from mapd.report import write_report

    if start is not None and start not in STAGE_NAMES:
        raise MapdError(f"--from {start}: not a stage (stages, in order: {', '.join(STAGE_NAMES)})")
    config = load_config(config_path) if config_path else embedded_default_config()
    # what would fail a later stage (a mistyped local model path, say) fails now, before the first one
    problems = run_problems(config, config_path or str(EMBEDDED_DEFAULT))
    if problems:
        raise MapdError(problems[0].message)
    if config_path is None:
        say(
            "mapd: running the offline demonstration (embedded default): a 0.5B local committee teaches a "
            "135M student one-digit sums, about 10 minutes on 2 CPU cores (docs/default-run.md). For real "
            "teaching, point `teachers:` at real endpoints (mapd init paper-committee)."
        )
    run_dir = RunLayout(out or default_run_dir(config_path))
    if config.task.path is not None:  # bad local data fails now, before the run folder is made
        task = get_task(config.task)
        task.load(config.task.test_split, config.task.test_limit)
        task.load(config.task.train_split, config.task.train_limit)
    stages = _stages()
    with folder_lock(run_dir.dir), server_pool() as servers:  # a served student: started once, kept between stages
        manifest = Manifest(run_dir, config, stages, start=start, config_path=config_path)
        if config.cache_path is None:
            config = config.model_copy(update={"cache_path": str(run_dir.cache)})
        for round_index in range(config.rounds):
            folder = run_dir.round(round_index)
            for stage in stages:
                if stage.first_round_only and round_index > 0:
                    continue
                if stage.name == "train":
                    servers.stop()  # training needs the device the student's server holds
                summary = _run_stage(manifest, round_index, stage, folder, config)
                if stage.name == "eval_after":
                    _record_comparison(manifest, round_index, run_dir)
                    card_from_run(run_dir.dir, round_index)  # the model card, now with its accuracy
                if stage.name == "mine" and summary and summary.get("correct") == summary.get("n"):
                    say(f"[round {round_index}] the student made no mistakes on the train split: nothing to teach")
                    break
            else:  # the next round mines the mistakes of the student this round trained
                config = config.model_copy(update={"student": trained_student(config.student, folder.model)})
                continue
            break
        manifest.data["finished"] = _now()
        manifest.save()
        report = write_report(run_dir.dir)
        say(f"mapd: run complete: {run_dir.dir} (report: {report})")
        return run_dir.dir
