"""Every file name of a run folder and a round folder, in one place (docs/formats.md#run-folder-layout).

The runner, the stage commands, the report and import-reference all name files through these
objects. A folder made by ``mapd teach`` or ``mapd import-reference`` is a round folder on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


CACHE = "cache.sqlite"  # a call cache (mapd.llm.CallCache)
SERVER_LOG = "server.log"  # the output of a server mapd started (mapd.serve)
TRAIN_SUMMARY = "train_summary.json"  # in a model folder: what train_model returned (steps, loss, world_size, ...)


def _file(*parts: str) -> property:
    """A path inside the layout's folder, named once here."""
    return property(lambda self: self.dir.joinpath(*parts))


@dataclass(frozen=True)
class EvalLayout:
    """An evaluation folder: ``mapd eval --out``, ``round-N/eval_before`` or ``round-N/eval_after``."""

    dir: Path
    predictions = _file("predictions.jsonl")
    metrics = _file("metrics.json")
    default_cache = _file(CACHE)  # the call cache of a served student, when no cache_path is given
    server_log = _file(SERVER_LOG)


@dataclass(frozen=True)
class RoundLayout:
    """One round's folder. ``mistakes_file`` points elsewhere for ``mapd teach --mistakes F``."""

    dir: Path
    mistakes_file: Path | None = None
    feedback = _file("feedback.jsonl")
    rationales = _file("rationales.jsonl")
    teach_stats = _file("teach_stats.json")
    train = _file("train.jsonl")
    model = _file("model")  # the trained student: a folder from_pretrained loads
    model_done = _file("model", "config.json")  # written last when training saves
    train_log = _file("model", "train_log.jsonl")
    default_cache = _file(CACHE)  # the call cache of a stage command run on this folder alone
    server_log = _file(SERVER_LOG)  # what a served student's server prints (mine)

    @property
    def mistakes(self) -> Path:
        return self.mistakes_file or self.dir / "mistakes.jsonl"

    @property
    def eval_before(self) -> EvalLayout:
        return EvalLayout(self.dir / "eval_before")

    @property
    def eval_after(self) -> EvalLayout:
        return EvalLayout(self.dir / "eval_after")


@dataclass(frozen=True)
class RunLayout:
    """A ``mapd run`` folder: manifest, call cache, report, and one folder per round."""

    dir: Path
    manifest = _file("manifest.json")
    cache = _file(CACHE)
    report_html = _file("report.html")
    report_md = _file("report.md")

    def round(self, index: int) -> RoundLayout:
        return RoundLayout(self.dir / f"round-{index}")

    def round_numbers(self) -> list[int]:
        """The numbers of the round-N/ folders present, in order."""
        return sorted(int(p.name.split("-")[1]) for p in self.dir.glob("round-*")
                      if p.is_dir() and re.fullmatch(r"round-\d+", p.name))

    def rounds(self) -> list[RoundLayout]:
        """The round folders present, in round order; the folder itself when it is a round folder alone."""
        numbers = self.round_numbers()
        if numbers:
            return [self.round(number) for number in numbers]
        alone = RoundLayout(self.dir)
        files = (alone.mistakes, alone.feedback, alone.rationales, alone.teach_stats, alone.train, alone.train_log,
                 *(path for e in (alone.eval_before, alone.eval_after) for path in (e.metrics, e.predictions)))
        return [alone] if any(path.exists() for path in files) else []
