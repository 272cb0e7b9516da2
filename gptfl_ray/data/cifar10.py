"""CIFAR-10 (torchvision's files under the dataset root): 50k train / official 10k test, 32x32 RGB."""

from __future__ import annotations

from pathlib import Path

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import DatasetSpec, Splits, register

NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load(cfg: DataConfig, root: Path) -> Splits:
    from gptfl_ray.data.vision import load_cifar

    return load_cifar("cifar10", root)


SPEC = register(
    DatasetSpec(
        name="cifar10",
        modality="image",
        num_classes=10,
        label_names=NAMES,
        image_size=32,
        channels=3,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        download_hint="torchvision.datasets.CIFAR10(root, download=True) where a network exists",
        hflip=True,
        test_split="official 10k test batch",
        loader=load,
    )
)
