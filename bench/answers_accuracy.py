"""Accuracy of mapd.answers on a labelled sample of real model outputs, next to the naive rules.

    python bench/answers_accuracy.py            # the tables in docs/answers.md
    python bench/answers_accuracy.py --misses   # also every text where ours disagrees with the label

Each line of tests/data/labelled_answers.jsonl says what one text commits to as its final answer,
as read by a person (``null``: no committed answer). The texts themselves are not in the repository:
they are read from the paper's reference data, the folder $MAPD_REFERENCE_DATA names (bench/_common.py).

The labelled texts are three seeded random draws (``draws`` reproduces them) plus a few hand-picked
hard cases ("extra", reported apart):
- dev (seed 731): 70 SVAMP student outputs, 72 SVAMP teacher rationales (24 per teacher), 70
  StrategyQA student outputs; the extractor was developed while reading these;
- holdout1 (seed 732) and holdout2 (seed 733): 30 + 30 (10 per teacher) + 30 each, drawn from the
  texts not drawn before and labelled before the extractor was run on them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench._common

from bench._common import reference_data, reference_rule  # noqa: E402

from mapd.answers import extract  # noqa: E402

LABELS = REPO / "tests" / "data" / "labelled_answers.jsonl"
TEACHERS = ("gpt", "gemini", "mistral")
FILES = {
    "svamp_student": "Llama-2-7b-chat-hf_svamp_false_round0.json",
    "svamp_rationale": "Llama-2-7b-chat-hf_svamp_rationale_round0.json",
    "strategyqa_student": "Llama-2-7b-chat-hf_strategyQA_false_round0.json",
}
GROUPS = ("svamp_student", "svamp_rationale", "strategyqa_student")
SAMPLES = ("dev", "holdout1", "holdout2")

Ref = tuple[str, int]  # (source, ref_id), source like "svamp_student" or "svamp_rationale:gpt"


def _records(ref_dir: Path) -> dict[str, list[dict]]:
    return {group: json.loads((ref_dir / name).read_text()) for group, name in FILES.items()}


def load_texts(ref_dir: Path) -> dict[Ref, str]:
    """Every text by (source, ref_id); ref_id is the record's ``id`` in the reference file."""
    texts = {}
    for group, records in _records(ref_dir).items():
        for record in records:
            if group == "svamp_rationale":
                for teacher in TEACHERS:
                    texts[(f"{group}:{teacher}", record["id"])] = record[f"{teacher}_rationale"][0]
            else:
                texts[(group, record["id"])] = record["student_wrong_pred"]
    return texts


def draws(ref_dir: Path, extra: set[Ref]) -> dict[str, list[Ref]]:
    """The three seeded draws the labels cover (holdouts exclude every text drawn or picked before)."""
    records = _records(ref_dir)
    student, rationale, strategyqa = records["svamp_student"], records["svamp_rationale"], records["strategyqa_student"]
    rng = random.Random(731)
    dev = [("svamp_student", r["id"]) for r in rng.sample(student, 70)]
    dev += [(f"svamp_rationale:{TEACHERS[i % 3]}", r["id"]) for i, r in enumerate(rng.sample(rationale, 72))]
    dev += [("strategyqa_student", r["id"]) for r in rng.sample(strategyqa, 70)]
    out, used = {"dev": dev}, set(dev) | extra
    for name, seed in (("holdout1", 732), ("holdout2", 733)):
        rng = random.Random(seed)
        fresh = [r for r in student if ("svamp_student", r["id"]) not in used]
        refs = [("svamp_student", r["id"]) for r in rng.sample(fresh, 30)]
        pool = [(f"svamp_rationale:{t}", r["id"]) for r in rationale for t in TEACHERS]
        for teacher in TEACHERS:
            mine = [p for p in pool if p[0] == f"svamp_rationale:{teacher}" and p not in used]
            refs += sorted(rng.sample(mine, 10))
        refs += [("strategyqa_student", r["id"])
                 for r in rng.sample([r for r in strategyqa if ("strategyqa_student", r["id"]) not in used], 30)]
        out[name] = refs
        used |= set(refs)
    return out


def load_labels(path: Path = LABELS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Row:
    group: str
    n: int = 0
    naive_right: int = 0
    ours_right: int = 0

    @property
    def naive_rate(self) -> float:
        return self.naive_right / self.n if self.n else 0.0

    @property
    def ours_rate(self) -> float:
        return self.ours_right / self.n if self.n else 0.0


def measure(labels: list[dict], texts: dict[Ref, str]) -> tuple[dict[str, Row], list[dict]]:
    """Rows keyed by group ("svamp_student", ...), teacher ("svamp_rationale:gpt"), sample
    ("dev/svamp_student", ...) and "extra"; plus every text where ours disagrees with the label.

    The group and teacher rows cover the three random draws; the hand-picked extras are apart.
    """
    rows: dict[str, Row] = {}
    misses = []
    for label in labels:
        text = texts[(label["source"], label["ref_id"])]
        ours = extract(text, label["kind"]).answer
        group = label["source"].split(":")[0]
        if label["sample"] == "extra":
            keys = ["extra"]
        else:
            keys = [group, f"{label['sample']}/{group}"] + ([label["source"]] if ":" in label["source"] else [])
        for key in keys:
            row = rows.setdefault(key, Row(key))
            row.n += 1
            row.naive_right += reference_rule(text, label["kind"]) == label["label"]
            row.ours_right += ours == label["label"]
        if ours != label["label"]:
            misses.append({**label, "ours": ours, "text": text})
    return rows, misses


def table(rows: dict[str, Row], keys: list[str]) -> str:
    lines = ["| group | n | naive | ours |", "|---|---|---|---|"]
    for key in keys:
        if key in rows:
            r = rows[key]
            naive_cell, ours_cell = f"{r.naive_rate:.1%} ({r.naive_right})", f"{r.ours_rate:.1%} ({r.ours_right})"
            lines.append(f"| {key} | {r.n} | {naive_cell} | {ours_cell} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true", help="print the texts where ours disagrees with the label")
    args = parser.parse_args()
    rows, misses = measure(load_labels(), load_texts(reference_data()))
    print("All three random draws:\n")
    print(table(rows, list(GROUPS) + [f"svamp_rationale:{t}" for t in TEACHERS]))
    print("\nBy draw (dev: read while developing; holdouts: labelled before the extractor saw them):\n")
    print(table(rows, [f"{s}/{g}" for s in SAMPLES for g in GROUPS] + ["extra"]))
    if args.misses:
        for miss in misses:
            print(f"\n--- {miss['sample']} {miss['source']} {miss['ref_id']}: label {miss['label']!r}, "
                  f"ours {miss['ours']!r} ({miss['why']})")
            print(miss["text"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
