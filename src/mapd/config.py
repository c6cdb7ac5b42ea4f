"""The YAML config: one pydantic model per section, every field documented.

Where config lives: every section is defined here, as data, and nowhere else. A stage module imports
the sections it uses from this module; this module imports no stage. ``mapd config`` prints the
defaults with their help text.
"""

from __future__ import annotations

from pathlib import Path
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, ValidationError, model_validator

from mapd.errors import MapdError

AnswerKind = Literal["number", "bool", "choice"]
def _not_a_key(name: str) -> str:
    """Refuse a secret pasted where a variable *name* belongs (the error never shows the value)."""
    if re.fullmatch(r"(?:sk|AIza|gsk|xai|hf)[A-Za-z0-9_]{16,}|[A-Za-z0-9_]{40,}", name):
        raise ValueError("looks like a key, not the name of the environment variable that holds it (value not shown)")
    return name


# The name of an environment variable, never its value: a key pasted here is refused, never echoed.
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), AfterValidator(_not_a_key)]
# Marks a field that changes how a run goes, not what it produces: it may change between reruns of one
# run folder (docs/reliability.md#resume-after-a-config-change).
OPERATIONAL = {"operational": True}


class TaskConfig(BaseModel):
    """Which benchmark to use and where its data comes from."""

    name: str = Field(
        "svamp",
        description="gsm8k, svamp, strategyqa, logiqa, jsonl (your own file), or "
        "reasoning_gym:<dataset> (generated, no download), e.g. reasoning_gym:basic_arithmetic.",
    )
    path: str | None = Field(
        None,
        description="Local data: a folder holding <split>.jsonl files, or one .jsonl file. "
        "When unset, the benchmark loads from the Hugging Face hub id the paper used.",
    )
    train_split: str = Field("train", description="Split the student's mistakes are mined from.")
    test_split: str = Field("test", description="Split the student is evaluated on.")
    train_limit: int | None = Field(None, ge=1, description="Use only the first N training questions.")
    test_limit: int | None = Field(None, ge=1, description="Evaluate on only the first N test questions.")
    question_field: str = Field("question", description="jsonl task: field holding the question.")
    answer_field: str = Field("answer", description="jsonl task: field holding the gold answer.")
    options_field: str | None = Field(None, description="jsonl task: field holding a list of options (choice kind).")
    id_field: str | None = Field(None, description="jsonl task: field holding a unique id (default: line number).")
    answer_kind: AnswerKind | None = Field(
        None, description="jsonl and reasoning_gym tasks: number, bool or choice (default: number)."
    )
    size: int = Field(200, ge=1, description="reasoning_gym tasks: questions generated per split.")
    seed: int = Field(731, description="reasoning_gym tasks: generator seed (the test split uses seed + 1).")

    model_config = {"extra": "forbid"}


class TeacherConfig(BaseModel):
    """One teacher of the committee. With ``base_url`` it is any OpenAI-compatible endpoint
    (OpenAI, Gemini's or Anthropic's compatibility endpoints, DeepInfra, Together, vLLM,
    llama.cpp server, Ollama); without one, ``model`` is a local model run in-process."""

    name: str = Field(description="Short unique name used in artifacts and reports, e.g. gpt.")
    model: str = Field(
        description="Model id sent to the endpoint, or for a local teacher a hub id, folder, "
        ".gguf file or embedded:<name> model."
    )
    base_url: str | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1. Query parameters in it are sent "
        "with every request; user:password@ travels as a Basic Authorization header.",
    )
    api_key_env: EnvName | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="Name of the environment variable holding the API key, e.g. OPENAI_API_KEY "
        "(the key itself is never stored).",
    )
    headers_env: dict[str, EnvName] = Field(
        default_factory=dict, json_schema_extra=OPERATIONAL,
        description="Extra request headers whose values come from environment variables, {header: VARIABLE}, "
        "e.g. {x-api-key: ANTHROPIC_API_KEY}; the values are treated as secrets.",
    )
    query_env: dict[str, EnvName] = Field(
        default_factory=dict, json_schema_extra=OPERATIONAL,
        description="Extra query parameters whose values come from environment variables, {name: VARIABLE}, "
        "e.g. {key: GEMINI_API_KEY}; the values are treated as secrets.",
    )
    provider: Literal["openai", "local"] | None = Field(
        None, description="openai (any OpenAI-compatible endpoint) or local; inferred from base_url when unset."
    )
    gguf_file: str | None = Field(None, description="Local teacher: GGUF file name inside the model folder.")
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature (the paper: 0.8).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling top-p.")
    max_tokens: int = Field(512, ge=1, description="Maximum new tokens per reply (the paper: 512).")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens",
        description="Request field that carries max_tokens: OpenAI's reasoning models (o-series, gpt-5) "
        "accept only max_completion_tokens.",
    )
    max_concurrency: int = Field(8, ge=1, json_schema_extra=OPERATIONAL,
                                 description="Requests in flight at once (local: batch size).")
    requests_per_minute: float | None = Field(None, gt=0, json_schema_extra=OPERATIONAL,
                                              description="Optional request rate limit.")
    tokens_per_minute: float | None = Field(None, gt=0, json_schema_extra=OPERATIONAL,
                                            description="Optional token rate limit (prompt + max_tokens).")
    timeout_s: float = Field(120, gt=0, json_schema_extra=OPERATIONAL,
                             description="Seconds before one request times out (then it is retried).")
    max_retries: int = Field(6, ge=0, json_schema_extra=OPERATIONAL,
                             description="Retries on 429, 5xx, timeouts and malformed replies.")
    max_consecutive_failures: int = Field(
        12, ge=1, json_schema_extra=OPERATIONAL,
        description="Circuit breaker: stop this teacher after this many failed attempts in a row (connection "
        "errors, timeouts, 5xx; 429s excepted), e.g. an endpoint that is down.",
    )
    price_input_per_mtok: float = Field(0.0, ge=0, json_schema_extra=OPERATIONAL,
                                        description="USD per million prompt tokens, for cost reports.")
    price_output_per_mtok: float = Field(0.0, ge=0, json_schema_extra=OPERATIONAL,
                                         description="USD per million completion tokens.")
    extra_body: dict = Field(default_factory=dict, description="Extra JSON fields sent with every request.")

    model_config = {"extra": "forbid"}

    @model_validator(mode="after")
    def _infer_provider(self) -> "TeacherConfig":
        if self.provider is None:
            self.provider = "openai" if self.base_url else "local"
        return self

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD cost of the given token counts at this teacher's prices."""
        return (input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok) / 1e6


class PromptConfig(BaseModel):
    """Prompt templates (``str.format``), overridable here; mapd.prompts fills them in. Fields: {question}
    (with lettered options for choice tasks), {answer_format}, {student_answer}, {gold}, {rationale},
    {score_format}."""

    system: str | None = Field(None, description="Optional system message sent before every prompt.")
    answer: str = Field(
        "Question: {question}\n\nLet's think step by step. {answer_format}",
        description="The student's (and each teacher's rationale) prompt; {answer_format} asks for the task's "
        "answer line.",
    )
    feedback: str = Field(
        "You are a teacher. A student answered the question below and made mistakes.\n\n"
        "Question: {question}\n\nStudent's answer:\n{student_answer}\n\n"
        "Hint: the correct final answer is {gold}.\n\n"
        "Point out each mistake in the student's answer and explain why it is wrong and how to fix it. "
        "Do not just restate the correct answer.",
        description="Mistake-aware feedback prompt: question, the student's wrong answer and a correct-answer hint.",
    )
    review: str = Field(
        "You are reviewing another teacher's solution.\n\nQuestion: {question}\n\n"
        "Solution under review:\n{rationale}\n\nHint: the correct final answer is {gold}.\n\n"
        "Judge whether the reasoning is correct and sound, step by step. You may explain briefly, {score_format}",
        description="Peer-review prompt; {score_format} asks for the integer score 1-5 in brackets that parse_score reads.",
    )

    model_config = {"extra": "forbid"}


class ReviewConfig(BaseModel):
    """How rationales are reviewed and accepted (docs/method.md#4-peer-review)."""

    enabled: bool = Field(True, description="Peer review on; off accepts every rationale (an ablation).")
    threshold: float = Field(3.0, description="Acceptance threshold on the aggregated valid scores.")
    comparison: Literal[">", ">="] = Field(">", description="Accept when aggregate > threshold (the paper) or >=.")
    aggregator: Literal["mean", "median", "min"] = Field("mean", description="How valid scores are combined.")
    max_reviewers: int | None = Field(None, ge=1, description="Use at most this many other teachers as reviewers.")
    require_gold_answer: bool = Field(
        False, description="Also require the rationale's own final answer to equal the gold answer (off: faithful to the paper)."
    )

    model_config = {"extra": "forbid"}


class TrainConfig(BaseModel):
    """Training settings; the defaults are the paper's (docs/method.md#6-joint-training)."""

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the feedback loss; 0 trains on rationales only.")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (constant after warm-up).")
    lr_scheduler_type: str = Field("constant_with_warmup", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    num_train_epochs: float = Field(10, gt=0, description="Epochs over the instruction data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Longer prompt+completion pairs are truncated (prompt first).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; default: on where the GPU supports it.")
    seed: int = Field(731, description="Training seed.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    lora_dropout: float = Field(0.05, ge=0, le=1, description="LoRA dropout.")
    lora_target_modules: list[str] | str = Field("all-linear", description="Modules LoRA adapts.")
    merge_lora: bool = Field(True, description="Save LoRA merged into full weights (else the adapter only).")
    logging_steps: int = Field(1, ge=1, json_schema_extra=OPERATIONAL, description="Log the loss every N steps.")
    save_steps: int = Field(50, ge=1, json_schema_extra=OPERATIONAL,
                            description="Checkpoint every N steps (training resumes from the last).")
    save_total_limit: int = Field(2, ge=1, json_schema_extra=OPERATIONAL, description="Checkpoints kept.")
    group_by_length: bool = Field(
        True, description="Batch pairs of similar length together, so dynamic padding adds few pad tokens."
    )
    gradient_checkpointing: bool = Field(
        False, json_schema_extra=OPERATIONAL, description="Recompute activations in the backward pass: less memory, about 30 % more time."
    )
    model_dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32",
        description="Weights while training: float32 keeps full-precision weights (bf16 then runs as "
        "mixed precision); bfloat16 halves their memory (pure bf16, for large students); auto: the checkpoint's.",
    )

    model_config = {"extra": "forbid"}


EMBEDDED_DEFAULT = Path(__file__).parent / "configs" / "default.yaml"


class StudentConfig(BaseModel):
    """The student model and how it answers when its mistakes are mined and when it is evaluated."""

    model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Hub id, local folder, .gguf file, or embedded:<name> (a model shipped by a PyPI package).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside the model folder, if any.")
    max_new_tokens: int = Field(512, ge=1, description="Tokens generated per answer (the paper: 512).")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Mining temperature; 0 is greedy (the paper samples at 0.3, top-p 0.9)."
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Mining top-p when sampling.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together (mining and evaluation).")
    seed: int = Field(731, description="Seed of the mining samples when temperature > 0.")

    model_config = {"extra": "forbid"}


class BuildConfig(BaseModel):
    """How instruction data is made from mistakes, feedback and rationales (docs/method.md#5-instruction-data)."""

    mode: str = Field(
        "mixed",
        description="mixed (the method), single:<teacher> (one teacher, no review), no-review, or all.",
    )
    seed: int = Field(731, description="Seed of the random choice among teachers.")

    model_config = {"extra": "forbid"}


class RunConfig(BaseModel):
    """A whole mapd run: task, student, teacher committee, prompts, review, data, training."""

    task: TaskConfig = Field(default_factory=TaskConfig, description="The benchmark and its data.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="The student model.")
    teachers: list[TeacherConfig] = Field(default_factory=list, description="The teacher committee (at least one).")
    prompts: PromptConfig = Field(default_factory=PromptConfig, description="Prompt templates.")
    review: ReviewConfig = Field(default_factory=ReviewConfig, description="Peer review and acceptance.")
    build: BuildConfig = Field(default_factory=BuildConfig, description="Instruction data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Joint-loss fine-tuning.")
    rounds: int = Field(1, ge=1, json_schema_extra=OPERATIONAL,
                        description="Rounds: each mines the mistakes of the student trained in the last.")
    cache_path: str | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="SQLite call cache; default <run dir>/cache.sqlite. Share one path between runs to reuse calls.",
    )
    max_budget_usd: float | None = Field(
        None, gt=0, json_schema_extra=OPERATIONAL,
        description="Stop cleanly before teacher spending exceeds this many USD in total: everything paid through "
        "the call cache counts, over all runs and processes that share it (needs prices).",
    )

    model_config = {"extra": "forbid"}

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> "RunConfig":
        names = [teacher.name for teacher in self.teachers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"teacher names must be unique, repeated: {', '.join(duplicates)}")
        return self

    def teacher(self, name: str) -> TeacherConfig:
        """The teacher called ``name``; an unknown name is a MapdError listing the committee."""
        for teacher in self.teachers:
            if teacher.name == name:
                return teacher
        known = ", ".join(t.name for t in self.teachers) or "none"
        raise MapdError(f"teacher '{name}' is not in the config (teachers: {known})")


def _field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(top level)"


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a config mapping; errors name the source and every bad field."""
    try:
        return RunConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = "; ".join(f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MapdError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise MapdError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MapdError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise MapdError(f"{path}: expected a mapping of config sections at the top level")
    return parse_config(data or {}, str(path))


def embedded_default_config() -> RunConfig:
    """The offline demonstration config shipped with the package (``mapd run`` with no config)."""
    return load_config(EMBEDDED_DEFAULT)


def public_dump(config: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data for manifests: key *names* only, credentials in URLs redacted."""
    from mapd.secrets import redact_url

    data = config.model_dump(mode="json")
    for teacher in data["teachers"]:
        if teacher.get("base_url"):
            teacher["base_url"] = redact_url(teacher["base_url"])
    return data


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _documented_lines(model: BaseModel, indent: str = "", comments: bool = True) -> list[str]:
    lines = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if comments and info.description:
            lines.append(f"{indent}# {info.description}")
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines.extend(_documented_lines(value, indent + "  ", comments))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{indent}{name}:")
            for number, item in enumerate(value):  # help text once, on the first item
                item_lines = _documented_lines(item, indent + "    ", comments and number == 0)
                first = next(i for i, line in enumerate(item_lines) if not line.lstrip().startswith("#"))
                item_lines[first] = f"{indent}  - " + item_lines[first].lstrip()
                lines.extend(item_lines)
        else:
            lines.append(f"{indent}{name}: {_yaml_value(value)}")
    return lines


def default_config_yaml(config: RunConfig) -> str:
    """``config`` as YAML with every field's help text as a comment above it."""
    return "\n".join(_documented_lines(config)) + "\n"
