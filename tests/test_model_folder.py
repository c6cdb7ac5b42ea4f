"""The trained model folder is what one would upload to the Hub (weights 0644, use_cache on, no checkpoints,
a model card with YAML metadata), and train.jsonl trains in TRL's SFTTrainer as conversational records."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from mapd.io import write_json, write_jsonl
from mapd.layout import RunLayout
from mapd.model_card import card_from_run
from mapd.records import Metrics, TrainingPair, read_records, write_document
from mapd.stages.train import train_model
from tests.test_train import fast_config, pairs


@pytest.fixture
def train_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    records = pairs(4)
    for index, record in enumerate(records):
        record["teacher"] = ("gpt", "gemini")[index % 2]
    write_jsonl(path, records)
    return path


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("keep", ["none", "apart"])
def test_the_model_folder_is_what_one_would_upload(tiny_model_dir, train_file, tmp_path, keep):
    out = tmp_path / "model"
    train_model(fast_config(max_steps=2, save_steps=1, keep_checkpoints=keep), str(tiny_model_dir), train_file, out)
    assert not list(out.glob("checkpoint-*"))
    apart = sorted(p.name for p in (tmp_path / "model-checkpoints").glob("checkpoint-*"))
    assert apart == (["checkpoint-1", "checkpoint-2"] if keep == "apart" else [])
    weights = list(out.glob("*.safetensors"))
    assert weights and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in weights)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert "mapd" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    assert meta["mapd"]["training_pairs"] == {"feedback": 4, "rationale": 4}
    assert meta["mapd"]["committee"] == ["gemini", "gpt"] and meta["mapd"]["steps"] == 2
    assert "2410.03663" in card and "accuracy after training | not measured" in card


def test_a_run_fills_the_card_with_task_committee_and_accuracy(tmp_path, train_file):
    run = RunLayout(tmp_path / "run")
    folder = run.round(0)
    folder.model.mkdir(parents=True)
    (folder.model / "config.json").write_text("{}")
    write_json(folder.model / "train_summary.json", {"steps": 7})
    folder.train.write_text(train_file.read_text())
    write_json(run.manifest, {"config": {"student": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                         "task": {"name": "svamp"},
                                         "teachers": [{"name": "gpt"}, {"name": "gemini"}, {"name": "mistral"}]}})
    for layout, correct in ((folder.eval_before, 20), (folder.eval_after, 35)):
        layout.dir.mkdir(parents=True)
        write_document(layout.metrics, Metrics(task="svamp", split="test", model="m", n=100, accuracy=correct / 100,
                                               strict_accuracy=correct / 100, unparsed_rate=0.0, seconds=1.0))
    meta = front_matter(card_from_run(run.dir, 0).read_text())
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["mapd"]["task"] == "svamp" and "task:svamp" in meta["tags"]
    assert meta["mapd"]["committee"] == ["gpt", "gemini", "mistral"] and meta["mapd"]["steps"] == 7
    assert meta["mapd"]["accuracy_before"]["value"] == 0.2
    after = meta["mapd"]["accuracy_after"]
    assert after["value"] == 0.35 and after["ci95"][0] < 0.35 < after["ci95"][1]


def test_train_jsonl_trains_in_trl_as_conversational_records_with_the_chat_template(tiny_model_dir, train_file,
                                                                                     tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational

    records = [pair.conversational() for pair in read_records(train_file, TrainingPair)]
    data = Dataset.from_list(records)
    assert is_conversational(data[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), processing_class=tokenizer, train_dataset=data,
        args=SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=4, report_to="none",
                       save_strategy="no", learning_rate=1e-3, use_cpu=True),
    )
    first = trainer.train_dataset[0]
    expected = tokenizer.apply_chat_template(records[0]["prompt"] + records[0]["completion"], tokenize=False)
    assert tokenizer.decode(first["input_ids"]).strip() == expected.strip()  # the student's chat template
    prompt_tokens = len(tokenizer.apply_chat_template(records[0]["prompt"], add_generation_prompt=True))
    labels = first["labels"]  # the loss is on the completion only
    assert set(labels[:prompt_tokens]) == {-100} and any(label != -100 for label in labels[prompt_tokens:]), (
        sorted(first), labels)
    assert trainer.train().global_step == 2
