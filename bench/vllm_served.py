"""mapd on a real vLLM: a served `mapd eval` against in-process generation, and a served teacher in `mapd teach`
(first run, then a rerun whose calls are all cached), with wall times, identical texts and leftover processes.

    nice -n 15 python bench/vllm_served.py --vllm-python /work/vllm-venv/bin/python \
        [--data $MAPD_SHARED_DATA/svamp] [--limit 16] [--max-new-tokens 160] [--teach-limit 4] [--out DIR]

vLLM lives in its own virtual environment (docs/scaling.md#vllm-in-its-own-environment): ``--vllm-python`` is its
interpreter, and mapd starts ``python -m vllm.entrypoints.openai.api_server`` with it (the CPU build's ``vllm``
script does not start). The model is the embedded student, converted once to a float32 folder
(``mapd.models.servable``) and served in float32, so greedy texts can equal in-process ones.

1. eval: the first ``--limit`` test questions, greedy, in-process (transformers ``generate``) and served (the
   student's calls through the call path, ``--concurrency`` in flight); bench/served_eval.py's ``run_mode`` and
   ``compare`` do the work. Printed: answering and end-to-end seconds, server readiness, and how many texts,
   answers and cut-off flags differ (texts compared as they are and up to surrounding whitespace).
2. teach: ``mapd teach`` (a subprocess, as a user runs it) with one teacher served by vLLM (the same model,
   temperature 0, review off: a committee of one) on ``--teach-limit`` of the in-process mistakes. Printed: wall
   seconds, whether every record has its text, and how many servers the teacher's log shows started. Then the same
   command again: every call is cached, so no server may start.
3. leftovers: every process whose command line names vLLM's entry point, after all of the above (expected: none).

Exit status 1 when a check fails (texts differ beyond whitespace, a record lacks its text, the cached rerun
started a server, a process is left), so the bench is also the project's check of the engines path on vLLM.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTRY = "vllm.entrypoints.openai.api_server"
SERVE = ("VLLM_CPU_KVCACHE_SPACE={kv} {python} -m " + ENTRY + " --model {{model}} --host {{host}} --port {{port}} "
         "--served-model-name {{name}} --dtype float32 --max-model-len 2048")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="The Python of vLLM's own environment.")
    parser.add_argument("--data", help="Folder of SVAMP <split>.jsonl files (default: $MAPD_SHARED_DATA/svamp).")
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=16, help="Questions evaluated (the first N of the test split).")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16, help="Served eval: requests in flight.")
    parser.add_argument("--teach-limit", type=int, default=4, help="Mistakes given to the served teacher.")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB).")
    parser.add_argument("--out", help="A new folder for this run (default: a new temporary folder, kept).")
    return parser.parse_args()


def eval_part(args, out: Path, serve: str) -> tuple[dict, dict, dict]:
    """(in-process result, served result, their comparison), as bench/served_eval.py measures them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import served_eval

    import mapd.student
    from mapd.log import log

    recorder = served_eval.Recorder()
    log.addHandler(recorder)
    calls: list[dict] = []
    mapd.student.Dispatcher = served_eval.counting_dispatcher(calls)
    settings = argparse.Namespace(model=args.model, batch_size=16, max_new_tokens=args.max_new_tokens, serve=serve,
                                  concurrency=args.concurrency, request_timeout=600.0, task="svamp", data=args.data,
                                  split="test", limit=args.limit)
    local = served_eval.run_mode("in-process", out / "in-process", settings, None, recorder, calls)
    served = served_eval.run_mode("served", out / "served", settings, out / "served" / "cache.sqlite", recorder, calls)
    return local, served, served_eval.compare(local, served)


def teach_part(args, out: Path, serve: str, predictions: list[dict]) -> list[dict]:
    """Two `mapd teach` runs with a vLLM-served teacher; what each did."""
    import yaml

    wrong = [p for p in predictions if not p["correct"]] or predictions
    mistakes = [{"id": p["id"], "question": p["question"], "gold": p["gold"], "output": p["output"],
                 "answer": p["answer"], "status": "wrong" if p["answer"] is not None else "unparsed"}
                for p in wrong[: args.teach_limit]]
    folder = out / "teach"
    folder.mkdir(parents=True)
    (folder / "mistakes.jsonl").write_text("".join(json.dumps(m) + "\n" for m in mistakes))
    config = {"task": {"name": "svamp", "path": args.data}, "review": {"enabled": False},
              "teachers": [{"name": "vllm", "model": args.model, "serve": serve, "temperature": 0.0, "max_tokens": 96,
                            "max_concurrency": 8, "timeout_s": 600, "ready_timeout_s": 900}]}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "mapd.cli", "teach", "--config", str(folder / "config.yaml"),
            "--mistakes", str(folder / "mistakes.jsonl"), "--out", str(folder / "out")]
    runs = []
    for label in ("first run", "rerun, every call cached"):
        began = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        wall = time.perf_counter() - began
        log = folder / "out" / "server-vllm.log"
        records = [json.loads(line) for name in ("feedback.jsonl", "rationales.jsonl")
                   for line in (folder / "out" / name).read_text().splitlines() if line.strip()] \
            if done.returncode == 0 else []
        runs.append({"label": label, "exit": done.returncode, "wall_s": wall, "records": len(records),
                     "complete": bool(records) and all(r.get("text") for r in records),
                     "servers_started": log.read_text().count("starting server") if log.exists() else 0,
                     "error": done.stderr.strip().splitlines()[-1] if done.returncode else None})
    return runs


def leftovers() -> list[str]:
    """Processes running vLLM's entry point."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if ENTRY in command and process.pid != os.getpid():
            found.append(f"{process.pid}: {command[:160]}")
    return found


def main() -> None:
    args = parse_args()
    if args.data is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _common import shared_data

        args.data = str(shared_data() / "svamp")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vllm-served-"))
    out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([args.vllm_python, "-c", "import vllm, transformers, torch; print(vllm.__version__, "
                              "transformers.__version__, torch.__version__)"], capture_output=True, text=True)
    if version.returncode:
        sys.exit(f"{args.vllm_python} cannot import vllm: {version.stderr.strip().splitlines()[-1:]}")
    serve = SERVE.format(kv=args.kv_cache_gib, python=shlex.quote(args.vllm_python))
    from mapd.log import setup

    setup(0)
    logging.getLogger("mapd").setLevel(logging.INFO)
    print(f"vllm_served: vllm, transformers, torch in vLLM's environment: {version.stdout.strip()}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; serve: {serve}; out {out}", flush=True)

    local, served, diff = eval_part(args, out, serve)
    n = local["metrics"]["n"]
    print(f"\n{'eval':<12} {'answer s':>9} {'wall s':>7} {'ready s':>8} {'accuracy':>8} {'cut off':>7}")
    for r in (local, served):
        print(f"{r['mode']:<12} {r['answer_s']:>9.1f} {r['wall_s']:>7.1f} {r['ready_s'] or '-':>8} "
              f"{r['metrics']['accuracy']:>8.1%} {r['metrics']['cut_off_rate']:>7.1%}")
    same = n - len(diff["texts_stripped"])
    print(f"served vs in-process: texts identical up to edge whitespace {same}/{n} (exactly {n - len(diff['texts'])}"
          f"/{n}); answers differ {len(diff['answers'])}, cut-off flags differ {len(diff['cut_off'])}")
    for qid, at, la, lb, xa, xb in diff["first_differences"][:3]:
        print(f"  id {qid}: texts part at character {at} (lengths {la} / {lb}): {xa!r} vs {xb!r}")

    runs = teach_part(args, out, serve, local["predictions"])
    print(f"\n{'teach':<26} {'exit':>4} {'wall s':>7} {'records':>7} {'complete':>8} {'servers started (log)':>21}")
    for r in runs:
        print(f"{r['label']:<26} {r['exit']:>4} {r['wall_s']:>7.1f} {r['records']:>7} {str(r['complete']):>8} "
              f"{r['servers_started']:>21}" + (f"  error: {r['error']}" if r["error"] else ""))

    left = leftovers()
    print(f"\nvLLM processes left: {len(left)}" + "".join(f"\n  {line}" for line in left))
    checks = {"texts equal up to edge whitespace": not diff["texts_stripped"],
              "teacher records complete": all(r["exit"] == 0 and r["complete"] for r in runs),
              "cached rerun started no server": runs[1]["servers_started"] == runs[0]["servers_started"] == 1,
              "no process left": not left}
    (out / "summary.json").write_text(json.dumps({"eval": {k: {key: v for key, v in r.items() if key != "predictions"}
                                                            for k, r in (("in-process", local), ("served", served))},
                                                   "comparison": diff, "teach": runs, "leftovers": left,
                                                   "checks": checks}, indent=1, default=str) + "\n")
    print("checks: " + "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
