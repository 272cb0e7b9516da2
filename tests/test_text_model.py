"""Text models over token ids: ``text_cnn`` (from scratch, hashed words) and ``hf:<path>`` (a Hugging Face
sequence-classification model; a tiny random BERT and a word-level tokenizer built offline and saved with
``save_pretrained``, loaded back by local path as a hub id would be)."""

from __future__ import annotations

import pytest
import torch

from gptfl_ray.config import validate_config
from gptfl_ray.data import load_dataset
from gptfl_ray.data.features import to_tensors
from gptfl_ray.data.text import HASH_VOCAB
from gptfl_ray.errors import ConfigError, InputError
from gptfl_ray.models import build_model, count_parameters
from tests.test_text_data import write_meld

CORPUS = ["oh my god he is lost", "what", "you are a genius", "i can not believe you did that", "yay"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 1-layer random BERT classifier (2 labels) + a word-level tokenizer with [CLS]/[SEP], saved offline."""
    from tokenizers import processors
    from transformers import BertConfig, BertForSequenceClassification

    from tests.tiny_models import train_wordlevel_tokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = train_wordlevel_tokenizer(CORPUS)
    tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    cls, sep = tok.cls_token_id, tok.sep_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_text_cnn_shapes_padding_and_head():
    import gptfl_ray.fl  # noqa: F401  (models.heads imported first is a circular import through fl.strategies)
    from gptfl_ray.models.heads import classifier_head

    torch.manual_seed(0)
    model = build_model("text_cnn", 7, (8,)).eval()
    ids = torch.tensor([[5, 17, 3, HASH_VOCAB - 1, -1, -1, -1, -1], [-1] * 8])
    out = model(ids)
    assert out.shape == (2, 7) and torch.isfinite(out).all()  # an empty text: all padding, still finite
    assert torch.equal(model(ids.float()), out)  # pretraining's Ray Data batches carry ids as float32
    longer = torch.cat([ids, torch.full((2, 4), -1)], dim=1)  # more padding does not change the output
    torch.testing.assert_close(model(longer), out)
    assert classifier_head(model)[0] == "classifier"  # FedGen / Fed-ET split the head off
    assert 1_000_000 < count_parameters(model) < 1_200_000
    with pytest.raises(ValueError, match=r"text_cnn reads token ids of a text dataset \(inputs \(L,\)\)"):
        build_model("text_cnn", 7, (1, 28, 28))


def test_hf_model_reads_its_own_tokenizer_and_fine_tunes(tiny_bert, tmp_path):
    from gptfl_ray.validate import validate_run

    write_meld(tmp_path / "meld")
    cfg = validate_config(
        {
            "data": {"dataset": "meld", "label_column": "sentiment", "text": {"max_length": 12}},
            "model": {"name": f"hf:{tiny_bert}"},
            "data_dir": str(tmp_path),
        }
    )
    assert cfg.data.text.tokenizer == str(tiny_bert)  # the model's own tokenizer, filled in
    validate_run(cfg, steps=("pretrain", "federate"))  # builds it on the meta device: shapes only
    splits = load_dataset(cfg.data, tmp_path)
    x, y = to_tensors(splits.train, cfg.data.dataset, cfg.data.audio)
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(tiny_bert)(splits.train.x[1])["input_ids"]  # "What?"
    assert (
        x.shape == (7, 12)
        and x[1, : len(expected)].tolist() == expected
        and (x[1, len(expected) :] == -1).all()
    )
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 3, (12,))  # a fresh 3-class head on the 2-label checkpoint
    model.eval()
    out = model(x)
    assert out.shape == (7, 3)
    torch.testing.assert_close(model(torch.cat([x, torch.full((7, 5), -1)], 1)), out)  # padding is masked
    # fine-tuning moves the encoder, not only the head
    model.train()
    before = model.net.bert.embeddings.word_embeddings.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(x.float()), y).backward()
    opt.step()
    assert not torch.equal(before, model.net.bert.embeddings.word_embeddings.weight)


def test_text_model_errors(tiny_bert, tmp_path):
    write_meld(tmp_path / "meld")
    base = {"data": {"dataset": "meld"}, "data_dir": str(tmp_path)}
    with pytest.raises(
        ConfigError, match=r"model: text_cnn reads the hashing tokenizer's ids: leave data\.text"
    ):
        validate_config(
            {
                **base,
                "data": {"dataset": "meld", "text": {"tokenizer": str(tiny_bert)}},
                "model": {"name": "text_cnn"},
            }
        )
    with pytest.raises(ConfigError, match=r"model\.name: no model folder '/nowhere/bert'"):
        validate_config({**base, "model": {"name": "hf:/nowhere/bert"}})
    with pytest.raises(ConfigError, match=r"model\.width: a hf: model takes no model\.width"):
        validate_config({**base, "model": {"name": f"hf:{tiny_bert}", "width": 8}})
    from gptfl_ray.validate import validate_run

    with pytest.raises(
        ConfigError, match=r"model\.name: 'convnet' does not fit meld inputs \(64,\): convnet takes"
    ):
        validate_run(validate_config({**base, "model": {"name": "convnet"}}), steps=("pretrain",))
    cfg = validate_config(
        {**base, "data": {"dataset": "meld", "text": {"tokenizer": str(tmp_path / "no-tok")}}}
    )
    with pytest.raises(InputError, match=r"data\.text\.tokenizer: cannot load the tokenizer '.*no-tok'"):
        to_tensors(load_dataset(cfg.data, tmp_path).test, "meld", cfg.data.audio)
