"""A collected label union that lacks classes still trains the dataset's classes: labels are re-indexed by name."""

import numpy as np

from gptfl_ray.config import RunConfig
from gptfl_ray.data.synthetic import load_synthetic, read_manifest


def test_label_subset_maps_to_dataset_classes(tmp_path, ray_session, data_dir):
    from gptfl_ray.generate.pipeline import generate

    cfg = RunConfig.model_validate(
        {
            "data": {"dataset": "mnist"},
            "prompts": {"num_per_class": 5},
            "generate": {"generator": "glyphs", "batch_size": 10, "rows_per_shard": 10},
        }
    )
    generate(cfg, tmp_path / "syn", label_names=["7", "3"])
    manifest = read_manifest(tmp_path / "syn")
    assert manifest["label_names"] == ["7", "3"] and manifest["counts_per_class"] == [5, 5]
    ds = load_synthetic(tmp_path / "syn", cfg.data)
    assert sorted(np.unique(ds.y).tolist()) == [3, 7]
    assert np.bincount(ds.y, minlength=10)[[3, 7]].tolist() == [5, 5]
    assert ds.label_names[7] == "7" and ds.label_names[3] == "3"
