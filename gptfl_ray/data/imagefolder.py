"""``data.dataset: imagefolder``: the user's images, ``<root>/<class>/*.png|jpg`` (a test set is held out) or
``<root>/train/<class>/*`` + ``<root>/test/<class>/*`` (the official split). Label names are the folder names;
channels are 1 if every image is grayscale, else 3; images keep their (shared, square) size unless
``data.image_size`` is set."""

from __future__ import annotations

from pathlib import Path

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.data.own import class_folders, image_array, index, splits_or_pool
from gptfl_ray.errors import InputError

EXTS = (".png", ".jpg", ".jpeg")


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    scanned = class_folders(root, EXTS, "image")
    first = "train" if "train" in scanned else "all"
    names = sorted({c for _, c in scanned[first]})
    parts = {}
    for split, files in scanned.items():
        y, _ = index([c for _, c in files], names, str(root / split))
        x = image_array([f for f, _ in files], [str(f) for f, _ in files], cfg.image_size)
        parts[split] = ArrayDataset(x=x, y=y, label_names=names, modality="image")
    if "test" in parts and parts["test"].x.shape[1:] != parts["train"].x.shape[1:]:
        raise InputError(
            f"{root / 'test'}: images are {parts['test'].x.shape[1:]} but {root / 'train'} has "
            f"{parts['train'].x.shape[1:]} (set data.image_size)"
        )
    return splits_or_pool(parts)


def check(cfg: DataConfig) -> str | None:
    return None if cfg.root else "data.root: the image folder is required with data.dataset 'imagefolder'"


SPEC = register(
    DatasetSpec(
        name="imagefolder",
        modality="image",
        num_classes=0,
        label_names=(),  # the class folder names
        channels=0,  # as the images have them
        test_split="official when <root>/train and <root>/test exist, else held out",
        loader=load,
        from_data=True,
        options=("image_size",),
        check=check,
    )
)
