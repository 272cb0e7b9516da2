"""MNIST from its original IDX gzip files, md5-verified.

The IDX reader is written here (a dozen lines) because torchvision's ``MNIST`` insists on its own folder
layout with both the train and the test files, and only the test set ships with this project's data.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import DIGIT_WORDS, ArrayDataset, DatasetSpec, Splits, register
from gptfl_ray.errors import InputError
from gptfl_ray.paths import DataNotFoundError

FILES = {
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
}
# md5s of the official .gz files (identical to torchvision's MNIST.resources).
MD5 = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
}


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (big-endian header: 0, 0, dtype code, ndim; then dims; then data)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{path}: truncated IDX file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(tuple(dims))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def load_mnist(root: Path, split: str = "test", verify: bool = True) -> ArrayDataset:
    img_name, lbl_name = FILES[split]
    paths = [root / img_name, root / lbl_name]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"MNIST {split} set missing: put {', '.join(p.name for p in missing)} in {root}/ "
            f"({SPEC.download_hint})"
        )
    if verify:
        for p in paths:
            if md5(p) != MD5[p.name]:
                raise InputError(
                    f"{p}: md5 mismatch (expected {MD5[p.name]}; corrupted or not the official file)"
                )
    x, y = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if len(x) != len(y):
        raise InputError(f"{root}: {len(x)} images but {len(y)} labels")
    return ArrayDataset(x=x, y=y, label_names=list(SPEC.label_names), modality="image")


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    """The official train/test split when the train files are there, else the test set alone (held out)."""
    if (root / FILES["train"][0]).is_file() and cfg.test_split == "official":
        return Splits(train=load_mnist(root, "train"), test=load_mnist(root, "test"))
    return load_mnist(root, "test")


SPEC = register(
    DatasetSpec(
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
        hflip=False,  # digits do not survive a flip
        test_split="official 10k test set when the 60k train files are present, else held out",
        loader=load,
    )
)
