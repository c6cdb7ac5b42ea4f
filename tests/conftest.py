"""Shared test fixtures: where ../shared lives (and a skip when it is absent), a teacher key, fast
retries for `mapd teach`, and a tiny model.

The benches read the data folders from MAPD_SHARED_DATA and MAPD_REFERENCE_DATA (bench/_common.py);
for the tests that load them, both default to ../shared/data and ../shared/reference-data when those
exist (a value set by the caller wins).
"""

import os
from functools import partial
from pathlib import Path
from secrets import token_hex

import pytest
from tests.reliability_kit import FAST_RETRIES, KEY_ENV

from mapd.llm import Dispatcher

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

for _variable, _folder in (("MAPD_SHARED_DATA", SHARED / "data"), ("MAPD_REFERENCE_DATA", SHARED / "reference-data")):
    if _folder.is_dir():
        os.environ.setdefault(_variable, str(_folder))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The ../shared folder (benchmark data, reference data); skip when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is not present beside the repository")
    return SHARED


@pytest.fixture
def key(monkeypatch) -> str:
    """A recognisable random key in $MAPD_TEST_KEY (reliability_kit.KEY_ENV; subprocesses inherit it)."""
    value = f"sk-test-{token_hex(16)}"
    monkeypatch.setenv(KEY_ENV, value)
    return value


@pytest.fixture
def fast_retries(monkeypatch) -> None:
    """`mapd teach` in this process retries after milliseconds instead of seconds, whatever Retry-After a
    server asks for (reliability_kit.FAST_RETRIES)."""
    monkeypatch.setattr("mapd.stages.teach.Dispatcher", partial(Dispatcher, backoff=FAST_RETRIES))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and the real SmolLM2 tokenizer (chat template included).

    It loads with ``from_pretrained`` like any checkpoint, so every stage can run on it in seconds.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mapd.models import servable

    # the converted folder (made once, shared by every worker and run) loads in a fraction of the GGUF's time
    tokenizer = AutoTokenizer.from_pretrained(servable("embedded:smollm2-135m-instruct"))
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
