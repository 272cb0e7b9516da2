"""Readers for torchvision datasets (CIFAR-10/100, Flowers102), when their files are present (never downloaded
here). Each dataset's facts live in its own module (cifar10.py, cifar100.py, flowers102.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptfl_ray.data.base import ArrayDataset, Splits, get_spec
from gptfl_ray.paths import DataNotFoundError


def _missing(name: str, root: Path, err: Exception) -> DataNotFoundError:
    return DataNotFoundError(f"{name} missing under {root}/ ({get_spec(name).download_hint}): {err}")


def load_cifar(name: str, root: Path) -> Splits:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        parts = [cls(str(root), train=t, download=False) for t in (True, False)]
    except RuntimeError as err:
        raise _missing(name, root, err) from None
    names = list(parts[0].classes)
    train, test = (
        ArrayDataset(x=p.data, y=np.asarray(p.targets, dtype=np.int64), label_names=names, modality="image")
        for p in parts
    )
    return Splits(train=train, test=test)


def load_flowers102(root: Path, image_size: int = 224) -> Splits:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])
    try:
        parts = {
            s: datasets.Flowers102(str(root), split=s, transform=tf, download=False)
            for s in ("train", "val", "test")
        }
    except RuntimeError as err:
        raise _missing("flowers102", root, err) from None

    def to_arrays(ds) -> ArrayDataset:
        xs = np.stack([np.asarray(ds[i][0].convert("RGB")) for i in range(len(ds))])
        ys = np.asarray(ds._labels, dtype=np.int64)
        return ArrayDataset(x=xs, y=ys, label_names=[f"flower {i}" for i in range(102)], modality="image")

    train = to_arrays(parts["train"])
    val = to_arrays(parts["val"])
    merged = ArrayDataset(
        np.concatenate([train.x, val.x]), np.concatenate([train.y, val.y]), train.label_names, "image"
    )
    return Splits(train=merged, test=to_arrays(parts["test"]))
