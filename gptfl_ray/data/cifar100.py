"""CIFAR-100 (torchvision's files under the dataset root): 50k train / official 10k test, 32x32 RGB."""

from __future__ import annotations

from pathlib import Path

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import DatasetSpec, Splits, register


def load(cfg: DataConfig, root: Path) -> Splits:
    from gptfl_ray.data.vision import load_cifar

    return load_cifar("cifar100", root)


SPEC = register(
    DatasetSpec(
        name="cifar100",
        modality="image",
        num_classes=100,
        label_names=(),  # read from the dataset's meta file
        image_size=32,
        channels=3,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        download_hint="torchvision.datasets.CIFAR100(root, download=True) where a network exists",
        hflip=True,
        test_split="official 10k test batch",
        loader=load,
    )
)
