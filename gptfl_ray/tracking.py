"""Experiment tracking with MLflow: ``gptfl run`` and ``gptfl sweep`` log where researchers already look.

``gptfl run`` logs one MLflow run per run folder (the parent: flattened config as params, ``report.md`` and the
plots as artifacts), and nested under it one run per pretraining (per-epoch metrics, step = epoch) and one per FL
arm and seed (every numeric field of each ``metrics.jsonl`` record, step = round). Each step's MLflow run id is
kept in its own folder (``mlflow_run.json``), so a resumed run, arm or pretraining logs into the same MLflow run.
``gptfl sweep`` logs every trial through Ray Tune's ``MLflowLoggerCallback`` (``tracking_callbacks``).

The store is ``tracking.mlflow.uri``, default a local file store ``file://<run folder>/mlruns``
(``mlflow ui --backend-store-uri <that uri>``; MLflow >= 3.7 needs ``MLFLOW_ALLOW_FILE_STORE=true`` for file
stores, which this module sets for its own process). Tracking is optional (``tracking.mlflow.enabled: false``)
and never fatal: the first failure is logged as one warning and tracking stays off for the rest of the command.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gptfl_ray.io import atomic_write_json, read_json, read_jsonl

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
MAX_PARAM_KEY = 250  # MLflow's limits on a param's key and value
MAX_PARAM_VALUE = 6000
BATCH = 100  # params per log_batch call (MLflow's per-request limit)
METRIC_BATCH = 1000
LOGGED_TAG = "gptfl.logged"  # set once a step's metrics are all logged: a rerun does not log them twice
TRIAL_ID_TAG = "gptfl.trial_id"  # a sweep trial's Tune id: a resumed trial logs into the same MLflow run


def tracking_uri(cfg: Any, folder: Path) -> str:
    """The configured store, else the local file store ``<folder>/mlruns``."""
    return cfg.tracking.mlflow.uri or (Path(folder).resolve() / "mlruns").as_uri()


def _allow_file_store(uri: str) -> None:
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def param_value(value: Any) -> str:
    """A param's value as MLflow stores it: JSON for lists/dicts, truncated to MLflow's limit."""
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """The flattened config as MLflow params (dotted keys, values within MLflow's limits)."""
    return {k[:MAX_PARAM_KEY]: param_value(v) for k, v in flatten(config).items()}


def numeric_fields(record: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The finite numbers of a metrics record (one level of nested dicts as ``outer.inner``), bools excluded."""
    out = {}
    for k, v in flatten(record).items():
        if k in skip or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class Tracker:
    """MLflow logging for one ``gptfl run`` folder; every method is a no-op once tracking is off or has failed."""

    def __init__(self, cfg: Any, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.enabled = bool(cfg.tracking.mlflow.enabled)
        self.uri = tracking_uri(cfg, self.run_dir)
        self._client: Any = None
        self._experiment_id: str | None = None
        self._parent: str | None = None

    # -------------------------------------------------------------------------------------- plumbing
    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as err:  # tracking must never stop a run
            self.enabled = False
            log.warning("MLflow tracking off for the rest of this run (%s failed: %s)", what, err)
            return None

    @property
    def client(self) -> Any:
        if self._client is None:
            _allow_file_store(self.uri)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            name = self.cfg.tracking.mlflow.experiment or self.cfg.name
            exp = client.get_experiment_by_name(name)
            self._experiment_id = exp.experiment_id if exp else client.create_experiment(name)
            self._client = client
        return self._client

    def _run_id(self, folder: Path, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """The MLflow run recorded in ``folder`` (same store), else a new one with these params and tags."""
        client, path = self.client, Path(folder) / RUN_ID_FILE
        if path.is_file():
            saved = read_json(path)
            if saved.get("uri") == self.uri:
                try:
                    client.get_run(saved["run_id"])
                    return saved["run_id"]
                except Exception:
                    log.debug("MLflow run %s is gone from %s: starting another", saved["run_id"], self.uri)
        if self._parent is not None:
            tags = {**tags, "mlflow.parentRunId": self._parent}
        run = client.create_run(self._experiment_id, run_name=name, tags=tags)
        run_id = run.info.run_id
        self._log_params(run_id, params)
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"run_id": run_id, "uri": self.uri})
        return run_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[i : i + BATCH])

    def _log_metrics(self, run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
        for i in range(0, len(items), METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + METRIC_BATCH])

    def _logged(self, run_id: str) -> bool:
        return self.client.get_run(run_id).data.tags.get(LOGGED_TAG) == "true"

    def _finish(self, run_id: str) -> None:
        self.client.set_tag(run_id, LOGGED_TAG, "true")
        self.client.set_terminated(run_id)

    # -------------------------------------------------------------------------------------- steps
    def start(self) -> None:
        """The parent run of the run folder (reused when the folder already has one)."""
        from gptfl_ray.config import dump_config

        def go() -> None:
            params = config_params(dump_config(self.cfg))
            self._parent = self._run_id(self.run_dir, self.cfg.name, params, {"gptfl.kind": "run"})

        self._guard("starting the run", go)

    def start_arm(self, arm: str, arm_cfg: Any, seed: int, out_dir: Path) -> None:
        """Create (or find) the arm's MLflow run before it trains, so a resumed arm logs into the same run."""
        from gptfl_ray.config import dump_config

        def go() -> None:
            params = {**config_params(dump_config(arm_cfg)), "arm": arm, "seed": str(seed)}
            tags = {"gptfl.kind": "fl", "gptfl.arm": arm, "gptfl.seed": str(seed)}
            self._run_id(out_dir, f"{arm}-seed{seed}", params, tags)

        self._guard(f"starting arm {arm}", go)

    def log_arm(self, arm: str, arm_cfg: Any, seed: int, out_dir: Path) -> None:
        """Every round's numeric metrics (step = round) and the summary's, once the arm has finished."""

        def go() -> None:
            self.start_arm(arm, arm_cfg, seed, out_dir)
            run_id = read_json(Path(out_dir) / RUN_ID_FILE)["run_id"]
            if self._logged(run_id):
                return
            rows = [
                (int(r["round"]), numeric_fields(r, skip=("round",)))
                for r in read_jsonl(Path(out_dir) / "metrics.jsonl")
                if "round" in r
            ]
            summary = Path(out_dir) / "summary.json"
            if summary.is_file():
                last = rows[-1][0] if rows else 0
                rows.append((last, {f"final.{k}": v for k, v in numeric_fields(read_json(summary)).items()}))
            self._log_metrics(run_id, rows)
            self._finish(run_id)

        self._guard(f"logging arm {arm}", go)

    def log_pretrain(self, seed: int, out_dir: Path, metrics: dict[str, Any]) -> None:
        """Per-epoch pretraining metrics (step = epoch) and the final ones, in the pretraining's own run."""
        from gptfl_ray.config import dump_config

        def go() -> None:
            dumped = dump_config(self.cfg)
            params = {
                **config_params({k: dumped[k] for k in ("data", "model", "pretrain", "generate")}),
                "seed": str(seed),
            }
            tags = {"gptfl.kind": "pretrain", "gptfl.seed": str(seed)}
            run_id = self._run_id(out_dir, f"pretrain-seed{seed}", params, tags)
            if self._logged(run_id):
                return
            history = metrics.get("history") or []
            rows = [(int(h["epoch"]), numeric_fields(h, skip=("epoch",))) for h in history if "epoch" in h]
            final = numeric_fields({k: v for k, v in metrics.items() if k != "history"})
            rows.append((rows[-1][0] if rows else 0, {f"final.{k}": v for k, v in final.items()}))
            self._log_metrics(run_id, rows)
            self._finish(run_id)

        self._guard(f"logging pretraining seed {seed}", go)

    def finish(self, report: Path | None) -> None:
        """The report and plots as artifacts of the parent run; the parent ends."""

        def go() -> None:
            if self._parent is None:
                return
            if report is not None and Path(report).is_file():
                self.client.log_artifact(self._parent, str(report))
            plots = self.run_dir / "plots"
            if plots.is_dir():
                self.client.log_artifacts(self._parent, str(plots), artifact_path="plots")
            self.client.set_terminated(self._parent)

        self._guard("logging the report", go)


# ------------------------------------------------------------------------------------------ sweeps
def tracking_callbacks(cfg: Any, sweep_dir: Path, experiment: str) -> list[Any]:
    """Ray Tune callbacks logging every trial to MLflow (none when tracking is off or MLflow is missing)."""
    if not cfg.tracking.mlflow.enabled:
        return []
    uri = tracking_uri(cfg, sweep_dir)
    _allow_file_store(uri)
    try:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
    except Exception as err:
        log.warning("MLflow tracking off for this sweep: %s", err)
        return []

    class QuietMLflowCallback(MLflowLoggerCallback):
        """Tune's MLflow callback logging the flat keys of each trial's config (not the whole grid point) as
        params; a tracking failure warns once and turns it off instead of failing the sweep."""

        _off = False

        def _safe(self, what: str, fn: Callable[[], Any]) -> None:
            if self._off:
                return
            try:
                fn()
            except Exception as err:
                self._off = True
                log.warning("MLflow tracking off for the rest of this sweep (%s failed: %s)", what, err)

        def setup(self, *args: Any, **kwargs: Any) -> None:
            self._safe("setup", lambda: MLflowLoggerCallback.setup(self, *args, **kwargs))

        def log_trial_start(self, trial: Any) -> None:
            def go() -> None:
                if trial not in self._trial_runs:
                    self._trial_runs[trial] = self._resumed_run(trial) or self._new_run(trial)
                flat = {k: param_value(v) for k, v in trial.config.items() if k != "point"}
                client = self.mlflow_util._get_client()
                from mlflow.entities import Param

                params = [Param(k[:MAX_PARAM_KEY], v) for k, v in flat.items()]
                for i in range(0, len(params), BATCH):
                    client.log_batch(self._trial_runs[trial], params=params[i : i + BATCH])

            self._safe("logging a trial's params", go)

        def _new_run(self, trial: Any) -> str:
            tags = {**self.tags, "trial_name": str(trial), TRIAL_ID_TAG: trial.trial_id}
            return self.mlflow_util.start_run(tags=tags, run_name=str(trial)).info.run_id

        def _resumed_run(self, trial: Any) -> str | None:
            """The MLflow run an earlier invocation opened for this trial (``gptfl sweep --resume`` restores
            Tune's trials with their ids): its metrics continue there instead of in a second run."""
            client = self.mlflow_util._get_client()
            runs = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial.trial_id}'",
                max_results=1,
            )
            if not runs:
                return None
            client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            # _trial_runs exists only once setup succeeded (a failed setup turns tracking off)
            if not self._off and trial in getattr(self, "_trial_runs", {}):  # not the config Tune adds
                metrics = {k: v for k, v in result.items() if k != "config"}
                # the FL round as the step: a resumed trial's Tune iteration count starts again at 1
                step = int(result.get("round") or result.get("training_iteration") or 0)
                self._safe(
                    "logging a result",
                    lambda: self.mlflow_util.log_metrics(
                        run_id=self._trial_runs[trial], metrics_to_log=metrics, step=step
                    ),
                )

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            if not self._off and trial in getattr(self, "_trial_runs", {}):
                self._safe("ending a trial", lambda: MLflowLoggerCallback.log_trial_end(self, trial, failed))

    return [QuietMLflowCallback(tracking_uri=uri, experiment_name=experiment, tags={"gptfl.kind": "sweep"})]


__all__ = ["RUN_ID_FILE", "Tracker", "config_params", "flatten", "numeric_fields", "tracking_callbacks"]
