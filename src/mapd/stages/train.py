"""Joint-loss fine-tuning of the student: alpha * L_feedback + (1 - alpha) * L_rationale.

Each term is the token-level mean cross-entropy over the completion tokens of that kind of pair
in the micro-batch (prompt and padding tokens carry label -100). A micro-batch without a pair of
one kind contributes 0 for that term (the other term keeps its weight; no renormalisation). A
kind whose weight is 0 is dropped from the data (alpha = 0: rationale pairs only; alpha = 1:
feedback pairs only).

So, in expectation over micro-batches, the feedback term weighs alpha * P(a micro-batch holds
feedback) and the rationale term (1 - alpha) * P(it holds a rationale), not alpha and 1 - alpha.
Grouping by length (the default) often separates the kinds, feedback pairs being the longer:
on the reference SVAMP pairs (batch 8, 10 epochs) 57 % of micro-batches hold both kinds, 21 %
feedback only, 23 % rationales only, so the weights are 0.387 and 0.396. Their ratio stays
alpha's (feedback share 0.494), but they sum to 0.78 instead of 1, and within a kind the weight
per token is uneven: short pairs batched together, and a pair that is its kind's only one in a
mixed micro-batch (it carries that kind's whole term), weigh more. Without grouping, 98 % of
micro-batches are mixed (sum 0.99) for 1.52x the tokens. Figures, command and the reasons for
keeping it: docs/training.md#the-joint-loss-in-practice (bench/joint_loss_weighting.py).

Built on the transformers ``Trainer``, so ``accelerate launch`` with DeepSpeed or FSDP runs it
unchanged; ``train.launch`` makes ``mapd run`` start it that way (:func:`launch_train`). Pairs are
tokenized with the student's chat template, padded per batch (right
padding) and grouped by length. Checkpoints go to ``out_dir/checkpoint-N``; a rerun resumes
from the last one. The trained model and tokenizer are saved in ``out_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mapd.config import TRAINING_ARGUMENTS, StudentConfig, TrainConfig
from mapd.errors import MapdError
from mapd.log import say
from mapd.io import append_jsonl, read_json, read_jsonl, write_json, write_jsonl
from mapd.layout import TRAIN_SUMMARY, RoundLayout
from mapd.model_card import finish_model_folder, write_model_card
from mapd.records import TrainingPair, read_records

KINDS = ("feedback", "rationale")
LAUNCH_CONFIG = "launch.yaml"  # in the model folder: the settings a train.launch child trains with
LAUNCH_LOG = "launch.log"  # in the model folder: a train.launch child's output


def load_pairs(path: Path, alpha: float) -> list[TrainingPair]:
    """The train.jsonl pairs whose kind has a non-zero weight; a bad line raises MapdError naming it."""
    records = read_records(path, TrainingPair)
    if not records:
        raise MapdError(f"{path}: no training pairs")
    weights = {"feedback": alpha, "rationale": 1 - alpha}
    pairs = [record for record in records if weights[record.kind] > 0]
    if not pairs:
        kept = "rationale" if alpha == 0 else "feedback"
        raise MapdError(f"{path}: alpha={alpha} trains on {kept} pairs only, and the file has none")
    return pairs


def tokenize_pair(tokenizer, pair: TrainingPair, max_length: int) -> dict[str, Any]:
    """Token ids and labels of one pair: its messages (system included) in the student's chat template,
    exactly as evaluation renders them (labels -100), then the completion + eos.

    A pair longer than ``max_length`` loses the start of its prompt first (the end, which holds
    the assistant turn marker, stays); a completion that alone leaves less than half of
    ``max_length`` to the prompt is cut at its end instead.
    """
    from mapd.generation import render_prompt

    prompt = tokenizer(render_prompt(tokenizer, pair.messages()), add_special_tokens=False)["input_ids"]
    completion = tokenizer(pair.completion, add_special_tokens=False)["input_ids"]
    completion = completion + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    budget = max(max_length - len(completion), min(len(prompt), max_length // 2))
    prompt = prompt[max(0, len(prompt) - budget) :]
    completion = completion[: max_length - len(prompt)]
    return {
        "input_ids": prompt + completion,
        "attention_mask": [1] * (len(prompt) + len(completion)),
        "labels": [-100] * len(prompt) + completion,
        "is_feedback": pair.kind == "feedback",
    }


class JointCollator:
    """Pads a batch to its longest pair (labels with -100) and keeps each pair's kind."""

    def __init__(self, tokenizer) -> None:
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.pad([{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features])
        batch["is_feedback"] = torch.tensor([f["is_feedback"] for f in features])
        return batch


def kind_losses(logits, labels, is_feedback) -> dict[str, Any]:
    """Mean next-token cross-entropy over the label tokens of each kind (0 for an absent kind).

    Only positions with a label enter the softmax, which saves the memory and time of the
    prompt and padding positions.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    counted = targets != -100
    token_loss = F.cross_entropy(logits[:, :-1][counted].float(), targets[counted], reduction="none")
    feedback = is_feedback[:, None].expand_as(targets)[counted]
    masks = {"feedback": feedback, "rationale": ~feedback}
    return {kind: (token_loss * mask).sum() / mask.sum().clamp(min=1) for kind, mask in masks.items()}


def make_trainer(config: TrainConfig, model, tokenizer, features: list[dict[str, Any]], out_dir: Path, bf16: bool):
    """A transformers ``Trainer`` whose loss is the joint loss; it logs to ``out_dir``/train_log.jsonl."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class JointLossTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides it by the accumulation steps

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.kind_history: dict[str, list] = {kind: [] for kind in KINDS}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            is_feedback, labels = inputs.pop("is_feedback"), inputs.pop("labels")
            outputs = model(**inputs)
            losses = kind_losses(outputs.logits, labels, is_feedback)
            for kind, present in (("feedback", is_feedback.any()), ("rationale", (~is_feedback).any())):
                if present and model.training:
                    self.kind_history[kind].append(losses[kind].detach())
            loss = config.alpha * losses["feedback"] + (1 - config.alpha) * losses["rationale"]
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:  # per-kind means over the micro-batches since the last log (this process)
                for kind, values in self.kind_history.items():
                    if values:
                        logs[f"loss_{kind}"] = round(sum(float(v) for v in values) / len(values), 4)
                    values.clear()
            super().log(logs, start_time)

    class LogFile(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if state.is_world_process_zero and logs and "loss" in logs:
                fields = ("epoch", "loss", "loss_feedback", "loss_rationale", "learning_rate")
                append_jsonl(out_dir / "train_log.jsonl", [{"step": state.global_step} | {k: logs.get(k) for k in fields}])

    own = {option: getattr(config, field) for option, field in TRAINING_ARGUMENTS.items()}
    own |= {"bf16": bf16, "train_sampling_strategy": "group_by_length" if config.group_by_length else "random",
            "output_dir": str(out_dir), "save_strategy": "steps", "remove_unused_columns": False}
    defaults = {"dataloader_pin_memory": torch.cuda.is_available(), "report_to": "none"}  # train.args may change
    try:
        args = TrainingArguments(**(defaults | config.args | own))
    except (TypeError, ValueError) as exc:
        if not config.args:
            raise
        raise MapdError(f"train.args: TrainingArguments refused them: {exc}") from exc
    return JointLossTrainer(
        model=model,
        args=args,
        train_dataset=features,
        data_collator=JointCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=[LogFile()],
    )


def _resume_point(out_dir: Path, is_main: bool) -> str | None:
    """The last complete checkpoint in ``out_dir`` (or None); train_log.jsonl is cut back to its step.

    The Trainer writes trainer_state.json last, so a checkpoint without a readable one was cut
    short by a kill and is passed over.
    """
    numbered = [p for p in out_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    complete = [p for p in numbered if _readable_json(p / "trainer_state.json")]
    last = str(max(complete, key=lambda p: int(p.name.split("-", 1)[1]))) if complete else None
    step = int(last.rsplit("-", 1)[1]) if last else 0
    log = out_dir / "train_log.jsonl"
    if is_main and log.exists():
        write_jsonl(log, [r for r in read_jsonl(log, partial_tail_ok=True) if r.get("step", 0) <= step])
    return last


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _drop_gguf_mark(student, name: str) -> None:
    """A GGUF student loads dequantized but still marked quantized; unmark it so it trains and saves as safetensors."""
    quantizer = getattr(student, "hf_quantizer", None)
    if quantizer is None or quantizer.quantization_config.quant_method != "gguf":
        return
    if getattr(quantizer, "packed_modules", None):
        raise MapdError(
            f"model {name}: its GGUF weights stay packed for fast inference (the kernels package is installed), "
            "and packed weights cannot be trained; uninstall kernels for this run or convert the model to safetensors"
        )
    quantizer.remove_quantization_config(student)


def prepare_trainer(config: TrainConfig, model: str, data: Path, out_dir: Path, gguf_file: str | None = None):
    """Load the pairs and the student; return ``(trainer, pairs)``, the joint-loss Trainer ready to train."""
    import torch
    from transformers import set_seed

    from mapd.generation import load_model

    pairs = load_pairs(Path(data), config.alpha)
    bf16 = config.bf16 if config.bf16 is not None else torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    set_seed(config.seed)
    student, tokenizer = load_model(model, gguf_file, dtype=config.model_dtype)
    _drop_gguf_mark(student, model)
    tokenizer.padding_side = "right"
    features = [tokenize_pair(tokenizer, pair, config.max_length) for pair in pairs]
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
        student = get_peft_model(student, lora)
    return make_trainer(config, student, tokenizer, features, Path(out_dir), bool(bf16)), pairs


def train_model(config: TrainConfig, model: str, data: Path, out_dir: Path, gguf_file: str | None = None) -> dict[str, Any]:
    """Fine-tune the student ``model`` (with ``gguf_file``, a GGUF file inside it) on ``data`` (train.jsonl)
    with the joint loss; save it in ``out_dir``.

    Resumes from the last checkpoint in ``out_dir``. Returns ``{steps, train_loss, seconds, pairs}``.
    """
    out_dir = Path(out_dir)
    trainer, pairs = prepare_trainer(config, model, data, out_dir, gguf_file)
    checkpoint = _resume_point(out_dir, trainer.is_world_process_zero())
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.config.use_cache = True  # an inference setting that training (gradient checkpointing) turned off
    if config.lora and config.merge_lora:
        merged = trained.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(out_dir)
            trainer.processing_class.save_pretrained(out_dir)
    else:
        trainer.save_model(str(out_dir))  # with the tokenizer; a LoRA adapter alone when merge_lora is off
    kinds = {kind: sum(p.kind == kind for p in pairs) for kind in KINDS}
    truncated = sum(len(f["input_ids"]) >= config.max_length for f in trainer.train_dataset)
    resumed = f", resumed from {Path(checkpoint).name}" if checkpoint else ""
    world_size = trainer.args.world_size
    processes = f" on {world_size} processes" if world_size > 1 else ""
    say(
        f"train: {len(pairs)} pairs ({kinds['feedback']} feedback, {kinds['rationale']} rationale; "
        f"{truncated} at max_length {config.max_length}), {trainer.state.global_step} steps{resumed}{processes}, "
        f"loss {result.training_loss:.4f}, {seconds:.0f} s -> {out_dir}"
    )
    summary = {"steps": trainer.state.global_step, "train_loss": result.training_loss, "seconds": seconds,
               "pairs": len(pairs), "world_size": world_size}
    if trainer.is_world_process_zero():
        write_json(out_dir / TRAIN_SUMMARY, summary)
        finish_model_folder(out_dir, config.keep_checkpoints)  # what one would upload: no checkpoints, 0644
        write_model_card(out_dir, base_model=model, pairs=pairs, steps=trainer.state.global_step)
    return summary


def launch_train(config: TrainConfig, model: str, data: Path, out_dir: Path, gguf_file: str | None = None
                 ) -> dict[str, Any]:
    """:func:`train_model` as ``mapd train`` under the launcher ``config.launch`` (e.g. ``accelerate launch
    --multi_gpu --num_processes 8``), in a watched process group that never outlives mapd (mapd.serve). Its
    output is shown and appended to ``out_dir``/launch.log; its settings go to ``out_dir``/launch.yaml.
    Returns the summary its main process wrote; CommandFailed (one line, the log's last lines) when it fails."""
    import shlex

    import yaml

    from mapd.serve import run_watched

    out_dir.mkdir(parents=True, exist_ok=True)
    settings = out_dir / LAUNCH_CONFIG
    settings.write_text(yaml.safe_dump({"train": config.model_dump(mode="json", exclude={"launch"})}, sort_keys=False))
    (out_dir / TRAIN_SUMMARY).unlink(missing_ok=True)  # the one the run below writes, not an earlier one
    argv = ["-m", "mapd.cli", "train", "--config", str(settings), "--data", str(data), "--out", str(out_dir),
            "--model", model, *(["--gguf-file", gguf_file] if gguf_file else [])]
    run_watched(f"{config.launch} {shlex.join(argv)}", out_dir / LAUNCH_LOG, what="train.launch")
    return read_json(out_dir / TRAIN_SUMMARY, dict)


def run_train(folder: RoundLayout, *, student: StudentConfig, train: TrainConfig) -> dict[str, Any]:
    """Train ``student`` on the round's train.jsonl into ``round/model``: in this process (:func:`train_model`),
    or under ``train.launch`` (:func:`launch_train`)."""
    how = launch_train if train.launch else train_model
    return how(train, student.model, folder.train, folder.model, student.gguf_file)
