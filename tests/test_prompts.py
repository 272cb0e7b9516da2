"""Prompt table (templates, counts, seeds, guidance) and expansion validation — no Ray, no models."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gptfl_ray.config import ConfigError, ExpanderConfig, PromptsConfig, validate_config
from gptfl_ray.prompts import build_prompt_table, count_fallbacks, expand_rows, validate_expansion
from gptfl_ray.prompts.templates import PROMPT_SCHEMA, default_templates
from gptfl_ray.prompts.validation import clean_expansion, mentions

DIGITS = [str(i) for i in range(10)]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WORDS = dict(zip(DIGITS, NUMBER_WORDS, strict=True))


def table(cfg: PromptsConfig, names=("cat", "dog"), modality="image", text=None, counts=None) -> pa.Table:
    return build_prompt_table(cfg, list(names), modality=modality, label_text=text or {}, class_counts=counts)


# ------------------------------------------------------------------------------------------ table
def test_schema_and_order():
    t = table(PromptsConfig(num_per_class=3))
    assert t.schema == PROMPT_SCHEMA
    assert t["label"].to_pylist() == [0, 0, 0, 1, 1, 1]
    assert t["index"].to_pylist() == [0, 1, 2, 0, 1, 2]
    assert t["label_name"].to_pylist() == ["cat"] * 3 + ["dog"] * 3
    assert t["prompt"].to_pylist() == ["a photo of a cat"] * 3 + ["a photo of a dog"] * 3
    assert set(t["template"].to_pylist()) == {"a photo of a {label}"}


def test_label_text_mapping_fills_prompt_but_keeps_name():
    t = table(PromptsConfig(num_per_class=2), names=DIGITS, modality="speech", text=WORDS)
    rows = t.to_pylist()
    seven = [r for r in rows if r["label_name"] == "7"]
    assert {r["label"] for r in seven} == {7}
    assert {r["label_text"] for r in seven} == {"seven"}
    assert {r["prompt"] for r in seven} == {"seven"}  # speech: the word itself
    # unmapped names are used verbatim
    t2 = table(PromptsConfig(num_per_class=1), names=["7", "x"], modality="audio", text={"7": "seven"})
    assert t2["prompt"].to_pylist() == ["a sound of seven", "a sound of x"]


@pytest.mark.parametrize(
    ("modality", "domain", "expected"),
    [
        ("image", None, ["a photo of a {label}"]),
        ("image", "sketch", ["a photo of a {label}", "a {domain} of {label}"]),
        ("speech", None, ["{label}"]),
        ("speech", "studio", ["{label}"]),  # a domain word would change what the TTS says
        ("audio", None, ["a sound of {label}"]),
        ("audio", "in a studio", ["a sound of {label}", "{label} {domain}"]),
    ],
)
def test_default_templates_by_modality(modality, domain, expected):
    assert default_templates(modality, domain) == expected


def test_unknown_modality_is_an_error():
    with pytest.raises(ValueError, match="modality"):
        table(PromptsConfig(num_per_class=1), modality="video")


def test_templates_and_domains_cycle_evenly():
    templates = ["a {domain} of {label}", "{label}, {domain}"]
    cfg = PromptsConfig(num_per_class=12, templates=templates, domain=["photo", "drawing", "painting"])
    prompts = table(cfg, names=["rose"])["prompt"].to_pylist()
    assert len(set(prompts)) == 6  # every (template, domain) pair ...
    assert all(prompts.count(p) == 2 for p in prompts)  # ... equally often
    assert prompts[:2] == ["a photo of rose", "rose, photo"]
    assert prompts[2:4] == ["a drawing of rose", "rose, drawing"]


def test_official_flower_prompt_via_domain():
    cfg = PromptsConfig(num_per_class=1, templates=["a {domain} of {label}"], domain="flower photo")
    assert table(cfg, names=["pink primrose"])["prompt"].to_pylist() == ["a flower photo of pink primrose"]


def test_num_per_class_wins_over_scale():
    t = table(PromptsConfig(num_per_class=2, scale=10.0), counts=[5, 7])
    assert t.num_rows == 4


def test_scale_times_class_counts_rounded_at_least_one():
    t = table(PromptsConfig(scale=0.5), names=["a", "b", "c"], counts=[7, 1, 0])
    assert np.bincount(t["label"].to_numpy()).tolist() == [4, 1, 1]  # round(3.5)=4, round(0.5)->1, 0->1


@pytest.mark.parametrize(
    ("cfg", "counts", "field"),
    [
        (PromptsConfig(), None, "prompts.num_per_class"),
        (PromptsConfig(scale=1.0), None, "prompts.scale"),
        (PromptsConfig(scale=1.0), [1, 2, 3], "prompts.scale"),
        # model_copy/model_construct skip validation: build_prompt_table must still catch these
        (
            PromptsConfig(num_per_class=1).model_copy(update={"templates": ["a {domain} of {label}"]}),
            None,
            "prompts.domain",
        ),
        (
            PromptsConfig.model_construct(num_per_class=1, templates=["a {colour} {label}"]),
            None,
            "prompts.templates",
        ),
    ],
)
def test_bad_inputs_name_the_field(cfg, counts, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        table(cfg, counts=counts)


def test_duplicate_or_missing_labels_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        table(PromptsConfig(num_per_class=1), names=["a", "b", "a"])
    with pytest.raises(ValueError, match="no label names"):
        table(PromptsConfig(num_per_class=1), names=[])


# ------------------------------------------------------------------------------------ seeds/guidance
def test_seeds_deterministic_unique_and_subset_stable():
    cfg = PromptsConfig(num_per_class=50, seed=3)
    a, b = table(cfg), table(cfg)
    assert a.equals(b)
    seeds = a["seed"].to_numpy()
    assert len(np.unique(seeds)) == len(seeds)
    assert seeds.min() >= 0
    # a smaller table (fewer samples, classes in another order) regenerates the same (class, index) rows
    small = table(cfg.model_copy(update={"num_per_class": 10}), names=["dog", "cat"])
    key = {(r["label_name"], r["index"]): (r["seed"], r["guidance_scale"]) for r in a.to_pylist()}
    assert all(
        key[(r["label_name"], r["index"])] == (r["seed"], r["guidance_scale"]) for r in small.to_pylist()
    )
    # another run seed changes them
    assert not np.array_equal(table(cfg.model_copy(update={"seed": 4}))["seed"].to_numpy(), seeds)


def test_guidance_integers_one_to_five_uniform():
    g = table(PromptsConfig(num_per_class=2500), names=["a", "b"])["guidance_scale"].to_numpy()
    assert g.dtype == np.float32
    values, counts = np.unique(g, return_counts=True)
    assert values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert counts.min() > 0.17 * len(g) and counts.max() < 0.23 * len(g)  # ~0.2 each (5000 draws)


def test_guidance_float_range():
    cfg = PromptsConfig(num_per_class=500, guidance_integer=False, guidance_min=2.5, guidance_max=7.5)
    g = table(cfg)["guidance_scale"].to_numpy()
    assert g.min() >= 2.5 and g.max() <= 7.5
    assert len(np.unique(g)) > 900
    assert abs(float(g.mean()) - 5.0) < 0.3


def test_guidance_config_errors():
    with pytest.raises(ValueError, match="guidance_max"):
        PromptsConfig(guidance_min=3, guidance_max=2)
    with pytest.raises(ValueError, match="no integer"):
        PromptsConfig(guidance_min=1.2, guidance_max=1.8)
    PromptsConfig(guidance_min=1.2, guidance_max=1.8, guidance_integer=False)  # fine as floats


# ----------------------------------------------------------------------------------------- config
def test_config_rejects_unknown_template_placeholder_naming_field():
    with pytest.raises(ConfigError, match=r"prompts\.templates: .*unknown placeholder \{colour\}"):
        validate_config({"prompts": {"templates": ["a {colour} {label}"]}})
    with pytest.raises(ConfigError, match=r"prompts\.templates: .*no \{label\}"):
        validate_config({"prompts": {"templates": ["a photo"]}})
    with pytest.raises(ConfigError, match=r"prompts\.templates: .*malformed"):
        validate_config({"prompts": {"templates": ["a {label"]}})
    with pytest.raises(ConfigError, match=r"prompts\.expander\.instruction: .*\{foo\}"):
        validate_config({"prompts": {"expander": {"instruction": "say {foo}"}}})
    with pytest.raises(ConfigError, match=r"prompts\.expander\.backend"):
        validate_config({"prompts": {"expander": {"backend": "gpt"}}})
    with pytest.raises(ConfigError, match=r"prompts\.expander: .*max_chars"):
        validate_config({"prompts": {"expander": {"min_chars": 50, "max_chars": 10}}})


def test_config_roundtrip_with_domain_list():
    cfg = validate_config({"prompts": {"domain": ["photo", "sketch"], "num_per_class": 4}})
    assert cfg.prompts.domain == ["photo", "sketch"]
    prompts = table(cfg.prompts, names=["owl"])["prompt"].to_pylist()
    assert prompts == ["a photo of a owl", "a photo of owl", "a photo of a owl", "a sketch of owl"]


# ------------------------------------------------------------------------------------- validation
def test_validate_expansion_accepts_and_cleans():
    seen: set[str] = set()
    out = validate_expansion('  "A tabby Cat naps in warm sunlight."\nextra line', "cat", [], 3, 300, seen)
    assert out == "A tabby Cat naps in warm sunlight."
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("A category of animals.", "label only inside another word"),
        ("A dog on a sofa.", "label missing"),
        ("", "empty"),
        (None, "no output"),
        ("cat", "too short (min 5)"),
        ("a cat " + "very " * 20, "too long (max 60)"),
    ],
)
def test_validate_expansion_rejects(text, reason):
    assert validate_expansion(text, "cat", [], 5, 60, set()) is None, reason


def test_validate_expansion_synonyms_multiword_and_dedupe():
    seen: set[str] = set()
    assert validate_expansion("A kitty on the rug", "cat", ["kitty"], 3, 300, seen) == "A kitty on the rug"
    assert validate_expansion("a KITTY  on the rug!", "cat", ["kitty"], 3, 300, seen) is None  # duplicate
    # only the first line counts
    assert validate_expansion("Wild  Pink\nPrimrose", "pink primrose", [], 3, 300, set()) is None
    assert validate_expansion("wild pink   primrose in bloom", "pink primrose", [], 3, 300, set())
    assert validate_expansion("the number 7 in ink", "7", [], 3, 300, set()) == "the number 7 in ink"
    assert validate_expansion("the number 17 in ink", "7", [], 3, 300, set()) is None


def test_clean_and_mentions_helpers():
    assert clean_expansion("\n\n  “Quoted text”  \n") == "Quoted text"
    assert clean_expansion(123) == ""  # type: ignore[arg-type]
    assert mentions("colt's foot in a field", ["colt's foot"])
    assert not mentions("coltsfoot", ["colt's foot"])


def test_validate_expansions_is_order_independent_and_keeps_types():
    from gptfl_ray.prompts.expand import validate_expansions

    t = table(PromptsConfig(num_per_class=4))
    cat_raw = ["A cat nap.", "a cat NAP", "A dog.", "no label"]
    dog_raw = ["The dog runs.", None, "the dog runs", "A dog sits."]
    raw = [*cat_raw, *dog_raw]
    t = t.append_column("raw_expansion", pa.array(raw, pa.string()))
    shuffled = t.take(pa.array([5, 2, 7, 0, 3, 6, 1, 4]))
    cfg = ExpanderConfig(synonyms={"dog": ["puppy"]})
    a, b = validate_expansions(t, cfg), validate_expansions(shuffled, cfg)
    assert a.equals(b)
    assert a["expansion_fallback"].to_pylist() == [False, True, True, True, False, True, True, False]
    assert a["prompt"].to_pylist()[:2] == ["A cat nap.", "a photo of a cat"]  # index 0 wins the duplicate
    assert "raw_expansion" not in a.column_names
    # row-wise paths lose Arrow types (float32 -> Python float): they are restored
    widened = a.set_column(
        a.column_names.index("guidance_scale"), "guidance_scale", a["guidance_scale"].cast(pa.float64())
    )
    widened = widened.drop_columns(["expansion_fallback"]).append_column(
        "raw_expansion", pa.array(raw, pa.string())
    )
    assert validate_expansions(widened, cfg).schema.field("guidance_scale").type == pa.float32()


# ---------------------------------------------------------------------------- templates backend
def test_templates_backend_is_identity_without_fallbacks():
    t = table(PromptsConfig(num_per_class=3))
    out = expand_rows(t.to_pylist(), ExpanderConfig())
    assert [r["prompt"] for r in out] == t["prompt"].to_pylist()
    assert all(r["expansion_fallback"] is False for r in out)
    assert count_fallbacks(out) == 0
    assert count_fallbacks(t) == 0  # no column yet: nothing expanded


def test_backend_config_errors_name_field():
    rows = table(PromptsConfig(num_per_class=1)).to_pylist()
    with pytest.raises(ValueError, match=r"prompts\.expander\.model"):
        expand_rows(rows, ExpanderConfig(backend="transformers"))
    with pytest.raises(ValueError, match=r"prompts\.expander\.base_url"):
        expand_rows(rows, ExpanderConfig(backend="openai", model="m"))
    with pytest.raises(ValueError, match=r"prompts\.expander\.base_url"):
        expand_rows(rows, ExpanderConfig(backend="openai", model="m", base_url="localhost:8000"))
    with pytest.raises(ValueError, match="missing column"):
        expand_rows(
            [{"label": 0, "prompt": "x"}], ExpanderConfig(backend="openai", model="m", base_url="http://x")
        )
