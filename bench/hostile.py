"""The [trust] targets, measured as a user meets them: `mapd teach` in its own process, with mapd's real
retry waits, against the local OpenAI-compatible test server (127.0.0.1 only).

    python bench/hostile.py [--mistakes 20] [--concurrency 8]

Prints, for each hostile case, the exit code, the wall time and the requests the server saw:
(a) the endpoint is down; (b) every call gets 401; (c) a run stopped by its budget, rerun with the same
budget, then with a raised one; (d) two processes on one cache; (e) a server that echoes credentials.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.openai_server

from tests.openai_server import FakeOpenAIServer  # noqa: E402
from tests.reliability_kit import COMMITTEE, CountingReply, dead_url, mapd_argv, write_teach_setup  # noqa: E402

KEY_ENV = "MAPD_BENCH_KEY"
KEY = "sk-bench-hostile-4f1c9e0b7d2a"
PASSWORD = "pw-bench-93b1d7"


def teach(folder: Path, out: str, extra: tuple[str, ...] = ()) -> tuple[int, float, str]:
    """(exit code, seconds, stderr) of `mapd teach` on ``folder``'s config and mistakes."""
    began = time.perf_counter()
    done = subprocess.run(mapd_argv(*extra, "teach", "--config", str(folder / "config.yaml"), "--mistakes",
                                    str(folder / "mistakes.jsonl"), "--out", str(folder / out)),
                          capture_output=True, text=True, env={**os.environ, KEY_ENV: KEY}, timeout=900)
    return done.returncode, time.perf_counter() - began, done.stderr


def edit(config: Path, **top) -> None:
    data = yaml.safe_load(config.read_text())
    data.update(top)
    config.write_text(yaml.safe_dump(data))


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1][:160] if stderr.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mistakes", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    n, slots = args.mistakes, args.concurrency * len(COMMITTEE)
    calls = n * len(COMMITTEE) * 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)

        dead = dead_url()  # (a)
        folder = root / "down"
        write_teach_setup(folder, dead, KEY_ENV, n, max_concurrency=args.concurrency)
        code, seconds, err = teach(folder, "out")
        print(f"(a) endpoint down, {n} mistakes: exit {code} after {seconds:.1f} s; {last_line(err)}")

        with FakeOpenAIServer(fault_rate=1.0, faults=("unauthorized",)) as server:  # (b)
            folder = root / "401"
            write_teach_setup(folder, server.base_url, KEY_ENV, n, max_concurrency=args.concurrency)
            code, seconds, err = teach(folder, "out")
            print(f"(b) 401 on every call: exit {code} after {seconds:.1f} s, {server.requests} requests "
                  f"({server.requests / slots:.2f} per concurrency slot, {slots} slots)")

        reply = CountingReply()
        with FakeOpenAIServer(reply, latency_s=0.05) as server:  # (c)
            folder = root / "budget"
            write_teach_setup(folder, server.base_url, KEY_ENV, n, max_concurrency=args.concurrency, max_tokens=100,
                              price_input_per_mtok=1000.0, price_output_per_mtok=1000.0)
            edit(folder / "config.yaml", max_budget_usd=1.0)
            first = teach(folder, "out")
            made = server.requests
            server.reset()
            again = teach(folder, "out")
            same = server.requests
            server.reset()
            edit(folder / "config.yaml", max_budget_usd=100.0)
            raised = teach(folder, "out")
            print(f"(c) budget 1 USD: exit {first[0]}, {made} requests; rerun, same budget: exit {again[0]}, "
                  f"{same} requests; raised to 100 USD: exit {raised[0]}, {server.requests} requests; "
                  f"{made + server.requests} of {calls} calls made in all, {reply.duplicates} paid twice")

        reply = CountingReply()
        with FakeOpenAIServer(reply, latency_s=0.05) as server:  # (d)
            folder = root / "shared"
            write_teach_setup(folder, server.base_url, KEY_ENV, n, max_concurrency=args.concurrency)
            edit(folder / "config.yaml", cache_path=str(root / "shared.sqlite"))
            argv = [mapd_argv("-q", "teach", "--config", str(folder / "config.yaml"), "--mistakes",
                              str(folder / "mistakes.jsonl"), "--out", str(folder / f"out{i}")) for i in range(2)]
            runs = [subprocess.Popen(a, env={**os.environ, KEY_ENV: KEY}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True) for a in argv]
            errors = [last_line(run.communicate(timeout=900)[1]) for run in runs]
            print(f"(d) two processes, one cache: exits {[run.returncode for run in runs]}; {server.completions} "
                  f"replies for {calls} calls, {reply.duplicates} paid twice (bound: the calls in flight, {slots})"
                  + "".join(f"; {error}" for error in errors if error))

        with FakeOpenAIServer(echo=True, echo_errors=True, fault_rate=0.2, faults=("server_error_500",)) as server:
            folder = root / "echo"  # (e)
            url = server.base_url.replace("://", f"://alice:{PASSWORD}@") + f"?key={KEY}"
            write_teach_setup(folder, url, KEY_ENV, n, max_concurrency=args.concurrency)
            code, seconds, err = teach(folder, "out", ("-v",))
            found = [str(p.relative_to(folder)) for p in (folder / "out").rglob("*") if p.is_file()
                     and any(secret.encode() in p.read_bytes() for secret in (KEY, PASSWORD))]
            print(f"(e) echoing server, key in ?key= and password in base_url: exit {code}; files holding a "
                  f"secret: {found or 'none'}; in the terminal: {KEY in err or PASSWORD in err}; "
                  f"tracebacks: {err.count('Traceback')}")


if __name__ == "__main__":
    main()
