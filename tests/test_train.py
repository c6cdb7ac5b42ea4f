"""Instruction data (mapd.stages.build) and the joint-loss trainer (mapd.stages.train).

Trainer tests use the real SmolLM2 tokenizer with a tiny random Llama model (conftest's
``tiny_model_dir``), so labels and chat templates are the real ones and a step is quick.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mapd.answers import ANSWER_FORMATS
from mapd.cli import main
from mapd.config import TRAINING_ARGUMENTS, BuildConfig, PromptConfig, TrainConfig
from mapd.config_file import load_config
from mapd.errors import MapdError
from mapd.io import read_jsonl, write_jsonl
from mapd.layout import RoundLayout
from mapd.records import Feedback, Mistake, Rationale, TrainingPair
from mapd.stages.build import build_pairs, infer_answer_kind, run_build
from mapd.stages.train import JointCollator, kind_losses, load_pairs, make_trainer, tokenize_pair, train_model

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    """The real SmolLM2-135M-Instruct tokenizer (saved beside conftest's tiny model), right-padded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> Path:
    """conftest's tiny random Llama with the SmolLM2 tokenizer: real labels, fast steps."""
    return tiny_model_dir


def pairs(n: int = 8) -> list[dict]:
    """Small arithmetic pairs of both kinds, of varied lengths."""
    records = []
    for i in range(n):
        a, b = 3 + 7 * i, 11 + 5 * i
        records.append(
            {"id": str(i), "kind": "rationale", "teacher": "t", "prompt": f"What is {a} + {b}?",
             "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        )
        records.append(
            {"id": str(i), "kind": "feedback", "teacher": "t",
             "prompt": f"A student said {a} + {b} = {a + b + 1}{' and more' * (i % 3)}. Point out the mistake.",
             "completion": f"The sum of {a} and {b} is {a + b}, not {a + b + 1}."}
        )
    return records


def training_pairs(n: int = 8) -> list[TrainingPair]:
    """pairs(n) as the TrainingPair records tokenize_pair takes."""
    return [TrainingPair.model_validate(record) for record in pairs(n)]


def fast_config(**overrides) -> TrainConfig:
    fields = dict(
        learning_rate=1e-2, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=96,
        save_steps=50, warmup_ratio=0.0, lr_scheduler_type="constant",
    )
    return TrainConfig(**(fields | overrides))


@pytest.fixture
def train_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", pairs())


# ---------------------------------------------------------------- tokenization and labels


def test_prompt_and_padding_labels_are_masked(tokenizer):
    from mapd.generation import render_prompt

    records = training_pairs(3)[:3]  # rationale, feedback, rationale: different lengths
    features = [tokenize_pair(tokenizer, r, max_length=256) for r in records]
    batch = JointCollator(tokenizer)(features)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # so masking by position, not by id, matters
    for row, record in enumerate(records):
        prompt_text = render_prompt(tokenizer, [{"role": "user", "content": record.prompt}])
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n = n_prompt + len(completion)
        labels = batch["labels"][row].tolist()
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:n] == completion  # the closing eos is learned even though pad == eos
        assert labels[n:] == [-100] * (len(labels) - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(labels) - n)
        assert batch["input_ids"][row, n_prompt:n].tolist() == completion
    assert batch["is_feedback"].tolist() == [False, True, False]
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in features)  # dynamic padding


def test_truncation_keeps_the_completion_and_the_prompt_end(tokenizer):
    record = TrainingPair(id="1", kind="rationale", teacher="t", prompt="word " * 300, completion="The answer is 4.")
    feature = tokenize_pair(tokenizer, record, max_length=64)
    completion = tokenizer("The answer is 4.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(feature["input_ids"]) == 64
    assert feature["labels"][-len(completion):] == completion
    assert tokenizer.decode(feature["input_ids"][: 64 - len(completion)]).endswith("<|im_start|>assistant\n")
    long = tokenize_pair(tokenizer, record.model_copy(update={"completion": "step " * 300}), max_length=64)
    assert len(long["input_ids"]) == 64 and long["labels"].count(-100) == 32  # half the room to the prompt


def test_batches_are_grouped_by_length_and_padded_dynamically(tokenizer, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    features = [tokenize_pair(tokenizer, r, 256) for r in training_pairs(16)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    widths = {}
    for grouped in (True, False):
        config = fast_config(group_by_length=grouped, per_device_train_batch_size=4)
        loader = make_trainer(config, model, tokenizer, features, tmp_path, bf16=False).get_train_dataloader()
        widths[grouped] = sum(batch["input_ids"].numel() for batch in loader)
    assert widths[True] <= widths[False] < 4 * 8 * 256  # never padded to max_length


def test_train_args_reach_training_arguments_unrenamed(tokenizer, tiny_model, tmp_path):
    """train.args goes to TrainingArguments as named; mapd's own fields go through the one table."""
    from transformers import AutoModelForCausalLM

    extra = {"optim": "adafactor", "dataloader_num_workers": 2, "lr_scheduler_kwargs": {"min_lr": 1e-6},
             "dataloader_pin_memory": True}
    config = fast_config(args=extra, max_steps=3, weight_decay=0.02, gradient_checkpointing=True)
    features = [tokenize_pair(tokenizer, r, 96) for r in training_pairs(2)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = make_trainer(config, model, tokenizer, features, tmp_path, bf16=False).args
    assert (args.optim, args.dataloader_num_workers, args.lr_scheduler_kwargs) == ("adafactor", 2, {"min_lr": 1e-6})
    assert args.dataloader_pin_memory and args.report_to == []  # a default of mapd's that train.args may change
    for option, field in TRAINING_ARGUMENTS.items():
        if option not in ("bf16", "train_sampling_strategy"):  # computed from the field: checked below
            assert getattr(args, option) == getattr(config, field), option
    assert (args.bf16, args.train_sampling_strategy, args.output_dir) == (False, "group_by_length", str(tmp_path))
    with pytest.raises(MapdError, match=r"^train\.args: TrainingArguments refused them: .*no_such_optimizer"):
        make_trainer(fast_config(args={"optim": "no_such_optimizer"}), model, tokenizer, features, tmp_path, bf16=False)


@pytest.mark.parametrize(("args", "message"), [
    ({"optim": "adamw_torch", "dataloader_num_worker": 2},
     "config.yaml:4: train.args.dataloader_num_worker: not a Hugging Face TrainingArguments option; did you mean "
     "'dataloader_num_workers'?"),
    ({"learning_rate": 1e-4},
     "config.yaml:3: train.args.learning_rate: mapd sets this TrainingArguments option itself, from "
     "train.learning_rate: set that instead"),
    ({"warmup_steps": 10}, "from train.warmup_ratio: set that instead"),
    ({"output_dir": "/tmp/x"}, "mapd sets this TrainingArguments option itself, it is the model folder"),
])
def test_train_args_are_checked_when_the_config_is_loaded(tmp_path, capsys, args, message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": {"args": args}}, sort_keys=False))
    with pytest.raises(MapdError) as error:
        load_config(config)
    assert message in str(error.value) and "\n" not in str(error.value)
    config.write_text(yaml.safe_dump({"train": {"args": {"optim": "adamw_torch", "lr_scheduler_kwargs": {}}}}))
    assert load_config(config).train.args == {"optim": "adamw_torch", "lr_scheduler_kwargs": {}}


# ---------------------------------------------------------------- the joint loss


def hand_loss(model, features, kind_is_feedback: bool):
    """Token-mean cross-entropy over the completions of one kind, one unpadded example at a time."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for f in features:
        if f["is_feedback"] != kind_is_feedback:
            continue
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor(f["labels"][1:])
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != -100
        total = total + F.cross_entropy(logits[keep], labels[keep], reduction="sum")
        count += int(keep.sum())
    return total / count if count else torch.tensor(0.0)


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_joint_loss_equals_weighted_kind_means(tokenizer, tiny_model, tmp_path, alpha):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    features = [tokenize_pair(tokenizer, r, 128) for r in training_pairs(3)]  # 3 rationale + 3 feedback, varied lengths
    trainer = make_trainer(fast_config(alpha=alpha), model, tokenizer, features, tmp_path, bf16=False)
    with torch.no_grad():
        loss = trainer.compute_loss(model, JointCollator(tokenizer)(features))
        l_f, l_r = hand_loss(model, features, True), hand_loss(model, features, False)
        assert float(loss) == pytest.approx(float(alpha * l_f + (1 - alpha) * l_r), rel=1e-4)
        only_rationales = [f for f in features if not f["is_feedback"]]
        loss = trainer.compute_loss(model, JointCollator(tokenizer)(only_rationales))
        assert float(loss) == pytest.approx(float((1 - alpha) * l_r), rel=1e-4)  # absent kind: term 0


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_a_single_kind_micro_batch_weighs_its_kind_alone(tokenizer, tiny_model, tmp_path, alpha):
    """No renormalisation either way (docs/training.md#the-joint-loss-in-practice): a feedback-only
    micro-batch counts alpha of its loss, a rationale-only one 1 - alpha, and their mean is the
    weighting that length-grouped (often single-kind) micro-batches give in expectation."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    features = [tokenize_pair(tokenizer, r, 128) for r in training_pairs(3)]
    trainer = make_trainer(fast_config(alpha=alpha), model, tokenizer, features, tmp_path, bf16=False)
    only_feedback = [f for f in features if f["is_feedback"]]
    only_rationales = [f for f in features if not f["is_feedback"]]
    with torch.no_grad():
        l_f, l_r = hand_loss(model, features, True), hand_loss(model, features, False)
        on_feedback = trainer.compute_loss(model, JointCollator(tokenizer)(only_feedback))
        on_rationales = trainer.compute_loss(model, JointCollator(tokenizer)(only_rationales))
    assert float(on_feedback) == pytest.approx(float(alpha * l_f), rel=1e-4)
    mean = (float(on_feedback) + float(on_rationales)) / 2  # each kind present in half the micro-batches
    assert mean == pytest.approx(float(alpha * 0.5 * l_f + (1 - alpha) * 0.5 * l_r), rel=1e-4)


def test_kind_losses_ignore_masked_tokens():
    import torch

    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, 3, 4]])
    a = kind_losses(logits, labels, torch.tensor([True, False]))
    logits[0, 3] += 100  # the position that predicts a masked token
    b = kind_losses(logits, labels, torch.tensor([True, False]))
    assert torch.allclose(a["feedback"], b["feedback"]) and torch.allclose(a["rationale"], b["rationale"])


# ---------------------------------------------------------------- training runs


def test_training_loss_falls_and_saves_a_loadable_model(tiny_model, train_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mapd.generation import load_model

    out = tmp_path / "model"
    result = train_model(fast_config(max_steps=12, learning_rate=3e-2), str(tiny_model), train_file, out)
    assert result["steps"] == 12 and result["pairs"] == 16
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert set(log[0]) == {"step", "epoch", "loss", "loss_feedback", "loss_rationale", "learning_rate"}
    for kind in ("loss_feedback", "loss_rationale"):
        logged = [r[kind] for r in log if r[kind] is not None]
        assert logged[-1] < 0.6 * logged[0]
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert AutoTokenizer.from_pretrained(out).chat_template  # mapd eval renders the same prompts
    assert load_model(str(out))[1].padding_side == "left"  # as mapd eval loads it
    assert "train: 16 pairs" in capsys.readouterr().out


def test_training_resumes_from_the_last_checkpoint(tiny_model, train_file, tmp_path, capsys):
    out = tmp_path / "model"
    kept = "in_place"  # a finished training's checkpoints stay where a rerun with more steps continues
    assert train_model(fast_config(max_steps=2, save_steps=2, keep_checkpoints=kept), str(tiny_model), train_file,
                       out)["steps"] == 2
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    result = train_model(fast_config(max_steps=4, save_steps=2, keep_checkpoints=kept), str(tiny_model), train_file,
                         out)
    assert result["steps"] == 4
    assert "resumed from checkpoint-2" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_lora_trains_and_saves_merged_or_adapter(tiny_model, train_file, tmp_path):
    from transformers import AutoModelForCausalLM

    config = fast_config(max_steps=2, lora=True, lora_r=4, lora_alpha=8)
    train_model(config, str(tiny_model), train_file, tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    train_model(config.model_copy(update={"merge_lora": False}), str(tiny_model), train_file, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_alpha_zero_trains_on_rationales_only(train_file):
    assert {p.kind for p in load_pairs(train_file, 0.0)} == {"rationale"}
    assert {p.kind for p in load_pairs(train_file, 1.0)} == {"feedback"}
    assert len(load_pairs(train_file, 0.5)) == 16


def test_bad_training_data_is_a_located_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MapdError, match="no training pairs"):
        load_pairs(empty, 0.5)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"id": "1", "kind": "feedback", "teacher": "t", "prompt": "q"}])
    with pytest.raises(MapdError, match=r"missing.jsonl:1: field 'completion': missing"):
        load_pairs(missing, 0.5)
    kind = write_jsonl(tmp_path / "kind.jsonl", [{"id": "1", "kind": "other", "teacher": "t", "prompt": "q",
                                                  "completion": "a"}])
    with pytest.raises(MapdError, match=r"kind.jsonl:1: field 'kind': .*\(got 'other'\)"):
        load_pairs(kind, 0.5)
    feedback_only = write_jsonl(tmp_path / "fb.jsonl", [{"id": "1", "kind": "feedback", "teacher": "t", "prompt": "q",
                                                         "completion": "a"}])
    with pytest.raises(MapdError, match="rationale pairs only"):
        load_pairs(feedback_only, 0.0)
    with pytest.raises(MapdError, match="file not found"):
        load_pairs(tmp_path / "absent.jsonl", 0.5)


# ---------------------------------------------------------------- build


def fb(i, teacher, text="fix it"):
    return {"id": i, "teacher": teacher, "text": text, "error": None if text else "HTTP 500"}


def rat(i, teacher, accepted, text="step by step"):
    return {"id": i, "teacher": teacher, "text": text, "error": None, "answer": "5", "reviews": [],
            "mean_score": 4.0 if accepted else 2.0, "accepted": accepted}


def mistake(i):
    return {"id": i, "question": f"Question {i}?", "gold": "5", "output": f"wrong answer {i}", "answer": "4",
            "status": "wrong"}


MISTAKES = [mistake(i) for i in ("m1", "m2", "m3", "m4")]
FEEDBACK = [
    fb("m1", "a", "a on m1"), fb("m1", "b", "b on m1"), fb("m1", "c", "c on m1"),
    fb("m2", "a", None), fb("m2", "b", None), fb("m2", "c", None),  # every feedback call failed
    fb("m3", "a", "a on m3"),
    fb("m4", "a", None), fb("m4", "b", "b on m4"),
]
RATIONALES = [
    rat("m1", "a", True, "a's m1"), rat("m1", "b", True, "b's m1"), rat("m1", "c", False, "c's m1"),
    rat("m2", "a", True),
    rat("m3", "a", False, "a's m3"), rat("m3", "b", False, "b's m3"), rat("m3", "c", False, None),
    rat("m4", "a", False, "a's m4"), rat("m4", "c", True, "c's m4"),
]


def run(mode, seed=731, mistakes=MISTAKES, feedback=FEEDBACK, rationales=RATIONALES):
    return build_pairs([Mistake.model_validate(m) for m in mistakes], [Feedback.model_validate(f) for f in feedback],
                       [Rationale.model_validate(r) for r in rationales], build=BuildConfig(mode=mode, seed=seed),
                       prompts=PromptConfig(), answer_kind="number")


def chosen(records, kind):
    return {r.id: r.teacher for r in records if r.kind == kind}


def test_build_mixed_uses_accepted_rationales_and_counts_drops():
    records, counts = run("mixed")
    assert counts["mistakes"] == 4 and counts["mistakes_used"] == 2
    assert counts["dropped_no_feedback"] == 1 and counts["dropped_no_rationale"] == 1
    assert counts["pairs"] == {"feedback": 2, "rationale": 2}
    assert chosen(records, "rationale")["m1"] in {"a", "b"} and chosen(records, "rationale")["m4"] == "c"
    assert chosen(records, "feedback")["m4"] == "b"
    assert records == run("mixed")[0]  # seeded: the same every time


def test_build_mixed_choice_is_seeded_per_mistake():
    many = [mistake(f"q{i}") for i in range(40)]
    feedback = [fb(m["id"], t) for m in many for t in "abc"]
    rationales = [rat(m["id"], t, True, f"{t} {m['id']}") for m in many for t in "abc"]
    first = run("mixed", 1, many, feedback, rationales)[0]
    assert chosen(first, "rationale") != chosen(run("mixed", 2, many, feedback, rationales)[0], "rationale")
    assert len(set(chosen(first, "rationale").values())) == 3  # every teacher gets picked
    gone = {m["id"] for m in many[:5]}
    fewer = run("mixed", 1, many[5:], [f for f in feedback if f["id"] not in gone],
                [r for r in rationales if r["id"] not in gone])[0]
    assert [r for r in first if r.id not in gone] == fewer  # other mistakes keep their draws


def test_build_prompts_are_the_templates_filled_in():
    prompts = PromptConfig()
    records, _ = run("mixed")
    feedback = next(r for r in records if r.kind == "feedback" and r.id == "m1")
    assert feedback.prompt == prompts.feedback.format(question="Question m1?", student_answer="wrong answer m1", gold="5")
    assert feedback.completion == f"{feedback.teacher} on m1"
    rationale = next(r for r in records if r.kind == "rationale" and r.id == "m1")
    assert rationale.prompt == prompts.answer.format(question="Question m1?", answer_format=ANSWER_FORMATS["number"])
    # TRL's prompt-completion form, plus the system message (none configured here)
    assert set(rationale.model_dump()) == {"id", "kind", "teacher", "system", "prompt", "completion"}
    assert rationale.system is None and feedback.system is None


def test_build_single_teacher_ignores_review():
    records, counts = run("single:a")
    assert {r.teacher for r in records} == {"a"}
    assert chosen(records, "rationale") == {"m1": "a", "m3": "a"}  # m3's rationale was rejected: used anyway
    assert counts["dropped_no_feedback"] == 2  # m2 and m4 have no feedback text from a
    with pytest.raises(MapdError, match=r"unknown teacher 'zz' \(teachers: a, b, c\)"):
        run("single:zz")


def test_build_no_review_and_all():
    records, counts = run("no-review")
    assert counts["mistakes_used"] == 3 and counts["dropped_no_rationale"] == 0
    assert chosen(records, "rationale")["m3"] in {"a", "b"}  # c's m3 has no text
    records, counts = run("all")
    assert counts["pairs"] == {"feedback": 4, "rationale": 3}
    assert sorted(r.completion for r in records if r.kind == "rationale") == ["a's m1", "b's m1", "c's m4"]
    with pytest.raises(MapdError, match="unknown"):
        run("best")


def test_build_later_line_wins_and_bad_records_are_located(tmp_path):
    records, _ = run("all", feedback=FEEDBACK + [fb("m1", "a", "a again")])
    assert "a again" in {r.completion for r in records} and "a on m1" not in {r.completion for r in records}
    with pytest.raises(MapdError, match=r"feedback: record 10: field 'id': 'nope' is not in the mistakes file"):
        run("mixed", feedback=FEEDBACK + [fb("nope", "a")])
    folder = write_run(tmp_path)  # a record missing a field is refused where it is read
    write_jsonl(folder / "rationales.jsonl", [{"id": "m1", "teacher": "a", "text": "x"}])
    with pytest.raises(MapdError, match=r"rationales.jsonl:1: field 'accepted': missing"):
        run_build(RoundLayout(folder), task=None, build=BuildConfig(), prompts=PromptConfig())


def test_infer_answer_kind():
    def golds(*values):
        return [Mistake.model_validate(mistake(str(i)) | {"gold": gold}) for i, gold in enumerate(values)]

    assert infer_answer_kind(golds("true", "false")) == "bool"
    assert infer_answer_kind(golds("A", "D")) == "choice"
    assert infer_answer_kind(golds("145", "true")) == "number"


def write_run(folder: Path) -> Path:
    for name, records in (("mistakes", MISTAKES), ("feedback", FEEDBACK), ("rationales", RATIONALES)):
        write_jsonl(folder / f"{name}.jsonl", records)
    return folder


def test_run_build_writes_train_jsonl(tmp_path, capsys):
    counts = run_build(RoundLayout(write_run(tmp_path)), task=None, build=BuildConfig(mode="mixed", seed=731),
                       prompts=PromptConfig())
    assert counts["answer_kind"] == "number"
    assert len(read_jsonl(tmp_path / "train.jsonl")) == 4
    assert "2 feedback + 2 rationale pairs" in capsys.readouterr().out


def test_pair_text_is_what_the_student_sees_at_evaluation(tokenizer):
    """The text a pair is trained on is exactly what the student sees at evaluation, system message included."""
    import torch

    from mapd import generation
    from mapd.stages.evaluate import evaluate
    from mapd.prompts import answer_messages, feedback_messages
    from mapd.tasks import Example

    prompts = PromptConfig(system="You are a careful math tutor. Check every step.")
    mistakes = {m["id"]: Mistake.model_validate(m) for m in MISTAKES}
    records, counts = build_pairs(
        list(mistakes.values()), [Feedback.model_validate(f) for f in FEEDBACK],
        [Rationale.model_validate(r) for r in RATIONALES], build=BuildConfig(mode="all"), prompts=prompts,
        answer_kind="number",
    )
    assert counts["pairs"] == {"feedback": 4, "rationale": 3}

    class Student:
        """Records the token ids generation hands the model (padding dropped); answers eos at once."""

        def __init__(self) -> None:
            self.seen: list[list[int]] = []

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, attention_mask, **options):
            self.seen += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
            return torch.cat([input_ids, torch.full((len(input_ids), 1), tokenizer.eos_token_id)], dim=1)

    def trained_prompt(pair: TrainingPair) -> list[int]:
        feature = tokenize_pair(tokenizer, pair, max_length=1024)  # room enough: nothing is cut
        n = feature["labels"].index(next(label for label in feature["labels"] if label != -100))
        assert feature["input_ids"][n:] == feature["labels"][n:]  # the rest is the completion, learned
        return feature["input_ids"][:n]

    def rendered(messages) -> list[int]:
        return tokenizer(generation.render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]

    student = Student()
    for pair in records:
        mistake = mistakes[pair.id]
        assert pair.system == prompts.system
        if pair.kind == "rationale":  # the student's own evaluation prompt for the question
            messages = answer_messages(prompts, mistake.question, "number")
            evaluate(student, tokenizer, [Example(id=mistake.id, question=mistake.question, gold=mistake.gold)],
                     "number", prompts, batch_size=1, max_new_tokens=4)
        else:  # the feedback prompt, rendered by the same generation path
            messages = feedback_messages(prompts, mistake.question, mistake.output, mistake.gold, "number")
            generation.generate(student, tokenizer, [messages], max_new_tokens=4, batch_size=1)
        prompt_ids = trained_prompt(pair)
        assert prompt_ids == student.seen[-1] == rendered(messages), (pair.kind, pair.id)
        text = tokenizer.decode(prompt_ids)
        assert prompts.system in text and "SmolLM" not in text  # our system message, not the template's default
        assert text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the CLI


def test_cli_build_and_train(tiny_model, tmp_path, capsys):
    run_dir = write_run(tmp_path / "run")
    assert main(["build", "--run", str(run_dir), "--mode", "all"]) == 0
    assert len(read_jsonl(run_dir / "train.jsonl")) == 7
    assert main(["build", "--run", str(run_dir), "--mode", "single:zz"]) == 2
    assert capsys.readouterr().err.strip().startswith("mapd: error: build mode single:zz: unknown teacher")

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                                                "max_length": 96, "save_steps": 10}}))
    argv = ["train", "--config", str(config), "--model", str(tiny_model), "--data", str(run_dir / "train.jsonl"),
            "--out", str(tmp_path / "model"), "--max-steps", "1", "--alpha", "0"]
    assert main(argv) == 0
    assert "train: 3 pairs (0 feedback, 3 rationale" in capsys.readouterr().out
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert main(["train", "--model", str(tiny_model), "--data", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "m2")]) == 2
    assert "absent.jsonl: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- a real GGUF student


@pytest.mark.slow
@pytest.mark.parametrize("form", ["embedded name", "folder + gguf_file"])
def test_gguf_student_trains_and_saves_safetensors(tmp_path, form):
    from transformers import AutoModelForCausalLM

    from mapd.models import resolve_model

    data = write_jsonl(tmp_path / "train.jsonl", pairs(2))
    config = TrainConfig(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=48)
    try:
        model = ("embedded:smollm2-135m-instruct", None) if form == "embedded name" else \
            resolve_model("embedded:smollm2-135m-instruct")  # a folder holding the .gguf file
        result = train_model(config, model[0], data, tmp_path / "model", gguf_file=model[1])
    except MapdError as exc:
        pytest.skip(str(exc))
    assert result["steps"] == 2 and result["pairs"] == 4
    assert (tmp_path / "model" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "llama"


def test_a_gguf_loaded_as_is_trains_unmarked_and_packed_gguf_weights_are_refused():
    """When a GGUF student is loaded from its own file (no converted copy could be kept), transformers marks it
    quantized: the mark is dropped so it trains and saves as safetensors; weights kept packed are refused."""
    from types import SimpleNamespace

    from mapd.stages.train import _drop_gguf_mark

    removed = []
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"), packed_modules=None,
                                remove_quantization_config=removed.append)
    student = SimpleNamespace(hf_quantizer=quantizer)
    _drop_gguf_mark(student, "m")
    assert removed == [student]
    quantizer.packed_modules = ["q_proj"]
    with pytest.raises(MapdError, match="m: its GGUF weights stay packed .* cannot be trained"):
        _drop_gguf_mark(student, "m")
    _drop_gguf_mark(SimpleNamespace(), "m")  # not a GGUF model: nothing to drop
    assert removed == [student]
