"""Helpers shared by the tests (test_reliability, test_failures, test_committee, test_batch, test_secrets,
test_bad_input, test_runner, test_resume, test_student, ...) and the benches (soak, hostile, batch_savings,
teach_concurrency): a scripted committee on the local OpenAI-compatible server, its setup and `mapd teach`
command line, fast retries, `mapd` in a subprocess killed at chosen moments, and folder snapshots.
The ``key`` and ``fast_retries`` fixtures built on KEY_ENV and FAST_RETRIES are in tests/conftest.py.

    from tests.reliability_kit import CountingReply, write_teach_setup, teach_argv, run_killed, snapshot
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import yaml

from mapd.config import PromptConfig
from mapd.io import read_jsonl, write_jsonl
from mapd.llm.openai_provider import Backoff

COMMITTEE = ("gpt", "gemini", "mistral")
REVIEW_MARK = PromptConfig().review.split("{")[0]  # the fixed opening of the default review template
FEEDBACK_MARK = PromptConfig().feedback.split("{")[0]  # and of the default feedback template
KEY_ENV = "MAPD_TEST_KEY"  # the teachers' api_key_env in the tests; conftest's ``key`` fixture sets it
FAST = Backoff(initial_s=0.001, max_s=0.01, jitter_s=0.001)  # retries after milliseconds (Retry-After honoured)
FAST_RETRIES = replace(FAST, retry_after_max_s=0.01)  # conftest's ``fast_retries``: a Retry-After cut to 10 ms too


class CountingReply:
    """The server's reply function: deterministic feedback, rationales ("The answer is 7.") and
    reviews ("[4]"), and a count of the successful replies per distinct request (model, messages),
    i.e. of the calls paid for."""

    def __init__(self) -> None:
        self.paid: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, messages: list[dict], model: str) -> str:
        key = json.dumps([model, messages], sort_keys=True)
        with self._lock:
            self.paid[key] += 1
        content = messages[-1]["content"]
        if content.startswith(REVIEW_MARK):
            return f"{model} checked each step. [4]"
        if content.startswith(FEEDBACK_MARK):
            return f"{model} explains: the student added instead of subtracting."
        return f"{model} works it out step by step. The answer is 7."

    @property
    def duplicates(self) -> int:
        """Successful replies beyond the first for the same request: calls paid twice."""
        return sum(count - 1 for count in self.paid.values())


def make_mistakes(n: int) -> list[dict]:
    """``n`` mistakes.jsonl records with distinct questions (gold 7)."""
    return [{"id": f"q{i}", "question": f"Question {i}: what is {i} + 7 - {i}?", "gold": "7",
             "output": f"{i} + 7 = {i + 7}", "answer": str(i + 7), "status": "wrong"} for i in range(n)]


def teacher_entries(base_url: str, key_env: str, names=COMMITTEE, **fields) -> list[dict]:
    """Config entries of a committee served by one server (model ``model-<name>``)."""
    return [{"name": name, "model": f"model-{name}", "base_url": base_url, "api_key_env": key_env, **fields}
            for name in names]


def write_teach_setup(folder: Path, base_url: str, key_env: str, n_mistakes: int, **fields) -> tuple[Path, Path]:
    """config.yaml (svamp, the committee with ``fields``) and mistakes.jsonl in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"task": {"name": "svamp"}, "teachers": teacher_entries(base_url, key_env, **fields)}
    (folder / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    write_jsonl(folder / "mistakes.jsonl", make_mistakes(n_mistakes))
    return folder / "config.yaml", folder / "mistakes.jsonl"


def teach_argv(config: Path | str, mistakes: Path | str, out: Path | str, *extra: str) -> list[str]:
    """The arguments of `mapd teach` (for ``mapd.cli.main`` or, after :func:`mapd_argv`, a subprocess)."""
    return ["teach", "--config", str(config), "--mistakes", str(mistakes), "--out", str(out), *extra]


def teach_records(out: Path) -> tuple[list[dict], list[dict]]:
    """(feedback.jsonl, rationales.jsonl) of a `mapd teach` output folder."""
    return read_jsonl(out / "feedback.jsonl"), read_jsonl(out / "rationales.jsonl")


def mapd_argv(*args: str) -> list[str]:
    """The `mapd` command line, run with this interpreter."""
    return [sys.executable, "-m", "mapd.cli", *args]


def run_mapd(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `mapd` to completion, capturing its output."""
    return subprocess.run(mapd_argv(*args), env=env, capture_output=True, text=True, timeout=timeout)


def run_killed(args: list[str], when, env: dict | None = None, log: Path | None = None) -> bool:
    """Start `mapd *args` and SIGKILL it ``when`` seconds later, or as soon as ``when()`` is true
    (polled every 5 ms). True when it was killed, False when it had exited first. Its output is
    appended to ``log`` (or dropped)."""
    deadline = time.monotonic() + when if isinstance(when, (int, float)) else None
    with open(log or os.devnull, "a") as sink:
        process = subprocess.Popen(mapd_argv(*args), env=env, stdout=sink, stderr=subprocess.STDOUT)
        while process.poll() is None:
            if (time.monotonic() >= deadline) if deadline is not None else when():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.005)
    return False


def jsonl_problems(folder: Path) -> list[str]:
    """Every *.jsonl under ``folder`` that has a line that is not a whole JSON object ending in a newline."""
    problems = []
    for path in sorted(folder.rglob("*.jsonl")):
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            problems.append(f"{path}: partial last line")
        for number, line in enumerate(text.splitlines(), 1):
            try:
                if not isinstance(json.loads(line), dict):
                    raise ValueError
            except ValueError:
                problems.append(f"{path}:{number}: not a JSON object")
    return problems


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (sha256, mtime_ns)}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_for(condition, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``condition()`` until it is true (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def write_pipeline_setup(root: Path, base_url: str, model_dir: Path) -> tuple[Path, dict]:
    """A whole `mapd run` in seconds: local jsonl data (6 train, 4 test questions), the tiny student, two
    teachers on the server at ``base_url``, 2 training steps. Returns (config.yaml's path, the config)."""
    def questions(n: int, offset: int = 0) -> list[dict]:
        return [{"id": f"q{i}", "question": f"What is {i} + 7 - {i}?", "answer": 7} for i in range(offset, offset + n)]

    write_jsonl(root / "data" / "train.jsonl", questions(6))
    write_jsonl(root / "data" / "test.jsonl", questions(4, offset=100))
    config = {
        "task": {"name": "jsonl", "path": str(root / "data"), "answer_kind": "number"},
        "student": {"model": str(model_dir), "max_new_tokens": 8, "batch_size": 8},
        "teachers": [{"name": name, "model": name, "base_url": base_url, "max_tokens": 32} for name in ("gpt", "gemini")],
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "max_length": 128, "save_steps": 1, "learning_rate": 1e-3},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root / "config.yaml", config


def dead_url() -> str:
    """The base_url of a port on 127.0.0.1 that nobody listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/v1"

