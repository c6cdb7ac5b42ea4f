"""The YAML config: one pydantic model per section, every field documented.

Where config lives: every section is defined here, as data, and nowhere else. A stage module imports
the sections it uses from this module; this module imports nothing of mapd but errors (reading a config
file is mapd.config_file; docs/architecture.md). ``mapd config`` prints the defaults with their help text.
"""

from __future__ import annotations

from collections.abc import Callable
from string import Formatter
from pathlib import Path
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StringConstraints,
                      ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from mapd.errors import MapdError

AnswerKind = Literal["number", "bool", "choice"]
GenerationDtype = Literal["auto", "float32", "bfloat16"]
GENERATION_DTYPE_HELP = ("the weights' type while generating. auto: float32 on a CPU, the checkpoint's own on a GPU; "
                         "bfloat16 halves their memory and, on CPUs with AVX-512 BF16 or AMX, is several times faster "
                         "(docs/default-run.md), at slightly different texts.")


def _not_a_key(name: str) -> str:
    """Refuse a secret pasted where a variable *name* belongs (the error never shows the value)."""
    if re.fullmatch(r"(?:sk|AIza|gsk|xai|hf)[A-Za-z0-9_]{16,}|[A-Za-z0-9_]{40,}", name):
        raise ValueError("looks like a key, not the name of the environment variable that holds it (value not shown)")
    return name


# The name of an environment variable, never its value: a key pasted here is refused, never echoed.
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"), AfterValidator(_not_a_key)]


def _http_url(url: str) -> str:
    """Refuse a base_url that is not an http(s) URL with a host (one without a scheme would fail every
    call); the error never shows the value (it may hold credentials)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. a bad [IPv6] host
        ok = False
    if not ok:
        raise PydanticCustomError("base_url", "expected an http:// or https:// URL with a host, e.g. "
                                  "https://api.openai.com/v1 (value not shown)")
    try:
        port = parts.port
    except ValueError:  # past 65535 or not a number: every request would fail, and be retried as if transient
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise PydanticCustomError("base_url", "the port must be a number from 1 to 65535 (value not shown)")
    return url


# An OpenAI-compatible endpoint: an http(s) URL with a host, never echoed in an error; public_dump redacts
# the credentials it may hold (user:password@, query parameters).
BaseUrl = Annotated[str, AfterValidator(_http_url)]


def _host(host: str) -> str:
    """An IP address or a host name (letters, digits, -, _ and dots), as a server binds it."""
    from ipaddress import ip_address

    try:
        ip_address(host)
        return host
    except ValueError:
        if re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?", host):
            return host
    raise ValueError(f"{host!r} is neither an IP address nor a host name")


Host = Annotated[str, AfterValidator(_host)]


def _expand_user(path: str | None) -> str | None:
    """``~/x`` -> ``/home/me/x``: a path field means the same to every stage that opens it."""
    return str(Path(path).expanduser()) if path else path


# Every config section: unknown fields are refused, and no float field takes .inf or .nan (a learning rate of
# .inf trains to NaN weights, a price of .inf writes Infinity into JSON artifacts, a wait of .inf never ends).
SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)
DAY_S = 86_400.0  # the longest wait, timeout or poll interval a field takes


def _identifier(name: str) -> str:
    """Refuse a teacher name that is not an identifier: it names files in the run folder and rows of reports."""
    if not re.fullmatch(r"[^\W_][\w-]{0,63}", name):
        raise PydanticCustomError("name", "a teacher name is 1-64 letters, digits, - and _, starting with a letter or "
                                  "digit (it names files and report rows), got {name}", {"name": repr(name[:80])})
    return name


def name_key(name: str) -> str:
    """What makes two teacher names the same: equal after Unicode (NFKC) normalisation, case folding and
    whitespace removal."""
    import unicodedata

    return "".join(unicodedata.normalize("NFKC", name).casefold().split())


# Marks a field that changes how a run goes, not what it produces: it may change between reruns of one
# run folder (docs/reliability.md#resume-after-a-config-change).
OPERATIONAL = {"operational": True}
HOST = Field(  # a teacher's and the student's serve host
    "127.0.0.1", json_schema_extra=OPERATIONAL,
    description="serve: the address mapd talks to the server at, passed to the template as {host} "
    "(e.g. --host {host}); loopback by default, so the server is not reachable from other machines.",
)


# The task names mapd.tasks implements (tests/test_layers.py checks the two agree); kept here as data so the
# config checks a name without importing the tasks. The task's own checks (a jsonl task's path, a generator's
# options) run when mapd.config_file.load_config loads the task.
TASK_NAMES = ("gsm8k", "svamp", "strategyqa", "logiqa", "jsonl")
TASK_PREFIXES = ("reasoning_gym:",)  # reasoning_gym:<dataset>


def unknown_task(name: str) -> str | None:
    """Why ``name`` names no task (a message listing the known ones), or None when it names one."""
    if name in TASK_NAMES or any(name.startswith(prefix) and name.removeprefix(prefix) for prefix in TASK_PREFIXES):
        return None
    known = ", ".join([*TASK_NAMES, *(prefix + "<dataset>" for prefix in TASK_PREFIXES)])
    return f"task.name: unknown task '{name}' (known: {known})"


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
    options: dict[str, StrictInt | StrictFloat | StrictBool | str] = Field(
        default_factory=dict,
        description="reasoning_gym tasks: the generator's settings, e.g. {min_terms: 2, max_terms: 3, max_digits: 1} "
        "for chain_sum (names and meanings: the reasoning-gym dataset's config class).",
    )

    model_config = SECTION


class EndpointConfig(BaseModel):
    """What the call path (mapd.llm) needs of a model it calls: where it is, how to sample and how to call
    it. A teacher is one (:class:`TeacherConfig`); so is the student when a server answers for it. With
    ``base_url`` it is any OpenAI-compatible endpoint (OpenAI, Gemini's or Anthropic's compatibility endpoints,
    DeepInfra, Together, vLLM, llama.cpp server, Ollama); without one, ``model`` is a local model run
    in-process."""

    name: Annotated[str, AfterValidator(_identifier)] = Field(
        description="Short unique name used in artifacts, file names and reports, e.g. gpt: letters, digits, - and _ "
        "(unique regardless of case and Unicode form).")
    model: str = Field(
        description="Model id sent to the endpoint, or for a local teacher a hub id, folder, "
        ".gguf file or embedded:<name> model."
    )
    base_url: BaseUrl | None = Field(
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
        None, description="openai (any OpenAI-compatible endpoint) or local; inferred from base_url and serve."
    )
    gguf_file: str | None = Field(None, description="Local teacher: GGUF file name inside the model folder.")
    dtype: GenerationDtype = Field("auto", description="Local teacher: " + GENERATION_DTYPE_HELP)
    temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature (the paper: 0.8).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling top-p.")
    max_tokens: int = Field(512, ge=1, le=10_000_000, description="Maximum new tokens per reply (the paper: 512).")
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", json_schema_extra=OPERATIONAL,
        description="Request field that carries max_tokens: OpenAI's reasoning models (o-series, gpt-5) "
        "accept only max_completion_tokens.",
    )
    max_concurrency: int = Field(8, ge=1, json_schema_extra=OPERATIONAL,
                                 description="Requests in flight at once (local: batch size).")
    requests_per_minute: float | None = Field(None, ge=1, json_schema_extra=OPERATIONAL,
                                              description="Optional request rate limit (at least 1).")
    tokens_per_minute: float | None = Field(None, ge=1, json_schema_extra=OPERATIONAL,
                                            description="Optional token rate limit (prompt + max_tokens; at least 1).")
    timeout_s: float = Field(120, gt=0, le=DAY_S, json_schema_extra=OPERATIONAL,
                             description="Seconds before one request times out (then it is retried).")
    max_retries: int = Field(6, ge=0, json_schema_extra=OPERATIONAL,
                             description="Retries on 429, 5xx, timeouts and malformed replies.")
    max_consecutive_failures: int = Field(
        12, ge=1, json_schema_extra=OPERATIONAL,
        description="Circuit breaker: stop this teacher after this many failed attempts in a row (connection "
        "errors, timeouts, 5xx; 429s excepted) spanning at least failing_for_s, e.g. an endpoint that is down.",
    )
    failing_for_s: float = Field(
        30, ge=0, le=DAY_S, json_schema_extra=OPERATIONAL,
        description="Circuit breaker: the failed attempts in a row must span this many seconds with no reply.",
    )
    price_input_per_mtok: float = Field(0.0, ge=0, le=1_000_000, json_schema_extra=OPERATIONAL,
                                        description="USD per million prompt tokens, for cost reports.")
    price_output_per_mtok: float = Field(0.0, ge=0, le=1_000_000, json_schema_extra=OPERATIONAL,
                                         description="USD per million completion tokens.")
    extra_body: dict = Field(default_factory=dict, description="Extra JSON fields sent with every request.")
    batch: bool = Field(
        False, json_schema_extra=OPERATIONAL,
        description="Send this teacher's calls through the endpoint's Batch API (OpenAI's /v1/files + /v1/batches, "
        "and endpoints that copy it): cheaper, answered within batch_completion_window, resumable over hours "
        "(docs/batch.md).",
    )
    batch_completion_window: str = Field("24h", json_schema_extra=OPERATIONAL,
                                         description="Batch API completion_window sent with each batch.")
    batch_poll_s: float = Field(60.0, gt=0, le=DAY_S, json_schema_extra=OPERATIONAL,
                                description="Seconds between two polls of a teacher's running batches.")
    batch_price_factor: float = Field(
        0.5, ge=0, le=1, json_schema_extra=OPERATIONAL,
        description="Batch calls cost this times the teacher's prices (OpenAI and Gemini: 0.5); used by the "
        "cost report and max_budget_usd.",
    )
    batch_retry_live: bool = Field(
        False, json_schema_extra=OPERATIONAL,
        description="A batch request that failed, expired or was cancelled is retried as a live call at full "
        "price, instead of in the next batch.",
    )
    batch_max_submissions: int = Field(
        3, ge=1, json_schema_extra=OPERATIONAL,
        description="Submissions of one request in batches before it counts as failed (failed, expired or "
        "cancelled requests are resubmitted).",
    )
    batch_max_requests: int = Field(50_000, ge=1, json_schema_extra=OPERATIONAL,
                                    description="Requests per batch input file (OpenAI: 50,000).")
    batch_max_bytes: int = Field(200_000_000, ge=1024, json_schema_extra=OPERATIONAL,
                                 description="Bytes per batch input file (OpenAI: 200 MB).")

    model_config = SECTION

    @property
    def started_by_mapd(self) -> bool:
        """Whether mapd starts the server this endpoint is (a teacher's ``serve``)."""
        return False

    @model_validator(mode="after")
    def _infer_provider(self) -> "EndpointConfig":
        if self.started_by_mapd and self.base_url:
            raise ValueError("set serve (mapd starts the server) or base_url (a server already running), not both")
        if self.provider is None:
            self.provider = "openai" if self.base_url or self.started_by_mapd else "local"
        if self.batch and (self.provider != "openai" or self.started_by_mapd):
            raise ValueError("batch: true needs base_url, an endpoint with the Batch API; local and serve: "
                             "teachers answer live")
        return self

    @property
    def free(self) -> bool:
        """Whether the teacher clearly costs nothing: a model run in-process, one mapd serves, or an endpoint on
        this machine (a loopback address); such a teacher needs no prices under max_budget_usd."""
        from ipaddress import ip_address
        from urllib.parse import urlsplit

        if self.provider == "local" or self.started_by_mapd:
            return True
        host = urlsplit(self.base_url or "").hostname or ""
        try:
            return host == "localhost" or ip_address(host).is_loopback
        except ValueError:
            return False

    def cost(self, input_tokens: int, output_tokens: int, *, batch: bool = False) -> float:
        """USD cost of the given token counts at this teacher's prices (``batch``: at its batch prices)."""
        factor = self.batch_price_factor if batch else 1.0
        return factor * (input_tokens * self.price_input_per_mtok + output_tokens * self.price_output_per_mtok) / 1e6


class TeacherConfig(EndpointConfig):
    """One teacher of the committee: an endpoint (:class:`EndpointConfig`), or a local model that mapd serves
    with ``serve``."""

    serve: str | None = Field(
        None,
        description="A local teacher on a serving engine that mapd starts and stops: a command template with "
        "{model}, {port}, {name} and {host}, e.g. 'vllm serve {model} --host {host} --port {port} "
        "--served-model-name {name}'. It starts only when some call is not cached.",
    )
    host: Host = HOST
    ready_timeout_s: float = Field(
        900, gt=0, le=DAY_S, json_schema_extra=OPERATIONAL,
        description="serve: seconds to wait for the server to be ready (a large model loads for minutes).")

    @property
    def started_by_mapd(self) -> bool:
        """Whether mapd starts this teacher's server (``serve``)."""
        return bool(self.serve)


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

    model_config = SECTION


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

    model_config = SECTION


class TrainConfig(BaseModel):
    """Training settings; the defaults are the paper's (docs/method.md#6-joint-training)."""

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the feedback loss; 0 trains on rationales only.")
    learning_rate: float = Field(1e-5, gt=0, le=1, description="Peak learning rate (constant after warm-up).")
    lr_scheduler_type: str = Field("constant_with_warmup", description="transformers scheduler name.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    num_train_epochs: float = Field(10, gt=0, le=10_000, description="Epochs over the instruction data.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_train_batch_size: int = Field(8, ge=1, description="Examples per device per step.")
    gradient_accumulation_steps: int = Field(2, ge=1, description="Steps accumulated per optimizer update.")
    max_length: int = Field(512, ge=16, description="Longer prompt+completion pairs are truncated (prompt first).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm.")
    bf16: bool | None = Field(None, description="bf16 mixed precision; default: on where the GPU supports it.")
    seed: int = Field(731, ge=0, lt=2**32, description="Training seed (numpy takes 0 to 2**32 - 1).")
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
    keep_checkpoints: Literal["none", "apart", "in_place"] = Field(
        "none", json_schema_extra=OPERATIONAL,
        description="The checkpoints (with their optimizer state) once training is done: none deletes them, apart "
        "moves them to <model folder>-checkpoints/ (the model folder then holds only what one would upload), "
        "in_place leaves them in the model folder (a rerun with a higher max_steps continues from the last).",
    )
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
    launch: str | None = Field(
        None,
        description="mapd run: train in a child process started by this launcher prefix, e.g. 'accelerate launch "
        "--multi_gpu --num_processes 8 --config_file configs/accelerate/fsdp.yaml' or 'torchrun --nproc_per_node "
        "8'; mapd appends '-m mapd.cli train ...' (the launcher must take -m MODULE). Its output is shown and kept "
        "in the round's model/launch.log. The global batch is per_device_train_batch_size x processes x "
        "gradient_accumulation_steps. Unset: train in mapd's own process.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other Hugging Face TrainingArguments option, passed through unrenamed, e.g. {optim: "
        "adamw_torch_fused, dataloader_num_workers: 2, lr_scheduler_kwargs: {...}}; checked against TrainingArguments' "
        "fields when the config is loaded. An option mapd sets from a train field above is refused (set that field).",
    )

    model_config = SECTION


# The TrainingArguments options mapd sets, each from one train field (mapd.stages.train passes them through with
# these values); train.args may not set them: one name per concept.
TRAINING_ARGUMENTS: dict[str, str] = {
    "seed": "seed", "data_seed": "seed", "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler_type",
    "warmup_steps": "warmup_ratio",  # a float below 1 is a fraction of all steps
    "num_train_epochs": "num_train_epochs", "max_steps": "max_steps",
    "per_device_train_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "bf16": "bf16", "activation_checkpointing": "gradient_checkpointing",
    "logging_steps": "logging_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "train_sampling_strategy": "group_by_length",  # group_by_length or random
}
# ... and those it fixes itself, with why.
TRAINING_ARGUMENTS_FIXED: dict[str, str] = {
    "output_dir": "it is the model folder (mapd run: the round's model/; mapd train: --out)",
    "save_strategy": "steps, to resume from the last checkpoint; set train.save_steps",
    "remove_unused_columns": "off, since the joint-loss collator needs every column",
}


EMBEDDED_DEFAULT = Path(__file__).parent / "configs" / "default.yaml"


class StudentConfig(BaseModel):
    """The student model and how it answers when its mistakes are mined and when it is evaluated."""

    model: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Hub id, local folder, .gguf file, or embedded:<name> (a model shipped by a PyPI package).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside the model folder, if any.")
    dtype: GenerationDtype = Field("auto", description="In-process generation: " + GENERATION_DTYPE_HELP)
    max_new_tokens: int = Field(512, ge=1, description="Tokens generated per answer (the paper: 512).")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Mining temperature; 0 is greedy (the paper samples at 0.3, top-p 0.9)."
    )
    top_p: float = Field(0.9, gt=0, le=1, description="Mining top-p when sampling.")
    batch_size: int = Field(16, ge=1, json_schema_extra=OPERATIONAL,
                            description="Prompts generated together (mining and evaluation).")
    seed: int = Field(731, ge=0, lt=2**32, description="Seed of the mining samples when temperature > 0.")
    serve: str | None = Field(
        None,
        description="Generate with a serving engine that mapd starts and stops: a command template with {model}, "
        "{port}, {name} and {host}, e.g. 'vllm serve {model} --host {host} --port {port} --served-model-name "
        "{name}' or 'transformers serve {model} --host {host} --port {port} --continuous-batching'. Unset (and no "
        "base_url): in-process.",
    )
    host: Host = HOST
    base_url: BaseUrl | None = Field(
        None, json_schema_extra=OPERATIONAL,
        description="Generate with an OpenAI-compatible server that is already running (e.g. a vLLM fleet behind "
        "a load balancer); model is then the name it serves.",
    )
    api_key_env: EnvName | None = Field(
        None, json_schema_extra=OPERATIONAL, description="With base_url: the variable holding the server's key.")
    max_concurrency: int = Field(
        64, ge=1, json_schema_extra=OPERATIONAL, description="Served generation: requests in flight at once.")
    ready_timeout_s: float = Field(
        900, gt=0, le=DAY_S, json_schema_extra=OPERATIONAL, description="serve: seconds to wait for the server to be ready.")
    timeout_s: float = Field(
        600, gt=0, le=DAY_S, json_schema_extra=OPERATIONAL,
        description="Served: seconds before one request times out (then it is retried). Requests wait in the "
        "server's queue: allow for max_concurrency answers ahead of each.")

    model_config = SECTION

    @model_validator(mode="after")
    def _one_engine(self) -> "StudentConfig":
        if self.serve and self.base_url:
            raise ValueError("set serve (mapd starts the server) or base_url (a server already running), not both")
        return self

    @property
    def served(self) -> bool:
        """Whether generation goes to a server (through the call path) rather than in-process."""
        return bool(self.serve or self.base_url)


# the build modes mapd.stages.build implements, besides single:<teacher> (build_mode_problem checks a mode)
BUILD_MODES = ("mixed", "no-review", "all")
SINGLE = "single:"  # single:<teacher>


def build_mode_problem(mode: str) -> str | None:
    """Why ``mode`` is no build mode (the config's field, or ``mapd build --mode``), or None when it is one."""
    if mode in BUILD_MODES or (mode.startswith(SINGLE) and mode.removeprefix(SINGLE).strip()):
        return None
    return f"unknown mode {mode!r} (modes: {', '.join(BUILD_MODES[:1] + (SINGLE + '<teacher>',) + BUILD_MODES[1:])})"


class BuildConfig(BaseModel):
    """How instruction data is made from mistakes, feedback and rationales (docs/method.md#5-instruction-data)."""

    mode: str = Field(
        "mixed",
        description="mixed (the method), single:<teacher> (one teacher, no review), no-review, or all.",
    )
    seed: int = Field(731, description="Seed of the random choice among teachers.")

    model_config = SECTION

    @property
    def single(self) -> str | None:
        """The teacher a ``single:<teacher>`` mode names, else None."""
        return self.mode.removeprefix(SINGLE) if self.mode.startswith(SINGLE) else None


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
    cache_path: Annotated[str | None, AfterValidator(_expand_user)] = Field(
        None, json_schema_extra=OPERATIONAL,
        description="SQLite call cache (~ is your home folder); default <run dir>/cache.sqlite. Share one path "
        "between runs to reuse calls.",
    )
    max_budget_usd: float | None = Field(
        None, gt=0, json_schema_extra=OPERATIONAL,
        description="Stop cleanly before teacher spending exceeds this many USD in total: everything paid through "
        "the call cache counts, over all runs and processes that share it (needs prices).",
    )

    model_config = SECTION

    @model_validator(mode="after")
    def _unique_teacher_names(self) -> "RunConfig":
        keys = [name_key(teacher.name) for teacher in self.teachers]
        duplicates = sorted({t.name for t, key in zip(self.teachers, keys) if keys.count(key) > 1})
        if duplicates:
            raise ValueError("teacher names must be unique regardless of case and Unicode form, repeated: "
                             f"{', '.join(duplicates)}")
        return self

    def teacher(self, name: str) -> TeacherConfig:
        """The teacher called ``name``; an unknown name is a MapdError listing the committee."""
        for teacher in self.teachers:
            if teacher.name == name:
                return teacher
        known = ", ".join(t.name for t in self.teachers) or "none"
        raise MapdError(f"teacher '{name}' is not in the config (teachers: {known})")


def field_path(location: tuple) -> str:
    """A field's location as the config writes it: ``teachers.0.model``."""
    return ".".join(str(part) for part in location) or "(top level)"


def parse_config(data: dict[str, Any], source: str = "config",
                 line_of: Callable[[tuple], int | None] | None = None) -> RunConfig:
    """Validate a config mapping; errors name the source and every bad field (and its line, when
    ``line_of`` maps a field's location to one)."""
    try:
        config = RunConfig.model_validate(data or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            line = line_of(error["loc"]) if line_of else None
            problems.append(f"{field_path(error['loc'])}: {error['msg']}" + (f" (line {line})" if line else ""))
        raise MapdError(f"{source}: {'; '.join(problems)}") from None
    _check_meaning(config, source, line_of or (lambda location: None))
    return config


# the fields mapd.prompts fills in, per template
PROMPT_FIELDS = {"answer": ("question", "answer_format"),
                 "feedback": ("question", "student_answer", "gold", "answer_format"),
                 "review": ("question", "rationale", "gold", "answer_format", "score_format")}


def _check_meaning(config: RunConfig, source: str, line_of: Callable[[tuple], int | None]) -> None:
    """What the field types cannot say: the task name is one mapd.tasks implements, the build mode is
    one mapd.stages.build implements, train.args sets no option mapd sets, and every prompt template fills in
    with its fields. Errors name the
    file, line and field."""
    def at(location: tuple) -> str:
        line = line_of(location)
        return f"{source}:{line}" if line else source

    if (problem := unknown_task(config.task.name)) is not None:
        raise MapdError(f"{at(('task', 'name'))}: {problem}")
    if config.task.options and not config.task.name.startswith(TASK_PREFIXES):
        raise MapdError(f"{at(('task', 'options'))}: task.options: only reasoning_gym:<dataset> tasks take generator "
                        f"options, and the task is {config.task.name}")
    if config.max_budget_usd is not None:
        for index, teacher in enumerate(config.teachers):
            if not (teacher.price_input_per_mtok or teacher.price_output_per_mtok or teacher.free):
                raise MapdError(f"{at(('teachers', index, 'name'))}: max_budget_usd is set, but teacher "
                                f"'{teacher.name}' has no prices (price_input_per_mtok, price_output_per_mtok), so its "
                                "calls would count as free: set its prices, or unset max_budget_usd")
    if (problem := build_mode_problem(config.build.mode)) is not None:
        raise MapdError(f"{at(('build', 'mode'))}: build.mode: {problem}")
    for name in config.train.args:
        if name in TRAINING_ARGUMENTS or name in TRAINING_ARGUMENTS_FIXED:
            how = (f"from train.{TRAINING_ARGUMENTS[name]}: set that instead" if name in TRAINING_ARGUMENTS
                   else TRAINING_ARGUMENTS_FIXED[name])
            raise MapdError(f"{at(('train', 'args', name))}: train.args.{name}: mapd sets this TrainingArguments "
                            f"option itself, {how}")
    for name, fields in PROMPT_FIELDS.items():
        try:
            used = [field for _, field, _, _ in Formatter().parse(getattr(config.prompts, name)) if field is not None]
        except ValueError as exc:  # a lone { or }
            raise MapdError(f"{at(('prompts', name))}: prompts.{name}: not a str.format template ({exc}; "
                            "write {{ or }} for a literal brace)") from None
        unknown = [field for field in used if re.split(r"[.\[]", field)[0] not in fields]
        if unknown:
            raise MapdError(f"{at(('prompts', name))}: prompts.{name}: {{{unknown[0]}}} is not a field of this "
                            f"template (its fields: {', '.join('{' + f + '}' for f in fields)}; write {{{{ or }}}} "
                            "for a literal brace)")


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The config section class inside a field's annotation (``TaskConfig``, ``list[TeacherConfig]``, ``X | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = section_model(argument)
        if found is not None:
            return found
    return None
