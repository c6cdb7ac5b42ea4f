"""What the teacher call layer does under load, against the local fault-injecting server:

    python bench/llm_dispatch.py [--calls 1000] [--fault-rate 0.3] [--profile-rerun]

(a) concurrency: 64 calls at 100 ms latency with max_concurrency 1 vs 16;
(b) faults: ``--calls`` calls fault-free vs at ``--fault-rate`` (every transient fault kind),
    requests per call, attempts, failures;
(c) a rerun of (b): requests made and its time; (d) cache commits per second.
Server and client share one process (and its interpreter lock), so absolute rates are low;
compare the ratios within one run. ``--profile-rerun`` runs (c) under cProfile and prints the share of
its profiled time spent in tqdm (the progress bar), called from outside tqdm.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.openai_server

from tests.openai_server import FakeOpenAIServer  # noqa: E402

from mapd.config import TeacherConfig  # noqa: E402
from mapd.llm import Call, CallCache, CallKey, CallResult, Dispatcher  # noqa: E402
from mapd.llm.openai_provider import Backoff  # noqa: E402

FAST = Backoff(initial_s=0.01, max_s=0.1, jitter_s=0.01)
os.environ.setdefault("MAPD_BENCH_KEY", "sk-bench-0123456789")


def timed_run(server: FakeOpenAIServer, cache: CallCache, n: int, **fields) -> tuple[float, list[CallResult]]:
    teacher = TeacherConfig(name="t", model="m", base_url=server.base_url, api_key_env="MAPD_BENCH_KEY", **fields)
    calls = [Call(CallKey("bench", str(i), "t"), [{"role": "user", "content": f"question {i}"}]) for i in range(n)]
    began = time.perf_counter()
    results = Dispatcher([teacher], cache, backoff=FAST).complete_all(calls, "bench")
    return time.perf_counter() - began, list(results.values())


def tqdm_share(profiler: cProfile.Profile) -> float:
    """The share of the profiled time spent inside tqdm, counted where non-tqdm code calls into it."""
    stats = pstats.Stats(profiler)
    inside = sum(ct for (file, _, _), (_, _, _, _, callers) in stats.stats.items() if "tqdm" in file
                 for (caller_file, _, _), (_, _, _, ct) in callers.items() if "tqdm" not in caller_file)
    return inside / stats.total_tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    parser.add_argument("--profile-rerun", action="store_true", help="run (c) under cProfile: the share in tqdm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with FakeOpenAIServer(latency_s=0.1) as server:
            one, _ = timed_run(server, CallCache(folder / "a.sqlite"), 64, max_concurrency=1)
            many, _ = timed_run(server, CallCache(folder / "b.sqlite"), 64, max_concurrency=16)
        print(f"(a) 64 calls at 100 ms: concurrency 1 {one:.2f} s, concurrency 16 {many:.2f} s, "
              f"speed-up {one / many:.1f}x (ideal 16x)")

        settings = {"max_concurrency": 32, "timeout_s": 1.0, "max_retries": 10}
        with FakeOpenAIServer() as server:
            clean, _ = timed_run(server, CallCache(folder / "c.sqlite"), args.calls, **settings)
        with FakeOpenAIServer(fault_rate=args.fault_rate, seed=3, hang_s=1.2) as server:
            cache = CallCache(folder / "d.sqlite")
            faulty, results = timed_run(server, cache, args.calls, **settings)
            requests, faults = server.requests, sum(server.faults.values())
            server.reset()
            profiler = cProfile.Profile() if args.profile_rerun else None
            if profiler:
                profiler.enable()
            rerun, _ = timed_run(server, cache, args.calls, **settings)
            if profiler:
                profiler.disable()
        attempts = Counter(result.attempts for result in results)
        print(f"(b) {args.calls} calls: fault-free {clean:.2f} s; at {args.fault_rate:.0%} faults {faulty:.2f} s "
              f"({faulty / clean:.2f}x), {requests} requests ({requests / args.calls:.2f} per call), {faults} faults, "
              f"{sum(r.text is None for r in results)} failed; attempts {dict(sorted(attempts.items()))}")
        print(f"(c) rerun: {server.requests} requests, {rerun:.2f} s ({rerun / faulty:.3f}x of the first run)"
              + (f"; under cProfile, {tqdm_share(profiler):.0%} of its time in tqdm" if profiler else ""))

        cache = CallCache(folder / "e.sqlite")
        began = time.perf_counter()
        for i in range(2000):
            cache.put(f"key{i}", CallResult(None, "x" * 2000, None, 100, 500, 1.0))
        print(f"(d) cache: {2000 / (time.perf_counter() - began):.0f} committed puts per second (2 kB replies)")


if __name__ == "__main__":
    main()
