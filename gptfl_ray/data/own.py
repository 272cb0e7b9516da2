"""Shared pieces of the user-data readers (imagefolder, audiofolder, hf, module:function): class-folder
scanning, image decoding to one uint8 array, label/group indexing and the checks every user dataset gets."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, Splits
from gptfl_ray.errors import InputError, InputNotFoundError

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def class_folders(root: Path, exts: tuple[str, ...], what: str) -> dict[str, list[tuple[Path, str]]]:
    """``{split: [(file, class name), ...]}`` for ``<root>/<class>/*`` (split "all") or
    ``<root>/train|test/<class>/*`` (splits "train" and "test"); files sorted, classes in name order."""
    if not root.is_dir():
        raise InputNotFoundError(f"{root}: {what} folder not found (data.root)")
    if (root / "train").is_dir() and (root / "test").is_dir():
        parts = {"train": root / "train", "test": root / "test"}
    else:
        parts = {"all": root}
    out: dict[str, list[tuple[Path, str]]] = {}
    for split, base in parts.items():
        classes = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise InputError(
                f"{base}: no class folders (expected <class>/*{exts[0]} or train|test/<class>/*{exts[0]})"
            )
        files = []
        for d in classes:
            found = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise InputError(f"{d}: empty class folder (no {'/'.join(exts)} files)")
            files += [(f, d.name) for f in found]
        out[split] = files
    if "test" in out:
        unknown = sorted({c for _, c in out["test"]} - {c for _, c in out["train"]})
        if unknown:
            raise InputError(f"{root / 'test'}: classes {unknown[:5]} have no folder in {root / 'train'}")
    return out


def index(
    values: Sequence[Any], names: list[Any] | None = None, where: str = ""
) -> tuple[np.ndarray, list[Any]]:
    """Integer ids of ``values`` in ``names`` (default: their sorted unique values) and the names."""
    names = sorted(set(values)) if names is None else names
    pos = {n: i for i, n in enumerate(names)}
    unknown = [v for v in values if v not in pos]
    if unknown:
        raise InputError(f"{where}: value {unknown[0]!r} is not among the training split's {names[:5]}")
    return np.array([pos[v] for v in values], dtype=np.int64), names


def open_image(item: Any, where: str) -> Any:
    """A PIL image from a path, PNG/JPEG bytes, a Hugging Face ``{bytes, path}`` dict or a pixel array."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(item, Image.Image):
            return item
        if isinstance(item, dict):
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes | bytearray):
            return Image.open(io.BytesIO(item))
        if isinstance(item, str | Path):
            return Image.open(item)
        return Image.fromarray(np.asarray(item, dtype=np.uint8))
    except (OSError, UnidentifiedImageError, TypeError, ValueError) as err:
        raise InputError(f"{where}: cannot read image ({err})") from None


def image_array(items: Sequence[Any], names: Sequence[str], image_size: int | None) -> np.ndarray:
    """uint8 (N, S, S) if every image is grayscale, else (N, S, S, 3). ``image_size``: resize the shorter side
    to it and centre-crop; None: all images must share one square size. ``names[i]`` names item i in errors."""
    from PIL import Image

    imgs = [open_image(it, str(n)) for it, n in zip(items, names, strict=True)]
    if not imgs:
        raise InputError(f"{names[0] if names else '<data>'}: no images")
    gray = all(im.mode in GRAY_MODES for im in imgs)
    if image_size is None:
        size = imgs[0].size
        for im, n in zip(imgs, names, strict=True):
            if im.size != size:
                raise InputError(
                    f"{n}: {im.size[0]}x{im.size[1]} but {names[0]} is {size[0]}x{size[1]}: images differ in "
                    "size (set data.image_size)"
                )
        if size[0] != size[1]:
            raise InputError(f"{names[0]}: images are {size[0]}x{size[1]}, not square (set data.image_size)")
        side = size[0]
    else:
        side = image_size
    out = np.empty((len(imgs), side, side) if gray else (len(imgs), side, side, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        try:
            im = im.convert("L" if gray else "RGB")
        except OSError as err:
            raise InputError(f"{names[i]}: cannot decode image ({err})") from None
        if im.size != (side, side):
            w, h = im.size
            scale = side / min(w, h)
            im = im.resize(
                (max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BILINEAR
            )
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = im.crop((left, top, left + side, top + side))
        out[i] = np.asarray(im, dtype=np.uint8)
    return out


def check_user_dataset(ds: ArrayDataset, where: str, cfg: DataConfig) -> ArrayDataset:
    """What ``module:function`` data must be: labels index ``label_names``; uint8 square images (resized to
    ``data.image_size`` if set), float32 clips at ``data.audio``'s rate and length, or a 1-D array of str."""
    if not isinstance(ds, ArrayDataset):
        raise InputError(f"{where}: expected an ArrayDataset, got {type(ds).__name__}")
    x, y = np.asarray(ds.x), np.asarray(ds.y)
    if len(x) != len(y) or len(y) == 0:
        raise InputError(f"{where}: {len(x)} samples but {len(y)} labels (need the same, at least 1)")
    if not ds.label_names or y.min() < 0 or y.max() >= len(ds.label_names):
        raise InputError(f"{where}: labels must index label_names (0..{len(ds.label_names) - 1})")
    if ds.groups is not None and len(ds.groups) != len(y):
        raise InputError(f"{where}: {len(ds.groups)} group ids for {len(y)} samples")
    ds.y = y.astype(np.int64)
    if ds.modality == "image":
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
            raise InputError(
                f"{where}: images must be uint8 (N, H, W) or (N, H, W, 3) (got {x.dtype} {x.shape})"
            )
        if x.ndim == 4 and x.shape[3] == 1:
            x = x[..., 0]
        if cfg.image_size is not None and x.shape[1:3] != (cfg.image_size, cfg.image_size):
            x = image_array(list(x), [f"{where}[{i}]" for i in range(len(x))], cfg.image_size)
        elif x.shape[1] != x.shape[2]:
            raise InputError(
                f"{where}: images are {x.shape[2]}x{x.shape[1]}, not square (set data.image_size)"
            )
        ds.x = x
    elif ds.modality == "audio":
        a = cfg.audio
        length = round(a.sample_rate * a.clip_seconds)
        if x.ndim != 2 or ds.sample_rate != a.sample_rate or x.shape[1] != length:
            raise InputError(
                f"{where}: audio must be float32 (N, {length}) at data.audio.sample_rate {a.sample_rate} "
                f"(got {x.shape} at {ds.sample_rate})"
            )
        ds.x = x.astype(np.float32, copy=False)
    elif ds.modality == "text":
        if x.ndim != 1 or not all(isinstance(t, str) for t in x):
            raise InputError(f"{where}: texts must be a 1-D array of str (got {x.dtype} {x.shape})")
        ds.x = x.astype(object, copy=False)
        ds.text = cfg.text  # the tokenizer settings travel with the data (features.to_tensors)
    else:
        raise InputError(f"{where}: modality must be 'image', 'audio' or 'text' (got {ds.modality!r})")
    return ds


def splits_or_pool(parts: dict[str, ArrayDataset]) -> Splits | ArrayDataset:
    return Splits(train=parts["train"], test=parts["test"]) if "test" in parts else parts["all"]
