"""Step 3: pretrain the downstream model on synthetic data with Ray Train.

Recipe (readable end to end, torchtune-style): synthetic Parquet shards -> Ray Data (decode + the same features
real data gets) -> ``TorchTrainer`` workers iterate ``iter_torch_batches`` -> SGD/AdamW with a cosine schedule and
augmentation -> a checkpoint per epoch through ``ray.train.report`` (a rerun with the same folder resumes from the
latest) -> ``weights.safetensors`` + ``metrics.json``.

Defaults follow GPT-FL's advice for synthetic data: a larger weight decay and a smaller learning rate than the
usual real-data recipe (synthetic samples are cleaner and less diverse, so the model overfits them easily).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptfl_ray.config import RunConfig, config_hash
from gptfl_ray.data.base import get_spec
from gptfl_ray.io import atomic_write_json, read_json, save_weights
from gptfl_ray.models import build_model
from gptfl_ray.training import evaluate, make_optimizer

log = logging.getLogger(__name__)

# Image datasets whose classes survive a horizontal flip (digits and glyphs do not).
FLIP_OK = {"cifar10", "cifar100", "flowers102"}


# ------------------------------------------------------------------------------------------ augmentation
class Augment(nn.Module):
    """Batch augmentation on model inputs, per sample.

    Images: random resized crop (scale 0.8-1) and, where the task allows, horizontal flip.
    Audio (log-mel): random time shift, additive noise and SpecAugment frequency/time masks.
    """

    def __init__(self, modality: str, flip: bool):
        super().__init__()
        self.modality = modality
        if modality == "image":
            from torchvision.transforms import v2

            self.crop = v2.RandomResizedCrop(size=1, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)
            self.flip = v2.RandomHorizontalFlip() if flip else nn.Identity()
        else:
            import torchaudio.transforms as AT

            self.freq_mask = AT.FrequencyMasking(freq_mask_param=6, iid_masks=True)
            self.time_mask = AT.TimeMasking(time_mask_param=12, iid_masks=True)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "image":
            self.crop.size = list(x.shape[-2:])
            return torch.stack([self.flip(self.crop(s)) for s in x])
        shifts = torch.randint(-8, 9, (x.shape[0],)).tolist()
        x = torch.stack([torch.roll(s, sh, dims=-1) for s, sh in zip(x, shifts, strict=True)])
        x = x + 0.1 * torch.rand(x.shape[0], 1, 1, 1) * torch.randn_like(x)
        return self.time_mask(self.freq_mask(x))


# ------------------------------------------------------------------------------------------ worker loop
def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: train, validate and checkpoint every epoch; resume from the latest checkpoint."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.set_flush_denormal(True)
    torch.manual_seed(config["seed"] + ray.train.get_context().get_world_rank())
    cfg = RunConfig.model_validate(config["run_cfg"])
    pcfg = cfg.pretrain
    model = build_model(
        cfg.model.name, config["num_classes"], tuple(config["input_shape"]), width=cfg.model.width
    )
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model.parameters(), pcfg.optimizer)
    steps_per_epoch = max(1, math.ceil(config["num_train"] / (pcfg.batch_size * config["world_size"])))
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=pcfg.epochs * steps_per_epoch)
        if pcfg.scheduler == "cosine"
        else None
    )
    start_epoch = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1

    augment = Augment(config["modality"], config["flip"]) if pcfg.augment else nn.Identity()
    loss_fn = nn.CrossEntropyLoss()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["has_val"] else None
    device = ray.train.torch.get_device()
    for epoch in range(start_epoch, pcfg.epochs):
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for batch in train_shard.iter_torch_batches(
            batch_size=pcfg.batch_size,
            local_shuffle_buffer_size=config["shuffle_buffer"],
            local_shuffle_seed=config["seed"] * 1000 + epoch,
            dtypes={"x": torch.float32, "y": torch.int64},
            device=device,
        ):
            x, y = augment(batch["x"]), batch["y"]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        train_time = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_samples": seen,
            "train_time_s": train_time,
            "samples_per_s": seen / max(train_time, 1e-9),
            "lr": opt.param_groups[0]["lr"],
            "start_epoch": start_epoch,
        }
        if val_shard is not None:
            correct, total, vloss = _validate(model, val_shard, device)
            correct, total, vloss = _all_reduce([correct, total, vloss])
            metrics["val_accuracy"] = correct / max(total, 1)
            metrics["val_loss"] = vloss / max(total, 1)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if ray.train.get_context().get_world_rank() == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                }
                torch.save(state, Path(d) / "state.pt")
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _validate(model: nn.Module, shard, device) -> tuple[float, float, float]:
    model.eval()
    correct = total = loss = 0.0
    for batch in shard.iter_torch_batches(
        batch_size=512, dtypes={"x": torch.float32, "y": torch.int64}, device=device
    ):
        out = model(batch["x"])
        loss += float(nn.functional.cross_entropy(out, batch["y"], reduction="sum"))
        correct += float((out.argmax(1) == batch["y"]).sum())
        total += len(batch["y"])
    return correct, total, loss


def _all_reduce(values: list[float]) -> list[float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------ driver
@contextmanager
def quiet_data_progress() -> Iterator[None]:
    """Datasets created inside run without Ray Data progress bars (each Dataset keeps its creation context)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def pretrain_key(cfg: RunConfig, synthetic_hash: str, seed: int) -> str:
    """Config hash identifying a pretraining output (synthetic data + model + recipe + seed)."""
    return config_hash(synthetic_hash, cfg.model, cfg.pretrain, cfg.data.audio, seed)


def fit(
    cfg: RunConfig,
    datasets: dict[str, Any],
    num_classes: int,
    shape: tuple[int, ...],
    out_dir: Path,
    *,
    seed: int,
) -> tuple[dict[str, torch.Tensor], Any, float]:
    """Run the TorchTrainer on Ray Datasets with columns x/y; return (final state dict, Result, wall seconds)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    pcfg = cfg.pretrain
    num_train = datasets["train"].count()
    loop_config = {
        "run_cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "num_train": num_train,
        "world_size": pcfg.num_workers,
        "cpus_per_worker": pcfg.cpus_per_worker,
        "modality": get_spec(cfg.data.dataset).modality,
        "flip": cfg.data.dataset in FLIP_OK,
        "shuffle_buffer": min(num_train, 10_000),
        "has_val": "val" in datasets,
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=pcfg.num_workers,
            use_gpu=pcfg.use_gpu,
            resources_per_worker={"CPU": pcfg.cpus_per_worker, **({"GPU": 1} if pcfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="ray_train",
            storage_path=str(Path(out_dir).resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining in {out_dir} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=False)["model"]
    return state, result, wall


def pretrain(
    cfg: RunConfig,
    synthetic_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train on ``synthetic_dir`` with Ray Train; write ``out_dir/weights.safetensors`` and ``metrics.json``.

    Reruns with the same ``out_dir`` resume from the latest epoch checkpoint; a finished run is returned from disk.
    ``test`` (real test tensors) adds the synthetic-only centralized accuracy, the paper's "synthetic only" number.
    """
    from gptfl_ray.data.features import input_shape
    from gptfl_ray.data.registry import label_names as dataset_label_names
    from gptfl_ray.data.synthetic import read_manifest, synthetic_ray_dataset

    out_dir = Path(out_dir).resolve()
    done = out_dir / "metrics.json"
    if done.is_file() and (out_dir / "weights.safetensors").is_file():
        log.info("pretraining already finished in %s", out_dir)
        return read_json(done)
    manifest = read_manifest(synthetic_dir)
    shape = input_shape(cfg.data.dataset, cfg.data.audio)
    num_classes = len(dataset_label_names(cfg.data, cfg.data_dir))  # the reader maps labels to these classes

    with quiet_data_progress():  # one line per epoch from the workers, not a progress bar per shard iterator
        ds = synthetic_ray_dataset(synthetic_dir, cfg.data).materialize()
        datasets = {"train": ds}
        if cfg.pretrain.val_fraction > 0:
            train_ds, val_ds = ds.train_test_split(
                test_size=cfg.pretrain.val_fraction, shuffle=True, seed=seed
            )
            datasets = {"train": train_ds.materialize(), "val": val_ds.materialize()}
    state, result, wall = fit(cfg, datasets, num_classes, shape, out_dir, seed=seed)
    num_train = datasets["train"].count()
    history = (
        result.metrics_dataframe.to_dict(orient="records") if result.metrics_dataframe is not None else []
    )
    metrics: dict[str, Any] = {
        "epochs": cfg.pretrain.epochs,
        "num_train": num_train,
        "num_synthetic": manifest["num_rows"],
        "wall_time_s": wall,
        "final_val_accuracy": result.metrics.get("val_accuracy"),
        "resumed_from_epoch": result.metrics.get("start_epoch"),
        "history": [{k: v for k, v in h.items() if not str(k).startswith("config")} for h in history],
        "key": pretrain_key(cfg, manifest.get("config_hash", ""), seed),
    }
    if test is not None:
        model = build_model(cfg.model.name, num_classes, shape, width=cfg.model.width)
        model.load_state_dict(state)
        ev = evaluate(model, test[0], test[1], batch_size=512)
        metrics["real_test_accuracy"] = ev["accuracy"]
        metrics["real_test_loss"] = ev["loss"]
        metrics["real_test_per_class_accuracy"] = ev["per_class_accuracy"]
    save_weights(out_dir / "weights.safetensors", state, metadata={"model": cfg.model.name})
    atomic_write_json(done, metrics)
    log.info(
        "pretraining done in %.1fs: val acc %s, real test acc %s",
        wall,
        metrics["final_val_accuracy"],
        metrics.get("real_test_accuracy"),
    )
    return metrics


def real_test_tensors(cfg: RunConfig, required: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The real test set as model tensors; None when the dataset is missing, unless ``required``."""
    from gptfl_ray.data import load_dataset
    from gptfl_ray.data.features import to_tensors
    from gptfl_ray.paths import DataNotFoundError

    try:
        splits = load_dataset(cfg.data, cfg.data_dir)
    except DataNotFoundError as err:
        if required:
            raise
        log.warning("no real test set for the synthetic-only accuracy: %s", err)
        return None
    return to_tensors(splits.test, cfg.data.dataset, cfg.data.audio)


def pretrain_command(args) -> int:
    from gptfl_ray.ray_env import ray_for

    cfg: RunConfig = args.cfg
    synthetic = Path(args.synthetic)
    seed = cfg.seeds[0]
    out = Path(args.output) if args.output else cfg.output_dir / f"pretrain-{pretrain_key(cfg, '', seed)}"
    with ray_for(cfg.ray_address, announce=True):
        metrics = pretrain(cfg, synthetic, out, seed=seed, test=real_test_tensors(cfg))
    print(f"weights: {out / 'weights.safetensors'}")
    print(
        f"synthetic val accuracy {metrics['final_val_accuracy']:.4f}"
        + (
            f", real test accuracy {metrics['real_test_accuracy']:.4f}"
            if "real_test_accuracy" in metrics
            else ""
        )
    )
    return 0


__all__ = ["Augment", "fit", "pretrain", "pretrain_command", "pretrain_key", "real_test_tensors"]
