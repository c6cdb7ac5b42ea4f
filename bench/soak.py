"""Soak: `mapd teach` over thousands of calls at a 30 % fault rate, SIGKILLed at random moments and
rerun until it completes; then checks that nothing was lost and counts what was paid twice.

    python bench/soak.py [--mistakes 300] [--fault-rate 0.3] [--latency 0.05] [--kills 8] [--seed 0]

Teachers are three models on the local OpenAI-compatible test server (127.0.0.1 only), every fault
kind of tests/openai_server.py (429 with and without Retry-After, 500/502/503, dropped connections,
timeouts, truncated and malformed JSON, empty content, refusals, content filter, 400), with mapd's
real retry waits (1 s doubling, plus jitter). Each kill comes after a random number of new requests
(during the calls) or, one time in four, at a random moment (start-up, calls or writing). The whole
soak stops with an error after --max-seconds (default 300).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.openai_server and tests.reliability_kit

from tests.openai_server import ALL_FAULTS, FakeOpenAIServer  # noqa: E402
from tests.reliability_kit import (COMMITTEE, CountingReply, jsonl_problems, run_killed, run_mapd,  # noqa: E402
                                   write_teach_setup)

from mapd.io import read_jsonl  # noqa: E402

KEY_ENV = "MAPD_SOAK_KEY"
MAX_RETRIES = 6
CONCURRENCY = 16


def check(out: Path, n: int) -> tuple[int, Counter]:
    """Every (id, teacher) record present, each with text or an error, every written rationale reviewed
    by both other teachers; returns (calls the artifacts hold, errors by kind)."""
    feedback, rationales = read_jsonl(out / "feedback.jsonl"), read_jsonl(out / "rationales.jsonl")
    pairs = [(f"q{i}", teacher) for i in range(n) for teacher in COMMITTEE]
    assert [(r["id"], r["teacher"]) for r in feedback] == pairs, "feedback records missing or out of order"
    assert [(r["id"], r["teacher"]) for r in rationales] == pairs, "rationale records missing or out of order"
    outcomes = [(r["text"], r["error"]) for r in feedback + rationales]
    for record in rationales:
        expected = [t for t in COMMITTEE if t != record["teacher"]] if record["text"] else []
        assert [v["reviewer"] for v in record["reviews"]] == expected, f"reviews missing for {record['id']}"
        outcomes += [(v["raw"], v["error"]) for v in record["reviews"]]
    assert all((text is None) != (error is None) for text, error in outcomes), "a record with neither text nor error"
    assert jsonl_problems(out) == [], jsonl_problems(out)
    return len(outcomes), Counter(error.split(":")[0] for _, error in outcomes if error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mistakes", type=int, default=300)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds every request takes")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, KEY_ENV: "sk-soak-" + "%032x" % rng.getrandbits(128)}
    began = time.perf_counter()
    deadline = began + args.max_seconds
    reply = CountingReply()
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(
        reply, latency_s=args.latency, fault_rate=args.fault_rate, faults=ALL_FAULTS, seed=args.seed, hang_s=2.0
    ) as server:
        folder = Path(tmp)
        config, mistakes = write_teach_setup(folder, server.base_url, KEY_ENV, args.mistakes, timeout_s=1.0,
                                             max_retries=MAX_RETRIES, max_concurrency=CONCURRENCY)
        argv = ["teach", "--config", str(config), "--mistakes", str(mistakes), "--out", str(folder / "out")]
        killed = runs = 0
        for _ in range(args.kills):
            after = server.requests + rng.randint(20, 600)
            when = rng.uniform(0.5, 8.0) if rng.random() < 0.25 else (
                lambda: server.requests >= after or time.perf_counter() > deadline)
            killed += run_killed(argv, when, env=env, log=folder / "killed.log")
            runs += 1
            assert jsonl_problems(folder / "out") == [], jsonl_problems(folder / "out")
        result = run_mapd(*argv, env=env, timeout=max(1.0, deadline - time.perf_counter()))  # the rerun
        runs += 1
        if result.returncode not in (0, 3):  # 3: refusals and 400s (not retried) leave the stage incomplete
            raise SystemExit(f"mapd teach failed:\n{result.stderr[-3000:]}")
        calls, errors = check(folder / "out", args.mistakes)
        rows = sqlite3.connect(folder / "out" / "cache.sqlite").execute("SELECT max(attempts) FROM calls").fetchone()
        stored = "\n".join(p.read_bytes().decode("latin-1") for p in (folder / "out").rglob("*") if p.is_file())
        leaked = env[KEY_ENV] in stored + result.stdout + result.stderr + (folder / "killed.log").read_text()
        faults = sum(server.faults.values())
        seconds = time.perf_counter() - began
    in_flight = killed * len(COMMITTEE) * CONCURRENCY
    print(json.dumps({
        "mistakes": args.mistakes,
        "calls_needed": calls,
        "requests_made": server.requests,
        "fault_rate_survived": round(faults / server.requests, 3),
        "faults": dict(sorted(server.faults.items())),
        "successful_calls": calls - sum(errors.values()),
        "paid_replies": sum(reply.paid.values()),
        "duplicates_paid": reply.duplicates,
        "duplicate_bound_in_flight": in_flight,
        "failed_calls_recorded": dict(errors),
        "max_attempts_per_call_per_run": rows[0],
        "kills_landed": killed,
        "runs": runs,
        "key_found_in_files_or_output": leaked,
        "wall_seconds": round(seconds, 1),
    }, indent=2))
    assert reply.duplicates <= in_flight and rows[0] <= MAX_RETRIES + 1 and not leaked


if __name__ == "__main__":
    main()
