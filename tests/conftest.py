"""Shared test fixtures: where ../shared lives, and a run that skips when it is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder (benchmark data, reference data); skip when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not present beside the repository")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and the real SmolLM2 tokenizer (chat template included).

    It loads with ``from_pretrained`` like any checkpoint, so every stage can run on it in seconds.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mapd.models import resolve_model

    folder, gguf_file = resolve_model("embedded:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
