"""The ``mapd`` command: parses arguments, loads the config, calls one stage function."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from mapd.errors import MapdError
from mapd.io import folder_lock


def _config(path: str | None):
    from mapd.config import embedded_default_config, load_config

    return load_config(path) if path else embedded_default_config()


def _task_config(args: argparse.Namespace):
    from mapd.config import TaskConfig

    fields = {"name": args.task}
    if getattr(args, "data", None):
        fields["path"] = args.data
    return TaskConfig(**fields)


def _stage(run, folder, config, **extra) -> None:
    """Call a stage wrapper with the config fields it names (as ``mapd run`` does)."""
    from mapd.runner import stage_sections

    run(folder, **stage_sections(run, config), **extra)


def cmd_eval(args: argparse.Namespace) -> None:
    from mapd.config import PromptConfig
    from mapd.evaluate import evaluate_model
    from mapd.layout import EvalLayout

    evaluate_model(EvalLayout(Path(args.out)), model=args.model, task=_task_config(args), split=args.split,
                   limit=args.limit, prompts=PromptConfig(), batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens)


def cmd_mine(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.mine import run_mine

    config = _config(args.config)
    with folder_lock(args.out):
        _stage(run_mine, RoundLayout(Path(args.out)), config)


def cmd_teach(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.teach import run_teach

    config = _config(args.config)
    folder = RoundLayout(Path(args.out), mistakes_file=Path(args.mistakes))
    with nullcontext() if args.dry_run else folder_lock(args.out):  # a dry run writes nothing
        _stage(run_teach, folder, config, dry_run=args.dry_run)


def cmd_build(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.build import run_build

    if not Path(args.run).is_dir():
        raise MapdError(f"--run {args.run}: no such folder")
    config = _config(args.config)
    build = config.build.model_copy(update={"mode": args.mode}) if args.mode else config.build
    task = config.task if args.config else None  # None: the answer kind is inferred from the golds
    with folder_lock(args.run):
        run_build(RoundLayout(Path(args.run)), task=task, build=build, prompts=config.prompts)


def cmd_train(args: argparse.Namespace) -> None:
    from mapd.train import train_model

    config = _config(args.config)
    overrides = {k: v for k, v in {"alpha": args.alpha, "max_steps": args.max_steps}.items() if v is not None}
    if args.lora:
        overrides["lora"] = True
    train_config = config.train.model_copy(update=overrides)
    gguf_file = args.gguf_file if args.model else config.student.gguf_file
    # under `accelerate launch` every process runs this command on the same folder: no lock there
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with nullcontext() if distributed else folder_lock(args.out):
        train_model(train_config, model=args.model or config.student.model, data=Path(args.data),
                    out_dir=Path(args.out), gguf_file=gguf_file)


def cmd_report(args: argparse.Namespace) -> None:
    from mapd.report import write_report

    print(write_report(Path(args.run)))


def cmd_import_reference(args: argparse.Namespace) -> None:
    from mapd.import_reference import import_reference
    from mapd.layout import RoundLayout

    with folder_lock(args.out):
        import_reference(args.task, Path(args.mistakes), args.feedback and Path(args.feedback),
                         args.rationale and Path(args.rationale), RoundLayout(Path(args.out)))


def cmd_run(args: argparse.Namespace) -> None:
    from mapd.runner import run

    run(args.config, out=args.out and Path(args.out))


def cmd_config(args: argparse.Namespace) -> None:
    from mapd.config import default_config_yaml, embedded_default_config

    print(default_config_yaml(embedded_default_config()), end="")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per stage."""
    parser = argparse.ArgumentParser(prog="mapd", description="Mistake-aware peer-review distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="Score a model on a task's split; write predictions.jsonl.")
    p.add_argument("--model", required=True, help="Hub id, folder, .gguf file or embedded:<name>.")
    p.add_argument("--task", required=True, help="gsm8k, svamp, strategyqa, logiqa or reasoning_gym:<name>.")
    p.add_argument("--data", help="Local folder of <split>.jsonl files (default: the hub).")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="Only the first N questions.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--out", default="eval-out", help="Output folder for predictions.jsonl and metrics.json.")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("mine", help="Collect the student's mistakes on the train split.")
    p.add_argument("--config", help="YAML config (default: the embedded default).")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("teach", help="Teacher feedback, rationales and peer review for mistakes.jsonl.")
    p.add_argument("--config", required=True)
    p.add_argument("--mistakes", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true", help="Estimate calls and tokens, call nothing.")
    p.set_defaults(func=cmd_teach)

    p = sub.add_parser("build", help="Make train.jsonl from mistakes, feedback and rationales.")
    p.add_argument("--run", required=True, help="Folder holding mistakes/feedback/rationales.jsonl.")
    p.add_argument("--mode", help="mixed, single:<teacher>, no-review or all (default: the config's).")
    p.add_argument("--config")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="Fine-tune the student on train.jsonl with the joint loss.")
    p.add_argument("--model", help="Student (default: the config's).")
    p.add_argument("--gguf-file", help="GGUF file name inside the --model folder or hub repo, if any.")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--alpha", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lora", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="Every stage in order, resuming what is done.")
    p.add_argument("config", nargs="?", help="YAML config (default: the offline embedded demo).")
    p.add_argument("--out", help="Run folder (default: runs/<config name>).")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="Write report.html and report.md for a run folder.")
    p.add_argument("run")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("import-reference", help="Convert the reference implementation's JSON files.")
    p.add_argument("--task", required=True)
    p.add_argument("--mistakes", required=True)
    p.add_argument("--feedback")
    p.add_argument("--rationale")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_import_reference)

    p = sub.add_parser("config", help="Print the embedded default config with every field documented.")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: a MapdError becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MapdError as exc:
        print(f"mapd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mapd: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
