"""Dataset containers, the per-dataset fact sheet (``DatasetSpec``) and the one registry of datasets.

Every dataset is one module under ``gptfl_ray/data/`` that declares a ``DatasetSpec`` (name, modality, label
names, input shape facts, natural groups, official test split, valid augmentations) with its loader and
registers it. Everything else in the package asks this registry (``get_spec``, ``known_datasets``) and never
names a dataset. Datasets whose facts come from the data itself (``imagefolder``, ``audiofolder``, ``hf``,
``module:function`` plugins) have a spec with ``from_data=True``; ``get_spec(data_cfg)`` then loads the data
once per process and fills in modality, label names, image size and channels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gptfl_ray.errors import ConfigError

if TYPE_CHECKING:
    from gptfl_ray.config import DataConfig

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class ArrayDataset:
    """Raw samples in memory.

    ``x`` is uint8 images (N, H, W) or (N, H, W, C), float32 waveforms (N, T) at ``sample_rate``, or texts
    (a numpy object array of ``str``, modality "text"). ``groups`` holds natural client ids (e.g. speaker
    index) where the dataset has them. ``text``: the ``data.text`` settings (``TextConfig``) its texts are
    tokenized with (``features.to_tensors``); None = the defaults.
    """

    x: np.ndarray
    y: np.ndarray
    label_names: list[str]
    modality: str
    sample_rate: int | None = None
    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    text: Any = None  # TextConfig | None (text datasets)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return ArrayDataset(
            x=self.x[idx],
            y=self.y[idx],
            label_names=self.label_names,
            modality=self.modality,
            sample_rate=self.sample_rate,
            groups=None if self.groups is None else self.groups[idx],
            group_names=self.group_names,
            text=self.text,
        )

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=len(self.label_names))


@dataclass
class Splits:
    train: ArrayDataset  # the federated pool (partitioned over clients)
    test: ArrayDataset  # held-out evaluation set


# loader(data_cfg, root) -> Splits (an official test set) or ArrayDataset (a test set is held out)
Loader = Callable[["DataConfig", Path], "Splits | ArrayDataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the package knows about one dataset."""

    name: str
    modality: str  # "image" | "audio" | "text" ("" until read from the data)
    num_classes: int
    label_names: tuple[str, ...]  # () = read from the data (see registry.label_names)
    image_size: int | None = None  # side of the square image models see
    channels: int = 1  # 0 = as the data has them
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    label_text: dict[str, str] = field(default_factory=dict)
    download_hint: str = ""
    hflip: bool = False  # a horizontal flip keeps the class (valid pretraining augmentation)
    natural_groups: bool = (
        False  # the loader sets ArrayDataset.groups (speaker ids: partition.method natural)
    )
    test_split: str = "holdout"  # what data.test_split 'official' uses; "holdout" = none, one is carved out
    loader: Loader | None = field(default=None, compare=False, repr=False)
    from_data: bool = False  # modality/labels/shape are read from the data (get_spec(data_cfg) fills them)
    options: tuple[str, ...] = ()  # the user-data fields of DataConfig it reads (image_size, group_regex, hf)
    check: Callable[[DataConfig], str | None] | None = field(default=None, compare=False, repr=False)
    # The spec as ``data``'s settings make it (label names from data.label_column, ...), without reading data.
    configured: Callable[[DataConfig], DatasetSpec] | None = field(default=None, compare=False, repr=False)


# Modules under gptfl_ray/data/ that each register one dataset (or one kind of user data), in listing order.
DATASET_MODULES = (
    "mnist",
    "fsdd",
    "speech_commands",
    "esc50",
    "cifar10",
    "cifar100",
    "flowers102",
    "imagefolder",
    "audiofolder",
    "hf",
    "meld",
    "textfile",
)
_REGISTRY: dict[str, DatasetSpec] = {}
_RESOLVED: dict[str, DatasetSpec] = {}  # config hash -> spec filled in from the data (this process)


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to the registry (called once at import by its module); returns the spec."""
    _REGISTRY[spec.name] = spec
    return spec


def _load_modules() -> None:
    if len(_REGISTRY) < len(DATASET_MODULES):
        for mod in DATASET_MODULES:
            importlib.import_module(f"gptfl_ray.data.{mod}")


def known_datasets() -> list[str]:
    """Registered dataset names (``module:function`` plugins come on top)."""
    _load_modules()
    return list(_REGISTRY)


def dataset_error(name: str) -> str | None:
    """Why ``name`` is not a valid ``data.dataset`` (None if it is)."""
    if ":" in name:
        from gptfl_ray.data.plugin import plugin_error

        return plugin_error(name)
    if name in known_datasets():
        return None
    return f"unknown dataset {name!r} (known: {', '.join(known_datasets())}, or module:function)"


def options_error(cfg: DataConfig) -> str | None:
    """Why ``cfg``'s user-data fields do not fit its dataset (None if they do)."""
    spec = lookup(cfg.dataset)
    for key in ("image_size", "group_regex", "hf", "text_column", "label_column", "group_column", "text"):
        if getattr(cfg, key) is not None and key not in spec.options:
            return f"data.{key} is not used by data.dataset {cfg.dataset!r}"
    return spec.check(cfg) if spec.check else None


def lookup(name: str) -> DatasetSpec:
    """The registered spec of ``name`` (static facts only); a ``module:function`` gets the plugin spec."""
    if ":" in name:
        from gptfl_ray.data.plugin import plugin_spec

        return plugin_spec(name)
    _load_modules()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"data.dataset: {dataset_error(name)}") from None


def get_spec(data: DataConfig | str, data_dir: str | Path | None = None) -> DatasetSpec:
    """The dataset's facts. Given a ``DataConfig``, datasets read from the user's data are loaded (once per
    process) and their modality, label names, image size and channels filled in; given a name, the static
    spec is returned."""
    if isinstance(data, str):
        return lookup(data)
    spec = lookup(data.dataset)
    if spec.configured is not None:  # facts set by the config alone (e.g. MELD's label column), no data read
        spec = spec.configured(data)
    if not spec.from_data:
        return spec
    from gptfl_ray.config import config_hash
    from gptfl_ray.data.registry import dataset_root, load_raw

    root = dataset_root(data, data_dir)
    key = config_hash(data, str(root))
    if key not in _RESOLVED:
        raw = load_raw(data, root)
        _RESOLVED[key] = spec_from_data(spec, raw.train if isinstance(raw, Splits) else raw)
    return _RESOLVED[key]


def spec_from_data(spec: DatasetSpec, ds: ArrayDataset) -> DatasetSpec:
    """``spec`` with modality, label names, image size and channels as ``ds`` has them."""
    facts: dict[str, Any] = {
        "modality": ds.modality,
        "label_names": tuple(ds.label_names),
        "num_classes": len(ds.label_names),
        "natural_groups": ds.groups is not None,
    }
    if ds.modality == "image":
        facts["image_size"] = int(ds.x.shape[1])
        facts["channels"] = 1 if ds.x.ndim == 3 else int(ds.x.shape[3])
    return replace(spec, **facts)
