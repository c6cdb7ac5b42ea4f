"""[trust] A call cache write-locked by another process mid-run, with mapd's real waits (CACHE_WAIT_S = 120 s):
`mapd teach` in its own process; after the server's 5th request another process takes the cache's write lock
for ``--hold`` seconds; then the same command is rerun.

    python bench/cache_lock.py [--hold 40] [--mistakes 6]

Prints each run's exit code, wall time and requests, the replies paid twice, and whether "move it away" appeared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.*

from tests.openai_server import FakeOpenAIServer  # noqa: E402
from tests.reliability_kit import mapd_argv, teach_argv, write_teach_setup  # noqa: E402
from tests.test_trust_cache import LockAfter  # noqa: E402

KEY_ENV = "MAPD_BENCH_KEY"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=40.0, help="seconds the other process holds the lock")
    parser.add_argument("--mistakes", type=int, default=6)
    args = parser.parse_args()
    env = {**os.environ, KEY_ENV: "sk-bench-cache-lock-0000", "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lock = LockAfter(folder / "out" / "cache.sqlite", after=5, hold_s=args.hold)
        try:
            with FakeOpenAIServer(lock) as server:
                config, mistakes = write_teach_setup(folder, server.base_url, KEY_ENV, args.mistakes, max_concurrency=2)
                for run in ("first", "rerun"):
                    server.reset()
                    began = time.perf_counter()
                    done = subprocess.run(mapd_argv(*teach_argv(config, mistakes, folder / "out")), env=env,
                                          capture_output=True, text=True)
                    print(f"{run}: exit {done.returncode} after {time.perf_counter() - began:.1f} s, "
                          f"{server.requests} requests; 'move it away' in stderr: {'move it away' in done.stderr}")
        finally:
            lock.release()
        print(f"lock held {args.hold:g} s from the 5th request; replies paid twice: {lock.reply.duplicates}")


if __name__ == "__main__":
    main()
