"""The Ray Data generation pipeline: shards, manifest, resume after a kill, CLI, reader."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from gptfl_ray.config import RunConfig, validate_config
from gptfl_ray.data.features import input_shape
from gptfl_ray.data.registry import load_dataset
from gptfl_ray.data.synthetic import load_synthetic, read_manifest, synthetic_ray_dataset
from gptfl_ray.generate.pipeline import generate, generate_command, synthetic_hash

REPO = Path(__file__).resolve().parents[1]
IMAGE_COLUMNS = {
    "row",
    "label",
    "label_name",
    "prompt",
    "guidance_scale",
    "seed",
    "generator",
    "model_id",
    "image",
}


def mnist_cfg(**generate_opts):
    return validate_config(
        {
            "data": {"dataset": "mnist"},
            "prompts": {"num_per_class": 3},
            "generate": {"generator": "glyphs", "rows_per_shard": 8, "batch_size": 4, **generate_opts},
        }
    )


def shard_stats(out: Path) -> dict[str, tuple[int, int]]:
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((out / "shards").glob("*.parquet"))
    }


def scale_cfg(**generate_opts):
    """prompts.scale: samples per class = scale × the real class counts (the only case that loads data)."""
    return validate_config(
        {
            "data": {"dataset": "mnist"},
            "prompts": {"scale": 0.003},
            "generate": {"generator": "glyphs", "rows_per_shard": 10, "batch_size": 4, "concurrency": 2}
            | generate_opts,
        }
    )


@dataclass(frozen=True)
class GlyphRun:
    """One finished glyph generation, shared by the tests of this module: read ``out``, copy it to change it."""

    cfg: RunConfig
    out: Path
    manifest: dict[str, Any]
    failed_first: str | None  # the ValueError of an attempt with invalid templates made in ``out`` before


@pytest.fixture(scope="module")
def glyph_run(ray_session, data_dir, tmp_path_factory) -> GlyphRun:
    """The module's one full glyph generation (a Ray Data job with its actor pool: the costly part).

    :func:`scale_cfg`; batches of 4 cut shards of 10 rows off the multiples of 4 (shard 1: rows 10, 14, 18).
    Into the same folder an attempt with invalid templates is made first: it must fail (the error is kept for
    the test that checks it) and leave nothing that blocks the run that follows.
    """
    cfg = scale_cfg()
    out = tmp_path_factory.mktemp("glyph-run") / "syn"
    bad = cfg.model_copy(update={"prompts": cfg.prompts.model_copy(update={"templates": ["a photo"]})})
    failed_first = None
    try:
        generate(bad, out, data_dir=data_dir)
    except ValueError as err:
        failed_first = str(err)
    manifest = generate(cfg, out, data_dir=data_dir)
    return GlyphRun(cfg, out, manifest, failed_first)


def copy_run(run: GlyphRun, dst: Path) -> Path:
    """A private copy of the shared folder (new files: new inodes and mtimes)."""
    return Path(shutil.copytree(run.out, dst))


def test_glyph_pipeline_writes_shards_manifest_and_reads_back(glyph_run, tmp_path, data_dir):
    cfg, out, manifest = glyph_run.cfg, glyph_run.out, glyph_run.manifest
    real = load_dataset(cfg.data, data_dir).train.class_counts()
    expected = [max(1, round(0.003 * c)) for c in real]

    assert manifest["complete"] is True
    assert manifest["counts_per_class"] == expected
    assert manifest["num_rows"] == sum(expected)
    assert manifest["config_hash"] == synthetic_hash(cfg)
    assert (manifest["image_size"], manifest["channels"], manifest["modality"]) == (28, 1, "image")
    assert manifest["label_names"] == [str(i) for i in range(10)]
    assert manifest["fallbacks"] == 0
    assert read_manifest(out) == manifest
    files = sorted((out / "shards").glob("*.parquet"))
    assert [f.name for f in files] == [f"part-{k:05d}.parquet" for k in range(-(-sum(expected) // 10))]

    rows = []
    for k, f in enumerate(files):
        t = pq.read_table(f)
        assert set(t.column_names) >= IMAGE_COLUMNS
        assert t["row"].to_pylist() == list(range(k * 10, k * 10 + t.num_rows))  # deterministic assignment
        rows += t.to_pylist()
    assert len({r["seed"] for r in rows}) == len(rows)
    assert all(r["generator"] == "glyphs" and r["prompt"].startswith("a photo of a ") for r in rows)
    img = np.asarray(Image.open(io.BytesIO(rows[0]["image"])))
    assert img.shape == (28, 28) and img.dtype == np.uint8

    # A rerun of a finished folder changes nothing (on a copy: the shared folder is never written).
    again = copy_run(glyph_run, tmp_path / "again")
    before = shard_stats(again)
    assert generate(cfg, again, data_dir=data_dir) == manifest
    assert shard_stats(again) == before

    ds = load_synthetic(out, cfg.data)
    assert ds.x.shape == (sum(expected), 28, 28) and ds.x.dtype == np.uint8
    assert ds.class_counts().tolist() == expected
    batch = next(iter(synthetic_ray_dataset(out, cfg.data).iter_torch_batches(batch_size=16)))
    assert tuple(batch["x"].shape[1:]) == input_shape("mnist", cfg.data.audio)
    assert str(batch["x"].dtype) == "torch.float32" and str(batch["y"].dtype) == "torch.int64"


def test_speech_pipeline_writes_audio_at_the_task_rate(ray_session, tmp_path):
    cfg = validate_config(
        {
            "data": {"dataset": "fsdd", "audio": {"sample_rate": 8000}},
            "prompts": {"num_per_class": 2},
            "generate": {"generator": "espeak", "rows_per_shard": 4, "batch_size": 2},
        }
    )
    out = tmp_path / "speech"
    manifest = generate(cfg, out, label_names=["3", "8"])
    assert manifest["counts_per_class"] == [2, 2]
    assert (manifest["sample_rate"], manifest["modality"]) == (8000, "speech")
    t = pq.read_table(out / "shards" / "part-00000.parquet")
    assert t.schema.field("audio").type.value_type.bit_width == 32
    assert t.schema.metadata[b"gptfl.sample_rate"] == b"8000"
    assert t["prompt"].to_pylist() == ["three", "three", "eight", "eight"]
    ds = load_synthetic(out, cfg.data)
    assert ds.x.shape == (4, 8000) and ds.x.dtype == np.float32
    assert np.allclose(np.abs(ds.x).max(axis=1), 0.9, atol=1e-3)  # peak-normalised like real clips
    batch = next(iter(synthetic_ray_dataset(out, cfg.data).iter_torch_batches(batch_size=4)))
    assert tuple(batch["x"].shape[1:]) == input_shape("fsdd", cfg.data.audio)


def test_interrupted_run_resumes_without_redoing_finished_shards(ray_session, tmp_path):
    """Kill `gptfl generate` (SIGKILL, no cleanup) once some shards exist; a rerun finishes the rest."""
    address = ray_session.get_runtime_context().gcs_address
    # 24 shards of 15 rows on one actor: the kill lands while 22 shards (330 glyphs, seconds of rendering) are
    # still to make, and the rerun renders only those (the run's cost, beyond its fixed start-up).
    raw = {
        "ray_address": address,
        "data": {"dataset": "mnist"},
        "prompts": {"num_per_class": 36},
        "generate": {"generator": "glyphs", "rows_per_shard": 15, "batch_size": 10, "concurrency": 1},
    }
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "syn"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptfl_ray.cli", "generate", str(cfg_path), "--output", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((out / "shards").glob("part-*.parquet"))) >= 2:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = shard_stats(out)
    assert 2 <= len(before) < 24, f"kill landed outside the run ({len(before)} shards)"
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(out)

    cfg = validate_config(raw)
    manifest = generate(cfg, out)
    after = shard_stats(out)
    assert len(after) == 24
    assert {k: after[k] for k in before} == before  # finished shards were not rewritten
    assert manifest["counts_per_class"] == [36] * 10
    rows = np.concatenate(
        [pq.read_table(f, columns=["row"])["row"].to_numpy() for f in sorted((out / "shards").glob("*"))]
    )
    assert np.array_equal(rows, np.arange(360))
    assert not list((out / "shards").glob(".*tmp"))


def test_resume_after_deleting_one_shard_regenerates_only_it_bit_identically(glyph_run, tmp_path, caplog):
    cfg, manifest = glyph_run.cfg, glyph_run.manifest
    # Shard 1: rows 10-19, cut into batches at rows 10, 14 and 18 (batch_size 4), not at multiples of 4.
    assert (cfg.generate.rows_per_shard, cfg.generate.batch_size) == (10, 4) and manifest["num_rows"] > 20
    out = copy_run(glyph_run, tmp_path / "syn")
    content = {f.name: f.read_bytes() for f in sorted((glyph_run.out / "shards").glob("*.parquet"))}
    before = shard_stats(out)
    assert sorted(before) == sorted(content)
    (out / "manifest.json").unlink()
    (out / "shards" / "part-00001.parquet").unlink()
    caplog.clear()  # the first run's lines too are captured when an earlier test left logging at INFO
    with caplog.at_level("INFO", logger="gptfl_ray.generate.pipeline"):
        assert generate(cfg, out) == manifest
    after = shard_stats(out)
    assert {k: v for k, v in after.items() if k != "part-00001.parquet"} == {
        k: v for k, v in before.items() if k != "part-00001.parquet"
    }  # the others were not rewritten
    assert after["part-00001.parquet"] != before["part-00001.parquet"]
    assert {f.name: f.read_bytes() for f in sorted((out / "shards").glob("*.parquet"))} == content
    wrote = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate: wrote part-")]
    assert len(wrote) == 1 and wrote[0].startswith(
        "generate: wrote part-00001.parquet (10 rows; 1/1 this run)"
    )


def test_generator_actors_write_shards_and_return_only_metadata(ray_session, tmp_path):
    """The driver receives one small record per shard (no image, audio, text or prompt column); the actor
    wrote the file, and the record's size, row range and checksum are the file's."""
    import hashlib

    import pyarrow as pa

    from gptfl_ray.generate.pipeline import SHARD_INFO, shard_dataset, shard_metadata, task_target
    from gptfl_ray.generate.registry import get_generator
    from gptfl_ray.prompts.templates import build_prompt_table

    cfg = mnist_cfg(concurrency=2)
    gen_cls = get_generator("glyphs")
    names = [str(i) for i in range(10)]
    target = task_target(cfg, gen_cls, gen_cls.parse_options({}), names)
    table = build_prompt_table(
        cfg.prompts, names, modality="image", label_text=dict(zip(names, target.label_text, strict=True))
    )
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))  # 30 rows
    out = tmp_path / "syn"
    ds = shard_dataset(
        table, [1, 3], gen_cls, cfg.generate, target, out, shard_metadata(cfg.generate, target)
    )
    received = [b for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    records = pa.concat_tables(received).sort_by("shard")
    assert records.schema.equals(SHARD_INFO)  # metadata columns only
    assert sum(b.nbytes for b in received) < 1024
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00001.parquet", "part-00003.parquet"]
    for info in records.to_pylist():
        path = Path(info["path"])
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (info["bytes"], info["sha256"])
        shard = pq.read_table(path)
        assert shard["row"].to_pylist() == list(range(info["row_first"], info["row_last"] + 1))
        assert info["rows"] == shard.num_rows == (8 if info["shard"] == 1 else 6)
        assert set(shard.column_names) >= IMAGE_COLUMNS  # the samples are in the file, not in the record


def test_folder_of_another_config_is_refused(glyph_run, tmp_path, data_dir):
    # The module's run was preceded, in its folder, by an attempt with invalid templates: that one failed on
    # the config, and left nothing to protect (the run that followed completed there).
    assert glyph_run.failed_first is not None and re.search("prompts.templates", glyph_run.failed_first)
    assert read_manifest(glyph_run.out) == glyph_run.manifest and glyph_run.manifest["complete"] is True
    out = copy_run(glyph_run, tmp_path / "syn")
    with pytest.raises(ValueError, match="another config"):
        generate(scale_cfg(rows_per_shard=5), out, data_dir=data_dir)


def test_generate_command_reads_labels_file_and_defaults_the_output(glyph_run, tmp_path, capsys):
    cfg = glyph_run.cfg.model_copy(update={"output_dir": tmp_path})
    out = tmp_path / f"synthetic-{synthetic_hash(cfg)}"
    # The default output already holds this config's finished generation for the dataset's labels in the
    # dataset's order (a copy of the module's run): `generate` accepts it for that config and label list only
    # (else "holds synthetic data for another config or label set"), and generates nothing.
    copy_run(glyph_run, out)
    labels = tmp_path / "labels.json"
    # The collected union in arbitrary order: put back in the dataset's order (label i = digit i).
    labels.write_text(json.dumps({"labels": [str(i) for i in reversed(range(10))]}))
    args = argparse.Namespace(cfg=cfg, output=None, labels=str(labels), data_dir=None)
    assert generate_command(args) == 0
    manifest = read_manifest(out)
    assert manifest["label_names"] == [str(i) for i in range(10)]
    counts = ", ".join(f"{i}: {c}" for i, c in enumerate(manifest["counts_per_class"]))
    assert f"{out}: {manifest['num_rows']} samples ({counts}); 0 prompt fallbacks" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([labels.name, out.name])  # nothing elsewhere

    # A subset keeps the file's order; --output is where it is generated (a real run, 6 glyphs).
    subset = tmp_path / "subset.json"
    subset.write_text(json.dumps({"labels": ["7", "2"]}))
    args = argparse.Namespace(
        cfg=mnist_cfg(), output=str(tmp_path / "sub"), labels=str(subset), data_dir=None
    )
    assert generate_command(args) == 0
    assert read_manifest(tmp_path / "sub")["label_names"] == ["7", "2"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"labels": []}))
    with pytest.raises(ValueError, match="bad.json"):
        generate_command(argparse.Namespace(cfg=cfg, output=None, labels=str(bad), data_dir=None))


def test_cli_reports_bad_generator_options_in_one_line(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"generate": {"generator": "glyphs", "options": {"fontz": []}}}))
    res = subprocess.run(
        [sys.executable, "-m", "gptfl_ray.cli", "generate", str(cfg_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "gptfl generate: error: generate.options.fontz: unknown option (generator 'glyphs')"
    ]


def test_reader_errors_name_the_folder(tmp_path):
    cfg = mnist_cfg()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_synthetic(tmp_path, cfg.data)
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {"complete": True, "kind": "audio", "sample_rate": 8000, "shards": [], "label_names": ["a"]}
        )
    )
    with pytest.raises(ValueError, match="holds audio data but data.dataset 'mnist' is image"):
        load_synthetic(tmp_path, cfg.data)


@pytest.mark.slow
def test_llm_expanded_prompts_and_fallbacks_flow_into_shards(ray_session, tmp_path):
    """With an LLM expander (tiny random Llama), shards carry the expanded prompts, the manifest counts the
    rows that fell back to their template, and the expanded table is kept so a rerun does not re-expand."""
    from tests.tiny_models import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm")
    cfg = validate_config(
        {
            "data": {"dataset": "mnist"},
            "prompts": {
                "num_per_class": 6,
                "expander": {
                    "backend": "transformers",
                    "model": str(model),
                    "max_new_tokens": 12,
                    "batch_size": 6,
                    "max_fallback_fraction": 1.0,  # a random model's text mostly falls back: that is the point
                },
            },
            "generate": {"generator": "glyphs", "rows_per_shard": 5, "batch_size": 4},
        }
    )
    out = tmp_path / "syn"
    manifest = generate(cfg, out, label_names=["7", "3"])
    table = pq.read_table(sorted((out / "shards").glob("*.parquet")))
    fallback = table["expansion_fallback"].to_pylist()
    assert manifest["fallbacks"] == sum(fallback)
    for prompt, fell_back, name in zip(
        table["prompt"].to_pylist(), fallback, table["label_name"].to_pylist(), strict=True
    ):
        word = {"7": "seven", "3": "three"}[name]
        if fell_back:
            assert prompt == f"a photo of a {word}"
        else:
            assert word in prompt and prompt != f"a photo of a {word}"
    prompts_before = pq.read_table(out / "prompts.parquet")["prompt"].to_pylist()
    kept = (out / "prompts.parquet").stat()
    (out / "manifest.json").unlink()
    for f in list((out / "shards").glob("*.parquet"))[:2]:
        f.unlink()
    assert generate(cfg, out, label_names=["7", "3"]) == manifest
    assert pq.read_table(out / "prompts.parquet")["prompt"].to_pylist() == prompts_before
    now = (out / "prompts.parquet").stat()
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # not rewritten: not re-expanded
    again = pq.read_table(sorted((out / "shards").glob("*.parquet")))
    for column in ("row", "prompt", "expansion_fallback"):  # the regenerated shards carry the kept prompts
        assert again[column].to_pylist() == table[column].to_pylist()
