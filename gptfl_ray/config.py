"""Typed run configuration: YAML in, validated pydantic models out.

One YAML file describes one GPT-FL run (all four steps); each step reads only its own section.
``load_config(path, overrides=["fl.rounds=5"])`` validates and reports problems as
``ConfigError("configs/x.yaml: fl.rounds: Input should be a valid integer")``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem; the message names the file and the field."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
class AudioConfig(Section):
    sample_rate: int = Field(16_000, gt=0)
    clip_seconds: float = Field(1.0, gt=0)
    n_mels: int = Field(40, gt=0)
    n_fft: int = Field(400, gt=0)
    hop_length: int = Field(160, gt=0)
    trim_silence: bool = True


class DataConfig(Section):
    dataset: Literal["mnist", "fsdd", "speech_commands", "esc50", "cifar10", "cifar100", "flowers102"] = (
        "mnist"
    )
    root: Path | None = None  # dataset root; default: <data dir>/<dataset>
    # Held-out test set. "official" uses the dataset's own split; "holdout" carves num_test samples
    # out of the available pool (MNIST here ships only its 10k test set).
    test_split: Literal["official", "holdout"] = "official"
    num_test: int | None = Field(None, gt=0)
    num_train: int | None = Field(None, gt=0)  # cap on the federated pool (None = all)
    split_seed: int = 0
    audio: AudioConfig = AudioConfig()


class PartitionConfig(Section):
    method: Literal["iid", "dirichlet", "natural", "equal"] = "dirichlet"
    num_clients: int = Field(10, gt=0)
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(1, ge=0)
    balanced: bool = False  # official GPT-FL partitioner: a client stops receiving at N/num_clients
    sub_splits: int = Field(1, gt=0)  # natural-id: split every group into this many sub-clients


class ModelConfig(Section):
    name: str = "convnet"
    width: int | None = Field(None, gt=0)  # model-specific width override (e.g. ConvNet channels)


# ---------------------------------------------------------------------------------- labels & prompts
class LabelsConfig(Section):
    # "dataset": the dataset's own label names; "config": `names`; "collect": IBLT + SecAgg over clients.
    source: Literal["dataset", "config", "collect"] = "dataset"
    names: list[str] | None = None
    # Label name -> text used in prompts, e.g. {"7": "seven"}.
    text: dict[str, str] = Field(default_factory=dict)
    # collect: the IBLT holds up to iblt_capacity distinct label names of <= iblt_max_label_bytes UTF-8 bytes,
    # each hashed into iblt_repetitions cells (table size: gptfl_ray/labels/iblt.py:table_cells).
    iblt_capacity: int = Field(256, gt=0)
    iblt_repetitions: int = Field(4, ge=2, le=7)
    iblt_max_label_bytes: int = Field(64, gt=0, lt=65536)
    # Fraction of clients (rounded up) that must survive every SecAgg stage; fewer aborts without a result.
    secagg_threshold: float = Field(0.6, gt=0, le=1)
    secagg_timeout_s: float | None = Field(None, gt=0)  # per-stage deadline; hosts that miss it drop out


DEFAULT_EXPANSION_INSTRUCTION = (
    'Rewrite the prompt "{prompt}" as one short, vivid, concrete sentence for a generative model. '
    'Keep the words "{label}". Reply with the sentence only.'
)


class ExpanderConfig(Section):
    """LLM prompt expansion (step 1b): each template prompt -> one richer sentence, validated, else fallback.

    Backends: ``templates`` (offline default, identity), ``transformers`` (text-generation in a Ray Data actor
    pool), ``vllm`` (ray.data.llm, GPU actors, own runtime_env), ``openai`` (any OpenAI-compatible endpoint).
    """

    backend: Literal["templates", "transformers", "vllm", "openai"] = "templates"
    model: str | None = None  # hub id or local path (transformers/vllm); model name at the endpoint (openai)
    base_url: str | None = None  # openai: endpoint root incl. /v1, e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # openai: env var holding the key (unset = no Authorization header)
    # What the LLM is asked; placeholders {prompt} (the template prompt) and {label} (the label text).
    instruction: str = DEFAULT_EXPANSION_INSTRUCTION
    system_prompt: str | None = None  # chat models only
    # Wrap in the model's chat template; None = when the tokenizer has one (vllm: True; openai: always chat).
    chat: bool | None = None
    max_new_tokens: int = Field(40, gt=0)
    temperature: float = Field(0.8, ge=0)  # 0 = greedy (batched); > 0 = sampling seeded by the row's seed
    top_p: float = Field(0.95, gt=0, le=1)
    timeout_s: float = Field(30.0, gt=0)  # openai: per request
    retries: int = Field(2, ge=0)  # openai: extra attempts after timeout / 408 / 429 / 5xx / malformed reply
    retry_backoff_s: float = Field(0.5, ge=0)  # openai: wait before retry k is retry_backoff_s * 2**k
    max_concurrency: int = Field(4, gt=0)  # openai: requests in flight per actor (total: × concurrency)
    batch_size: int = Field(8, gt=0)  # rows per actor call
    concurrency: int = Field(1, gt=0)  # actors in the expansion pool
    num_cpus: float = Field(1.0, gt=0)  # per actor (transformers sets its torch threads from this)
    # per actor (transformers); vllm takes tensor_parallel_size × pipeline_parallel_size GPUs per engine
    num_gpus: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # transformers; auto = cuda when the actor has a GPU
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # transformers
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # vllm: vLLM engine args (max_model_len, ...)
    accelerator_type: str | None = None  # vllm: e.g. "H100"
    # Validation: an expansion must name the label text or a synonym (keyed by label name), have
    # min_chars..max_chars characters and differ from earlier expansions of its class; else -> template.
    min_chars: int = Field(3, ge=0)
    max_chars: int = Field(300, gt=0)
    synonyms: dict[str, list[str]] = Field(default_factory=dict)
    runtime_env: dict[str, Any] | None = None  # vLLM stage: its own env (pip / container image)

    @model_validator(mode="after")
    def _check_bounds(self) -> ExpanderConfig:
        if self.max_chars < self.min_chars:
            raise ValueError("max_chars must be >= min_chars")
        return self

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str) -> str:
        from gptfl_ray.prompts.placeholders import check_placeholders

        check_placeholders([value], allowed={"prompt", "label"})
        return value


class PromptsConfig(Section):
    """Prompt table (step 1b): label names -> prompts with per-sample seed and guidance scale."""

    # Default chosen by modality (see gptfl_ray.prompts.templates.DEFAULT_TEMPLATES); placeholders
    # {label} (required) and {domain}. Sample i of a class uses template i % len(templates).
    templates: list[str] | None = Field(None, min_length=1)
    # Fills {domain}; a list is cycled over samples (the official multi-domain prompts: photo, drawing, ...).
    domain: str | list[str] | None = None
    num_per_class: int | None = Field(None, gt=0)
    scale: float | None = Field(None, gt=0)  # × the real dataset's per-class size (ignored if num_per_class)
    # Unconditional guidance scale, drawn per sample in [guidance_min, guidance_max].
    guidance_min: float = Field(1.0, ge=0)
    guidance_max: float = Field(5.0, ge=0)
    guidance_integer: bool = True  # official code draws integers 1..5 (np.random.randint(1, 6))
    seed: int = Field(0, ge=0)
    expander: ExpanderConfig = ExpanderConfig()

    @model_validator(mode="after")
    def _check_range(self) -> PromptsConfig:
        if self.guidance_max < self.guidance_min:
            raise ValueError("guidance_max must be >= guidance_min")
        if self.guidance_integer and math.floor(self.guidance_max) < math.ceil(self.guidance_min):
            raise ValueError("guidance_integer: no integer between guidance_min and guidance_max")
        return self

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: list[str] | None) -> list[str] | None:
        from gptfl_ray.prompts.placeholders import check_placeholders

        if value is not None:
            check_placeholders(value, allowed={"label", "domain"}, required="label")
        return value

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("empty list (use null for no domain)")
        return value


# ------------------------------------------------------------------------------------------ generate
class GenerateConfig(Section):
    """Step 2. ``options`` are the generator's own (validated by it; unknown keys name
    ``generate.options.<key>``), see gptfl_ray/generate/<module>.py: glyphs (image_glyphs), espeak
    (speech_espeak), diffusers (image_diffusers), speecht5 (speech_t5), audioldm (audio_ldm), remote."""

    generator: str = "glyphs"  # glyphs | espeak | diffusers | speecht5 | audioldm | remote
    model_id: str | None = None  # hub id or local path; None = the generator's default
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(16, gt=0)  # rows per generator call
    concurrency: int = Field(1, gt=0)  # actors in the generation pool
    num_gpus: float = Field(0.0, ge=0)  # per actor
    num_cpus: float = Field(1.0, ge=0)  # per actor (also sizes torch's thread pool in the actor)
    rows_per_shard: int = Field(500, gt=0)  # rows per Parquet shard = the unit of resume
    options: dict[str, Any] = Field(default_factory=dict)  # generator-specific, validated by the generator


# ------------------------------------------------------------------------------------------ training
class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class PretrainConfig(Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    # Synthetic data: larger weight decay, smaller lr than the usual real-data recipe (GPT-FL §4).
    optimizer: OptimizerConfig = OptimizerConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler: Literal["cosine", "none"] = "cosine"
    augment: bool = True
    val_fraction: float = Field(0.1, ge=0, lt=1)
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)


class StrategyConfig(Section):
    """Strategy by name + its own parameters, validated by the strategy class (gptfl_ray/fl/strategies.py).

    fedavg/fedprox/scaffold/fedavgm/fedadam/fedyogi/fedadagrad, e.g. ``{name: fedprox, mu: 0.01}``; an
    unknown or invalid parameter is an error naming ``fl.strategy.<param>``.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "fedavg"


class LocalTrainConfig(Section):
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    optimizer: OptimizerConfig = OptimizerConfig()


class FLConfig(Section):
    strategy: StrategyConfig = StrategyConfig()
    rounds: int = Field(20, gt=0)
    clients_per_round: int = Field(10, gt=0)
    with_replacement: bool = False  # official code samples with replacement
    local: LocalTrainConfig = LocalTrainConfig()
    eval_every: int = Field(1, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    checkpoint_every: int = Field(5, ge=0)  # 0 = only at the end
    num_actors: int = Field(2, gt=0)
    actor_num_cpus: float = Field(1.0, gt=0)
    actor_num_gpus: float = Field(0.0, ge=0)
    min_clients_fraction: float = Field(0.5, gt=0, le=1)  # of the round's sampled clients
    # A client whose actor dies mid-round is re-dispatched this many times (0 = aggregate the survivors).
    client_retries: int = Field(1, ge=0)
    max_actor_replacements: int = Field(8, ge=0)  # dead actors replaced per run before the run fails
    # L2 bound; larger updates are rejected (with secure_aggregation: the client clips its update to it).
    max_update_norm: float | None = Field(None, gt=0)
    # Secure aggregation (Bonawitz et al. 2017) of FedAvg-family updates, see gptfl_ray/fl/secure.py: the server
    # learns only Σ[w·Δ, w]; grad_diversity is null; SCAFFOLD is not supported.
    secure_aggregation: bool = False
    # Fraction of the round's SecAgg participants (rounded up, at least 2) that must survive every stage;
    # fewer: the round is skipped (no partial sum is ever revealed).
    secagg_threshold: float = Field(0.6, gt=0, le=1)
    # Z_2^32 (4 bytes per value on the wire, like float32) or Z_2^64 (8 bytes, finer fixed point).
    secagg_ring_bits: Literal[32, 64] = 32
    # Per-coordinate bound of a client's update before fixed-point encoding (larger values are clipped and
    # counted in the round's secagg.clipped_fraction): trainable parameters, and float buffers (BatchNorm).
    secagg_clip: float = Field(1.0, gt=0)
    secagg_buffer_clip: float = Field(100.0, gt=0)
    secagg_timeout_s: float | None = Field(None, gt=0)  # per-stage deadline; actors that miss it drop out
    target_accuracy: float | None = Field(None, gt=0, le=1)
    # "federated": FL rounds; "isolated": the paper's client-isolated fine-tuning control.
    mode: Literal["federated", "isolated"] = "federated"
    isolated_clients: int = Field(10, gt=0)
    isolated_epochs: int | None = Field(
        None, gt=0
    )  # local epochs of the isolated control (None: local.epochs)


class BaselineConfig(Section):
    """One baseline arm: FL from random init with these overrides of the main `fl` section."""

    name: str
    fl: dict[str, Any] = Field(default_factory=dict)
    init: Literal["random", "pretrained"] = "random"


class RunConfig(Section):
    name: str = "run"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    output_dir: Path = Path("runs")
    data_dir: Path | None = None  # overrides GPTFL_DATA_DIR
    ray_address: str | None = None  # None = local ray.init()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    labels: LabelsConfig = LabelsConfig()
    prompts: PromptsConfig = PromptsConfig()
    generate: GenerateConfig = GenerateConfig()
    pretrain: PretrainConfig = PretrainConfig()
    fl: FLConfig = FLConfig()
    baselines: list[BaselineConfig] = Field(default_factory=list)


# --------------------------------------------------------------------------------------- loading
def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        inp = e.get("input")
        shown = f" (got {inp!r})" if e["type"] != "extra_forbidden" and not isinstance(inp, dict) else ""
        lines.append(f"{source}: {_format_loc(e['loc'])}: {msg}{shown}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"fl.local.lr=0.1"`` -> (["fl", "local", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. fl.rounds=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides, validate."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(raw, str(path))


def dump_config(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    from gptfl_ray.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(dump_config(cfg), sort_keys=False))


def config_hash(*parts: Any, length: int = 12) -> str:
    """Stable hash of config sections (pydantic models, dicts, scalars) identifying a step's output."""

    def norm(p: Any) -> Any:
        return p.model_dump(mode="json") if isinstance(p, BaseModel) else p

    blob = json.dumps([norm(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
