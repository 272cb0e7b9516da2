"""Oxford Flowers-102 (torchvision's files under the dataset root): train+val pooled, official test split;
resized and centre-cropped to 224x224 RGB (the paper's resolution), or to ``data.image_size``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import DatasetSpec, Splits, register


def load(cfg: DataConfig, root: Path) -> Splits:
    from gptfl_ray.data.vision import load_flowers102

    return load_flowers102(root, configured(cfg).image_size, list(SPEC.label_names))


def configured(cfg: DataConfig) -> DatasetSpec:
    return replace(SPEC, image_size=cfg.image_size) if cfg.image_size else SPEC


SPEC = register(
    DatasetSpec(
        name="flowers102",
        modality="image",
        num_classes=102,
        label_names=tuple(f"flower {i}" for i in range(102)),
        image_size=224,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        download_hint="torchvision.datasets.Flowers102(root, download=True) where a network exists",
        hflip=True,
        test_split="official test split (train and val pooled for training)",
        loader=load,
        options=("image_size",),
        configured=configured,
    )
)
