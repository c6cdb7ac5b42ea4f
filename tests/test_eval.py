"""Tasks, batched generation, `mapd eval` and `mapd mine`.

Fast tests run a tiny random Llama (conftest's ``tiny_model_dir``) or a fake ``generate``;
the slow ones load SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mapd import generation
from mapd.cli import main
from mapd.config import PromptConfig, RunConfig, TaskConfig
from mapd.errors import MapdError
from mapd.io import read_jsonl
from mapd.layout import EvalLayout, RoundLayout
from mapd.prompts import answer_messages
from mapd.records import Prediction, read_records
from mapd.stages.evaluate import evaluate, metrics
from mapd.stages.mine import mine, run_mine
from mapd.tasks import Example, get_task

SVAMP_ROWS = [
    {"id": 0, "question": "There are 290 bananas in 2 groups. How big is each group?", "final": "145"},
    {"id": 1, "question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "final": "7"},
    {"id": 2, "question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "final": "30"},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def svamp_dir(tmp_path) -> Path:
    """A tiny SVAMP-format data folder whose train and test splits are SVAMP_ROWS."""
    for split in ("train", "test"):
        write_rows(tmp_path / "svamp" / f"{split}.jsonl", SVAMP_ROWS)
    return tmp_path / "svamp"


# --- tasks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, counts, first_gold",
    [
        ("gsm8k", {"train": 7473, "test": 1319}, {"test": "18", "train": "72"}),
        ("svamp", {"train": 700, "test": 300}, {"train": "145", "test": "1"}),
        ("strategyqa", {"train": 1603, "test": 687}, {"train": "false", "test": "true"}),
        ("logiqa", {"validation": 651, "test": 651}, {}),
    ],
)
def test_benchmarks_load_from_shared_data(shared, name, counts, first_gold):
    task = get_task(TaskConfig(name=name, path=str(shared / "data" / name)))
    for split, count in counts.items():
        examples = task.load(split)
        assert len(examples) == count
        assert len({e.id for e in examples}) == count
        if split in first_gold:
            assert examples[0].gold == first_gold[split]
        golds = {e.gold for e in examples}
        if task.answer_kind == "number":
            assert all(g.lstrip("-").replace(".", "", 1).isdigit() for g in golds)
        elif task.answer_kind == "bool":
            assert golds == {"true", "false"}
        else:
            assert golds == {"A", "B", "C", "D"}
            first = examples[0]
            assert len(first.options) == 4
            assert all(f"\n{letter}. {option}" in first.question for letter, option in zip("ABCD", first.options))
    assert task.load(next(iter(counts)), limit=5) == task.load(next(iter(counts)))[:5]


def test_custom_jsonl_task(tmp_path):
    data = write_rows(tmp_path / "mine.jsonl", [
        {"key": "a", "q": "Pick the fruit.", "choices": ["car", "Apple", "rock"], "gold": "b"},
        {"key": "b", "q": "Pick the rock.", "choices": ["car", "Apple", "rock"], "gold": 2},
        {"key": "c", "q": "Pick the car.", "choices": ["car", "Apple", "rock"], "gold": " CAR "},
    ])
    task = get_task(TaskConfig(name="jsonl", path=str(data), question_field="q", answer_field="gold",
                               options_field="choices", id_field="key", answer_kind="choice"))
    examples = task.load("test")
    assert [(e.id, e.gold) for e in examples] == [("a", "B"), ("b", "C"), ("c", "A")]
    assert examples[0].question == "Pick the fruit.\n\nA. car\nB. Apple\nC. rock"
    assert examples[0].options == ["car", "Apple", "rock"]

    numbers = write_rows(tmp_path / "numbers" / "train.jsonl", [{"question": "Q?", "answer": "1,234"},
                                                                  {"question": "R?", "answer": 5.0}])
    task = get_task(TaskConfig(name="jsonl", path=str(numbers.parent)))
    assert [(e.id, e.gold) for e in task.load("train")] == [("0", "1234"), ("1", "5")]

    yes_no = write_rows(tmp_path / "yes_no.jsonl", [{"question": "Q?", "answer": "Yes"}, {"question": "R?", "answer": False}])
    task = get_task(TaskConfig(name="jsonl", path=str(yes_no), answer_kind="bool"))
    assert [e.gold for e in task.load("test")] == ["true", "false"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"q": "Pick.", "choices": ["x", "y"], "gold": "z"}, "mine.jsonl:1: field 'gold' is 'z'"),
        ({"q": "Pick.", "choices": "xy", "gold": "A"}, "mine.jsonl:1: field 'choices' must be a list"),
        ({"q": "", "choices": ["x", "y"], "gold": "A"}, "mine.jsonl:1: field 'q' must be non-empty text"),
    ],
)
def test_custom_jsonl_bad_rows(tmp_path, row, message):
    data = write_rows(tmp_path / "mine.jsonl", [row])
    task = get_task(TaskConfig(name="jsonl", path=str(data), question_field="q", answer_field="gold",
                               options_field="choices", answer_kind="choice"))
    with pytest.raises(MapdError, match=message):
        task.load("test")


def test_reasoning_gym_is_deterministic_by_seed():
    config = TaskConfig(name="reasoning_gym:basic_arithmetic", size=5, seed=3)
    train = get_task(config).load("train")
    assert train == get_task(config).load("train")
    assert train != get_task(config).load("test")
    assert train != get_task(config.model_copy(update={"seed": 4})).load("train")
    assert [e.id for e in train] == [f"train-{i}" for i in range(5)]
    assert all(e.gold.lstrip("-").isdigit() for e in train)


# --- bad input through the CLI: exit 2, one line on stderr ----------------------------------------------------


def cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "task, lines, message",
    [
        ("svamp", ['{"question": "Q?", "final": "1"}', "{not json"], "test.jsonl:2: not valid JSON"),
        ("gsm8k", ['{"final": "3"}'], "test.jsonl:1: missing field 'question'"),
        ("svamp", ['{"question": "Q?", "final": "twelve"}'], "test.jsonl:1: gold answer is 'twelve', expected a number"),
        ("strategyqa", [], "split 'test' is empty"),
        ("arithmetic", ['{"question": "Q?", "answer": "1"}'], "unknown task 'arithmetic'"),
    ],
)
def test_eval_bad_data_is_one_line(tmp_path, capsys, task, lines, message):
    (tmp_path / "test.jsonl").write_text("".join(line + "\n" for line in lines))
    err = cli_error(capsys, "eval", "--model", "/nope", "--task", task, "--data", str(tmp_path), "--out", str(tmp_path))
    assert message in err


def test_eval_bad_model_and_limit_are_one_line(svamp_dir, tmp_path, capsys):
    base = ["eval", "--task", "svamp", "--data", str(svamp_dir), "--out", str(tmp_path / "out")]
    assert "model /nope: no such folder" in cli_error(capsys, *base, "--model", "/nope")
    assert "GGUF file not found" in cli_error(capsys, *base, "--model", str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_text("not a model")
    assert "not a GGUF file" in cli_error(capsys, *base, "--model", str(tmp_path / "junk.gguf"))
    assert "limit must be at least 1" in cli_error(capsys, *base, "--model", "/nope", "--limit", "0")
    assert "no data file" in cli_error(capsys, *base, "--model", "/nope", "--split", "validation")
    assert not (tmp_path / "out").exists()


# --- generation, evaluation and mining on a tiny random model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny random Llama."""
    return generation.load_model(str(tiny_model_dir))


def test_batched_greedy_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [answer_messages(PromptConfig(), row["question"] + " Think." * i, "number") for i, row in
               enumerate(SVAMP_ROWS * 2)]
    single = generation.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=1)
    batched = generation.generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=4)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.input_tokens for g in batched] == [g.input_tokens for g in single]
    assert len(set(sorted((g.input_tokens for g in single), reverse=True)[:4])) > 1  # the first batch was padded


def test_evaluate_records_and_metrics(tiny):
    model, tokenizer = tiny
    examples = [Example(id=str(r["id"]), question=r["question"], gold=r["final"]) for r in SVAMP_ROWS]
    predictions = evaluate(model, tokenizer, examples, "number", PromptConfig(), batch_size=2, max_new_tokens=4)
    assert [p.id for p in predictions] == ["0", "1", "2"]
    for p in predictions:
        assert set(p.model_dump()) == {"id", "question", "output", "answer", "status", "cut_off", "strict", "gold",
                                       "correct"}
        assert p.status in {"ok", "unparsed", "truncated"} and (p.answer is None) == (p.status != "ok")
    empty = metrics([], task="svamp", split="test", model="m", seconds=0.0)
    assert {k: getattr(empty, k) for k in ("n", "accuracy", "strict_accuracy", "unparsed_rate")} == {
        "n": 0, "accuracy": 0.0, "strict_accuracy": 0.0, "unparsed_rate": 0.0}


def fake_generate(outputs: dict[str, str], calls: list[dict]):
    """A stand-in for generation.generate answering each question (found in the prompt) with outputs[question]."""
    def fake(model, tokenizer, prompts, **options):
        calls.append(options)
        texts = [next(text for question, text in outputs.items() if question in p[-1]["content"]) for p in prompts]
        options["on_batch"](len(prompts))
        return [generation.Generation(text, 10, 5) for text in texts]
    return fake


OUTPUTS = {  # right and strict; right, not strict; wrong; unparsed
    "bananas": "290 / 2 = 145. The answer is 145.",
    "apples": "So he has 7 apples now, which is the total. Good.",
    "eggs": "6 x 5 = 35. The answer is 35.",
}


def test_eval_and_mine_with_known_outputs(tiny_model_dir, svamp_dir, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(generation, "generate", fake_generate(OUTPUTS, calls))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "svamp", "--data", str(svamp_dir),
                 "--out", str(out), "--max-new-tokens", "8"]) == 0
    predictions = read_records(EvalLayout(out).predictions, Prediction)
    assert [(p.answer, p.strict, p.correct) for p in predictions] == [
        ("145", True, True), ("7", False, True), ("35", True, False)]
    result = json.loads(EvalLayout(out).metrics.read_text())
    assert set(result) == {"task", "split", "model", "n", "accuracy", "strict_accuracy", "unparsed_rate",
                           "cut_off_rate", "truncated_rate", "seconds"}
    assert (result["n"], result["accuracy"], result["strict_accuracy"]) == (3, 2 / 3, 1 / 3)
    assert calls[-1]["temperature"] == 0.0 and calls[-1]["max_new_tokens"] == 8
    assert "accuracy 66.7%" in capsys.readouterr().out

    unparsed = predictions[0].model_copy(update={"id": "x", "answer": None, "status": "unparsed", "correct": False})
    mistakes = mine(predictions + [unparsed])
    assert [(m.id, m.status) for m in mistakes] == [("2", "wrong"), ("x", "unparsed")]
    assert set(mistakes[0].model_dump()) == {"id", "question", "gold", "output", "answer", "status", "cut_off"}


def test_run_mine_writes_mistakes(tiny_model_dir, svamp_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(generation, "generate", fake_generate({**OUTPUTS, "apples": "I cannot tell."}, calls))
    config = RunConfig.model_validate({
        "task": {"name": "svamp", "path": str(svamp_dir), "train_limit": 3},
        "student": {"model": str(tiny_model_dir), "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 8,
                    "batch_size": 2},
    })
    summary = run_mine(RoundLayout(tmp_path / "round-0"), task=config.task, student=config.student,
                       prompts=config.prompts)
    assert {k: v for k, v in summary.items() if k != "seconds"} == {
        "n": 3, "correct": 1, "wrong": 1, "unparsed": 1, "truncated": 0, "accuracy": 1 / 3}
    mistakes = read_jsonl(tmp_path / "round-0" / "mistakes.jsonl")
    assert [(m["id"], m["status"], m["answer"], m["gold"]) for m in mistakes] == [
        ("1", "unparsed", None, "7"), ("2", "wrong", "35", "30")]
    assert {k: calls[-1][k] for k in ("temperature", "top_p", "seeds", "batch_size")} == {
        "temperature": 0.3, "top_p": 0.9, "seeds": [generation.key_seed(731, i) for i in ("0", "1", "2")],
        "batch_size": 2}  # each question its own seed, from student.seed and its id


# --- real weights ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_cli_with_smollm2(shared, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", "embedded:smollm2-135m-instruct", "--task", "svamp",
                 "--data", str(shared / "data" / "svamp"), "--limit", "4", "--max-new-tokens", "32",
                 "--out", str(out)]) == 0
    predictions = read_jsonl(out / "predictions.jsonl")
    assert len(predictions) == 4 and all(p["output"] for p in predictions)
    assert json.loads((out / "metrics.json").read_text())["n"] == 4


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_at_a_time(shared):
    model, tokenizer = generation.load_model("embedded:smollm2-135m-instruct")
    examples = get_task(TaskConfig(name="svamp", path=str(shared / "data" / "svamp"))).load("train", 4)
    prompts = [answer_messages(PromptConfig(), e.question, "number") for e in examples]
    single = generation.generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=1)
    batched = generation.generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=4)
    assert [g.text for g in batched] == [g.text for g in single]


def test_sampled_batched_equals_one_at_a_time(tiny):
    """Sampling is seeded per prompt: a prompt samples the same text alone or in a batch, in any batch order."""
    model, tokenizer = tiny
    prompts = [answer_messages(PromptConfig(), row["question"] + " Think." * i, "number") for i, row in
               enumerate(SVAMP_ROWS * 2)]
    seeds = [generation.key_seed("test", i) for i in range(len(prompts))]
    options = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    single = generation.generate(model, tokenizer, prompts, batch_size=1, seeds=seeds, **options)
    batched = generation.generate(model, tokenizer, prompts, batch_size=4, seeds=seeds, **options)
    reversed_ = generation.generate(model, tokenizer, prompts[::-1], batch_size=3, seeds=seeds[::-1], **options)
    assert [g.text for g in batched] == [g.text for g in single] == [g.text for g in reversed_][::-1]
    other = generation.generate(model, tokenizer, prompts, batch_size=4, seeds=[s + 1 for s in seeds], **options)
    greedy = generation.generate(model, tokenizer, prompts, batch_size=4, max_new_tokens=12)
    assert [g.text for g in other] != [g.text for g in single] != [g.text for g in greedy]  # the seed samples


def test_a_gguf_model_loads_from_its_own_file_when_no_converted_copy_can_be_kept(tiny_model_dir, tmp_path,
                                                                                monkeypatch, caplog):
    """A full disk or a read-only cache folder costs the one-time conversion's speed-up, never the load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    asked = []
    real_model, real_tokenizer = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained
    monkeypatch.setattr(generation, "servable", no_room)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda folder, gguf_file=None, **kwargs: asked.append(
        (folder, gguf_file)) or real_model(tiny_model_dir, **kwargs))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **kwargs: asked.append(
        (folder, gguf_file)) or real_tokenizer(tiny_model_dir, **kwargs))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    model, tokenizer = generation.load_model(str(tmp_path / "m.gguf"))
    assert asked == [(str(tmp_path), "m.gguf")] * 2 and model.config.vocab_size == len(tokenizer)
    assert "no converted copy could be kept ([Errno 28] No space left on device); loading the GGUF file itself" in (
        caplog.text)


def test_generation_dtype_is_configurable(tiny_model_dir):
    """student.dtype / a local teacher's dtype: bfloat16 weights when asked, float32 on a CPU by default."""
    import torch

    default, _ = generation.load_model(str(tiny_model_dir))
    half, tokenizer = generation.load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(default.parameters()).dtype == torch.float32 and next(half.parameters()).dtype == torch.bfloat16
    [reply] = generation.generate(half, tokenizer, [[{"role": "user", "content": "2 + 2?"}]], max_new_tokens=3)
    assert reply.output_tokens > 0
