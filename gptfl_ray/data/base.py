"""Dataset containers and per-dataset facts (modality, shape, label names, label text)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gptfl_ray.errors import ConfigError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class ArrayDataset:
    """Raw samples in memory.

    ``x`` is uint8 images (N, H, W) or (N, H, W, C), or float32 waveforms (N, T) at ``sample_rate``.
    ``groups`` holds natural client ids (e.g. speaker index) where the dataset has them.
    """

    x: np.ndarray
    y: np.ndarray
    label_names: list[str]
    modality: str
    sample_rate: int | None = None
    groups: np.ndarray | None = None
    group_names: list[str] | None = None

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
        )

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=len(self.label_names))


@dataclass
class Splits:
    train: ArrayDataset  # the federated pool (partitioned over clients)
    test: ArrayDataset  # held-out evaluation set


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    modality: str  # "image" | "audio"
    num_classes: int
    label_names: tuple[str, ...]
    image_size: int | None = None  # side of the square image models see
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    label_text: dict[str, str] = field(default_factory=dict)
    download_hint: str = ""


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        modality="image",
        num_classes=10,
        label_names=tuple(str(i) for i in range(10)),
        image_size=28,
        channels=1,
        mean=(0.1307,),
        std=(0.3081,),
        label_text={str(i): w for i, w in enumerate(DIGIT_WORDS)},
        download_hint="official files at https://ossci-datasets.s3.amazonaws.com/mnist/ (where a network exists)",
    ),
    "fsdd": DatasetSpec(
        name="fsdd",
        modality="audio",
        num_classes=10,
        label_names=tuple(str(i) for i in range(10)),
        label_text={str(i): w for i, w in enumerate(DIGIT_WORDS)},
        download_hint="git clone https://github.com/Jakobovski/free-spoken-digit-dataset (where a network exists)",
    ),
    "speech_commands": DatasetSpec(
        name="speech_commands",
        modality="audio",
        num_classes=35,
        label_names=(),  # read from the folder layout
        download_hint="torchvision-style download: http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz",
    ),
    "esc50": DatasetSpec(
        name="esc50",
        modality="audio",
        num_classes=50,
        label_names=(),  # read from meta/esc50.csv
        download_hint="https://github.com/karolpiczak/ESC-50 (where a network exists)",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        modality="image",
        num_classes=10,
        label_names=CIFAR10_NAMES,
        image_size=32,
        channels=3,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        download_hint="torchvision.datasets.CIFAR10(root, download=True) where a network exists",
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        modality="image",
        num_classes=100,
        label_names=(),  # read from the dataset's meta file
        image_size=32,
        channels=3,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        download_hint="torchvision.datasets.CIFAR100(root, download=True) where a network exists",
    ),
    "flowers102": DatasetSpec(
        name="flowers102",
        modality="image",
        num_classes=102,
        label_names=tuple(f"flower {i}" for i in range(102)),
        image_size=224,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        download_hint="torchvision.datasets.Flowers102(root, download=True) where a network exists",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ConfigError(f"data.dataset: unknown dataset {name!r} (known: {', '.join(SPECS)})") from None
