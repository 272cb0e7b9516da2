"""``data.dataset: module:function``: the user's code returns the data: an ``ArrayDataset`` (a test set is held
out) or ``Splits`` (gptfl_ray/data/base.py). The function is called with the ``DataConfig`` if it takes an
argument, else with none. As with ``module:callable`` models, a module from outside this package is pickled by
value and the resolved function travels to the Ray workers that validate the run's config
(``plugin_datasets`` -> ``install_datasets``), so it need not be importable there."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gptfl_ray.config import DataConfig
from gptfl_ray.data.base import ArrayDataset, DatasetSpec, Splits
from gptfl_ray.data.own import check_user_dataset
from gptfl_ray.errors import ConfigError, InputError
from gptfl_ray.ray_env import ship_by_value

NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# Resolved `module:function` datasets of this process (the driver's imports, or what a worker was sent).
_PLUGINS: dict[str, Callable[..., Any]] = {}


def _resolve(name: str) -> Callable[..., Any] | str:
    """The function, or why it cannot be had."""
    if name in _PLUGINS:
        return _PLUGINS[name]
    if not NAME.match(name):
        return f"{name!r} is not module:function"
    mod_name, fn_name = name.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        return f"cannot import {mod_name!r} for {name!r} ({err}; is it on PYTHONPATH?)"
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        return f"module {mod_name!r} has no function {fn_name!r}"
    ship_by_value(mod_name)
    _PLUGINS[name] = fn
    return fn


def plugin_datasets(names: Iterable[str]) -> dict[str, Callable[..., Any]]:
    """The resolved functions of the ``module:function`` names among ``names``, to send to Ray workers."""
    resolved = {n: _resolve(n) for n in names if ":" in n}
    return {n: fn for n, fn in resolved.items() if not isinstance(fn, str)}


def install_datasets(datasets: dict[str, Callable[..., Any]] | None) -> None:
    """On a worker: make ``data.dataset`` names resolve to the functions the driver resolved."""
    _PLUGINS.update(datasets or {})


def plugin_error(name: str) -> str | None:
    fn = _resolve(name)
    return fn if isinstance(fn, str) else None


def load(cfg: DataConfig, root: Path) -> Splits | ArrayDataset:
    fn = _resolve(cfg.dataset)
    if isinstance(fn, str):
        raise ConfigError(f"data.dataset: {fn}")
    out = fn(cfg) if inspect.signature(fn).parameters else fn()
    if isinstance(out, Splits):
        train = check_user_dataset(out.train, f"{cfg.dataset} train", cfg)
        test = check_user_dataset(out.test, f"{cfg.dataset} test", cfg)
        if test.modality != train.modality or test.label_names != train.label_names:
            raise InputError(f"{cfg.dataset}: train and test differ in modality or label_names")
        return Splits(train=train, test=test)
    if isinstance(out, ArrayDataset):
        return check_user_dataset(out, cfg.dataset, cfg)
    raise InputError(f"{cfg.dataset}: returned {type(out).__name__}, expected an ArrayDataset or Splits")


def plugin_spec(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        modality="",  # what the function returns
        num_classes=0,
        label_names=(),
        channels=0,
        test_split="official when the function returns Splits, else held out",
        loader=load,
        from_data=True,
        options=("image_size",),
    )
