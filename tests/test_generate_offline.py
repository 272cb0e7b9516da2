"""The offline generators (glyphs, espeak-ng + flite) make real, varied samples of the right label."""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from gptfl_ray.config import ConfigError, GenerateConfig
from gptfl_ray.generate.base import Target
from gptfl_ray.generate.image_glyphs import (
    REFERENCE_FONT,
    GlyphImageGenerator,
    draw_text,
    place_like_mnist,
    usable_fonts,
)
from gptfl_ray.generate.registry import generator_names, get_generator
from gptfl_ray.generate.speech_espeak import EspeakSpeechGenerator

DIGITS = tuple(str(i) for i in range(10))
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MNIST = Target("image", image_size=28, channels=1, label_names=DIGITS, label_text=WORDS)
SPEECH = Target("speech", sample_rate=8000, clip_seconds=1.0, label_names=DIGITS, label_text=WORDS)


def batch_for(labels: list[int], seeds: list[int], prompts: list[str] | None = None) -> dict[str, np.ndarray]:
    n = len(labels)
    return {
        "row": np.arange(n, dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
        "label_name": np.array([DIGITS[i] for i in labels], dtype=object),
        "label_text": np.array([WORDS[i] for i in labels], dtype=object),
        "prompt": np.array(prompts or [WORDS[i] for i in labels], dtype=object),
        "guidance_scale": np.ones(n, dtype=np.float32),
        "seed": np.asarray(seeds, dtype=np.int64),
    }


def decode(table) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table["image"].to_pylist()])


def _unit(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------- registry
def test_registry_knows_every_builtin_and_names_the_field_on_typos():
    assert {"glyphs", "espeak", "diffusers", "speecht5", "audioldm", "remote"} <= set(generator_names())
    with pytest.raises(ConfigError, match="generate.generator: unknown generator 'glyph'"):
        get_generator("glyph")


def test_unknown_or_bad_option_names_generate_options_key():
    with pytest.raises(ConfigError, match=r"generate\.options\.rotaton: unknown option"):
        GlyphImageGenerator(GenerateConfig(options={"rotaton": 5}), MNIST)
    with pytest.raises(ConfigError, match=r"generate\.options\.flite_fraction"):
        get_generator("espeak").parse_options({"flite_fraction": 2})


def test_generator_refuses_the_wrong_kind_of_task():
    with pytest.raises(ConfigError, match="makes image but data.dataset is an audio dataset"):
        GlyphImageGenerator.prompt_modality(GlyphImageGenerator.Options(), "audio")
    assert EspeakSpeechGenerator.prompt_modality(EspeakSpeechGenerator.Options(), "audio") == "speech"


# --------------------------------------------------------------------------------------------- glyphs
def test_font_screen_keeps_text_fonts_and_drops_symbol_and_fallback_fonts():
    usable = usable_fonts(DIGITS)
    fonts = {Path(p).name for paths in usable.values() for p in paths}
    assert all(usable[d] for d in DIGITS)
    assert {"DejaVuSans.ttf", "DejaVuSerif.ttf", "cmr10.ttf"} <= fonts
    # Computer Modern symbol/extension fonts map digits to other shapes; LastResort draws boxes.
    assert not fonts & {"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf"}
    assert len(fonts) >= 20


def test_font_screen_is_cached_on_disk_keyed_by_the_font_files(tmp_path, monkeypatch):
    """A second process (here: a cleared in-memory cache) reads the screening from disk; a changed font file
    is screened again."""
    import os
    import shutil

    import matplotlib

    import gptfl_ray.generate.image_glyphs as glyphs

    monkeypatch.setenv("GPTFL_CACHE_DIR", str(tmp_path / "cache"))
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for name in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "cmsy10.ttf"):
        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name, fonts)
    glyphs.usable_fonts.cache_clear()
    screened = usable_fonts(DIGITS, (str(fonts),))
    assert {Path(p).name for ps in screened.values() for p in ps} == {"DejaVuSans.ttf", "DejaVuSerif.ttf"}
    assert len(list((tmp_path / "cache" / "fonts").glob("*.json"))) == 1

    def no_screening(*args):
        raise AssertionError("screened again")

    monkeypatch.setattr(glyphs, "_screen_fonts", no_screening)
    glyphs.usable_fonts.cache_clear()
    assert usable_fonts(DIGITS, (str(fonts),)) == screened
    os.utime(fonts / "cmsy10.ttf", ns=(0, 0))  # another file under the same name
    glyphs.usable_fonts.cache_clear()
    with pytest.raises(AssertionError, match="screened again"):
        usable_fonts(DIGITS, (str(fonts),))
    glyphs.usable_fonts.cache_clear()


def test_glyphs_are_mnist_like_varied_and_deterministic_per_seed():
    gen = GlyphImageGenerator(GenerateConfig(), MNIST)
    labels = [7] * 12
    out = gen(batch_for(labels, list(range(12))))
    imgs = decode(out)
    assert imgs.shape == (12, 28, 28) and imgs.dtype == np.uint8
    # MNIST placement: light glyph on a dark ground, centre of mass near the centre, ink inside a ~20 px box.
    assert imgs[:, 0, :].mean() < 20 and imgs.mean() > 15
    ys, xs = np.indices((28, 28))
    for img in imgs.astype(np.float64):
        com = ((ys * img).sum() / img.sum(), (xs * img).sum() / img.sum())
        assert abs(com[0] - 13.5) < 3 and abs(com[1] - 13.5) < 3
    # Every pair of seeds gives a different image; the same seed gives the same image (in any batch).
    flat = imgs.reshape(12, -1).astype(int)
    diffs = np.abs(flat[:, None] - flat[None]).sum(-1)
    assert (diffs[~np.eye(12, dtype=bool)] > 0).all()
    again = decode(gen(batch_for([7, 1], [3, 99])))
    assert np.array_equal(again[0], imgs[3])
    fonts = {json.loads(m)["font"] for m in out["meta"].to_pylist()}
    assert len(fonts) >= 4


def test_glyphs_draw_the_right_label():
    """Template matching against plainly rendered reference digits recognises most samples: the label in
    the row is the digit in the image (chance is 10%)."""
    gen = GlyphImageGenerator(GenerateConfig(), MNIST)
    labels = [i % 10 for i in range(200)]
    imgs = decode(gen(batch_for(labels, [1000 + i for i in range(200)])))
    ref = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / REFERENCE_FONT)
    templates = np.stack([place_like_mnist(draw_text(d, ref, 48, 2), 28, 20 / 28) for d in DIGITS])
    pred = (_unit(imgs) @ _unit(templates).T).argmax(axis=1)
    assert (pred == np.array(labels)).mean() > 0.4


def test_glyphs_in_rgb_for_colour_tasks():
    target = Target("image", image_size=32, channels=3, label_names=DIGITS, label_text=WORDS)
    imgs = decode(GlyphImageGenerator(GenerateConfig(), target)(batch_for([0, 1, 2], [5, 6, 7])))
    assert imgs.shape == (3, 32, 32, 3)
    assert not np.array_equal(imgs[0, 0, 0], imgs[1, 0, 0])  # random background colours


# --------------------------------------------------------------------------------------------- speech
@pytest.fixture(scope="module")
def espeak() -> EspeakSpeechGenerator:
    return EspeakSpeechGenerator(GenerateConfig(generator="espeak"), SPEECH)


def test_espeak_mixes_engines_and_voices_with_plausible_durations(espeak):
    labels = [i % 10 for i in range(24)]
    out = espeak(batch_for(labels, list(range(24))))
    waves = [np.asarray(w, dtype=np.float32) for w in out["audio"].to_pylist()]
    meta = [json.loads(m) for m in out["meta"].to_pylist()]
    assert {m["engine"] for m in meta} == {"espeak-ng", "flite"}
    assert len({m["voice"] for m in meta}) >= 12
    # A single spoken digit at 8 kHz: 0.2-2.5 s, not silent, in [-1, 1].
    for w in waves:
        assert 0.2 * 8000 <= len(w) <= 2.5 * 8000
        assert 0.01 < np.abs(w).max() <= 1.0
    assert len({len(w) for w in waves}) >= 12  # voices, speeds and stretches differ
    # Each clip says its own label's word.
    assert [m["text"] for m in meta] == [WORDS[i] for i in labels]


def test_espeak_is_deterministic_per_seed_and_the_word_matters(espeak):
    a = espeak(batch_for([3, 3], [11, 12]))["audio"].to_pylist()
    b = espeak(batch_for([3], [11]))["audio"].to_pylist()
    c = espeak(batch_for([8], [11]))["audio"].to_pylist()  # same voice draw, another word
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], a[1])
    assert len(a[0]) != len(c[0]) or not np.allclose(a[0], c[0])


def test_espeak_espeak_only_and_flite_only(espeak):
    only_espeak = EspeakSpeechGenerator(
        GenerateConfig(generator="espeak", options={"flite_fraction": 0}), SPEECH
    )
    only_flite = EspeakSpeechGenerator(
        GenerateConfig(generator="espeak", options={"flite_fraction": 1}), SPEECH
    )
    for gen, engine in ((only_espeak, "espeak-ng"), (only_flite, "flite")):
        meta = [json.loads(m) for m in gen(batch_for([1, 2, 3], [1, 2, 3]))["meta"].to_pylist()]
        assert {m["engine"] for m in meta} == {engine}
    with pytest.raises(ConfigError, match="generate.options.flite_voices"):
        EspeakSpeechGenerator(GenerateConfig(generator="espeak", options={"flite_voices": ["nope"]}), SPEECH)
