import json
import time

import numpy as np
import pytest
import yaml

from gptfl_ray.cli import main as cli_main
from gptfl_ray.config import ConfigError, validate_config
from gptfl_ray.data import load_dataset
from gptfl_ray.data.partition import partition
from gptfl_ray.labels.collect import _ordered, collect_labels
from gptfl_ray.labels.secagg import threshold_count
from tests.cli_output import error_lines


def make_cfg(tmp_path, **overrides):
    raw = {
        "name": "labels-test",
        "output_dir": str(tmp_path),
        "data": {"dataset": "mnist", "num_train": 3000, "num_test": 500},
        "partition": {"method": "dirichlet", "num_clients": 20, "alpha": 0.05},
        "fl": {"num_actors": 2, "actor_num_cpus": 0.5},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return validate_config(raw)


def true_client_counts(cfg, seed):
    """Oracle computed in the test (the server never sees per-client label sets)."""
    train = load_dataset(cfg.data).train
    counts: dict[str, int] = {}
    for part in partition(cfg.partition, train.y, train.groups, seed):
        for k in np.unique(train.y[part]):
            name = train.label_names[int(k)]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_collect_labels_matches_the_true_union_and_counts(ray_session, data_dir, tmp_path):
    cfg = make_cfg(tmp_path)
    out_file = tmp_path / "labels.json"
    result = collect_labels(cfg, seed=1, output=out_file)
    truth = true_client_counts(cfg, seed=1)
    # skewed split: labels are held by different numbers of clients, so the counts are informative
    assert len(set(truth.values())) > 1
    assert result["client_counts"] == truth
    assert result["labels"] == [str(i) for i in range(10)]  # class-index order
    assert result["num_clients"] == result["num_included"] == 20 and result["dropped_clients"] == []
    assert result["iblt"]["seed"] == 1 and result["secagg"]["threshold"] == threshold_count(0.6, 20) == 12
    assert json.loads(out_file.read_text()) == result
    # no actor left behind (ray.kill is asynchronous)
    deadline = time.monotonic() + 20
    while [a for a in ray_session.util.list_named_actors() if a.startswith("label-client-")]:
        assert time.monotonic() < deadline, "label-client actors still alive"
        time.sleep(0.2)


def test_cli_collect_labels_writes_labels_json(ray_session, data_dir, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "run"),
                "data": {"dataset": "mnist", "num_train": 1000, "num_test": 200},
                "partition": {"method": "iid", "num_clients": 6},
                "fl": {"num_actors": 2, "actor_num_cpus": 0.5},
            }
        )
    )
    assert cli_main(["collect-labels", str(cfg_file), "--data-dir", str(data_dir)]) == 0
    written = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert written["labels"] == [str(i) for i in range(10)]
    assert written["client_counts"] == {str(i): 6 for i in range(10)}  # iid: every client holds every digit
    assert "10 labels from 6/6 clients" in capsys.readouterr().out


def test_cli_capacity_too_small_is_one_line_error(ray_session, data_dir, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path),
                "data": {"dataset": "mnist", "num_train": 1000, "num_test": 200},
                "partition": {"method": "iid", "num_clients": 4},
                "fl": {"num_actors": 2, "actor_num_cpus": 0.5},
                "labels": {"iblt_capacity": 5},
            }
        )
    )
    assert cli_main(["collect-labels", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1
    assert "10 distinct labels exceed the table capacity 5 (raise labels.iblt_capacity)" in err
    assert not (tmp_path / "labels.json").exists()


def test_bad_partition_surfaces_the_original_error(ray_session, data_dir, tmp_path):
    cfg = make_cfg(tmp_path, partition={"method": "natural"})  # MNIST has no natural client ids
    with pytest.raises(ValueError, match="partition.method: 'natural' needs a dataset with natural ids"):
        collect_labels(cfg, seed=0)


def test_label_order_and_threshold_rules():
    digits = [str(i) for i in range(10)]
    assert _ordered(["10", "2", "7"], [*digits, "10"]) == ["2", "7", "10"]  # class-index order
    assert _ordered(["zebra", "2", "apple"], digits) == ["2", "apple", "zebra"]  # not all dataset labels
    # at least 2, as in FL (the secure sum of one client's table is its label set), and a majority
    assert [threshold_count(0.6, n) for n in (1, 2, 10, 11)] == [2, 2, 6, 7]


def test_threshold_rules_are_checked_before_any_work(tmp_path):
    """One client, or a threshold at or below half without the opt-in: a one-line error naming the field,
    before Ray or the data are touched (no ray_session: a Ray start here would be a failure to fail fast)."""
    with pytest.raises(ConfigError, match="partition.num_clients: private label collection needs at least 2"):
        collect_labels(make_cfg(tmp_path, partition={"num_clients": 1}), seed=0)
    with pytest.raises(ConfigError, match=r"labels\.secagg_threshold: must be > 0\.5"):
        make_cfg(tmp_path, labels={"secagg_threshold": 0.5})
    cfg = make_cfg(tmp_path, labels={"secagg_threshold": 0.5, "secagg_allow_minority_threshold": True})
    assert threshold_count(cfg.labels.secagg_threshold, 20, cfg.labels.secagg_allow_minority_threshold) == 10
