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


def load_flowers102(root: Path, image_size: int, label_names: list[str]) -> Splits:
    """Flowers102 in torchvision's layout (``root/flowers-102/``: ``jpg/image_NNNNN.jpg``, ``imagelabels.mat``,
    ``setid.mat``), train and val pooled, official test split; each image resized (shorter side) and
    centre-cropped to ``image_size``. Read here rather than by torchvision's class, which refuses any copy whose
    .mat files differ in md5 from the ones it downloads (a re-saved mirror, a test's tiny layout)."""
    from PIL import Image, UnidentifiedImageError
    from scipy.io import loadmat
    from torchvision import transforms

    base = Path(root) / "flowers-102"
    try:
        labels = np.asarray(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"], np.int64) - 1
        ids = loadmat(base / "setid.mat", squeeze_me=True)
        train_ids, val_ids, test_ids = (
            np.atleast_1d(ids[k]).astype(np.int64) for k in ("trnid", "valid", "tstid")
        )
    except (OSError, KeyError, ValueError) as err:
        raise _missing("flowers102", root, err) from None
    tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])

    def part(image_ids: np.ndarray) -> ArrayDataset:
        xs = []
        for i in image_ids:
            path = base / "jpg" / f"image_{i:05d}.jpg"
            try:
                with Image.open(path) as im:
                    xs.append(np.asarray(tf(im.convert("RGB"))))
            except (OSError, UnidentifiedImageError) as err:
                raise _missing("flowers102", root, err) from None
        x = np.stack(xs) if xs else np.zeros((0, image_size, image_size, 3), np.uint8)
        return ArrayDataset(x=x, y=labels[image_ids - 1], label_names=label_names, modality="image")

    return Splits(train=part(np.concatenate([train_ids, val_ids])), test=part(test_ids))
