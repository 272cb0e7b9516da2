"""The user's own data without code (imagefolder, audiofolder, Hugging Face on disk / Parquet) and with code
(``module:function``): loaders return the counts, label names, groups and shapes the test wrote; bad layouts
are one-line errors naming the path. A loader's output (``Splits`` and the spec) is all the rest of a run reads, so
`gptfl run` end to end is tested once per modality in test_own_data_run.py (an audio folder, a plugin image
dataset), not once per layout."""

import io
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from gptfl_ray.config import DataConfig, validate_config
from gptfl_ray.data import load_dataset
from gptfl_ray.data.base import Splits, get_spec
from gptfl_ray.data.features import input_shape, to_tensors
from gptfl_ray.data.registry import dataset_root, label_names, load_raw
from gptfl_ray.errors import ConfigError, InputError, InputNotFoundError


def _png(path, value, size=(8, 8), mode="L"):
    """A constant image whose pixel value identifies it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


def _image_folder(root, classes=("0", "1", "2"), per_class=4, **kw):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"img{i}.png", 10 * c + i, **kw)
    return root


def _one_line_error(err, path):
    text = str(err.value)
    assert "\n" not in text and str(path) in text, text


def test_imagefolder_flat_holds_out_test_set(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    cfg = DataConfig(dataset="imagefolder", root=root, num_test=3)
    raw = load_raw(cfg, root)
    assert not isinstance(raw, Splits) and raw.x.shape == (12, 8, 8) and raw.x.dtype == np.uint8
    # every image is constant 10*class + index: labels and pixels line up
    assert raw.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert raw.x[:, 0, 0].tolist() == [10 * c + i for c in range(3) for i in range(4)]
    splits = load_dataset(cfg)
    assert (
        len(splits.train) == 9 and len(splits.test) == 3 and splits.test.class_counts().tolist() == [1, 1, 1]
    )
    spec = get_spec(cfg)
    assert spec.label_names == ("0", "1", "2") and spec.num_classes == 3
    assert (spec.modality, spec.image_size, spec.channels, spec.hflip) == ("image", 8, 1, False)
    assert input_shape(cfg, cfg.audio) == (1, 8, 8) and label_names(cfg) == ["0", "1", "2"]
    x, _ = to_tensors(splits.test, cfg.dataset, cfg.audio)
    assert x.shape == (3, 1, 8, 8)
    # mean/std 0.5: pixel value v -> (v/255 - 0.5) / 0.5
    np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), splits.test.x[:, 0, 0] / 127.5 - 1.0, atol=1e-6)


def test_imagefolder_train_test_rgb_and_resize(tmp_path):
    root = tmp_path / "imgs"
    _image_folder(root / "train", classes=("cat", "dog"), per_class=3, size=(10, 6), mode="RGB")
    _image_folder(root / "test", classes=("dog",), per_class=2, size=(10, 6), mode="RGB")
    with pytest.raises(InputError, match="not square") as err:
        load_raw(DataConfig(dataset="imagefolder", root=root), root)
    _one_line_error(err, root / "train")
    cfg = DataConfig(dataset="imagefolder", root=root, image_size=4)
    splits = load_dataset(cfg)
    assert splits.train.x.shape == (6, 4, 4, 3) and splits.test.x.shape == (2, 4, 4, 3)
    assert splits.train.label_names == ["cat", "dog"] and splits.test.y.tolist() == [1, 1]
    assert splits.test.x[1, 2, 2].tolist() == [1, 254, 7]  # a constant image stays constant when resized
    spec = get_spec(cfg)
    assert (spec.image_size, spec.channels) == (4, 3) and input_shape(cfg, cfg.audio) == (3, 4, 4)


def test_imagefolder_bad_layouts(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputNotFoundError) as err:
        load_dataset(DataConfig(dataset="imagefolder", root=missing))
    _one_line_error(err, missing)
    root = _image_folder(tmp_path / "a")
    (root / "3").mkdir()
    with pytest.raises(InputError, match="empty class folder") as err:
        load_dataset(DataConfig(dataset="imagefolder", root=root))
    _one_line_error(err, root / "3")
    root = _image_folder(tmp_path / "b")
    _png(root / "1" / "big.png", 0, size=(9, 9))
    with pytest.raises(InputError, match="differ in size") as err:
        load_dataset(DataConfig(dataset="imagefolder", root=root))
    _one_line_error(err, root / "1" / "big.png")
    root = _image_folder(tmp_path / "c")
    (root / "2" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read image") as err:
        load_dataset(DataConfig(dataset="imagefolder", root=root))
    _one_line_error(err, root / "2" / "broken.png")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no class folders") as err:
        load_dataset(DataConfig(dataset="imagefolder", root=tmp_path / "d"))
    _one_line_error(err, tmp_path / "d")
    with pytest.raises(ConfigError, match="data.root: the image folder is required"):
        validate_config({"data": {"dataset": "imagefolder"}})
    with pytest.raises(ConfigError, match="data.image_size is not used by data.dataset 'mnist'"):
        validate_config({"data": {"dataset": "mnist", "image_size": 8}})
    with pytest.raises(
        ConfigError, match=r"data.dataset: unknown dataset 'imgfolder' \(known: mnist, .*imagefolder"
    ):
        validate_config({"data": {"dataset": "imgfolder"}})


def _wav(path, freq, sr=8000, dur=0.25):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * dur)) / sr
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), sr)


def test_audiofolder_with_speaker_groups(tmp_path):
    root = tmp_path / "sounds"
    files = {
        "yes/alice_0.wav": 300,
        "yes/bob_0.wav": 320,
        "yes/bob_1.wav": 340,
        "no/carol_0.wav": 500,
        "no/alice_1.wav": 520,
    }
    for rel, f in files.items():
        _wav(root / rel, f)
    cfg = DataConfig(
        dataset="audiofolder", root=root, group_regex=r"^([a-z]+)_\d+", audio={"clip_seconds": 0.5}
    )
    raw = load_raw(cfg, root)
    # sorted: no/alice_1, no/carol_0, yes/alice_0, yes/bob_0, yes/bob_1
    assert raw.label_names == ["no", "yes"] and raw.y.tolist() == [0, 0, 1, 1, 1]
    assert raw.group_names == ["alice", "bob", "carol"] and raw.groups.tolist() == [0, 2, 0, 1, 1]
    assert raw.x.shape == (5, 8000) and raw.x.dtype == np.float32 and raw.sample_rate == 16000
    spec = get_spec(cfg)
    assert (spec.modality, spec.label_names, spec.natural_groups) == ("audio", ("no", "yes"), True)
    assert input_shape(cfg, cfg.audio)[0] == 1
    assert (
        get_spec(DataConfig(dataset="audiofolder", root=root)).natural_groups is False
    )  # no regex: no groups
    with pytest.raises(ConfigError, match="group_regex: needs a capturing group"):
        validate_config({"data": {"dataset": "audiofolder", "root": str(root), "group_regex": "[a-z]+"}})
    _wav(root / "no" / "Dave-3.wav", 400)
    with pytest.raises(InputError, match="does not match data.group_regex") as err:
        load_raw(cfg, root)
    _one_line_error(err, root / "no" / "Dave-3.wav")


def _hf_images(n_per_class, names, groups=True):
    import datasets

    rows = {"img": [], "label": [], "speaker": []}
    for c in range(len(names)):
        for i in range(n_per_class):
            rows["img"].append(Image.new("L", (6, 6), 20 * c + i))
            rows["label"].append(c)
            rows["speaker"].append(f"s{i % 2}")
    feats = datasets.Features(
        img=datasets.Image(), label=datasets.ClassLabel(names=list(names)), speaker=datasets.Value("string")
    )
    return datasets.Dataset.from_dict(rows, features=feats)


def test_hf_save_to_disk_with_classlabel_and_test_split(tmp_path):
    import datasets

    path = tmp_path / "hfdisk"
    datasets.DatasetDict(
        train=_hf_images(3, ["ant", "bee"]), test=_hf_images(1, ["ant", "bee"])
    ).save_to_disk(str(path))
    hf = {"path": str(path), "image_column": "img", "label_column": "label", "group_column": "speaker"}
    cfg = validate_config({"data": {"dataset": "hf", "hf": hf}}).data
    splits = load_dataset(cfg)
    assert len(splits.train) == 6 and len(splits.test) == 2  # the saved test split is the official one
    assert splits.train.label_names == ["ant", "bee"] and splits.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert splits.train.x.shape == (6, 6, 6) and splits.train.x[:, 0, 0].tolist() == [0, 1, 2, 20, 21, 22]
    assert splits.train.group_names == ["s0", "s1"] and splits.train.groups.tolist() == [0, 1, 0, 0, 1, 0]
    spec = get_spec(cfg)
    assert (spec.image_size, spec.channels, spec.label_names) == (6, 1, ("ant", "bee"))
    bad = validate_config({"data": {"dataset": "hf", "hf": {**hf, "label_column": "kind"}}}).data
    with pytest.raises(ConfigError, match=r"data.hf.label_column: no column 'kind'") as err:
        load_dataset(bad)
    _one_line_error(err, path)
    with pytest.raises(ConfigError, match="data.hf.split: no split 'validation'") as err:
        load_dataset(validate_config({"data": {"dataset": "hf", "hf": {**hf, "split": "validation"}}}).data)
    _one_line_error(err, path)
    with pytest.raises(ConfigError, match="set exactly one of image_column and audio_column"):
        validate_config({"data": {"dataset": "hf", "hf": {"path": str(path)}}})
    with pytest.raises(ConfigError, match="data.hf: required with data.dataset 'hf'"):
        validate_config({"data": {"dataset": "hf"}})


def test_hf_parquet_audio_with_string_labels(tmp_path):
    import datasets

    sr = 8000
    t = np.arange(sr // 4) / sr
    rows = {"clip": [], "word": []}
    for word, f in [("up", 300), ("down", 400), ("up", 350), ("down", 450), ("left", 500)]:
        buf = io.BytesIO()
        sf.write(buf, 0.4 * np.sin(2 * np.pi * f * t), sr, format="WAV")
        rows["clip"].append({"bytes": buf.getvalue(), "path": ""})
        rows["word"].append(word)
    # encoded WAV bytes typed as the library's Audio feature (its encoder would need torchcodec)
    ds = datasets.Dataset.from_dict(rows).cast_column("clip", datasets.Audio())
    path = tmp_path / "clips.parquet"
    ds.to_parquet(str(path))
    hf = {"path": str(path), "audio_column": "clip", "label_column": "word"}
    cfg = validate_config(
        {"data": {"dataset": "hf", "hf": hf, "num_test": 3, "audio": {"clip_seconds": 0.5}}}
    ).data
    raw = load_raw(cfg, dataset_root(cfg))
    assert raw.label_names == ["down", "left", "up"] and raw.y.tolist() == [
        2,
        0,
        2,
        0,
        1,
    ]  # sorted unique values
    assert raw.x.shape == (5, 8000) and raw.modality == "audio"
    spec = get_spec(cfg)  # what the prompts, the synthetic set and the model are made from
    assert (spec.modality, spec.label_names) == ("audio", ("down", "left", "up"))
    assert input_shape(cfg, cfg.audio)[0] == 1
    splits = load_dataset(cfg)
    assert len(splits.train) == 2 and splits.test.class_counts().tolist() == [1, 1, 1]  # stratified holdout
    bad = validate_config({"data": {"dataset": "hf", "hf": {**hf, "audio_column": "wave"}}}).data
    with pytest.raises(ConfigError, match=r"no column 'wave' in .*clips.parquet \(columns: clip, word\)"):
        load_dataset(bad)
    with pytest.raises(InputNotFoundError) as err:
        load_dataset(
            validate_config({"data": {"dataset": "hf", "hf": {**hf, "path": str(tmp_path / "no")}}}).data
        )
    _one_line_error(err, tmp_path / "no")


PLUGIN = """
import numpy as np
from gptfl_ray.data.base import ArrayDataset, Splits


def load(cfg):
    x = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    names = ["red", "green"]
    train = ArrayDataset(x=x[:4], y=np.array([0, 1, 0, 1]), label_names=names, modality="image")
    test = ArrayDataset(x=x[4:], y=np.array([1]), label_names=names, modality="image")
    return Splits(train=train, test=test)


def not_data():
    return [1, 2, 3]
"""


def test_plugin_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_tiny_data.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_tiny_data", raising=False)
    cfg = validate_config({"data": {"dataset": "my_tiny_data:load"}}).data
    splits = load_dataset(cfg)
    assert len(splits.train) == 4 and len(splits.test) == 1 and splits.test.y.tolist() == [1]
    spec = get_spec(cfg)
    assert (spec.modality, spec.label_names, spec.image_size, spec.channels) == (
        "image",
        ("red", "green"),
        4,
        3,
    )
    assert to_tensors(splits.train, cfg.dataset, cfg.audio)[0].shape == (4, 3, 4, 4)
    resized = validate_config({"data": {"dataset": "my_tiny_data:load", "image_size": 2}}).data
    assert load_dataset(resized).train.x.shape == (4, 2, 2, 3)
    with pytest.raises(
        InputError, match="my_tiny_data:not_data: returned list, expected an ArrayDataset or Splits"
    ):
        load_dataset(validate_config({"data": {"dataset": "my_tiny_data:not_data"}}).data)
    with pytest.raises(ConfigError, match="module 'my_tiny_data' has no function 'nope'"):
        validate_config({"data": {"dataset": "my_tiny_data:nope"}})
