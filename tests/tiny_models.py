"""Tiny random language models built offline, for tests (no hub access anywhere).

Each builder trains its tokenizer with ``tokenizers``, builds the model from a config (``from_config``-style,
random weights), and writes both with ``save_pretrained`` so the code under test loads them by local path
through the same ``from_pretrained`` call a hub id takes. Generator builders live in tests/tiny_generators.py.
"""

from __future__ import annotations

from pathlib import Path

# A small closed vocabulary: with ~50 words a random model's 12-token sample contains a given class word
# about a fifth of the time, so most expansions fail validation and some pass — both paths get exercised.
TINY_LM_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "a photo of a dog running in the green park",
    "a small bird on a tree branch at night",
    "a sketch of a horse near the old barn",
    "the ship sails on a calm blue sea",
    "a bright painting of a seven and a three",
    "a sound of rain on the window",
    "rewrite the prompt as one short vivid sentence",
    "keep the words reply with the sentence only",
]

# Minimal chat template (Jinja, as transformers expects) so the chat code path can run on the tiny model.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def train_wordlevel_tokenizer(corpus: list[str], *, chat_template: str | None = None):
    """A word-level fast tokenizer trained offline on ``corpus`` (lower-cased, whitespace/punctuation split)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"], min_frequency=1)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def build_tiny_causal_lm(
    path: str | Path,
    *,
    corpus: list[str] | None = None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a 2-layer random Llama + word-level tokenizer to ``path``; return the path (a model id).

    The defaults are the smallest that run on CPU; GPU engines such as vLLM want a standard head size
    (``hidden_size / num_attention_heads`` = 64, e.g. 128 and 2).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = Path(path)
    tokenizer = train_wordlevel_tokenizer(corpus or TINY_LM_CORPUS, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=max(1, num_attention_heads // 2),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
