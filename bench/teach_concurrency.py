"""How much faster mapd's committee is than a one-call-at-a-time loop, and what a rerun and a
crash cost. Against the local OpenAI-compatible test server at 100 ms per call:

    python bench/teach_concurrency.py [--mistakes 50] [--latency 0.1] [--concurrency 16] [--sequential-subset K]

50 mistakes x 3 teachers = 600 calls (150 feedback, 150 rationales, 300 reviews). It measures
(a) the same three stages through a sequential loop (one call at a time, as the reference does;
with ``--sequential-subset K`` only the first K mistakes, scaled up linearly: for long latencies),
(b) ``mapd teach`` (run_teach) with ``max_concurrency`` per teacher, (c) a second run (calls made),
and (d) a run killed with SIGKILL midway and rerun (calls made in all). Times are taken by the
server, from the first request's arrival to the last reply, so process start-up is left out. Every
client runs in a process of its own, as it would against a remote endpoint (the server's threads
and a client in one process would share one interpreter lock).
"""

from __future__ import annotations

import argparse
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests.openai_server and tests.reliability_kit

from tests.openai_server import FakeOpenAIServer  # noqa: E402
from tests.reliability_kit import COMMITTEE, FEEDBACK_MARK, REVIEW_MARK  # noqa: E402

from mapd.config import RunConfig, TaskConfig, TeacherConfig  # noqa: E402
from mapd.config_file import load_config  # noqa: E402
from mapd.io import read_jsonl, write_jsonl  # noqa: E402
from mapd.prompts import answer_messages, feedback_messages, review_messages  # noqa: E402
from mapd.records import read_mistakes  # noqa: E402
from mapd.review_score import parse_score  # noqa: E402
from mapd.stages.review import reviewers  # noqa: E402

class Stamps:
    """Reply function for the server that also notes when each reply is produced, and of what kind."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.review_times: list[float] = []
        self._lock = threading.Lock()

    def clear(self) -> None:
        self.times.clear()
        self.review_times.clear()

    def __call__(self, messages: list[dict], model: str) -> str:
        content = messages[-1]["content"]
        with self._lock:
            self.times.append(time.perf_counter())
            if content.startswith(REVIEW_MARK):
                self.review_times.append(self.times[-1])
        if content.startswith(REVIEW_MARK):
            return "The reasoning holds. [4]"
        if content.startswith(FEEDBACK_MARK):
            return f"{model}: the student subtracted where the question asks for a sum."
        return f"{model}: 3 + 4 = 7. The answer is 7."

    def span(self, latency_s: float) -> float:
        """Seconds from the first request's arrival (its reply time less the latency) to the last reply."""
        return max(self.times) - (min(self.times) - latency_s)

    def idle_between_stages(self, latency_s: float) -> float:
        """Seconds from the last feedback/rationale reply to the first review request."""
        first_stage = set(self.times) - set(self.review_times)
        return min(self.review_times) - latency_s - max(first_stage)


def setup(folder: Path, base_url: str, n: int, concurrency: int) -> None:
    """config.yaml (the committee at ``base_url``, no key) and mistakes.jsonl in ``folder``. Not
    reliability_kit.write_teach_setup: its mistakes have other questions and ids, so the prompts sent
    would differ from those the figures in docs/committee.md were measured with."""
    teachers = [TeacherConfig(name=name, model=f"model-{name}", base_url=base_url, max_concurrency=concurrency)
                for name in COMMITTEE]
    config = RunConfig(task=TaskConfig(name="svamp"), teachers=teachers)
    (folder / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    mistakes = [{"id": str(i), "question": f"Ann has {i} pens and buys 7 more, then gives {i} away. How many now?",
                 "gold": "7", "output": f"{i} - 7 = {i - 7}", "answer": str(i - 7), "status": "wrong"}
                for i in range(n)]
    write_jsonl(folder / "mistakes.jsonl", mistakes)


def sequential_client(folder: Path, subset: int | None) -> None:
    """(a): the three stages over the same mistakes (or the first ``subset``), one call at a time."""
    config = load_config(folder / "config.yaml")
    mistakes = read_mistakes(folder / "mistakes.jsonl")[:subset]
    client = OpenAI(base_url=config.teachers[0].base_url, api_key="not-needed", max_retries=0)
    prompts, committee = config.prompts, list(COMMITTEE)

    def ask(teacher: str, messages: list[dict]) -> str:  # the reference's way: one blocking call after another
        return client.chat.completions.create(model=f"model-{teacher}", messages=messages).choices[0].message.content

    for m in mistakes:
        for teacher in committee:
            ask(teacher, feedback_messages(prompts, m.question, m.output, m.gold, "number"))
    drafts = [(m, teacher, ask(teacher, answer_messages(prompts, m.question, "number")))
              for m in mistakes for teacher in committee]
    for m, teacher, text in drafts:
        for reviewer in reviewers(teacher, committee, config.review):
            parse_score(ask(reviewer, review_messages(prompts, m.question, text, m.gold, "number")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mistakes", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.1, help="Seconds the server takes per call.")
    parser.add_argument("--concurrency", type=int, default=16, help="max_concurrency of each teacher.")
    parser.add_argument("--sequential-subset", type=int, help="Time (a) on the first K mistakes and scale up.")
    parser.add_argument("--sequential-client", type=Path, help=argparse.SUPPRESS)  # (a), run in a subprocess
    args = parser.parse_args()
    if args.sequential_client:
        return sequential_client(args.sequential_client, args.sequential_subset)
    subset = min(args.sequential_subset or args.mistakes, args.mistakes)
    stamps = Stamps()
    with FakeOpenAIServer(stamps, latency_s=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        setup(folder, server.base_url, args.mistakes, args.concurrency)
        total = args.mistakes * len(COMMITTEE) * (2 + len(COMMITTEE) - 1)
        teach = [sys.executable, "-m", "mapd.cli", "teach", "--config", str(folder / "config.yaml"),
                 "--mistakes", str(folder / "mistakes.jsonl"), "--out"]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}

        def measure(command: list[str]) -> tuple[float, int, float]:
            """(seconds from first request to last reply, requests, CPU seconds) of one client process."""
            server.reset()
            stamps.clear()
            cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(command, check=True, **quiet)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            used = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
            return (stamps.span(args.latency) if stamps.times else 0.0), server.requests, used

        sequential_span, sequential_calls, _ = measure([sys.executable, __file__, "--sequential-client", str(folder),
                                                         "--sequential-subset", str(subset)])
        assert sequential_calls == total * subset // args.mistakes, (sequential_calls, total)
        sequential_span *= args.mistakes / subset
        mapd_span, mapd_calls, mapd_cpu = measure(teach + [str(folder / "run")])
        in_flight, idle = server.max_in_flight, stamps.idle_between_stages(args.latency)
        *_, startup_cpu = measure([sys.executable, "-c", "import mapd.cli, mapd.stages.teach, mapd.llm.dispatch"])
        _, rerun_calls, _ = measure(teach + [str(folder / "run")])

        # (d) SIGKILL when half the calls have reached the server, then rerun
        server.reset()
        process = subprocess.Popen(teach + [str(folder / "killed")], **quiet)
        while server.requests < total // 2 and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before_kill = server.requests
        subprocess.run(teach + [str(folder / "killed")], check=True, **quiet)
        killed_total = server.requests
        complete = len(read_jsonl(folder / "killed" / "rationales.jsonl")) == args.mistakes * len(COMMITTEE)

    print(f"calls: {total} ({args.mistakes} mistakes x {len(COMMITTEE)} teachers; "
          f"server latency {args.latency * 1000:.0f} ms)")
    scaled = f" (measured on {sequential_calls} calls, scaled to {total})" if subset < args.mistakes else ""
    print(f"(a) sequential loop:  {sequential_span:6.2f} s from first request to last reply{scaled}")
    print(f"(b) mapd teach:       {mapd_span:6.2f} s, {mapd_calls} calls, at most {in_flight} in flight "
          f"(max_concurrency {args.concurrency} per teacher); client process CPU {mapd_cpu:.2f} s, "
          f"{(mapd_cpu - startup_cpu) / mapd_calls * 1000:.1f} ms a call after {startup_cpu:.2f} s of start-up")
    print(f"    of which idle between the feedback+rationale calls and the reviews: {idle:.2f} s")
    print(f"    speed-up (a)/(b): {sequential_span / mapd_span:6.1f}x")
    print(f"(c) second run:       {rerun_calls} calls")
    print(f"(d) SIGKILL at {before_kill} calls, rerun: {killed_total} calls in all "
          f"(bound: {total} + the calls in flight at the kill, at most {args.concurrency * len(COMMITTEE)}); "
          f"artifacts complete: {complete}")


if __name__ == "__main__":
    main()
