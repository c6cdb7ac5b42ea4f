"""The embedded default, measured: run `mapd run` (no config) into a fresh folder, print wall time, peak
memory, stage shares and the paired result, and, given a second finished run folder, whether the two runs
made byte-identical records (docs/default-run.md).

    python bench/default_run.py --out /tmp/default-a                        # one run, its figures
    python bench/default_run.py --out /tmp/default-b --same-as /tmp/default-a
    python bench/default_run.py --compare /tmp/default-a /tmp/default-b     # two finished folders only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# What "the same run" means: these records byte for byte (timings, logs and statistics aside).
RECORDS = ["round-0/mistakes.jsonl", "round-0/feedback.jsonl", "round-0/rationales.jsonl", "round-0/train.jsonl",
           "round-0/eval_before/predictions.jsonl", "round-0/eval_after/predictions.jsonl"]


def run(out: Path) -> float:
    """`mapd run --out OUT` in a child process; its wall seconds (exit status checked)."""
    if out.exists():
        sys.exit(f"{out} exists: the figures are for a fresh folder")
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mapd.cli", "run", "--out", str(out)], check=True)
    return time.perf_counter() - began


def figures(out: Path, seconds: float | None) -> None:
    """Print the run's stage shares, its paired result and (when it ran here) wall time and peak memory."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    stages = manifest["rounds"][0]["stages"]
    total = sum(stage.get("seconds") or 0 for stage in stages.values())
    if seconds is not None:
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
        print(f"wall {seconds / 60:.1f} min ({seconds:.0f} s), peak RSS {peak_gb:.1f} GB, "
              f"load average at the end {os.getloadavg()[0]:.1f}")
    for name, stage in stages.items():
        share = (stage.get("seconds") or 0) / total if total else 0
        print(f"  {name:12s} {stage.get('seconds') or 0:7.0f} s  {share:4.0%}")
    after = stages["eval_after"].get("summary", {})
    before = json.loads((out / "round-0/eval_before/metrics.json").read_text(encoding="utf-8"))
    print(f"before {before['accuracy']:.1%} (cut off {before['cut_off_rate']:.1%}), after {after.get('accuracy', 0):.1%} "
          f"(cut off {after.get('cut_off_rate', 0):.1%}) on {after.get('paired_n')} paired questions: "
          f"{after.get('gained')} gained, {after.get('lost')} lost, exact McNemar p = {after.get('mcnemar_p'):.2g}")
    teach = stages["teach"].get("summary", {})
    print(f"teach: {teach.get('mistakes')} mistakes, {teach.get('accepted')} rationales accepted")


def compare(first: Path, second: Path) -> bool:
    """Print, per record file, whether two run folders hold the same bytes; True when all do."""
    same = True
    for name in RECORDS:
        equal = (first / name).read_bytes() == (second / name).read_bytes()
        same &= equal
        print(f"  {name}: {'identical' if equal else 'DIFFERENT'}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="a fresh folder to run the default into")
    parser.add_argument("--same-as", type=Path, help="a finished default run to compare the new one with")
    parser.add_argument("--compare", type=Path, nargs=2, metavar="RUN", help="only compare two finished runs")
    args = parser.parse_args()
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    if not args.out:
        parser.error("--out or --compare is required")
    figures(args.out, run(args.out))
    if args.same_as and not compare(args.same_as, args.out):
        sys.exit(1)


if __name__ == "__main__":
    main()
