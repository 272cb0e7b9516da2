"""Text generators: the phrase grammar (offline default, not an LLM) and the LLM generator through the prompt
backends (a tiny random causal LM saved offline; a local OpenAI-compatible stub). Cleaning, length bounds,
de-duplication within a shard, retries, row-exact shards through the Ray Data pipeline, and the reader."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptfl_ray.config import ConfigError, GenerateConfig, PromptsConfig, validate_config
from gptfl_ray.data.base import DatasetSpec, get_spec, known_datasets, register
from gptfl_ray.generate.base import Target
from gptfl_ray.generate.registry import get_generator
from gptfl_ray.generate.text_common import attempt_seed, clean_utterance, dedupe_key, word_count
from gptfl_ray.prompts.templates import build_prompt_table
from tests.test_expand_openai import INSTRUCTION, server  # noqa: F401  (the stub server fixture)
from tests.tiny_models import build_tiny_causal_lm

LABELS = ["joy", "anger", "neutral"]
TEXT_DATASET = "test-text-3"  # a text dataset known by name only (generation needs no samples)
DIALOGUE = [
    "oh my god we did it",
    "i am so happy for you",
    "get out of my apartment now",
    "i can not believe you did that",
    "what time is the party tonight",
    "please do not leave me here",
    "that is the best news ever",
]


def target(labels=LABELS) -> Target:
    return Target("text", label_names=tuple(labels), label_text=tuple(labels))


def prompt_batch(labels=LABELS, n=4, seed=0, domain=None) -> dict[str, np.ndarray]:
    """The prompt table as the pipeline hands it to a generator (numpy columns, a global ``row``)."""
    table = build_prompt_table(
        PromptsConfig(num_per_class=n, seed=seed, domain=domain), labels, modality="text", label_text={}
    )
    table = table.append_column("row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    return {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}


def make(name: str, rows_per_shard=500, labels=LABELS, **options):
    cfg = GenerateConfig(generator=name, rows_per_shard=rows_per_shard, options=options)
    return get_generator(name)(cfg, target(labels))


def texts_meta(table: pa.Table) -> tuple[list[str], list[dict]]:
    return table["text"].to_pylist(), [json.loads(m) for m in table["meta"].to_pylist()]


def assert_unique_per_shard_label(rows: list[int], labels: list[int], texts: list[str], rps: int) -> None:
    keys = [(r // rps, lab, dedupe_key(t)) for r, lab, t in zip(rows, labels, texts, strict=True)]
    assert len(set(keys)) == len(keys)


# ----------------------------------------------------------------------------------------- shared parts
def test_clean_utterance_keeps_one_line_without_tags_quotes_or_directions():
    assert clean_utterance('Ross: "Oh my God, you did it!"\nRachel: Yes!') == "Oh my God, you did it!"
    assert clean_utterance("\n  (sighs) I just... [pause]   can't.  ") == "I just... can't."
    assert clean_utterance("Mr. Geller (angrily): *slams door* Get out!") == "Get out!"
    assert clean_utterance("“Fine.”") == "Fine."
    assert clean_utterance("   \n ") == "" and clean_utterance(None) == ""
    assert dedupe_key("Oh my  God!") == dedupe_key("oh my god") != dedupe_key("oh my god, no")


def test_attempt_seeds_start_at_the_row_seed_and_differ():
    seeds = [attempt_seed(12345, k) for k in range(50)]
    assert seeds[0] == 12345 and len(set(seeds)) == 50
    assert all(0 <= s < 2**63 for s in seeds) and attempt_seed(12345, 3) == seeds[3]


def test_options_errors_name_the_field():
    grammar, llm = get_generator("text-grammar"), get_generator("text-llm")
    with pytest.raises(ConfigError, match=r"generate\.options\.max_words: .*>= min_words \(5\)"):
        grammar.parse_options({"min_words": 5, "max_words": 3})
    with pytest.raises(ConfigError, match=r"generate\.options\.domains: .*'space'"):
        grammar.parse_options({"domains": ["space"]})
    with pytest.raises(ConfigError, match=r"generate\.options\.styles"):
        grammar.parse_options({"styles": ["shouting"]})
    with pytest.raises(ConfigError, match=r"generate\.options\.instruction: .*\{prompt\}"):
        llm.parse_options({"instruction": "Write a line about {label}."})
    with pytest.raises(ConfigError, match=r"generate\.options\.base_url: required for backend 'openai'"):
        llm.prompt_modality(llm.parse_options({"backend": "openai"}), "text")
    with pytest.raises(ConfigError, match="makes image but data.dataset is a text dataset"):
        get_generator("glyphs").prompt_modality(get_generator("glyphs").parse_options({}), "text")
    assert grammar.prompt_modality(grammar.parse_options({}), "text") == "text"


# --------------------------------------------------------------------------------------------- grammar
def test_grammar_same_seed_same_text_and_row_alone_same_text():
    batch = prompt_batch(n=6)
    first, meta = texts_meta(make("text-grammar")(batch))
    again, _ = texts_meta(make("text-grammar")(batch))
    assert first == again and len(first) == 18
    other, _ = texts_meta(make("text-grammar")(prompt_batch(n=6, seed=1)))
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 15  # the seeds drive the choices
    # A text accepted at its first attempt is its row's alone: it does not depend on its batch-mates.
    gen = make("text-grammar")
    for i in [i for i, m in enumerate(meta) if m["attempt"] == 0][:5]:
        one = {k: v[i : i + 1] for k, v in batch.items()}
        assert texts_meta(gen(one))[0] == [first[i]]
    banks = {m["bank"] for m in meta}
    assert banks == set(LABELS)


def test_grammar_dedup_within_shard_and_word_bounds_with_retries():
    rps = 150
    batch = prompt_batch(labels=["joy"], n=300)
    gen = make("text-grammar", rows_per_shard=rps, min_words=5, max_words=9)
    out = gen({k: v[:rps] for k, v in batch.items()})  # the pipeline hands the generator one shard
    out2 = gen({k: v[rps:] for k, v in batch.items()})
    table = pa.concat_tables([out, out2])
    texts, meta = texts_meta(table)
    assert table.num_rows == 300 and table["row"].to_pylist() == list(range(300))
    assert all(5 <= word_count(t) <= 9 for t in texts)
    assert_unique_per_shard_label(table["row"].to_pylist(), table["label"].to_pylist(), texts, rps)
    reasons = {r for m in meta for r in m["rejected"]}
    assert {"duplicate", "too long"} <= reasons  # the checks ran and retried, rows were not dropped
    assert all(sum(m["rejected"].values()) == m["attempt"] for m in meta)


def test_grammar_impossible_bounds_fail_instead_of_dropping_rows():
    gen = make("text-grammar", min_words=40, max_words=45, max_attempts=5)
    match = r"generate\.options\.max_attempts: 2 row\(s\).*too short ×10.*min_words"
    with pytest.raises(RuntimeError, match=match):
        gen(prompt_batch(labels=["fear"], n=2))


def test_grammar_unknown_label_speaks_its_text_and_aliases_find_banks():
    labels = ["serenity", "Happy"]
    texts, meta = texts_meta(make("text-grammar", labels=labels)(prompt_batch(labels=labels, n=8)))
    assert all("serenity" in t for t in texts[:8]) and {m["bank"] for m in meta[:8]} == {"generic"}
    assert {m["bank"] for m in meta[8:]} == {"joy"}


# ------------------------------------------------------------------------------------- through the pipeline
@pytest.fixture(scope="module")
def text_dataset() -> str:
    if TEXT_DATASET not in known_datasets():
        register(DatasetSpec(name=TEXT_DATASET, modality="text", num_classes=3, label_names=tuple(LABELS)))
    return TEXT_DATASET


def text_cfg(dataset: str, generator: str, n: int, rps: int, **generate):
    return validate_config(
        {
            "data": {"dataset": dataset},
            "prompts": {"num_per_class": n, "domain": "TV-sitcom"},
            "generate": {"generator": generator, "rows_per_shard": rps, "batch_size": 2, **generate},
        }
    )


def shard_texts_by_direct_call(gen, out) -> list[str]:
    """Each shard regenerated in-process from the stored prompt table: what the pipeline must have written."""
    table = pq.read_table(out / "prompts.parquet")
    rps = gen.cfg.rows_per_shard
    texts: list[str] = []
    for start in range(0, table.num_rows, rps):
        part = table.slice(start, rps)
        batch = {c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}
        texts += gen(batch)["text"].to_pylist()
    return texts


def test_grammar_pipeline_row_exact_shards_and_reader(ray_session, tmp_path, text_dataset):
    from gptfl_ray.data.features import text_tensor
    from gptfl_ray.data.synthetic import load_synthetic, synthetic_ray_dataset
    from gptfl_ray.generate.pipeline import generate

    cfg = text_cfg(text_dataset, "text-grammar", n=7, rps=5)
    out = tmp_path / "syn"
    manifest = generate(cfg, out, label_names=LABELS)
    assert (manifest["kind"], manifest["modality"], manifest["num_rows"]) == ("text", "text", 21)
    assert manifest["counts_per_class"] == [7, 7, 7] and "sample_rate" not in manifest
    files = sorted((out / "shards").glob("*.parquet"))
    sizes = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert sizes == [5, 5, 5, 5, 1]
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.field("text").type == pa.string()
    assert table["row"].to_pylist() == list(range(21))
    texts = table["text"].to_pylist()
    assert_unique_per_shard_label(table["row"].to_pylist(), table["label"].to_pylist(), texts, 5)
    prompts = table["prompt"].to_pylist()
    assert "Write one line of TV-sitcom dialogue expressing anger." in prompts
    gen = make("text-grammar", rows_per_shard=5)
    assert texts == shard_texts_by_direct_call(gen, out)  # whole shards per call, deterministic

    ds = load_synthetic(out, cfg.data)
    assert ds.modality == "text" and ds.x.dtype == object and list(ds.x) == texts
    assert ds.class_counts().tolist() == [7, 7, 7] and ds.label_names == LABELS
    rows = synthetic_ray_dataset(out, cfg.data).take_all()
    rows.sort(key=lambda r: r["row"])
    expected = text_tensor(texts, cfg.data.text).numpy()
    assert np.array_equal(np.stack([r["x"] for r in rows]), expected)
    assert [r["y"] for r in rows] == table["label"].to_pylist()
    assert get_spec(cfg.data).modality == "text"


# ------------------------------------------------------------------------------------------------ LLM
@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"  # any hub access would fail loudly
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-text-lm") / "model", corpus=DIALOGUE))


def llm(model: str, labels=LABELS, rows_per_shard=500, **options):
    base = {"max_new_tokens": 8, "min_words": 2, "max_words": 6, "max_attempts": 30}
    cfg = GenerateConfig(
        generator="text-llm",
        model_id=model,
        batch_size=4,
        device="cpu",
        rows_per_shard=rows_per_shard,
        options={**base, **options},
    )
    return get_generator("text-llm")(cfg, target(labels))


def test_llm_transformers_bounds_dedup_cleaning_and_determinism(tiny_lm):
    vocab = {w for line in DIALOGUE for w in line.split()}
    batch = prompt_batch(n=5)
    gen = llm(tiny_lm)
    table = gen(batch)
    texts, meta = texts_meta(table)
    assert table.num_rows == 15 and table["row"].to_pylist() == list(range(15))
    assert all(2 <= word_count(t) <= 6 for t in texts)
    assert_unique_per_shard_label(list(range(15)), table["label"].to_pylist(), texts, 500)
    for text, m in zip(texts, meta, strict=True):  # the model's own words, only cleaned
        assert text == clean_utterance(m["raw"]) and set(text.split()) <= vocab
        assert sum(m["rejected"].values()) == m["attempt"]
    assert table["model_id"].to_pylist() == [tiny_lm] * 15
    assert texts_meta(llm(tiny_lm)(batch))[0] == texts  # seeded per row and attempt
    with pytest.raises(RuntimeError, match=r"max_attempts: 3 row\(s\).*too short"):
        llm(tiny_lm, min_words=20, max_words=30, max_attempts=2)(prompt_batch(labels=["joy"], n=3))


def test_llm_pipeline_row_exact(ray_session, tmp_path, tiny_lm, text_dataset):
    from gptfl_ray.generate.pipeline import generate

    options = {"max_new_tokens": 8, "min_words": 2, "max_words": 6, "max_attempts": 30}
    cfg = text_cfg(text_dataset, "text-llm", n=2, rps=4, model_id=tiny_lm, device="cpu", options=options)
    out = tmp_path / "syn-llm"
    manifest = generate(cfg, out, label_names=LABELS)
    assert manifest["num_rows"] == 6 and manifest["model_id"] == tiny_lm
    files = sorted((out / "shards").glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [4, 2]
    texts = pa.concat_tables([pq.read_table(f) for f in files])["text"].to_pylist()
    assert texts == shard_texts_by_direct_call(llm(tiny_lm, rows_per_shard=4), out)


def test_llm_openai_backend_seeds_http_retries_and_duplicates(server):  # noqa: F811
    def gen(labels):
        return llm(
            "fake-model",
            labels=labels,
            backend="openai",
            base_url=server.base_url,
            instruction=INSTRUCTION,
            retries=2,
            max_attempts=3,
            min_words=2,
            max_words=12,
        )

    batch = prompt_batch(labels=["cat", "bird"], n=3)
    texts, meta = texts_meta(gen(["cat", "bird"])(batch))
    seeds = batch["seed"].tolist()
    # the row's own seed is sent (attempt 0)
    assert texts[:3] == [f"A fluffy cat naps on a red sofa, take {s}." for s in seeds[:3]]
    assert texts[3:] == [f"A small bird sings at dawn, take {s}." for s in seeds[3:]]  # a 503, retried
    assert all(m["attempt"] == 0 for m in meta)
    # The stub answers "dog" identically every time: the first row keeps it, the second can never be unique.
    assert texts_meta(gen(["dog"])(prompt_batch(labels=["dog"], n=1)))[0] == ["A happy dog runs in the park."]
    with pytest.raises(RuntimeError, match=r"1 row\(s\) .*label 'dog'.*duplicate ×3"):
        gen(["dog"])(prompt_batch(labels=["dog"], n=2))


def test_synthetic_key_names_the_label_column_only_when_set():
    from gptfl_ray.config import config_hash, validate_config
    from gptfl_ray.generate.pipeline import synthetic_hash

    emotion = validate_config({"data": {"dataset": "meld"}, "generate": {"generator": "text-grammar"}})
    sentiment = validate_config(
        {"data": {"dataset": "meld", "label_column": "sentiment"}, "generate": {"generator": "text-grammar"}}
    )
    assert synthetic_hash(emotion) != synthetic_hash(sentiment)  # other labels, other prompts: other data
    mnist = validate_config({"data": {"dataset": "mnist"}})  # unset: the key of earlier runs is kept
    assert synthetic_hash(mnist) == config_hash("mnist", mnist.labels, mnist.prompts, mnist.generate)


def test_text_refuses_llm_prompt_expansion_and_the_remote_generator():
    from gptfl_ray.config import ConfigError, validate_config
    from gptfl_ray.generate.registry import get_generator
    from gptfl_ray.validate import check_expander_fits

    cfg = validate_config({"data": {"dataset": "meld"}, "prompts": {"expander": {"backend": "transformers"}}})
    with pytest.raises(ConfigError, match="prompts.expander.backend: text generators take the template"):
        check_expander_fits(cfg, "text")
    remote = get_generator("remote")
    with pytest.raises(ConfigError, match="generate.generator: 'remote' serves images and audio"):
        remote.prompt_modality(remote.parse_options({}), "text")
