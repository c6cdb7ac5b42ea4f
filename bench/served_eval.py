"""In-process vs served evaluation of the student, side by side in one run: questions/minute, accuracy, cut-off
rate, and the predictions that differ between the modes.

    OMP_NUM_THREADS=1 python bench/served_eval.py --data $MAPD_SHARED_DATA/svamp [--limit 100] [--max-new-tokens 160]
        [--modes in-process,served,served-cb] [--out DIR]

Each mode is one ``mapd.stages.evaluate.evaluate_model`` call (what ``mapd eval`` runs) on the first ``--limit``
questions of the test split, greedy, with the same ``--max-new-tokens``:

- ``in-process``: transformers ``generate`` in this process, batches of ``--batch-size`` (mapd's default path);
- ``served``: ``transformers serve {model} --port {port}``, started and stopped by mapd (mapd.serve), the student's
  calls going through the call path with ``--concurrency`` requests in flight;
- ``served-cb``: the same with ``--continuous-batching``.

After the served modes, the first served mode is evaluated once more on the same call cache: every answer comes
from the cache (0 requests), but mapd still starts and stops the server (the cache is consulted after the server
is up). Each run gets a fresh folder (``--out``, default a new temporary folder), so its call cache is empty.

Questions per minute are printed twice: over the answering alone (the seconds ``evaluate_model`` reports: model
load and server start excluded) and end to end (the whole ``evaluate_model`` call: model load, or server start and
stop, included). The served student is the embedded GGUF converted once to a float32 safetensors folder
(``mapd.models.servable``); its conversion, cached across runs, is timed separately before the served modes.

Threads: the bench reads ``OMP_NUM_THREADS`` (``--threads`` sets it) before torch loads; the server inherits it,
so both modes compute with the same number of threads. ``--request-timeout`` is ``student.timeout_s`` (600 s by
default): against plain ``transformers serve``, which answers one request at a time, 16 requests in flight wait well
over 120 s each (docs/scaling.md). Requires ``pip install 'transformers[serving]'`` for the
served modes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SERVE = "transformers serve {model} --port {port}"
MODES = ("in-process", "served", "served-cb")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True,
                        help="Folder of SVAMP <split>.jsonl files (e.g. $MAPD_SHARED_DATA/svamp, see bench/_common.py).")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--task", default="svamp")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="The first N questions of the split.")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16, help="In-process batch size.")
    parser.add_argument("--concurrency", type=int, default=16, help="Served: requests in flight.")
    parser.add_argument("--serve", default=DEFAULT_SERVE, help="Served: the command template.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, from {', '.join(MODES)}.")
    parser.add_argument("--no-rerun", action="store_true", help="Skip the cached rerun of the first served mode.")
    parser.add_argument("--threads", type=int, help="Sets OMP_NUM_THREADS (default: the environment's, else torch's).")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="Served: student.timeout_s, seconds before a request times out and is retried.")
    parser.add_argument("--out", help="A new folder for this run (default: a new temporary folder, kept).")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    return args


class Recorder(logging.Handler):
    """Keeps mapd's log lines (server start, readiness, retries) for the summary."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def counting_dispatcher(calls: list[dict]):
    """A Dispatcher that leaves its statistics (requests made, cache hits, failures) in ``calls``."""
    from mapd.llm import Dispatcher

    class Counting(Dispatcher):
        def __exit__(self, *exc):
            calls.append({name: stats.summary() for name, stats in self.stats.items()})
            return super().__exit__(*exc)

    return Counting


def run_mode(mode: str, folder: Path, args, cache_path: Path | None, recorder: Recorder, calls: list[dict]) -> dict:
    from mapd.config import PromptConfig, StudentConfig, TaskConfig
    from mapd.stages.evaluate import evaluate_model
    from mapd.layout import EvalLayout

    served = mode != "in-process"
    serve = None
    if served:
        serve = args.serve + (" --continuous-batching" if mode.startswith("served-cb") else "")
    student = StudentConfig(model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            serve=serve, max_concurrency=args.concurrency, timeout_s=args.request_timeout)
    task = TaskConfig(name=args.task, path=args.data)
    out = EvalLayout(folder)
    first_line, first_call = len(recorder.lines), len(calls)
    began = time.perf_counter()
    result = evaluate_model(out, student=student, task=task, split=args.split, limit=args.limit,
                            prompts=PromptConfig(), cache_path=cache_path)
    wall = time.perf_counter() - began
    lines = recorder.lines[first_line:]
    ready = [float(m.group(1)) for line in lines if (m := re.search(r"server ready after ([\d.]+) s", line))]
    stats = calls[first_call]["student"] if served and len(calls) > first_call else None
    predictions = [json.loads(line) for line in out.predictions.read_text().splitlines() if line.strip()]
    return {"mode": mode, "command": serve, "metrics": result.model_dump(), "answer_s": result.seconds,
            "wall_s": wall, "ready_s": ready[0] if ready else None, "calls": stats, "predictions": predictions,
            "folder": str(folder), "retries": [line for line in lines if "retry" in line.lower() or "fail" in line.lower()]}


def per_minute(n: int, seconds: float) -> str:
    return f"{60 * n / seconds:.1f}" if seconds > 0 else "-"


def compare(a: dict, b: dict) -> dict:
    """Predictions that differ between two modes: answers, correctness, texts, cut-off flags."""
    by_id = {p["id"]: p for p in b["predictions"]}
    diff = {"answers": [], "correct": [], "texts": [], "texts_stripped": [], "cut_off": []}
    first = []
    for p in a["predictions"]:
        q = by_id[p["id"]]
        if p["answer"] != q["answer"]:
            diff["answers"].append(p["id"])
        if p["correct"] != q["correct"]:
            diff["correct"].append(p["id"])
        if p["output"] != q["output"]:
            diff["texts"].append(p["id"])
        if p["output"].strip() != q["output"].strip():
            diff["texts_stripped"].append(p["id"])
            x, y = p["output"], q["output"]
            at = next((i for i, (c, d) in enumerate(zip(x, y)) if c != d), min(len(x), len(y)))
            first.append((p["id"], at, len(x), len(y), x[max(0, at - 40):at + 40], y[max(0, at - 40):at + 40]))
        if bool(p["cut_off"]) != bool(q["cut_off"]):
            diff["cut_off"].append(p["id"])
    diff["first_differences"] = first
    return diff


def main() -> None:
    args = parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="served-eval-"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: each run needs a fresh folder (its call cache must start empty)")
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import transformers

    import mapd.student
    from mapd.log import log, setup

    setup(0)
    recorder = Recorder()
    log.addHandler(recorder)
    calls: list[dict] = []
    mapd.student.Dispatcher = counting_dispatcher(calls)

    load = os.getloadavg()
    print(f"served_eval: {args.task}/{args.split}, first {args.limit} questions, {args.model}, greedy, "
          f"max_new_tokens {args.max_new_tokens}; in-process batch {args.batch_size}, served concurrency "
          f"{args.concurrency}, request timeout {args.request_timeout:g} s; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load[0]:.2f}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; out {out}", flush=True)

    results: dict[str, dict] = {}
    conversion_s = None
    for mode in args.modes:
        if mode != "in-process" and conversion_s is None:
            from mapd.models import servable

            began = time.perf_counter()
            folder = servable(args.model)
            conversion_s = time.perf_counter() - began
            print(f"servable folder {folder}: {conversion_s:.1f} s (converted once, then reused)", flush=True)
        print(f"\n== {mode}", flush=True)
        results[mode] = run_mode(mode, out / mode, args, out / mode / "cache.sqlite" if mode != "in-process" else None,
                                 recorder, calls)
    served_modes = [mode for mode in args.modes if mode != "in-process"]
    rerun = None
    if served_modes and not args.no_rerun:
        mode = served_modes[0]
        print(f"\n== {mode}, again on the same call cache", flush=True)
        rerun = run_mode(mode, out / f"{mode}-rerun", args, out / mode / "cache.sqlite", recorder, calls)

    n = args.limit
    print(f"\n{'mode':<34} {'q/min answering':>15} {'q/min end-to-end':>16} {'answer s':>9} {'wall s':>7} "
          f"{'server ready s':>14} {'accuracy':>8} {'cut off':>7} {'requests':>8} {'cache hits':>10}")
    rows = [(mode, r) for mode, r in results.items()] + ([(f"{rerun['mode']} (rerun, cached)", rerun)] if rerun else [])
    for label, r in rows:
        m = r["metrics"]
        c = r["calls"] or {}
        print(f"{label:<34} {per_minute(m['n'], r['answer_s']):>15} {per_minute(m['n'], r['wall_s']):>16} "
              f"{r['answer_s']:>9.1f} {r['wall_s']:>7.1f} {r['ready_s'] if r['ready_s'] is not None else '-':>14} "
              f"{m['accuracy']:>8.1%} {m['cut_off_rate']:>7.1%} {c.get('calls', '-'):>8} {c.get('cache_hits', '-'):>10}")
    for label, r in rows:
        if r["retries"]:
            print(f"{label}: {len(r['retries'])} retry/failure line(s), e.g. {r['retries'][0][:200]}")

    modes = list(results)
    comparisons = {}
    for i, a in enumerate(modes):
        for b in modes[i + 1:] + (["rerun"] if rerun and a == served_modes[0] else []):
            other = rerun if b == "rerun" else results[b]
            d = compare(results[a], other)
            comparisons[f"{a} vs {b}"] = d
            print(f"\n{a} vs {b}: answers differ {len(d['answers'])}/{n}, correctness {len(d['correct'])}, "
                  f"texts {len(d['texts'])} ({len(d['texts_stripped'])} beyond surrounding whitespace), cut-off flags {len(d['cut_off'])}")
            golds = {p["id"]: p["gold"] for p in results[a]["predictions"]}
            answers_b = {p["id"]: p["answer"] for p in other["predictions"]}
            for qid in d["answers"][:10]:
                answer_a = next(p["answer"] for p in results[a]["predictions"] if p["id"] == qid)
                print(f"  id {qid}: answer {answer_a!r} vs {answers_b[qid]!r} (gold {golds[qid]!r})")
            if d["cut_off"]:
                print(f"  cut-off flag differs for ids {d['cut_off'][:20]}")
            stripped = set(d["texts_stripped"])
            for qid, at, la, lb, xa, xb in [f for f in d["first_differences"] if f[0] in stripped][:3]:
                print(f"  id {qid}: texts part at character {at} (lengths {la} / {lb})\n    {a}: {xa!r}\n    {b}: {xb!r}")

    summary = {"args": {k: v for k, v in vars(args).items()}, "conversion_s": conversion_s,
               "threads": os.environ.get("OMP_NUM_THREADS"), "load_average_start": load,
               "load_average_end": os.getloadavg(),
               "modes": {k: {key: v for key, v in r.items() if key != "predictions"} for k, r in results.items()},
               "rerun": {key: v for key, v in rerun.items() if key != "predictions"} if rerun else None,
               "comparisons": comparisons}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
