"""``transformers`` backend with a tiny random causal LM built offline and loaded back by local path."""

from __future__ import annotations

import os

import pytest

from gptfl_ray.config import ExpanderConfig, PromptsConfig
from gptfl_ray.prompts import (
    build_prompt_table,
    count_fallbacks,
    expand_prompts,
    expand_rows,
    validate_expansion,
)
from tests.tiny_models import build_tiny_causal_lm

LABELS = ["cat", "dog", "ship"]  # words in the tiny model's vocabulary, so some samples contain them


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"  # any hub access would fail loudly
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm") / "model"))


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    cfg = PromptsConfig(num_per_class=6, seed=0)
    return build_prompt_table(cfg, LABELS, modality="image", label_text={}).to_pylist()


@pytest.fixture(scope="module")
def expanded(tiny_lm, rows) -> list[dict]:
    """The default-config expansion, computed once in-process (the reference for other tests)."""
    return expand_rows(rows, lm_cfg(tiny_lm))


def lm_cfg(model: str, **kw) -> ExpanderConfig:
    """A random tiny LM rarely names the class: most rows fall back, so the fallback cap is off here."""
    base = {"backend": "transformers", "model": model, "max_new_tokens": 12, "batch_size": 4}
    return ExpanderConfig(**{**base, "max_fallback_fraction": 1.0, **kw})


def key(rows):
    return sorted((r["label"], r["index"], r["prompt"], r["expansion_fallback"]) for r in rows)


def test_tiny_lm_loads_by_local_path(tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    assert model.config.num_hidden_layers == 2
    assert (
        tokenizer.chat_template
        and tokenizer.decode(tokenizer("a photo of a cat")["input_ids"]) == "a photo of a cat"
    )


def test_fallbacks_counted_and_match_validation(tiny_lm, rows, expanded):
    from gptfl_ray.prompts.backend_transformers import TransformersPromptExpander

    cfg = lm_cfg(tiny_lm)
    out = expanded
    assert len(out) == len(rows)
    # recompute from the raw generations: the fallback flag is exactly "validation rejected it"
    raw = TransformersPromptExpander(cfg).generate(rows)
    seen: dict[int, set] = {}
    expected = {}
    for r, text in zip(rows, raw, strict=True):
        ok = validate_expansion(
            text, r["label_text"], [], cfg.min_chars, cfg.max_chars, seen.setdefault(r["label"], set())
        )
        expected[(r["label"], r["index"])] = (ok or r["prompt"], ok is None)
    assert {(r["label"], r["index"]): (r["prompt"], r["expansion_fallback"]) for r in out} == expected
    n_fallback = count_fallbacks(out)
    assert n_fallback == sum(r["expansion_fallback"] for r in out)
    assert len(rows) / 2 < n_fallback < len(rows)  # random text: mostly rejected, but some name their class
    for r in out:
        if r["expansion_fallback"]:
            assert r["prompt"] == f"a photo of a {r['label_name']}"
        else:
            assert r["label_name"] in r["prompt"].split() and r["prompt"] != f"a photo of a {r['label_name']}"


def test_sampling_is_seeded_per_row(tiny_lm, rows, expanded):
    reordered = expand_rows(list(reversed(rows)), lm_cfg(tiny_lm, batch_size=5))
    assert key(reordered) == key(expanded)  # independent of batching and order


def count_generate_calls(monkeypatch) -> list[int]:
    """Record the batch size of every ``generate`` call of any transformers model (the real one still runs)."""
    from transformers.generation.utils import GenerationMixin

    sizes: list[int] = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        sizes.append(int(ids.shape[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    return sizes


def test_sampling_is_one_generate_call_per_batch_and_reproducible(tiny_lm, rows, expanded, monkeypatch):
    from gptfl_ray.prompts.backend_transformers import TransformersPromptExpander

    calls = count_generate_calls(monkeypatch)
    assert expand_rows(rows, lm_cfg(tiny_lm)) == expanded  # the same rows give the same table twice
    assert calls == [4, 4, 4, 4, 2]  # 18 rows, batch_size 4: one call per batch (it was one per row)
    raw = TransformersPromptExpander(lm_cfg(tiny_lm)).generate(rows)
    assert calls[5:] == [18]
    assert all(isinstance(t, str) and len(t.split()) <= 12 for t in raw)  # max_new_tokens word tokens
    assert sum(bool(t) for t in raw) > len(rows) / 2  # sampling, not an empty string per row


def test_row_sampler_samples_the_warped_distribution():
    """Greedy argmax over RowSampler's output is a draw from softmax(logits / T) restricted to top-p."""
    import torch

    from gptfl_ray.prompts.backend_transformers import RowSampler

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    ids = torch.zeros(4000, 1, dtype=torch.long)
    picks = RowSampler(1.0, 0, 1.0, list(range(4000)), "cpu")(ids, logits.clone()).argmax(-1)
    freq = torch.bincount(picks, minlength=4) / 4000
    assert torch.allclose(freq, probs, atol=0.03), freq
    nucleus = RowSampler(1.0, 0, 0.7, list(range(4000)), "cpu")(ids, logits.clone()).argmax(-1)
    assert set(nucleus.tolist()) == {0, 1}  # top-p 0.7 keeps the two most likely tokens
    again = RowSampler(1.0, 0, 1.0, list(range(4000)), "cpu")(ids, logits.clone()).argmax(-1)
    assert torch.equal(picks, again)  # each row's draw is its seed's


def test_synonyms_and_plain_text_mode(tiny_lm, rows):
    plain = expand_rows(rows, lm_cfg(tiny_lm, chat=False))
    with_syn = expand_rows(
        rows, lm_cfg(tiny_lm, chat=False, synonyms={"cat": ["sofa", "night"], "dog": ["park"]})
    )
    assert count_fallbacks(with_syn) < count_fallbacks(plain)
    accepted = [r for r in with_syn if not r["expansion_fallback"] and r["label_name"] == "cat"]
    assert accepted and all({"cat", "sofa", "night"} & set(r["prompt"].split()) for r in accepted)


def test_greedy_is_batched_and_padding_safe(tiny_lm, rows):
    subset = rows[:3] + rows[8:11]
    one = expand_rows(subset, lm_cfg(tiny_lm, temperature=0.0, batch_size=1))
    batched = expand_rows(subset, lm_cfg(tiny_lm, temperature=0.0, batch_size=6))
    assert key(one) == key(batched)


def test_chat_forced_without_template_is_an_error(tmp_path, rows):
    path = str(build_tiny_causal_lm(tmp_path / "no-chat", chat_template=None))
    with pytest.raises(ValueError, match=r"prompts\.expander\.chat"):
        expand_rows(rows[:2], lm_cfg(path, chat=True))
    assert len(expand_rows(rows[:2], lm_cfg(path))) == 2  # auto: plain text


def test_transformers_backend_in_ray_data_actor_pool(tiny_lm, rows, expanded, ray_session):
    import ray.data

    cfg = lm_cfg(tiny_lm, concurrency=1, num_cpus=1)
    ds = expand_prompts(ray.data.from_items(rows), cfg)
    out = ds.take_all()
    assert key(out) == key(expanded)  # same seeds -> same text in an actor as in-process
    assert count_fallbacks(ds) == count_fallbacks(out) > 0
    assert set(out[0]) == set(rows[0]) | {"expansion_fallback"}
