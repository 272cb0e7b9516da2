"""Text datasets: a tiny MELD layout (the released CSVs' columns and quoting) and the generic ``textfile`` layout
(CSV / JSON Lines) written by the tests; counts, label maps, speaker groups, token ids, one-line errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from gptfl_ray.config import DataConfig, validate_config
from gptfl_ray.data import load_dataset
from gptfl_ray.data.base import get_spec
from gptfl_ray.data.features import input_shape, to_tensors
from gptfl_ray.data.partition import natural
from gptfl_ray.data.text import PAD, text_ids, words
from gptfl_ray.errors import ConfigError, InputError, InputNotFoundError

MELD_COLUMNS = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
]
TRAIN = [
    ("Oh my God, he’s lost it. He’s totally lost it.", "Phoebe", "sadness", "negative"),
    ("What?", "Monica", "surprise", "negative"),
    ("Or! Or, we could go to the bank, close our accounts.", "Ross", "neutral", "neutral"),
    ("You’re a genius!", "Phoebe", "joy", "positive"),
    ("I can’t believe you did that!", "Monica", "anger", "negative"),
    ("Eww, gross.", "Ross", "disgust", "negative"),
    ("Something’s out there.", "Phoebe", "fear", "negative"),
]
TEST = [
    ("Why do all you’re coffee mugs have numbers on the bottom?", "Mark", "surprise", "positive"),
    ("Oh. That’s so Monica can keep track.", "Rachel", "neutral", "neutral"),
    ("Yay!", "Phoebe", "joy", "positive"),
]


def write_meld(root, train=TRAIN, test=TEST, columns=MELD_COLUMNS):
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_sent_emo.csv", train), ("test_sent_emo.csv", test)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)  # quotes the fields with commas, as the released files do
            w.writerow(columns)
            for i, (utt, spk, emo, sen) in enumerate(rows):
                full = {"Sr No.": i + 1, "Utterance": utt, "Speaker": spk, "Emotion": emo, "Sentiment": sen}
                w.writerow([full.get(c, 0) for c in columns])
    return root


def test_meld_emotion_labels_speakers_and_official_test(tmp_path):
    root = write_meld(tmp_path / "meld")
    cfg = DataConfig(dataset="meld", root=root)
    splits = load_dataset(cfg)
    assert len(splits.train) == 7 and len(splits.test) == 3  # official split: test_sent_emo.csv
    names = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
    assert splits.train.label_names == names and splits.train.modality == "text"
    assert splits.train.y.tolist() == [5, 6, 4, 3, 0, 1, 2] and splits.test.y.tolist() == [6, 4, 3]
    assert splits.train.x[0] == "Oh my God, he’s lost it. He’s totally lost it."  # quoted commas, UTF-8
    # speakers: one id space over both splits (Mark and Rachel speak only in the test split)
    assert splits.train.group_names == ["Mark", "Monica", "Phoebe", "Rachel", "Ross"]
    assert splits.train.groups.tolist() == [2, 1, 4, 2, 1, 4, 2] and splits.test.groups.tolist() == [0, 3, 2]
    parts = natural(splits.train.groups, 1, seed=0)  # partition.method natural: one client per speaker
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    spec = get_spec(cfg)
    assert (spec.modality, spec.num_classes, spec.natural_groups) == ("text", 7, True)


def test_meld_sentiment_labels(tmp_path):
    root = write_meld(tmp_path / "meld")
    cfg = DataConfig(dataset="meld", root=root, label_column="sentiment")
    splits = load_dataset(cfg)
    assert splits.train.label_names == ["negative", "neutral", "positive"]
    assert splits.train.y.tolist() == [0, 0, 1, 2, 0, 0, 0] and splits.test.y.tolist() == [2, 1, 2]
    assert get_spec(cfg).label_names == ("negative", "neutral", "positive")


def test_meld_found_in_the_data_dir_and_tokenized(tmp_path):
    write_meld(tmp_path / "meld")
    cfg = validate_config(
        {"data": {"dataset": "meld", "text": {"max_length": 6}}, "data_dir": str(tmp_path)}
    ).data
    splits = load_dataset(cfg, tmp_path)
    x, y = to_tensors(splits.test, cfg.dataset, cfg.audio)
    assert y.tolist() == [6, 4, 3]
    assert x.dtype == torch.int64 and x.shape == (3, 6) and input_shape(cfg, cfg.audio, tmp_path) == (6,)
    # "Yay!" -> 2 words, the rest padding; long texts are cut at max_length
    assert (x[2] == PAD).sum() == 4 and (x[0] != PAD).all()
    # the hashing tokenizer: lower case, curly quotes made straight, punctuation split off, same word same id
    assert words("You’re SO Monica!") == ["you", "'", "re", "so", "monica", "!"]
    ids = text_ids(["You’re here", "you're", "YOU"])
    assert ids[0, :3].tolist() == ids[1, :3].tolist() and ids[0, 0] == ids[2, 0] and ids[0, 3] != ids[0, 0]
    assert to_tensors(splits.test, cfg.dataset, cfg.audio)[0].equal(x)  # deterministic


def test_meld_bad_layouts(tmp_path):
    root = write_meld(tmp_path / "meld")
    (root / "test_sent_emo.csv").unlink()
    with pytest.raises(InputNotFoundError, match=r"MELD missing: put test_sent_emo\.csv in .*meld") as err:
        load_dataset(DataConfig(dataset="meld", root=root))
    assert "\n" not in str(err.value)
    bad = write_meld(tmp_path / "nocol", columns=[c for c in MELD_COLUMNS if c != "Emotion"])
    with pytest.raises(
        InputError, match=r"train_sent_emo\.csv: no column 'Emotion' \(data\.label_column; columns"
    ):
        load_dataset(DataConfig(dataset="meld", root=bad))
    odd = write_meld(tmp_path / "odd", train=[*TRAIN, ("Hm.", "Ross", "boredom", "neutral")])
    with pytest.raises(
        InputError, match=r"train_sent_emo\.csv: line 9: emotion 'boredom' is not one of anger"
    ):
        load_dataset(DataConfig(dataset="meld", root=odd))
    with pytest.raises(
        ConfigError, match=r"data\.label_column: MELD's labels are 'emotion' .* not 'Speaker'"
    ):
        validate_config({"data": {"dataset": "meld", "label_column": "Speaker"}})
    with pytest.raises(ConfigError, match=r"data\.text_column is not used by data\.dataset 'meld'"):
        validate_config({"data": {"dataset": "meld", "text_column": "Utterance"}})
    with pytest.raises(ConfigError, match=r"data\.label_column is not used by data\.dataset 'mnist'"):
        validate_config({"data": {"dataset": "mnist", "label_column": "emotion"}})


def test_textfile_csv_holds_out_a_test_set(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [("great, loved it", "pos", "ann"), ("awful", "neg", "bob"), ("fine I guess", "neu", "ann")] * 4
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars", "author"])
        w.writerows(rows)
    cfg = DataConfig(
        dataset="textfile",
        root=path,
        text_column="review",
        label_column="stars",
        group_column="author",
        num_test=3,
    )
    splits = load_dataset(cfg)
    assert len(splits.train) == 9 and splits.test.class_counts().tolist() == [1, 1, 1]
    assert splits.train.label_names == ["neg", "neu", "pos"] and splits.train.group_names == ["ann", "bob"]
    assert get_spec(cfg).label_names == ("neg", "neu", "pos") and get_spec(cfg).modality == "text"
    assert to_tensors(splits.train, cfg.dataset, cfg.audio)[0].shape == (9, 64)


def test_textfile_jsonl_train_test_numeric_labels(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    train = [{"text": f"sample {i}", "label": i % 11} for i in range(22)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "test.jsonl").write_text(json.dumps({"text": "x", "label": 10}) + "\n\n")
    splits = load_dataset(DataConfig(dataset="textfile", root=root))
    assert splits.train.label_names == [str(i) for i in range(11)]  # numbers sort as numbers
    assert splits.test.y.tolist() == [10] and splits.train.groups is None


def test_textfile_bad_layouts(tmp_path):
    def fails(content, match, name="train.jsonl", **kw):
        root = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        (root / name).write_text(content)
        (root / "test.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
        with pytest.raises((InputError, InputNotFoundError), match=match) as err:
            load_dataset(DataConfig(dataset="textfile", root=root, **kw))
        assert "\n" not in str(err.value)

    fails('{"text": "a", "label": "a"}\nnot json\n', r"train\.jsonl: line 2: not JSON")
    fails('{"text": 5, "label": "a"}\n', r"train\.jsonl: line 1: column 'text' is not text \(got int\)")
    fails(
        '{"body": "a", "label": "a"}\n',
        r"train\.jsonl: no column 'text' \(data\.text_column; columns: body, label\)",
    )
    fails('{"text": "a", "label": "b"}\n', r"test\.jsonl column 'label': value 'a' is not among")
    fails("text,label\na,a,extra\n", r"train\.csv: line 2: more fields than the header's", name="train.csv")
    fails("", r"train\.jsonl: no records")
    with pytest.raises(InputError, match=r"expected train\.csv\|jsonl and test\.csv\|jsonl"):
        load_dataset(DataConfig(dataset="textfile", root=tmp_path / "case0" / ".."))
    with pytest.raises(
        InputNotFoundError, match=r"nowhere\.csv: text file or folder not found \(data\.root\)"
    ):
        load_dataset(DataConfig(dataset="textfile", root=tmp_path / "nowhere.csv"))
    with pytest.raises(
        ConfigError, match=r"data\.root: the \.csv/\.jsonl file .* required with data\.dataset"
    ):
        validate_config({"data": {"dataset": "textfile"}})


TEXT_PLUGIN = """
import numpy as np
from gptfl_ray.data.base import ArrayDataset


def load(cfg):
    x = np.array(["so happy today", "this is awful", "great news", "terrible day"], dtype=object)
    return ArrayDataset(x=x, y=np.array([0, 1, 0, 1]), label_names=["joy", "anger"], modality="text")


def not_texts(cfg):
    return ArrayDataset(x=np.zeros((2, 3)), y=np.array([0, 1]), label_names=["a", "b"], modality="text")
"""


def test_plugin_function_returning_texts(tmp_path, monkeypatch):
    import sys

    (tmp_path / "my_text_data.py").write_text(TEXT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_text_data", raising=False)
    cfg = validate_config({"data": {"dataset": "my_text_data:load", "num_test": 2}}).data
    splits = load_dataset(cfg)
    assert len(splits.train) == 2 and len(splits.test) == 2 and splits.train.modality == "text"
    ids = to_tensors(splits.train, cfg.dataset, cfg.audio)[0]
    assert ids.dtype == torch.int64 and ids.shape == (2, *input_shape(cfg, cfg.audio))
    with pytest.raises(InputError, match=r"my_text_data:not_texts: texts must be a 1-D array of str"):
        load_dataset(validate_config({"data": {"dataset": "my_text_data:not_texts"}}).data)
