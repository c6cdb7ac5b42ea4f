"""The ``mapd`` command: parses arguments, loads the config, calls one stage function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NoReturn

from mapd import log
from mapd.errors import MapdError
from mapd.io import check_folder, folder_lock


def _config(path: str | None):
    from mapd.config_file import embedded_default_config, load_config

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
    from pydantic import ValidationError

    from mapd.config import PromptConfig, StudentConfig
    from mapd.stages.evaluate import evaluate_model
    from mapd.layout import EvalLayout

    out = EvalLayout(Path(args.out))
    check_folder(out.dir, [out.predictions, out.metrics])  # before the model loads, not after it answered
    try:
        student = StudentConfig(model=args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                serve=args.serve, base_url=args.base_url, api_key_env=args.api_key_env,
                                max_concurrency=args.max_concurrency)
    except ValidationError as exc:
        raise MapdError(f"eval: {exc.errors()[0]['msg']}") from None
    evaluate_model(out, student=student, task=_task_config(args), split=args.split, limit=args.limit,
                   prompts=PromptConfig(), lock=True)


# The stage commands below check their folder first (a file there, or another command writing it, is
# refused before anything is read), then the stage reads and checks every input, and only then takes
# the folder's lock (creating the folder) to work and write: bad input leaves nothing behind.


def cmd_mine(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.mine import run_mine

    check_folder(args.out)
    config = _config(args.config)
    _stage(run_mine, RoundLayout(Path(args.out)), config, lock=True)


def cmd_teach(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.review import check_committee
    from mapd.stages.teach import run_batch_status, run_teach

    if not (args.dry_run or args.batch_status):  # these write nothing, not even the folder
        check_folder(args.out)
    if not (args.mistakes or args.batch_status):
        raise MapdError("teach: --mistakes is required (only --batch-status needs none)")
    config = _config(args.config)
    check_committee([teacher.name for teacher in config.teachers], config.review, args.config)
    folder = RoundLayout(Path(args.out), mistakes_file=args.mistakes and Path(args.mistakes))
    if args.batch_status:
        return _stage(run_batch_status, folder, config)
    _stage(run_teach, folder, config, dry_run=args.dry_run, lock=True)


def cmd_build(args: argparse.Namespace) -> None:
    from mapd.layout import RoundLayout
    from mapd.stages.build import run_build

    if not Path(args.run).is_dir():
        raise MapdError(f"--run {args.run}: no such folder")
    check_folder(args.run)
    config = _config(args.config)
    build = config.build.model_copy(update={"mode": args.mode}) if args.mode else config.build
    task = config.task if args.config else None  # None: the answer kind is inferred from the golds
    run_build(RoundLayout(Path(args.run)), task=task, build=build, prompts=config.prompts, lock=True)


def cmd_train(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from mapd.config import TrainConfig
    from mapd.models import resolve_model
    from mapd.stages.train import load_pairs, train_model

    # under `accelerate launch` every process runs this command on the same folder: no lock there
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed:
        check_folder(args.out)
    config = _config(args.config)
    overrides = {k: v for k, v in {"alpha": args.alpha, "max_steps": args.max_steps}.items() if v is not None}
    if args.lora:
        overrides["lora"] = True
    try:
        train_config = TrainConfig.model_validate({**config.train.model_dump(), **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise MapdError(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}") from None
    model = args.model or config.student.model
    gguf_file = args.gguf_file if args.model else config.student.gguf_file
    load_pairs(Path(args.data), train_config.alpha)  # a bad line or a missing file fails before the folder is made
    resolve_model(model, gguf_file)  # and so does a mistyped model path
    with nullcontext() if distributed else folder_lock(args.out):
        train_model(train_config, model=model, data=Path(args.data), out_dir=Path(args.out), gguf_file=gguf_file)


def cmd_report(args: argparse.Namespace) -> None:
    from mapd.report import write_report

    log.say(str(write_report(Path(args.run))))


def cmd_import_reference(args: argparse.Namespace) -> None:
    from mapd.stages.import_reference import import_reference
    from mapd.layout import RoundLayout

    check_folder(args.out)
    import_reference(args.task, Path(args.mistakes), args.feedback and Path(args.feedback),
                     args.rationale and Path(args.rationale), RoundLayout(Path(args.out)), lock=True)


def cmd_run(args: argparse.Namespace) -> None:
    from mapd.runner import run

    run(args.config, out=args.out and Path(args.out), start=args.start)


def cmd_config(args: argparse.Namespace) -> None:
    from mapd.config import EMBEDDED_DEFAULT, RunConfig
    from mapd.config_doc import default_config_yaml
    from mapd.config_file import load_config

    # the YAML is the command's product (``mapd config > my.yaml``): printed as is, not logged
    path = EMBEDDED_DEFAULT if args.demo else args.config
    config = load_config(path) if path else RunConfig()  # no file: the defaults a config's absent fields get
    print(default_config_yaml(config), end="")


def cmd_check(args: argparse.Namespace) -> None:
    from mapd.check import check

    check(args.config, offline=args.offline)


def cmd_init(args: argparse.Namespace) -> None:
    from mapd.config_file import write_template

    write_template(args.template, Path.cwd())


# the starter configs ``mapd init`` writes (src/mapd/configs/<name>.yaml)
TEMPLATES = ("paper-committee", "vllm-committee", "offline-default")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``mapd: error:`` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("mapd").strip()  # "eval" for `mapd eval`, "" for `mapd` itself
        self.exit(2, f"mapd: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def _at_least_one(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _loudness(parser: argparse.ArgumentParser, default: object) -> None:
    """-q / -v (``verbosity`` -1 or 1; ``default`` when neither is given)."""
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                          help="Print errors only (the folder's mapd.log still gets everything).")
    loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                          help="Also print each call: teacher, key, status, attempts, latency, tokens.")


class _SubcommandParser(_Parser):
    """A subcommand's parser: it takes -q / -v too (``mapd mine ... -v``), unset unless given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _loudness(self, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per stage."""
    parser = _Parser(prog="mapd", description="Mistake-aware peer-review distillation.")
    _loudness(parser, default=0)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    p = sub.add_parser("eval", help="Score a model on a task's split; write predictions.jsonl.")
    p.add_argument("--model", required=True, help="Hub id, folder, .gguf file or embedded:<name>.")
    p.add_argument("--task", required=True, help="gsm8k, svamp, strategyqa, logiqa or reasoning_gym:<name>.")
    p.add_argument("--data", help="Local folder of <split>.jsonl files (default: the hub).")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, help="Only the first N questions.")
    p.add_argument("--batch-size", type=_at_least_one, default=16)
    p.add_argument("--max-new-tokens", type=_at_least_one, default=512)
    p.add_argument("--out", default="eval-out", help="Output folder for predictions.jsonl and metrics.json.")
    p.add_argument("--serve", help="Generate with a server mapd starts: a command template with {model}, {port} "
                                   "and {name}, e.g. 'vllm serve {model} --port {port} --served-model-name {name}'.")
    p.add_argument("--base-url", help="Generate with an OpenAI-compatible server already running (--model: its name).")
    p.add_argument("--api-key-env", help="With --base-url: the environment variable holding the server's key.")
    p.add_argument("--max-concurrency", type=_at_least_one, default=64, help="Served: requests in flight at once.")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("mine", help="Collect the student's mistakes on the train split.")
    p.add_argument("--config", help="YAML config (default: the embedded default).")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("teach", help="Teacher feedback, rationales and peer review for mistakes.jsonl.")
    p.add_argument("--config", required=True)
    p.add_argument("--mistakes", help="mistakes.jsonl to teach (required, except with --batch-status).")
    p.add_argument("--out", required=True, help="Folder for the outputs: a round folder, or with --batch-status "
                                                "also a `mapd run` folder.")
    p.add_argument("--dry-run", action="store_true", help="Estimate calls and tokens, call nothing, write nothing "
                                                         "(local teachers are not loaded).")
    p.add_argument("--batch-status", action="store_true",
                   help="Show the batches this folder's run submitted (state and counts, asked of the provider); "
                        "teach nothing.")
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
    p.add_argument("--from", dest="start", metavar="STAGE",
                   help="Redo round 0's STAGE (eval_before, mine, teach, build, train or eval_after) and every stage "
                   "after it, in every round; their outputs are moved to <run folder>/superseded/<UTC time>/ first.")
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

    p = sub.add_parser("config", help="Print every field with its help text: the defaults a config gets for the "
                                      "fields it leaves out, or a config file's resolved values.")
    p.add_argument("config", nargs="?", help="A YAML config to show resolved, e.g. a file `mapd init` wrote "
                                             "(default: none, the bare defaults).")
    p.add_argument("--demo", action="store_true", help="Show the offline demo's config (what `mapd run` runs "
                                                       "without a config), not the bare defaults.")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("check", help="Check a config, its keys and endpoints, and bound what teaching may cost; "
                                     "writes nothing.")
    p.add_argument("config", nargs="?", help="YAML config (default: the offline embedded demo).")
    p.add_argument("--offline", action="store_true", help="Do not probe the endpoints (keys are still checked).")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("init", help="Write a starter config into the current folder.")
    p.add_argument("template", nargs="?", default="paper-committee", choices=TEMPLATES,
                   help="paper-committee (hosted APIs, the paper's committee), vllm-committee (your own servers), "
                        "offline-default (the offline demo, no keys).")
    p.set_defaults(func=cmd_init)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: a MapdError becomes one line on stderr and its exit code (mapd.errors)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    log.setup(args.verbosity)
    try:
        with _sigterm_as_interrupt() as terminated:
            args.func(args)
    except (MapdError, KeyboardInterrupt) as exc:  # the folder's mapd.log has it already (mapd.log.to_file)
        log.end(exc)
        return exc.exit_code if isinstance(exc, MapdError) else 143 if terminated else 130
    return 0


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list[bool]]:
    """While the block runs, SIGTERM (``kill``, a scheduler's stop) is handled like Ctrl-C: the same clean stop,
    logged, the manifest saying ``interrupted``; the flag yielded (a list, true once SIGTERM came) makes the exit
    code 143 instead of 130 (docs/reliability.md#exit-codes)."""
    import signal
    import threading

    terminated: list[bool] = []
    if threading.current_thread() is not threading.main_thread():  # (signal handlers: the main thread only)
        yield terminated
        return

    def on_sigterm(signum: int, frame: object) -> None:
        terminated.append(True)
        ctrl_c = signal.getsignal(signal.SIGINT)  # asyncio's while a dispatcher runs: it cancels the run cleanly
        if callable(ctrl_c):
            ctrl_c(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
