"""Accuracy of mapd.answers on model outputs cut off at the token limit and finished ones, four tasks.

    python bench/answers_cutoff.py              # the tables in docs/answers.md ("cut-off set")
    python bench/answers_cutoff.py --misses     # also every text where ours disagrees with the label
    python bench/answers_cutoff.py --show dev   # print a sample's texts (for labelling), no extraction

The texts are in tests/data/answers_cutoff.jsonl: greedy answers of SmolLM2-135M-Instruct and
Qwen2.5-Coder-0.5B-Instruct to seeded draws of GSM8K, SVAMP, StrategyQA and LogiQA test questions at
two token limits (collected by bench/answers_collect.py). Each line has the model, task, split,
ref_id (the question's id in the task's test split), max_new_tokens, cut_off (the model used every
token), the text, the gold answer and, labelled by a person reading the text alone: ``label`` (the
answer the text commits to, null for none) and ``why``. Options of LogiQA questions are read from
$MAPD_SHARED_DATA/logiqa/test.jsonl (bench/_common.py). The last line printed is how often
``mapd.answers.unfinished`` (the text alone) agrees with the token count on which texts were cut off.

``sample`` is "dev" (read while the rules were written), "holdout" (a seeded ~35 % draw of the 96- and
256-token texts, decided before any text was read, labelled without looking at the extractor's output
and never used to write rules) or "holdout2" (every text at a third limit, 160 tokens, generated and
labelled after the rules were frozen); the holdout figures are reported apart.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench._common

from bench._common import naive, shared_data  # noqa: E402

from mapd.answers import extract, unfinished  # noqa: E402

DATA = REPO / "tests" / "data"
SET = DATA / "answers_cutoff.jsonl"
MODELS = ("smollm2", "qwen")
TASKS = ("gsm8k", "svamp", "strategyqa", "logiqa")
HOLDOUT_SHARE = 0.35
HOLDOUT2_LIMIT = 160  # a third token limit, collected and labelled after the rules were frozen


def sample_of(record: dict) -> str:
    """dev, holdout or holdout2, from the text's identity alone (fixed before any text was read)."""
    if record["max_new_tokens"] == HOLDOUT2_LIMIT:
        return "holdout2"
    key = f"holdout/{record['model']}/{record['max_new_tokens']}/{record['task']}/{record['ref_id']}"
    return "holdout" if random.Random(key).random() < HOLDOUT_SHARE else "dev"


def load_set(path: Path = SET) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_options(data: Path | None = None) -> dict[str, list[str]]:
    """LogiQA options by ref id (test split)."""
    data = data or shared_data()
    rows = map(json.loads, (data / "logiqa" / "test.jsonl").read_text().splitlines())
    return {str(row["id"]): row["options"] for row in rows}


def ours(record: dict, options: dict[str, list[str]], complete: str = "known") -> str | None:
    """Our extraction; ``complete`` "known" passes the cut-off flag, "unknown" lets the extractor judge."""
    flag = None if complete == "unknown" else not record["cut_off"]
    opts = options.get(record["ref_id"]) if record["task"] == "logiqa" else None
    return extract(record["text"], record["kind"], opts, complete=flag).answer


def measure(records: list[dict], options: dict[str, list[str]], complete: str = "known"):
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, naive right, ours right
    misses = []
    for r in records:
        got = ours(r, options, complete)
        keys = ["all", r["model"], r["task"], f"{r['model']}/{r['task']}", f"limit {r['max_new_tokens']}",
                "cut off" if r["cut_off"] else "finished", r["sample"], f"{r['sample']}/{r['model']}",
                f"{r['sample']}/{'cut off' if r['cut_off'] else 'finished'}"]
        for key in keys:
            row = rows[key]
            row[0] += 1
            row[1] += naive(r["text"], r["kind"]) == r["label"]
            row[2] += got == r["label"]
        if got != r["label"]:
            misses.append({**r, "ours": got})
    return rows, misses


def unfinished_agreement(records: list[dict]) -> str:
    """How often ``unfinished(text)`` says what the token count says (``cut_off``)."""
    cut = [r for r in records if r["cut_off"]]
    finished = [r for r in records if not r["cut_off"]]
    flagged_cut = sum(unfinished(r["text"]) for r in cut)
    flagged_finished = sum(unfinished(r["text"]) for r in finished)
    agree = flagged_cut + len(finished) - flagged_finished
    return (f"unfinished() agrees with the token count on {agree} of {len(records)} texts: it flags {flagged_cut} "
            f"of the {len(cut)} cut-off texts and {flagged_finished} of the {len(finished)} finished ones")


def table(rows, keys) -> str:
    lines = ["| group | n | naive | ours |", "|---|---|---|---|"]
    for key in keys:
        if key in rows:
            n, nv, us = rows[key]
            lines.append(f"| {key} | {n} | {nv / n:.1%} ({nv}) | {us / n:.1%} ({us}) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--misses", action="store_true")
    parser.add_argument("--show", choices=("dev", "holdout"), help="print the texts of a sample and stop")
    parser.add_argument("--complete", choices=("known", "unknown"), default="known",
                        help="pass the cut-off flag to extract (known) or let it judge from the text (unknown)")
    parser.add_argument("--set", type=Path, default=SET)
    args = parser.parse_args()
    records = load_set(args.set)
    for r in records:
        r.setdefault("sample", sample_of(r))
    if args.show:
        for r in records:
            if r["sample"] == args.show:
                print(f"\n===== {r['model']} {r['max_new_tokens']} {r['task']} {r['ref_id']} "
                      f"cut_off={r['cut_off']} gold={r['gold']}\n{r['text']}")
        return 0
    rows, misses = measure(records, load_options(), args.complete)
    print(f"complete={args.complete}\n")
    print(table(rows, ["all", *MODELS, *TASKS, *(f"{m}/{t}" for m in MODELS for t in TASKS),
                       "limit 96", "limit 160", "limit 256", "cut off", "finished"]))
    print("\nBy sample (dev: read while writing rules; holdout: never read for rules):\n")
    samples = ("dev", "holdout", "holdout2")
    print(table(rows, [*samples, *(f"{s}/{m}" for s in samples for m in MODELS),
                       *(f"{s}/{c}" for s in samples for c in ("cut off", "finished"))]))
    if args.misses:
        for m in misses:
            print(f"\n--- {m['sample']} {m['model']} {m['max_new_tokens']} {m['task']} {m['ref_id']} "
                  f"cut_off={m['cut_off']}: label {m['label']!r}, ours {m['ours']!r} ({m.get('why', '')})")
            print(m["text"])
    print("\n" + unfinished_agreement(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
