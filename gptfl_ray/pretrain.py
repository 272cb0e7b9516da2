"""Step 3: pretrain the downstream model on synthetic data with Ray Train.

Recipe (readable end to end, torchtune-style): synthetic Parquet shards -> Ray Data (decode + the same features
real data gets) -> ``TorchTrainer`` workers iterate the data in fixed chunks and shuffle it by a seeded hash of each
sample's stable id -> SGD/AdamW with a cosine schedule and augmentation -> a checkpoint per epoch through
``ray.train.report`` (a rerun with the same folder resumes from the latest) -> ``weights.safetensors`` +
``metrics.json`` (every epoch's metrics).

Defaults follow GPT-FL's advice for synthetic data: a larger weight decay and a smaller learning rate than the
usual real-data recipe (synthetic samples are cleaner and less diverse, so the model overfits them easily).

Reproducibility. The output is a function of (synthetic set, config, seed), never of how Ray schedules blocks:

- the train/val split ranks the stable row ids by a seeded hash (``split_rows``);
- every epoch orders the rows by a hash of (row id, seed, epoch) inside a shuffle buffer of ``SHUFFLE_BUFFER`` rows
  fed fixed-size chunks in shard order (``preserve_order``): below ``1.5 × SHUFFLE_BUFFER`` rows the epoch is one
  exact seeded permutation whatever order the rows arrive in, above it a buffered shuffle of a fixed stream
  (``shuffled_batches``);
- augmentation and dropout draw from the global torch RNG, re-seeded from (seed, epoch, rank) every epoch, so an
  interrupted run resumed from its last checkpoint equals an uninterrupted one (weights and per-epoch metrics).

Guarantee: one worker on CPU gives bit-identical weights and metrics (wall times excepted) for the same synthetic
set, config, seed and library versions. With ``num_workers = N > 1`` every worker reads the whole (materialized)
train set, all compute the same shuffled stream, and worker ``r`` trains on its slice of each global batch of
``N × batch_size`` rows: the result is identical across runs with the same N (gloo's all-reduce sums in a fixed
order), but differs from another N (other batches, other reduction order). On GPU, cuDNN runs in deterministic
mode, but bit-identity also depends on the GPU model and the kernels' own determinism.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gptfl_ray.config import RunConfig, config_hash
from gptfl_ray.data.base import get_spec
from gptfl_ray.data.plugin import install_datasets, plugin_datasets
from gptfl_ray.errors import InputError
from gptfl_ray.io import atomic_write_json, read_json, save_weights
from gptfl_ray.models import build_model
from gptfl_ray.models.registry import install_models, plugin_models
from gptfl_ray.models.weights import load_model_weights, weights_identity
from gptfl_ray.training import evaluate, make_optimizer

log = logging.getLogger(__name__)

# Rows per chunk pulled from Ray Data: fixed, so the shuffle never sees the (machine-dependent) block boundaries.
CHUNK_ROWS = 1024
# Rows the shuffle buffer keeps; an epoch of fewer than 1.5x this many rows is one exact seeded permutation.
SHUFFLE_BUFFER = 10_000
STATE_FILE, HISTORY_FILE = "state.pt", "history.json"
DATASET = "synthetic"  # the one dataset Train hands every worker (train and val rows, told apart by ``row``)
_SPLIT, _ORDER, _AUGMENT = 1, 2, 3  # salts: the val split, the epoch order, the augmentation RNG


# ------------------------------------------------------------------------------------------ augmentation
class Augment(nn.Module):
    """Batch augmentation on model inputs, per sample.

    Images: random resized crop (scale 0.8-1) and, where the task allows, horizontal flip.
    Audio (log-mel): random time shift, additive noise and SpecAugment frequency/time masks.
    Text (token ids): word dropout, each token replaced by padding (-1) with probability 0.1.
    """

    def __init__(self, modality: str, flip: bool):
        super().__init__()
        self.modality = modality
        if modality == "image":
            from torchvision.transforms import v2

            self.crop = v2.RandomResizedCrop(size=1, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True)
            self.flip = v2.RandomHorizontalFlip() if flip else nn.Identity()
        elif modality != "text":
            import torchaudio.transforms as AT

            self.freq_mask = AT.FrequencyMasking(freq_mask_param=6, iid_masks=True)
            self.time_mask = AT.TimeMasking(time_mask_param=12, iid_masks=True)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modality == "image":
            self.crop.size = list(x.shape[-2:])
            return torch.stack([self.flip(self.crop(s)) for s in x])
        if self.modality == "text":
            return x.masked_fill(torch.rand(x.shape, device=x.device) < 0.1, -1)
        shifts = torch.randint(-8, 9, (x.shape[0],)).tolist()
        x = torch.stack([torch.roll(s, sh, dims=-1) for s, sh in zip(x, shifts, strict=True)])
        x = x + 0.1 * torch.rand(x.shape[0], 1, 1, 1) * torch.randn_like(x)
        return self.time_mask(self.freq_mask(x))


# ------------------------------------------------------------------------------------------ data order
def seed_of(*parts: int) -> int:
    """A 64-bit seed derived from integers (numpy's SeedSequence: the same on every platform)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


def row_keys(rows: np.ndarray, *salt: int) -> np.ndarray:
    """A seeded 64-bit hash of each stable row id (splitmix64's bijective finaliser: distinct ids, distinct keys)."""
    z = np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(seed_of(*salt))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_rows(rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), both sorted: the ``round(fraction × n)`` ids with the smallest seeded hash are val."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    n_val = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if fraction > 0 and len(rows) > 1 else 0
    by_key = rows[np.argsort(row_keys(rows, seed, _SPLIT), kind="stable")]
    return np.sort(by_key[n_val:]), np.sort(by_key[:n_val])


def steps_per_epoch(num_train: int, batch_size: int, world_size: int) -> int:
    """Optimizer steps per epoch: global batches of ``batch_size × world_size`` rows; a last one too small to
    give every worker a row is dropped."""
    full, rest = divmod(num_train, batch_size * world_size)
    return full + (1 if rest >= world_size else 0)


def shuffled_batches(
    chunks: Iterable[dict[str, np.ndarray]],
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    buffer_rows: int = SHUFFLE_BUFFER,
) -> Iterator[dict[str, np.ndarray]]:
    """This worker's batches of one epoch, from chunks of columns that include ``row`` (the stable id).

    Rows wait in a buffer; whenever it holds ``1.5 × buffer_rows`` rows it is sorted by ``row_keys(row, seed,
    epoch)`` and everything but the ``buffer_rows`` largest keys goes out in global batches of ``batch_size ×
    world_size``, of which worker ``rank`` takes its contiguous slice. Deterministic for a deterministic chunk
    stream; an epoch that fits the buffer is a seeded permutation independent of the stream's order.
    """
    global_batch = batch_size * world_size
    pending: list[dict[str, np.ndarray]] = []
    held = 0

    def sort(final: bool) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pending, held
        table = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
        order = np.argsort(row_keys(table["row"], seed, epoch, _ORDER), kind="stable")
        out = len(order) if final else (len(order) - buffer_rows) // global_batch * global_batch
        head = {k: v[order[:out]] for k, v in table.items()}
        pending = [] if final else [{k: v[order[out:]] for k, v in table.items()}]
        held = len(order) - out
        for start in range(0, out, global_batch):
            m = min(global_batch, out - start)
            if m < world_size:  # too small to give every worker a row (DDP needs a step on every worker)
                break
            lo, hi = start + rank * m // world_size, start + (rank + 1) * m // world_size
            yield {k: v[lo:hi] for k, v in head.items()}

    for chunk in chunks:
        if len(chunk["row"]) == 0:
            continue
        pending.append(chunk)
        held += len(chunk["row"])
        if held >= buffer_rows * 3 // 2 and held - buffer_rows >= global_batch:
            yield from sort(final=False)
    if held:
        yield from sort(final=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (tensors and plain containers only: ``weights_only=True``)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{path}: refusing a checkpoint that holds arbitrary Python objects ({first})"
        ) from None


# ------------------------------------------------------------------------------------------ worker loop
def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker: train, validate and checkpoint every epoch; resume from the latest checkpoint."""
    import ray.train
    import ray.train.torch

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    seed = config["seed"]
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.set_flush_denormal(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(seed)  # the same init on every worker (DDP also broadcasts rank 0's)
    install_datasets(config.get("datasets"))  # `module:function` datasets, resolved on the driver
    cfg = RunConfig.model_validate(config["run_cfg"])
    pcfg = cfg.pretrain
    install_models(config.get("models"))  # `module:callable` models, resolved on the driver
    model = build_model(
        cfg.model.name, config["num_classes"], tuple(config["input_shape"]), width=cfg.model.width
    )
    if config.get("init_weights"):  # model.weights (a head of another shape stays fresh, seeded alike)
        load_model_weights(model, config["init_weights"])
    model = ray.train.torch.prepare_model(model)
    opt = make_optimizer(model.parameters(), pcfg.optimizer)
    steps = steps_per_epoch(config["num_train"], pcfg.batch_size, world)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=pcfg.epochs * max(1, steps))
        if pcfg.scheduler == "cosine"
        else None
    )
    start_epoch, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_state(Path(d) / STATE_FILE)
            history = read_json(Path(d) / HISTORY_FILE)
        _unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1

    augment = Augment(config["modality"], config["flip"]) if pcfg.augment else nn.Identity()
    loss_fn = nn.CrossEntropyLoss()
    shard = ray.train.get_dataset_shard(DATASET)
    val_rows = np.asarray(config["val_rows"], dtype=np.int64)
    device = ray.train.torch.get_device()
    for epoch in range(start_epoch, pcfg.epochs):
        torch.manual_seed(seed_of(seed, epoch, rank, _AUGMENT))  # augmentation: a function of the epoch alone
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        chunks = _rows_of(shard, CHUNK_ROWS, val_rows, val=False)
        for batch in shuffled_batches(
            chunks, seed=seed, epoch=epoch, batch_size=pcfg.batch_size, world_size=world, rank=rank
        ):
            x = augment(torch.as_tensor(batch["x"], dtype=torch.float32).to(device))
            y = torch.as_tensor(batch["y"], dtype=torch.int64).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        train_time = time.perf_counter() - t0
        loss_sum, total_seen = _all_reduce([loss_sum, float(seen)], device)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(total_seen, 1),
            "train_samples": int(total_seen),
            "train_time_s": train_time,
            "samples_per_s": total_seen / max(train_time, 1e-9),
            "lr": opt.param_groups[0]["lr"],
        }
        if len(val_rows):
            correct, total, vloss = _validate(
                model, _rows_of(shard, 512, val_rows, val=True), device, rank, world
            )
            correct, total, vloss = _all_reduce([correct, total, vloss], device)
            metrics["val_accuracy"] = correct / max(total, 1)
            metrics["val_loss"] = vloss / max(total, 1)
        history = [*history, metrics]
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict() if sched is not None else None,
                    "epoch": epoch,
                }
                torch.save(state, Path(d) / STATE_FILE)
                atomic_write_json(Path(d) / HISTORY_FILE, history)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report({**metrics, "start_epoch": start_epoch}, checkpoint=checkpoint)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _rows_of(
    shard: Any, chunk_rows: int, val_rows: np.ndarray, *, val: bool
) -> Iterator[dict[str, np.ndarray]]:
    """The val (or train) rows of the dataset, in order, in chunks of at most ``chunk_rows``."""
    for chunk in shard.iter_batches(
        batch_size=chunk_rows, batch_format="numpy", prefetch_batches=2, drop_last=False
    ):
        if not len(val_rows):
            if not val:
                yield chunk
            continue
        keep = np.isin(chunk["row"], val_rows) == val
        yield {k: v[keep] for k, v in chunk.items()}


@torch.no_grad()
def _validate(
    model: nn.Module, batches: Iterable[dict[str, np.ndarray]], device, rank: int, world: int
) -> tuple[float, float, float]:
    """(correct, count, summed loss) over this worker's share: every ``world``-th batch, in order."""
    model.eval()
    correct = total = loss = 0.0
    for i, batch in enumerate(batches):
        if i % world != rank or not len(batch["y"]):
            continue
        # copies: the chunks may be read-only views of Arrow buffers
        x = torch.tensor(batch["x"], dtype=torch.float32, device=device)
        y = torch.tensor(batch["y"], dtype=torch.int64, device=device)
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        total += len(y)
    return correct, total, loss


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sums over the workers (on the training device: NCCL reduces GPU tensors only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------------ driver
@contextmanager
def data_context() -> Iterator[None]:
    """Datasets created inside keep their rows in order (``preserve_order``: the same rows in the same order
    whatever the scheduling) and run without progress bars (each Dataset keeps its creation context)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order = saved


def pretrain_key(cfg: RunConfig, synthetic_id: str, seed: int) -> str:
    """Config hash identifying a pretraining output: the synthetic set (``synthetic_identity``), the model, the
    recipe and the seed; with ``model.weights``, that file's identity (path, size, mtime)."""
    start = [weights_identity(cfg.model.weights)] if cfg.model.weights else []
    # text datasets: the tokenization, when set (unset: the keys of earlier runs stay the same)
    text = [cfg.data.text] if cfg.data.text is not None else []
    return config_hash(synthetic_id, cfg.model, cfg.pretrain, cfg.data.audio, seed, *start, *text)


def fit(
    cfg: RunConfig,
    dataset: Any,
    num_classes: int,
    shape: tuple[int, ...],
    out_dir: Path,
    *,
    seed: int,
    val_rows: np.ndarray | None = None,
    callbacks: list[Any] | None = None,
) -> tuple[dict[str, torch.Tensor], Any, float, list[dict[str, Any]]]:
    """Run the TorchTrainer on a materialized Ray Dataset with columns x/y/row (``row``: a stable id per sample);
    the rows whose id is in ``val_rows`` are validated on, the others trained on.

    Every worker reads the dataset whole, in order, and takes its share (see the module doc). ``callbacks``:
    Ray Train ``UserCallback``s. Returns (final state dict, Result, wall seconds, every epoch's metrics).
    """
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    pcfg = cfg.pretrain
    val_rows = np.unique(np.asarray([] if val_rows is None else val_rows, dtype=np.int64))
    num_train = dataset.count() - len(val_rows)
    loop_config = {
        "run_cfg": cfg.model_dump(mode="json"),
        "seed": seed,
        "num_classes": num_classes,
        "input_shape": list(shape),
        "num_train": num_train,
        "cpus_per_worker": pcfg.cpus_per_worker,
        "modality": get_spec(cfg.data, cfg.data_dir).modality,
        # only where the dataset's classes survive a horizontal flip (not digits, glyphs)
        "flip": get_spec(cfg.data, cfg.data_dir).hflip,
        "val_rows": val_rows,
        "models": plugin_models([cfg.model.name]),
        "datasets": plugin_datasets([cfg.data.dataset]),
        "init_weights": str(Path(cfg.model.weights).resolve()) if cfg.model.weights else None,
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
            callbacks=callbacks,
        ),
        datasets={DATASET: dataset},
        # Not split: a streaming split hands blocks to whichever worker asks first.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    t0 = time.perf_counter()
    from gptfl_ray.console import epoch_progress

    with epoch_progress(out_dir, pcfg.epochs, HISTORY_FILE):  # one console line per epoch, on the driver
        result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining in {out_dir} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_state(Path(d) / STATE_FILE)["model"]
        history = read_json(Path(d) / HISTORY_FILE)
    return state, result, wall, history


def check_pretrain_folder(out_dir: Path, key: str) -> None:
    """Refuse a folder holding the pretraining of other inputs (its ``pretrain.json`` or ``metrics.json`` key)."""
    out_dir = Path(out_dir)
    claim = out_dir / "pretrain.json"
    held = read_json(claim).get("key") if claim.is_file() else None
    if held is None and (out_dir / "metrics.json").is_file():
        held = read_json(out_dir / "metrics.json").get("key")
    if held is None and (out_dir / "ray_train").exists():
        held = "unknown (no pretrain.json)"
    if held is not None and held != key:
        raise InputError(
            f"{out_dir}: holds pretraining of other inputs (key {held}, now {key}: another synthetic set, "
            "config or seed); use another --output or delete the folder"
        )


def _claim(out_dir: Path, key: str, synthetic_dir: Path, seed: int) -> None:
    """Record which inputs ``out_dir`` holds the pretraining of; refuse a folder holding another's."""
    check_pretrain_folder(out_dir, key)
    claim = out_dir / "pretrain.json"
    if not claim.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(claim, {"key": key, "synthetic": str(Path(synthetic_dir).resolve()), "seed": seed})


def pretrain(
    cfg: RunConfig,
    synthetic_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train on ``synthetic_dir`` with Ray Train; write ``out_dir/weights.safetensors`` and ``metrics.json``.

    ``out_dir`` is claimed for (synthetic set, config, seed) by ``pretrain.json``: another input's folder is an
    error. Reruns resume from the latest epoch checkpoint; a finished run is returned from disk.
    ``test`` (real test tensors) adds the synthetic-only centralized accuracy, the paper's "synthetic only" number.
    """
    from gptfl_ray.data.features import input_shape
    from gptfl_ray.data.registry import label_names as dataset_label_names
    from gptfl_ray.data.synthetic import read_manifest, row_ids, synthetic_identity, synthetic_ray_dataset

    out_dir = Path(out_dir).resolve()
    manifest = read_manifest(synthetic_dir)
    key = pretrain_key(cfg, synthetic_identity(synthetic_dir, manifest), seed)
    _claim(out_dir, key, synthetic_dir, seed)
    done = out_dir / "metrics.json"
    if done.is_file() and (out_dir / "weights.safetensors").is_file():
        log.info("pretraining already finished in %s", out_dir)
        return read_json(done)
    shape = input_shape(cfg.data, cfg.data.audio, cfg.data_dir)
    num_classes = len(dataset_label_names(cfg.data, cfg.data_dir))  # the reader maps labels to these classes
    train_rows, val_rows = split_rows(row_ids(synthetic_dir, manifest), cfg.pretrain.val_fraction, seed)

    with data_context():  # ordered rows; one line per epoch from the workers, not a progress bar per iterator
        ds = synthetic_ray_dataset(synthetic_dir, cfg.data).materialize()  # decoded once, read every epoch
    state, result, wall, history = fit(cfg, ds, num_classes, shape, out_dir, seed=seed, val_rows=val_rows)
    metrics: dict[str, Any] = {
        "epochs": cfg.pretrain.epochs,
        "num_train": len(train_rows),
        "num_synthetic": manifest["num_rows"],
        "wall_time_s": wall,
        "final_val_accuracy": history[-1].get("val_accuracy"),
        "resumed_from_epoch": result.metrics.get("start_epoch"),
        "history": history,
        "key": key,
    }
    if test is not None:
        model = build_model(cfg.model.name, num_classes, shape, width=cfg.model.width)
        model.load_state_dict(state)
        ev = evaluate(model, test[0], test[1], batch_size=512)
        metrics["real_test_accuracy"] = ev["accuracy"]
        metrics["real_test_weighted_f1"] = ev["weighted_f1"]
        metrics["real_test_macro_f1"] = ev["macro_f1"]
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
    from gptfl_ray.data.synthetic import synthetic_identity
    from gptfl_ray.ray_env import ray_for

    cfg: RunConfig = args.cfg
    synthetic = Path(args.synthetic)
    seed = cfg.seeds[0]
    key = pretrain_key(cfg, synthetic_identity(synthetic), seed)  # a missing/unfinished folder fails here
    out = Path(args.output) if args.output else cfg.output_dir / f"pretrain-{key}"
    check_pretrain_folder(out, key)  # before Ray starts
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


__all__ = [
    "Augment",
    "fit",
    "load_state",
    "pretrain",
    "pretrain_command",
    "pretrain_key",
    "real_test_tensors",
    "shuffled_batches",
    "split_rows",
]
