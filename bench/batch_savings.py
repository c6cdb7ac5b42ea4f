"""What a committee saves through the Batch API: the same `mapd teach` job against the local batch server
(tests/batch_server.py) all live, all batch, with an expired first batch and with per-request errors; then
the cost of a GSM8K-size job at list prices, live against batch (docs/batch.md).

    python bench/batch_savings.py [--mistakes 50] [--wrong-fraction 0.6] \\
        [--input-tokens-per-call 300] [--output-tokens-per-call 200]

Each run counts, from the server: live calls, batches created, request lines submitted, custom_ids submitted
more than once, and replies paid more than once (CountingReply); from teach_stats.json: tokens and cost per
teacher, priced as the three example teachers below. The server's replies are canned and short, so the
local token counts show the prompts' shape, not a real job's size: the projection takes its tokens per call
from the flags. Defaults: input ~300 = the prompt templates (~25-85 tokens) + a GSM8K training question
(mean 235 characters, ~59 tokens) + the student's answer (~150 assumed) for feedback or a ~250-token
rationale for a review, averaged over 1 feedback + 1 rationale + 2 reviews; output ~200 = feedback and
rationale ~250 each, reviews ~120 each (a short judgement and its [score]). Tokens are ~4 characters.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.batch_server and tests.reliability_kit

from tests.batch_server import FakeBatchServer  # noqa: E402
from tests.reliability_kit import COMMITTEE, CountingReply, write_teach_setup  # noqa: E402

from mapd.cli import main as mapd_main  # noqa: E402

KEY_ENV = "MAPD_BENCH_KEY"
GSM8K_TRAIN = 7473
BATCH_FACTOR = 0.5  # OpenAI's and Gemini's Batch API price, as a share of the live price
# USD per million tokens, live (standard tier); sources and the dates they were read: docs/batch.md, "Prices
# and where they come from". gemini-3.5-flash-lite replaces gemini-2.5-flash, retired on 1 Dec 2026.
# gpt-5-mini needs temperature: 1 and max_tokens_field: max_completion_tokens.
PRICES = (("gpt-4o-mini", 0.15, 0.60), ("gpt-5-mini", 0.25, 2.00), ("gemini-3.5-flash-lite", 0.30, 2.50))
RUNS = (  # name, server knobs, teacher fields
    ("live", {}, {}),
    ("batch", {}, {"batch": True}),
    ("batch, 1st batch expires half done", {"expire_batches": {0: 0.5}}, {"batch": True}),
    ("batch, 10% request errors", {"batch_error_rate": 0.1}, {"batch": True}),
    ("batch, 10% errors, retry live", {"batch_error_rate": 0.1}, {"batch": True, "batch_retry_live": True}),
)


def teach(folder: Path, server: FakeBatchServer, n: int, fields: dict) -> tuple[int, dict, float]:
    """One `mapd teach` in this process: (exit status, teach_stats.json, seconds)."""
    write_teach_setup(folder, server.base_url, KEY_ENV, n, batch_poll_s=0.05, **fields)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    for teacher, (_, price_in, price_out) in zip(config["teachers"], PRICES):
        teacher.update(price_input_per_mtok=price_in, price_output_per_mtok=price_out)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["-q", "teach", "--config", str(folder / "config.yaml"), "--mistakes", str(folder / "mistakes.jsonl"),
            "--out", str(folder / "out")]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = mapd_main(argv)
    return status, json.loads((folder / "out" / "teach_stats.json").read_text()), time.perf_counter() - started


def per_kind(cache: Path) -> dict[str, tuple[int, float, float]]:
    """Mean input and output tokens per call kind of a batch run: {kind: (calls, input, output)}."""
    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT r.call, c.input_tokens, c.output_tokens FROM batch_requests r "
                          "JOIN calls c ON c.key = r.key WHERE c.text IS NOT NULL").fetchall()
    kinds: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for call, tokens_in, tokens_out in rows:
        kinds[call.split()[0]].append((tokens_in, tokens_out))
    return {kind: (len(v), sum(i for i, _ in v) / len(v), sum(o for _, o in v) / len(v)) for kind, v in kinds.items()}


def measure(n: int) -> None:
    """Run every RUNS entry and print its figures; per-kind tokens of the plain batch run."""
    print(f"local: {n} mistakes x {len(COMMITTEE)} teachers = {n * len(COMMITTEE) * 4} calls "
          f"(feedback, rationale, 2 reviews each); teachers priced as "
          + ", ".join(f"{t} = {m}" for t, (m, *_) in zip(COMMITTEE, PRICES)))
    header = ("run", "exit", "s", "live calls", "batches", "lines", "dup lines", "dup paid", "failed",
              "tokens in", "tokens out", "USD", "vs live")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    live_cost, kinds, teachers = None, {}, ""
    for name, knobs, fields in RUNS:
        reply = CountingReply()
        with FakeBatchServer(reply, seed=7, **knobs) as server, tempfile.TemporaryDirectory() as tmp:
            status, stats, seconds = teach(Path(tmp), server, n, fields)
            if name == "batch":
                kinds = per_kind(Path(tmp) / "out" / "cache.sqlite")
            dup_lines = sum(count - 1 for count in server.submitted_custom_ids.values())
            counts = (server.requests, server.batches_created, server.batch_lines, dup_lines, reply.duplicates)
        tokens_in = sum(row["input_tokens"] for row in stats.values())
        tokens_out = sum(row["output_tokens"] for row in stats.values())
        cost = sum(row["cost_usd"] for row in stats.values())
        live_cost = cost if live_cost is None else live_cost
        failed = sum(row["failures"] + row["not_made"] for row in stats.values())
        print(f"| {name} | {status} | {seconds:.1f} | " + " | ".join(str(c) for c in (*counts, failed))
              + f" | {tokens_in} | {tokens_out} | {cost:.6f} | {cost / live_cost:.3f} |")
        if name == "batch":
            teachers = "\n".join(
                f"  {t:<8} {r['calls']} calls, {r['batch_calls']} by batch in {r['batches']} batches, "
                f"{r['input_tokens']} in / {r['output_tokens']} out, {r['cost_usd']:.6f} USD "
                f"(batch_cost_usd {r['batch_cost_usd']:.6f})" for t, r in stats.items())
    print(f"\nper teacher, batch run:\n{teachers}")
    print("\nlocal tokens per call kind (batch run; templates + toy questions in, canned replies out):")
    for kind, (calls, tokens_in, tokens_out) in sorted(kinds.items()):
        print(f"  {kind:<9} {calls:4d} calls  {tokens_in:6.1f} in  {tokens_out:5.1f} out")


def project(wrong: float, tokens_in: int, tokens_out: int) -> None:
    """The GSM8K-size job at list prices: every teacher 1 feedback + 1 rationale + 2 reviews per mistake."""
    mistakes = round(GSM8K_TRAIN * wrong)
    calls = mistakes * 4
    print(f"\nGSM8K projection: {GSM8K_TRAIN:,} training questions, the student wrong on {wrong:.0%} = "
          f"{mistakes:,} mistakes; {calls:,} calls per teacher, {len(PRICES) * calls:,} in all; "
          f"{tokens_in} input + {tokens_out} output tokens per call")
    print("| teacher | USD/M in | USD/M out | input Mtok | output Mtok | live USD | batch USD | saved USD |\n"
          "|---|---|---|---|---|---|---|---|")
    m_in, m_out = calls * tokens_in / 1e6, calls * tokens_out / 1e6
    total_live = 0.0
    for model, price_in, price_out in PRICES:
        live = m_in * price_in + m_out * price_out
        total_live += live
        batch = live * BATCH_FACTOR
        print(f"| {model} | {price_in:.2f} | {price_out:.2f} | {m_in:.2f} | {m_out:.2f} | {live:.2f} | {batch:.2f} | "
              f"{live - batch:.2f} |")
    batch = total_live * BATCH_FACTOR
    print(f"| committee | | | {len(PRICES) * m_in:.2f} | {len(PRICES) * m_out:.2f} | {total_live:.2f} | {batch:.2f} | "
          f"{total_live - batch:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mistakes", type=int, default=50, help="Mistakes of the local runs.")
    parser.add_argument("--wrong-fraction", type=float, default=0.6,
                        help="Share of GSM8K's training questions the 7B student gets wrong (the projection).")
    parser.add_argument("--input-tokens-per-call", type=int, default=300)
    parser.add_argument("--output-tokens-per-call", type=int, default=200)
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    measure(args.mistakes)
    project(args.wrong_fraction, args.input_tokens_per_call, args.output_tokens_per_call)


if __name__ == "__main__":
    main()
