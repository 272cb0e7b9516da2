"""Text classifiers over token ids (N, L), -1 = padding (gptfl_ray/data/text.py makes them from the texts).

- ``text_cnn`` (``TextCNN``): trained from scratch; a CNN for sentence classification after Kim (2014): word
  embeddings of the hashing tokenizer's ids (``HASH_VOCAB`` × 64; the tokenizer is trained on nothing, so it leaks
  no client's or test text to the server and is the same for every arm of a run), convolutions of widths 3, 4
  and 5 (64 filters each, ReLU), max-pooled over the real tokens, dropout 0.5, a linear head. ~1.1 M parameters.
- ``hf:<hub id or local path>`` (``HFSequenceClassifier``): any Hugging Face sequence-classification model
  (``AutoModelForSequenceClassification``), its weights loaded and a fresh, seeded head of ``num_classes``
  outputs where the checkpoint's does not fit; it reads its own tokenizer's ids (``data.text.tokenizer``
  defaults to the model's path). GPT-FL fine-tunes it on the synthetic text, then FL fine-tunes it on the
  clients'; its "random init" arm is FL from the checkpoint without synthetic pretraining.

Both take ids as int64 or float32 (pretraining's Ray Data batches are float32; ids below 2^24 are exact) and
return logits; the head is the last ``nn.Linear`` (gptfl_ray/models/heads.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gptfl_ray.data.text import HASH_VOCAB
from gptfl_ray.errors import ConfigError, shorten


def _check_shape(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 1:
        raise ValueError(f"{name} reads token ids of a text dataset (inputs (L,)), not {tuple(input_shape)}")


class TextCNN(nn.Module):
    """Embeddings -> parallel 1-D convolutions -> max over the real tokens -> dropout -> linear head."""

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        *,
        vocab: int = HASH_VOCAB,
        dim: int = 64,
        filters: int = 64,
        kernels: tuple[int, ...] = (3, 4, 5),
        dropout: float = 0.5,
    ):
        super().__init__()
        _check_shape("text_cnn", input_shape)
        self.embed = nn.Embedding(vocab, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, filters, k, padding=k // 2) for k in kernels)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(filters * len(kernels), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        mask = ids >= 0  # (N, L): real tokens
        h = (self.embed(ids.clamp_min(0)) * mask.unsqueeze(-1)).transpose(1, 2)  # (N, dim, L)
        length = ids.shape[1]
        keep = mask.unsqueeze(1).to(h.dtype)
        # ReLU outputs are >= 0, so zeroing the padded positions leaves the max over the real tokens
        pooled = [(F.relu(conv(h))[..., :length] * keep).amax(dim=-1) for conv in self.convs]
        return self.classifier(self.dropout(torch.cat(pooled, dim=1)))


class HFSequenceClassifier(nn.Module):
    """A Hugging Face ``AutoModelForSequenceClassification`` (hub id or local path) over token ids."""

    def __init__(self, path: str, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        _check_shape(f"hf:{path}", input_shape)
        from transformers import AutoConfig, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        # quiet: its load report (a fresh head) and progress bar would come from every client actor's build
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            if torch.get_default_device().type == "meta":  # config validation: shapes only, no weights read
                config = AutoConfig.from_pretrained(path, num_labels=num_classes)
                self.net = AutoModelForSequenceClassification.from_config(config)
            else:
                self.net = AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_classes, ignore_mismatched_sizes=True, dtype=torch.float32
                )
        except (OSError, ValueError, KeyError) as err:
            first = shorten(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__, 160)
            raise ConfigError(
                f"model.name: cannot load the Hugging Face sequence-classification model {path!r} ({first})"
            ) from None
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        config = self.net.config
        # e.g. GPT-2 has no pad token; its classifier finds each text's last token by the pad id
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id if config.eos_token_id is not None else 0
        self.pad = int(config.pad_token_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        if ids.device.type == "meta":  # config validation: transformers' forward reads values (.item())
            return torch.empty(ids.shape[0], self.net.config.num_labels, device="meta")
        mask = ids >= 0
        return self.net(input_ids=ids.masked_fill(~mask, self.pad), attention_mask=mask.long()).logits


__all__ = ["HFSequenceClassifier", "TextCNN"]
