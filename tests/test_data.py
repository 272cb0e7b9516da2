import gzip

import numpy as np
import pytest
import soundfile as sf

from gptfl_ray.config import AudioConfig, DataConfig
from gptfl_ray.data import load_dataset
from gptfl_ray.data.features import audio_input_shape, to_tensors
from gptfl_ray.data.mnist import load_mnist, read_idx
from gptfl_ray.data.speech_commands import load_speech_commands, scan_speech_commands
from gptfl_ray.paths import DataNotFoundError

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_decodes_with_known_counts(data_dir):
    ds = load_mnist(data_dir / "mnist", "test")
    assert ds.x.shape == (10_000, 28, 28) and ds.x.dtype == np.uint8
    assert ds.class_counts().tolist() == MNIST_TEST_COUNTS
    assert ds.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(float(ds.x.mean()) - 33.79) < 0.01


def test_mnist_md5_mismatch_and_missing(tmp_path, data_dir):
    with pytest.raises(DataNotFoundError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path, "test")
    raw = gzip.decompress((data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="md5 mismatch"):
        load_mnist(tmp_path, "test")
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").shape == (10_000,)


def test_mnist_holdout_split(data_dir):
    splits = load_dataset(DataConfig(dataset="mnist", test_split="holdout", num_test=2000))
    assert len(splits.train) == 8000 and len(splits.test) == 2000
    # stratified: every class is in both parts in proportion
    assert np.all(np.abs(splits.test.class_counts() - np.array(MNIST_TEST_COUNTS) / 5) <= 1)
    x, _y = to_tensors(splits.test, "mnist", AudioConfig())
    assert x.shape == (2000, 1, 28, 28) and abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2


@pytest.mark.slow
def test_fsdd_counts_speakers_and_official_split(data_dir):
    splits = load_dataset(DataConfig(dataset="fsdd"))
    train, test = splits.train, splits.test
    assert len(train) + len(test) == 3000 and len(test) == 300
    assert train.group_names == ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
    assert (train.class_counts() + test.class_counts()).tolist() == [300] * 10
    assert np.bincount(np.concatenate([train.groups, test.groups])).tolist() == [500] * 6
    assert train.x.shape[1] == 16_000 and train.sample_rate == 16_000
    assert np.abs(train.x).max() <= 0.9 + 1e-6
    x, _ = to_tensors(test, "fsdd", AudioConfig())
    assert x.shape == (300, *audio_input_shape(AudioConfig()))


def _tone(path, sr=16000, freq=440.0, dur=0.5):
    t = np.arange(int(sr * dur)) / sr
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, 0.3 * np.sin(2 * np.pi * freq * t), sr)


def test_speech_commands_layout(tmp_path):
    root = tmp_path / "speech_commands"
    files = {
        "yes/0a7c2a8d_nohash_0.wav": ("yes", "0a7c2a8d"),
        "yes/0a7c2a8d_nohash_1.wav": ("yes", "0a7c2a8d"),
        "no/c50f55b8_nohash_0.wav": ("no", "c50f55b8"),
        "up/0a7c2a8d_nohash_2.wav": ("up", "0a7c2a8d"),
        "up/ffd2ba2f_nohash_0.wav": ("up", "ffd2ba2f"),
    }
    for rel in files:
        _tone(root / rel, freq=200 + 50 * len(rel))
    _tone(root / "_background_noise_" / "white_noise.wav")
    (root / "testing_list.txt").write_text("up/ffd2ba2f_nohash_0.wav\n")
    scanned = scan_speech_commands(root)
    assert {(c[0]): (c[1], c[2]) for c in scanned} == files
    splits = load_speech_commands(root, AudioConfig(clip_seconds=1.0))
    assert splits.train.label_names == ["no", "up", "yes"]
    assert splits.train.group_names == ["0a7c2a8d", "c50f55b8", "ffd2ba2f"]
    assert len(splits.test) == 1 and splits.test.groups.tolist() == [2] and splits.test.y.tolist() == [1]
    assert sorted(splits.train.groups.tolist()) == [0, 0, 0, 1]
    assert splits.train.x.shape == (4, 16_000)


def test_missing_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="FSDD missing: put the WAV files"):
        load_dataset(DataConfig(dataset="fsdd"), tmp_path)
    with pytest.raises(DataNotFoundError, match=r"cifar10 missing.*download=True"):
        load_dataset(DataConfig(dataset="cifar10"), tmp_path)


def test_esc50_layout(tmp_path):
    from gptfl_ray.data.esc50 import load_esc50

    root = tmp_path / "esc50"
    rows = [
        ("1-100-A-0.wav", 1, 0, "dog"),
        ("5-200-A-1.wav", 5, 1, "chirping_birds"),
        ("2-300-B-0.wav", 2, 0, "dog"),
    ]
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for name, fold, target, cat in rows:
        _tone(root / "audio" / name, sr=44_100, freq=300 + 100 * target, dur=5.0)
        lines.append(f"{name},{fold},{target},{cat},False,x,A")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    splits = load_esc50(root, AudioConfig(clip_seconds=1.0))
    assert splits.train.label_names == ["dog", "chirping birds"]
    assert len(splits.train) == 2 and splits.test.y.tolist() == [1]
    assert splits.test.x.shape == (1, 16_000)


def test_decoded_clips_are_cached_and_invalidated(tmp_path, monkeypatch, caplog):
    from gptfl_ray.data.audio import load_clips, read_wav, standardize_clip

    monkeypatch.setenv("GPTFL_CACHE_DIR", str(tmp_path / "cache"))
    files = [tmp_path / "wav" / f"{i}.wav" for i in range(4)]
    for i, f in enumerate(files):
        _tone(f, sr=8_000, freq=300 + 100 * i, dur=0.3 + 0.2 * i)
    cfg = AudioConfig(clip_seconds=0.5)
    first = load_clips(files, cfg)
    expected = np.stack([standardize_clip(*read_wav(f), 16_000, 0.5) for f in files])
    np.testing.assert_array_equal(first, expected)
    (cached,) = (tmp_path / "cache" / "clips").glob("*.npy")

    again = load_clips(files, cfg)  # served from the cache: same values, the file is not rewritten
    np.testing.assert_array_equal(again, expected)
    assert list((tmp_path / "cache" / "clips").glob("*.npy")) == [cached]

    _tone(files[0], sr=8_000, freq=900, dur=0.3)  # an edited file is decoded again
    edited = load_clips(files, cfg)
    assert not np.array_equal(edited[0], expected[0]) and np.array_equal(edited[1:], expected[1:])
    (edited_entry,) = set((tmp_path / "cache" / "clips").glob("*.npy")) - {cached}
    assert load_clips(files, AudioConfig(clip_seconds=0.25)).shape == (4, 4_000)  # new settings, new entry
    assert len(list((tmp_path / "cache" / "clips").glob("*.npy"))) == 3

    edited_entry.write_bytes(b"not an npy file")  # a damaged entry is decoded again and replaced
    with caplog.at_level("WARNING", logger="gptfl_ray.data.audio"):
        np.testing.assert_array_equal(load_clips(files, cfg), edited)
    assert "unreadable clip cache" in caplog.text
    np.testing.assert_array_equal(np.load(edited_entry), edited)


def test_missing_audio_file_names_it(tmp_path, monkeypatch):
    from gptfl_ray.data.audio import load_clips

    monkeypatch.setenv("GPTFL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match=r"gone\.wav: audio file missing"):
        load_clips([tmp_path / "gone.wav"], AudioConfig())
