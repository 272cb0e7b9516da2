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
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gptfl_ray.errors import ConfigError, shorten  # ConfigError: re-exported for callers


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    # inf/nan in a float field is an error: every float here is a size, a rate or a bound.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _check_folder_name(value: str) -> str:
    """A name used as (part of) a folder name must stay one plain path component."""
    if not value or "/" in value or "\\" in value or ".." in value or not value.isprintable():
        raise PydanticCustomError(
            "folder_name", "must be a plain folder name (no '/', '\\', '..' or control characters)"
        )
    return value


# Run, arm and sweep names become folder names (runs/<name>-<time>, fl/<arm>-seed<k>-<hash>).
FolderName = Annotated[str, Field(max_length=100), AfterValidator(_check_folder_name)]
# Non-negative and within what numpy's and torch's generators take.
MAX_SEED = 2**32 - 1  # seeds feed numpy's and torch's generators: one bound for config, --seed and grids
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


# ----------------------------------------------------------------------------------------------- data
class AudioConfig(Section):
    sample_rate: int = Field(16_000, gt=0)
    clip_seconds: float = Field(1.0, gt=0)
    n_mels: int = Field(40, gt=0)
    n_fft: int = Field(400, gt=0)
    hop_length: int = Field(160, gt=0)
    trim_silence: bool = True


class HFDataConfig(Section):
    """A Hugging Face dataset saved with ``save_to_disk`` (a folder) or as Parquet/Arrow files (``data.dataset: hf``)."""

    path: Path  # a save_to_disk folder, a .parquet/.arrow file, or a folder of them
    split: str = "train"  # the split used as the federated pool (a "test" split, if present, is the test set)
    image_column: str | None = None  # exactly one of image_column / audio_column
    audio_column: str | None = None
    label_column: str = "label"
    group_column: str | None = None  # natural client ids (e.g. speaker), for partition.method natural

    @model_validator(mode="after")
    def _one_input_column(self) -> HFDataConfig:
        if (self.image_column is None) == (self.audio_column is None):
            raise PydanticCustomError("hf_column", "set exactly one of image_column and audio_column")
        return self


class TextConfig(Section):
    """Text datasets: how each text becomes ``max_length`` token ids (gptfl_ray/data/text.py; -1 = padding)."""

    # None: the model's own: a `hf:` model's tokenizer (its path), else "hash" (hashed words: no training, so no
    # client text reaches the server). Or a Hugging Face tokenizer by hub id or local path (AutoTokenizer).
    tokenizer: str | None = None
    max_length: int = Field(64, gt=0, le=8192)  # tokens kept per text (longer texts are cut)


# Fields of DataConfig added for user data: not dumped while unset, so configs, run folders and cache keys of
# the built-in datasets stay what they were.
_OWN_DATA_FIELDS = ("image_size", "group_regex", "hf", "text_column", "label_column", "group_column", "text")


class DataConfig(Section):
    # A registered dataset (gptfl_ray/data/base.py:known_datasets) or "module:function" returning the data.
    dataset: str = "mnist"
    root: Path | None = None  # dataset root; default: <data dir>/<dataset>
    image_size: int | None = Field(None, gt=0)  # own image data: resize to this square side (None = keep)
    group_regex: str | None = None  # audiofolder: first group of this regex on the file name = speaker/group
    hf: HFDataConfig | None = None  # data.dataset hf: where and which columns
    text_column: str | None = None  # textfile: the column holding the text (default "text")
    # meld: emotion (7 classes, the default) or sentiment (3); textfile: the label column (default "label")
    label_column: str | None = None
    # textfile: the column of natural client ids (e.g. a speaker), for partition.method natural
    group_column: str | None = None
    text: TextConfig | None = None  # text datasets: tokenization (None: TextConfig's defaults)
    # Held-out test set. "official" uses the dataset's own split; "holdout" carves num_test samples
    # out of the available pool (MNIST here ships only its 10k test set).
    test_split: Literal["official", "holdout"] = "official"
    num_test: int | None = Field(None, gt=0)
    num_train: int | None = Field(None, gt=0)  # cap on the federated pool (None = all)
    split_seed: Seed = 0
    audio: AudioConfig = AudioConfig()

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, value: str) -> str:
        from gptfl_ray.data.base import dataset_error

        if err := dataset_error(value):
            raise PydanticCustomError("dataset_name", err)
        return value

    @field_validator("group_regex")
    @classmethod
    def _check_regex(cls, value: str | None) -> str | None:
        import re

        if value is not None:
            try:
                if re.compile(value).groups < 1:
                    raise PydanticCustomError("group_regex", "needs a capturing group (the group id)")
            except re.error as err:
                raise PydanticCustomError("group_regex", "invalid regex: {err}", {"err": str(err)}) from None
        return value

    @model_validator(mode="after")
    def _check_options(self) -> DataConfig:
        from gptfl_ray.data.base import options_error

        if err := options_error(self):
            raise PydanticCustomError("data_options", err)
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_own_data(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in _OWN_DATA_FIELDS:
            if out.get(key) is None:
                out.pop(key, None)
        return out


class PartitionConfig(Section):
    method: Literal["iid", "dirichlet", "natural", "equal"] = "dirichlet"
    num_clients: int = Field(10, gt=0)
    alpha: float = Field(0.5, gt=0)
    min_size: int = Field(1, ge=0)
    balanced: bool = False  # official GPT-FL partitioner: a client stops receiving at N/num_clients
    sub_splits: int = Field(1, gt=0)  # natural-id: split every group into this many sub-clients


class ModelConfig(Section):
    name: str = "convnet"
    # Channel width of models that have one (gptfl_ray/models/specs.py:WIDTH_MODELS); an error for the others.
    width: int | None = Field(None, gt=0)
    # Starting weights (a .safetensors or torch.save'd state dict, see gptfl_ray/models/weights.py): GPT-FL's
    # pretraining starts from them, and `gptfl run` adds the arm "pretrained-init" (FL from them).
    weights: Path | None = None

    @model_serializer(mode="wrap")
    def _drop_unset_weights(self, handler: Any) -> dict[str, Any]:
        # Unset: not dumped, so configs, run folders and cache keys from before the field stay the same.
        out = handler(self)
        if out.get("weights") is None:
            out.pop("weights", None)
        return out

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        from gptfl_ray.models.specs import name_error

        if err := name_error(value):
            raise PydanticCustomError("model_name", err)
        return value

    @field_validator("width")
    @classmethod
    def _check_width(cls, value: int | None, info: ValidationInfo) -> int | None:
        from gptfl_ray.models.specs import width_error

        if err := width_error(info.data.get("name", ""), value):
            raise PydanticCustomError("model_width", err)
        return value


def _majority_threshold(value: float, info: ValidationInfo) -> float:
    """SecAgg thresholds must exceed half the participants unless ``secagg_allow_minority_threshold``."""
    if value <= 0.5 and not info.data.get("secagg_allow_minority_threshold", False):
        raise PydanticCustomError(
            "secagg_majority",
            "must be > 0.5: at or below half of the participants, a server that sends clients different "
            "survivor lists can unmask a client's input (set secagg_allow_minority_threshold: true to accept that)",
        )
    return value


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
    # Allow secagg_threshold <= 0.5 (README "Secure aggregation": safe against an honest-but-curious server only).
    secagg_allow_minority_threshold: bool = False
    # Fraction of clients (rounded up, at least 2 and more than half unless allowed above) that must survive
    # every SecAgg stage; fewer aborts without a result.
    secagg_threshold: float = Field(0.6, gt=0, le=1)
    secagg_timeout_s: float = Field(600.0, gt=0)  # per-stage deadline; hosts that miss it drop out

    _check_secagg_threshold = field_validator("secagg_threshold")(_majority_threshold)


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
    # openai: allow sending the key over plain http:// to a host other than this machine (gptfl_ray/transport.py)
    allow_insecure_http: bool = False
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
    # openai: wait before retry k is retry_backoff_s * 2**(k-1) × [0.5, 1.5) jitter, or the Retry-After if longer
    retry_backoff_s: float = Field(0.5, ge=0)
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
    # More rows than this fraction falling back to their template fails the step (endpoint down, bad key, ...).
    max_fallback_fraction: float = Field(0.1, ge=0, le=1)
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
    (speech_espeak), diffusers (image_diffusers), speecht5 (speech_t5), audioldm (audio_ldm), remote,
    text-grammar (text_grammar), text-llm (text_llm)."""

    # glyphs | espeak | diffusers | speecht5 | audioldm | remote | text-grammar | text-llm
    generator: str = "glyphs"
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


class PublicDataConfig(Section):
    """Unlabeled data held by the server, for algorithms that use it (FedDF, DS-FL, Fed-ET).

    ``holdout``: ``num`` real samples drawn from the train pool *before* partitioning (so no client holds them),
    labels dropped. ``synthetic``: the run's own synthetic data (at most ``num`` samples, a seeded subset; all
    when unset), labels dropped: the same generated data GPT-FL pretrains on, used another way.
    """

    source: Literal["none", "holdout", "synthetic"] = "none"
    num: int | None = Field(None, gt=0, validate_default=True)
    seed: Seed = 0  # which samples (fixed across run seeds, like data.split_seed)

    @field_validator("num")
    @classmethod
    def _check_num(cls, value: int | None, info: ValidationInfo) -> int | None:
        if info.data.get("source") == "holdout" and value is None:
            raise PydanticCustomError(
                "public_num", "required when source is 'holdout' (samples drawn from the pool)"
            )
        return value


class FLConfig(Section):
    strategy: StrategyConfig = StrategyConfig()
    # The clients' model when it differs from the server's `model` (strategies with heterogeneous_models:
    # Fed-ET's small client models); None: the clients train `model`.
    client_model: ModelConfig | None = None
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
    # Deadline of one client task (training, evaluation); a task past it counts as a lost client: its actor is
    # killed and replaced, the task re-dispatched per client_retries. None: 10x the median measured time of
    # such tasks (scaled by the client's sample count), at least 60 s; 600 s until one has finished.
    task_timeout_s: float | None = Field(None, gt=0)
    # L2 bound; larger updates are rejected (with secure_aggregation: the client clips its update to it).
    max_update_norm: float | None = Field(None, gt=0)
    # Secure aggregation (Bonawitz et al. 2017) of FedAvg-family updates, see gptfl_ray/fl/secure.py: the server
    # learns only Σ[w·Δ, w]; grad_diversity is null; SCAFFOLD is not supported.
    secure_aggregation: bool = False
    # Allow secagg_threshold <= 0.5 (README "Secure aggregation": safe against an honest-but-curious server only).
    secagg_allow_minority_threshold: bool = False
    # Fraction of the round's SecAgg participants (rounded up, at least 2 and more than half unless allowed
    # above) that must survive every stage; fewer: the round is skipped (no partial sum is ever revealed).
    secagg_threshold: float = Field(0.6, gt=0, le=1)
    # Z_2^32 (4 bytes per value on the wire, like float32) or Z_2^64 (8 bytes, finer fixed point).
    secagg_ring_bits: Literal[32, 64] = 32
    # Per-coordinate bound of a client's update before fixed-point encoding (larger values are clipped and
    # counted in the round's secagg.clipped_fraction): trainable parameters, and float buffers (BatchNorm).
    secagg_clip: float = Field(1.0, gt=0)
    secagg_buffer_clip: float = Field(100.0, gt=0)
    secagg_timeout_s: float = Field(600.0, gt=0)  # per-stage deadline; actors that miss it drop out
    # "Rounds / MB to target": the first evaluated round whose `target_metric` reaches `target_accuracy`.
    target_accuracy: float | None = Field(None, gt=0, le=1)
    target_metric: Literal["accuracy", "weighted_f1", "macro_f1"] = "accuracy"
    # "federated": FL rounds; "isolated": the paper's client-isolated fine-tuning control.
    mode: Literal["federated", "isolated"] = "federated"
    isolated_clients: int = Field(10, gt=0)
    isolated_epochs: int | None = Field(
        None, gt=0
    )  # local epochs of the isolated control (None: local.epochs)

    _check_secagg_threshold = field_validator("secagg_threshold")(_majority_threshold)

    @model_serializer(mode="wrap")
    def _drop_default_target_metric(self, handler: Any) -> dict[str, Any]:
        # Not dumped at its default, so configs, run folders and cache keys from before the field stay the same.
        out = handler(self)
        if out.get("target_metric") == "accuracy":
            out.pop("target_metric", None)
        return out


class BaselineConfig(Section):
    """One baseline arm: FL from random init with these overrides of the main `fl` section."""

    name: FolderName
    fl: dict[str, Any] = Field(default_factory=dict)
    init: Literal["random", "pretrained"] = "random"


class MLflowConfig(Section):
    """MLflow tracking of `gptfl run` and `gptfl sweep` (see gptfl_ray/tracking.py)."""

    enabled: bool = True
    uri: str | None = None  # None: a local file store, file://<run or sweep folder>/mlruns
    experiment: str | None = None  # None: the run's (or sweep's) name


class TrackingConfig(Section):
    mlflow: MLflowConfig = MLflowConfig()


class RunConfig(Section):
    name: FolderName = "run"
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1)
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
    public_data: PublicDataConfig = PublicDataConfig()
    baselines: list[BaselineConfig] = Field(default_factory=list)
    tracking: TrackingConfig = TrackingConfig()  # where results are logged, not what they are

    @field_validator("model")
    @classmethod
    def _text_tokenizer(cls, model: ModelConfig, info: ValidationInfo) -> ModelConfig:
        """Text data: a `hf:` model reads its own tokenizer's ids (``data.text.tokenizer`` is set to its path when
        unset); text_cnn reads the hashing tokenizer's."""
        from gptfl_ray.data.base import lookup
        from gptfl_ray.models.specs import HF_PREFIX, hashed_ids_only

        data = info.data.get("data")
        if data is None or "text" not in lookup(data.dataset).options:
            return model
        tokenizer = data.text.tokenizer if data.text is not None else None
        if model.name.startswith(HF_PREFIX) and tokenizer is None:
            path = model.name[len(HF_PREFIX) :]
            data.text = (data.text or TextConfig()).model_copy(update={"tokenizer": path})
        elif hashed_ids_only(model.name) and tokenizer not in (None, "hash"):
            raise PydanticCustomError(
                "text_tokenizer",
                "{name} reads the hashing tokenizer's ids: leave data.text.tokenizer unset (or 'hash')",
                {"name": model.name},
            )
        return model


# --------------------------------------------------------------------------------------- loading
def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


# Bounds on what a config may hold and what an error may echo of it (a YAML alias bomb is a few hundred bytes).
MAX_CONFIG_VALUES = 100_000  # keys + values after alias expansion
MAX_CONFIG_DEPTH = 64
MAX_ERRORS_SHOWN = 3


def echo(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` of user input for error messages (never the repr of a whole large value)."""
    r = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, limit, limit
    return shorten(r.repr(value), limit)


def plugin_params_error(err: ValidationError, field: str, unknown: str, owner: str) -> ConfigError:
    """One error for a plug-in's own parameters (a strategy's, a generator's options): every problem named
    ``<field>.<key>: <message> (<owner>)``, an unexpected key as ``unknown``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = unknown if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{field}.{key}: {msg} ({owner})")
    return ConfigError("; ".join(parts))


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        msg = shorten(e["msg"], 200)
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        inp = e.get("input")
        shown = f" (got {echo(inp)})" if e["type"] != "extra_forbidden" and not isinstance(inp, dict) else ""
        lines.append(f"{source}: {shorten(_format_loc(e['loc']), 120)}: {msg}{shown}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more errors")
    return "; ".join(lines)


def check_size(value: Any, source: str) -> None:
    """Refuse YAML whose aliases expand past ``MAX_CONFIG_VALUES`` values, nest past ``MAX_CONFIG_DEPTH``
    levels, or refer to themselves: the expansion is counted per distinct node, never materialised."""
    seen: dict[int, tuple[int, int]] = {}  # id -> (values, height) of an already measured node
    active: set[int] = set()

    def measure(v: Any, depth: int) -> tuple[int, int]:
        if not isinstance(v, dict | list):
            return 1, 0
        key = id(v)
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to itself (recursive value)")
        if key not in seen:
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"{source}: values nested more than {MAX_CONFIG_DEPTH} levels deep")
            active.add(key)
            parts = [measure(x, depth + 1) for x in ([*v.keys(), *v.values()] if isinstance(v, dict) else v)]
            active.discard(key)
            seen[key] = (1 + sum(n for n, _ in parts), 1 + max((h for _, h in parts), default=0))
        total, height = seen[key]
        if total > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{source}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded (alias bomb?)"
            )
        if depth + height > MAX_CONFIG_DEPTH + 1:
            raise ConfigError(f"{source}: values nested more than {MAX_CONFIG_DEPTH} levels deep")
        return total, height

    measure(value, 0)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"fl.local.lr=0.1"`` -> (["fl", "local", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. fl.rounds=5")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    check_size(value, f"--set {key.strip()}")
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
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError(f"{path}: {what}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = shorten(str(getattr(err, "problem", None) or err).splitlines()[0], 200)
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    if raw is None:  # an empty file would silently run every default
        raise ConfigError(f"{path}: empty config file (write `{{}}` to run with every default)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping (got {type(raw).__name__})")
    check_size(raw, str(path))
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
