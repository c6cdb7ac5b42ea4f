"""Reproduce the paper's SVAMP ablations on CPU from the reference implementation's real teacher outputs.

    python bench/reproduce_svamp.py --out runs/reproduce-svamp            # the whole table
    python bench/reproduce_svamp.py --variants base method --eval-limit 50  # a quick look

Imports the reference data in $MAPD_REFERENCE_DATA (real GPT-3.5 / Gemini / Mixtral feedback and
peer-reviewed rationales for 387 SVAMP questions Llama-2-7B got wrong), builds one training set per
variant, trains SmolLM2-135M-Instruct on each with identical settings, evaluates every student on the
SVAMP test split in $MAPD_SHARED_DATA (both variables: bench/_common.py) and writes a Markdown table
(accuracy with a 95 % Wilson interval, pairs, training time).
Every variant is resumable: a finished one (its metrics.json exists) is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench._common

from bench._common import shared_data, svamp_reference_files  # noqa: E402

from mapd.config import BuildConfig, PromptConfig, StudentConfig, TaskConfig, TrainConfig  # noqa: E402
from mapd.io import read_jsonl  # noqa: E402
from mapd.layout import EvalLayout, RoundLayout  # noqa: E402
from mapd.report.render import COLORS  # noqa: E402
from mapd.stages.build import run_build  # noqa: E402
from mapd.stages.evaluate import evaluate_model  # noqa: E402
from mapd.stages.import_reference import import_reference  # noqa: E402
from mapd.stages.train import train_model  # noqa: E402
from mapd.stats import format_p, paired_comparison, wilson_interval  # noqa: E402

STUDENT = "embedded:smollm2-135m-instruct"
# variant -> (build mode, alpha); "base" is the untrained student
VARIANTS = {
    "base": (None, None),
    "method": ("mixed", 0.5),
    "no_review": ("no-review", 0.5),
    "single_gpt": ("single:gpt", 0.5),
    "single_gemini": ("single:gemini", 0.5),
    "single_mistral": ("single:mistral", 0.5),
    "no_feedback": ("mixed", 0.0),
}
LABELS = {
    "base": "base student (no training)",
    "method": "the method: mixed committee + peer review + feedback",
    "no_review": "mixed, no peer review",
    "single_gpt": "single teacher: gpt",
    "single_gemini": "single teacher: gemini",
    "single_mistral": "single teacher: mistral",
    "no_feedback": "the method without feedback (alpha = 0)",
}


def prepare_reference(out: Path) -> Path:
    """Import the reference SVAMP files once into out/reference."""
    reference = out / "reference"
    if not (reference / "rationales.jsonl").exists():
        import_reference("svamp", *svamp_reference_files(), RoundLayout(reference))
    return reference


def run_variant(name: str, args: argparse.Namespace, reference: Path, train_config: TrainConfig) -> dict:
    """Build, train and evaluate one variant (skipped when its metrics exist)."""
    folder = args.out / name
    result_path = folder / "result.json"
    if result_path.exists():
        print(f"{name}: done earlier, skipped")
        return json.loads(result_path.read_text())
    mode, alpha = VARIANTS[name]
    result: dict = {"variant": name, "pairs": 0, "train_seconds": 0.0}
    model = STUDENT
    task = TaskConfig(name="svamp", path=str(shared_data() / "svamp"))
    if mode is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for artifact in ("mistakes", "feedback", "rationales"):
            shutil.copyfile(reference / f"{artifact}.jsonl", folder / f"{artifact}.jsonl")
        round_folder = RoundLayout(folder)
        run_build(round_folder, task=task, build=BuildConfig(mode=mode, seed=args.seed), prompts=PromptConfig())
        trained = train_model(train_config.model_copy(update={"alpha": alpha}), STUDENT, round_folder.train,
                              round_folder.model)
        result.update(pairs=trained["pairs"], train_seconds=round(trained["seconds"], 1), train_loss=trained["train_loss"])
        model = str(round_folder.model)
    student = StudentConfig(model=model, batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens)
    metrics = evaluate_model(EvalLayout(folder / "eval"), student=student, task=task, split="test",
                             limit=args.eval_limit, prompts=PromptConfig())
    correct = round(metrics.accuracy * metrics.n)
    low, high = wilson_interval(correct, metrics.n)
    result.update(n=metrics.n, correct=correct, accuracy=metrics.accuracy, ci_low=low, ci_high=high,
                  strict_accuracy=metrics.strict_accuracy, unparsed_rate=metrics.unparsed_rate,
                  eval_seconds=metrics.seconds)
    folder.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def correctness(out: Path, variant: str) -> dict[str, bool]:
    """Question id -> whether the variant's student answered it correctly."""
    return {r["id"]: bool(r["correct"]) for r in read_jsonl(out / variant / "eval" / "predictions.jsonl")}


def table(results: list[dict], out: Path) -> str:
    """The Markdown results table; the last column compares each variant with the method question by question."""
    names = {r["variant"] for r in results}
    method = correctness(out, "method") if "method" in names else None
    lines = ["| variant | accuracy | 95 % interval | correct / n | training pairs | training time | "
             "vs. the method: only method right / only this right, McNemar p |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        minutes = f"{r['train_seconds'] / 60:.1f} min" if r["train_seconds"] else "—"
        paired = "—"
        if method is not None and r["variant"] != "method":
            comparison = paired_comparison(method, correctness(out, r["variant"]))  # lost: only the method right
            paired = f"{comparison.lost} / {comparison.gained}, p = {format_p(comparison.p_value)}"
        lines.append(
            f"| {LABELS[r['variant']]} | {r['accuracy']:.1%} | {r['ci_low']:.1%} – {r['ci_high']:.1%} | "
            f"{r['correct']} / {r['n']} | {r['pairs'] or '—'} | {minutes} | {paired} |"
        )
    return "\n".join(lines)


def plot_losses(out: Path, variants: list[str], window: int = 5) -> Path | None:
    """One panel per loss kind, one line per trained variant (running mean over ``window`` logged
    steps: a step's loss is that of 8 pairs, noisy) -> out/loss_curves.png."""
    logs = {name: read_jsonl(out / name / "model" / "train_log.jsonl") for name in variants
            if (out / name / "model" / "train_log.jsonl").exists()}
    if not logs:
        return None
    fig = Figure(figsize=(11, 3.6))
    panels = fig.subplots(1, 2, sharey=True)
    for panel, key in zip(panels, ("loss_feedback", "loss_rationale")):
        for i, (name, log) in enumerate(logs.items()):
            points = [(x["step"], x[key]) for x in log if x.get(key) is not None]
            if not points:
                continue
            steps, losses = zip(*points)
            smooth = [sum(losses[max(0, j - window + 1): j + 1]) / len(losses[max(0, j - window + 1): j + 1])
                      for j in range(len(losses))]
            panel.plot(steps, smooth, label=name, color=COLORS[i % len(COLORS)])
        panel.set_title(f"{key} (running mean of {window} logged steps)")
        panel.set_xlabel("optimizer step")
        panel.spines[["top", "right"]].set_visible(False)
    panels[0].set_ylabel("cross-entropy per target token")
    panels[1].legend(frameon=False, fontsize=8)
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce-svamp"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lora", action="store_true", help="LoRA instead of a full fine-tune.")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--eval-limit", type=int, default=None, help="Only the first N test questions (default: all 300).")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--seed", type=int, default=731)
    args = parser.parse_args()
    svamp_reference_files(), shared_data()  # both folders, before any work
    train_config = TrainConfig(
        num_train_epochs=args.epochs, max_steps=args.max_steps, lora=args.lora, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1, max_length=args.max_length,
        seed=args.seed, save_steps=25,
    )
    start = time.perf_counter()
    reference = prepare_reference(args.out)
    results = [run_variant(name, args, reference, train_config) for name in args.variants]
    settings = json.dumps({k: str(v) for k, v in vars(args).items()})
    print(f"\nsettings: {settings}\nwall time: {(time.perf_counter() - start) / 60:.1f} min\n")
    print(table(results, args.out))
    (args.out / "results.json").write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                                       "results": results}, indent=2))
    plot = plot_losses(args.out, [name for name in args.variants if VARIANTS[name][0] is not None])
    if plot:
        print(f"\nloss curves: {plot}")


if __name__ == "__main__":
    main()
