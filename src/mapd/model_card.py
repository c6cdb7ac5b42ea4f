"""The trained model folder as one would upload it to the Hugging Face Hub: weights readable like any other
file, checkpoints out of it, and a model card (README.md with YAML metadata) saying what made it.

``mapd train`` writes the card with what it knows (base model, training pairs, steps, the command);
``mapd run`` writes it again after the round's evaluation, adding the task, the committee and the accuracy
before and after training with their 95 % intervals (:func:`card_from_run`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from mapd.records import Metrics, TrainingPair
from mapd.stats import accuracy_interval

CARD = "README.md"
CHECKPOINTS_SUFFIX = "-checkpoints"  # <model folder>-checkpoints/: where keep_checkpoints moves them
PAPER = ("Zhuochun Li, Yuelyu Ji, Rui Meng, Daqing He. Learning from Committee: Reasoning Distillation from a "
         "Mixture of Teachers with Peer-Review. Findings of ACL 2025. arXiv:2410.03663")
BIBTEX = """@inproceedings{li2025learning,
  title     = {Learning from Committee: Reasoning Distillation from a Mixture of Teachers with Peer-Review},
  author    = {Li, Zhuochun and Ji, Yuelyu and Meng, Rui and He, Daqing},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2025},
  year      = {2025},
  eprint    = {2410.03663},
  archivePrefix = {arXiv}
}"""


def finish_model_folder(out_dir: Path, keep_checkpoints: str) -> None:
    """After the final save: every file readable like any other (0644; the weights are written 0600), and the
    ``checkpoint-N`` folders deleted (``keep_checkpoints`` none), moved to ``<out_dir>-checkpoints/`` (apart) or
    left (in_place)."""
    out_dir = Path(out_dir)
    checkpoints = [] if keep_checkpoints == "in_place" else sorted(p for p in out_dir.glob("checkpoint-*") if p.is_dir())
    if keep_checkpoints == "apart" and checkpoints:
        apart = out_dir.with_name(out_dir.name + CHECKPOINTS_SUFFIX)
        apart.mkdir(exist_ok=True)
        for checkpoint in checkpoints:
            if (apart / checkpoint.name).exists():  # a retrained model's checkpoint of the same step
                shutil.rmtree(apart / checkpoint.name)
            shutil.move(str(checkpoint), apart / checkpoint.name)
    else:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _hub_id(name: str) -> str | None:
    """``name`` when it reads as a Hub repository id (``org/model``), not a path or an embedded model."""
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).expanduser().exists() else None


def _interval(metrics: Metrics) -> list[float]:
    """The 95 % Wilson interval of an evaluation's accuracy, rounded for the card."""
    return [round(bound, 4) for bound in accuracy_interval(metrics.accuracy, metrics.n)]


def _accuracy(metrics: Metrics | None) -> str:
    if metrics is None:
        return "not measured"
    low, high = _interval(metrics)
    return (f"{100 * metrics.accuracy:.1f} % on {metrics.n} questions ({metrics.task}/{metrics.split}), "
            f"95 % interval {100 * low:.1f}–{100 * high:.1f} %")


def write_model_card(out_dir: Path, *, base_model: str, pairs: list[TrainingPair], steps: int | None = None,
                     task: str | None = None, teachers: list[str] | None = None,
                     before: Metrics | None = None, after: Metrics | None = None, command: str | None = None) -> Path:
    """Write ``out_dir/README.md``: YAML metadata (base_model, tags, task, committee, training pairs, mapd
    version) and what made the model, with the accuracy before and after training where it was measured."""
    kinds = Counter(pair.kind for pair in pairs)
    by_teacher = Counter(pair.teacher for pair in pairs)
    committee = teachers or sorted(by_teacher)
    version = metadata.version("mapd")
    command = command or shlex.join(["mapd", *sys.argv[1:]])
    meta: dict[str, Any] = {}
    if _hub_id(base_model):
        meta["base_model"] = base_model
    meta.update({
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mapd", "distillation", "reasoning", "peer-review", *([f"task:{task}"] if task else [])],
        "mapd": {"version": version, "task": task, "committee": committee,
                 "training_pairs": {"feedback": kinds["feedback"], "rationale": kinds["rationale"]},
                 "steps": steps, "command": command},
    })
    for name, metrics in (("accuracy_before", before), ("accuracy_after", after)):
        if metrics is not None:
            meta["mapd"][name] = {"value": round(metrics.accuracy, 4), "ci95": _interval(metrics), "n": metrics.n,
                                  "split": metrics.split}
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {Path(out_dir).name}: {base_model} taught by a committee of teachers", "",
        f"This model is **{base_model}** fine-tuned with mapd {version} by mistake-aware peer-review distillation "
        f"(the method of *Learning from Committee*, Li et al., ACL Findings 2025): the teachers "
        f"({', '.join(committee)}) explained the student's own mistakes"
        + (f" on {task}" if task else "") + " and wrote step-by-step rationales that passed a peer review among "
        "them; the student trained on both with the joint loss.", "",
        "| | |", "|---|---|",
        f"| base model | {base_model} |",
        f"| task | {task or 'not recorded (mapd train alone)'} |",
        f"| committee | {', '.join(committee)} |",
        f"| training pairs | {len(pairs)}: {kinds['feedback']} feedback, {kinds['rationale']} rationale "
        f"({', '.join(f'{name} {n}' for name, n in sorted(by_teacher.items()))}) |",
        f"| steps | {steps if steps is not None else '—'} |",
        f"| accuracy before training | {_accuracy(before)} |",
        f"| accuracy after training | {_accuracy(after)} |",
        f"| made by | `{command}` (mapd {version}) |", "",
        "Greedy decoding as mapd evaluates (the tokenizer's chat template, the prompts of the run's config). "
        "Accuracy intervals are 95 % Wilson intervals.", "",
        "## Citation", "", PAPER, "", "```bibtex", BIBTEX, "```", "",
    ]
    path, text = Path(out_dir) / CARD, "\n".join(lines)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # a resumed run leaves the same card alone
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
    return path


def card_from_run(run_dir: Path, round_index: int) -> Path | None:
    """Write a round's model card from its run folder (the manifest's task, student and committee, train.jsonl,
    the model's train_summary.json, the base student's eval_before and this round's eval_after); None when the
    round has no trained model."""
    from mapd.io import read_json
    from mapd.layout import TRAIN_SUMMARY, RunLayout
    from mapd.records import read_document, read_records

    run = RunLayout(Path(run_dir))
    folder = run.round(round_index)
    if not folder.model_done.is_file():
        return None
    config = (read_json(run.manifest) if run.manifest.is_file() else {}).get("config") or {}
    summary = read_json(folder.model / TRAIN_SUMMARY) if (folder.model / TRAIN_SUMMARY).is_file() else {}

    def metrics(path: Path) -> Metrics | None:
        return read_document(path, Metrics) if path.is_file() else None

    return write_model_card(
        folder.model, base_model=(config.get("student") or {}).get("model", "the student"),
        pairs=read_records(folder.train, TrainingPair), steps=summary.get("steps"),
        task=(config.get("task") or {}).get("name"), teachers=[t.get("name") for t in config.get("teachers") or []],
        before=metrics(run.round(0).eval_before.metrics), after=metrics(folder.eval_after.metrics),
    )
