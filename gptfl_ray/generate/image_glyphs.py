"""``glyphs``: the label's character or word rendered with Pillow in random fonts, distorted MNIST-style.

The offline default for digit and character classes. Recipe (calibrated in NOTES-offline-generators.md):
random usable font, size, stroke 0-4, rotation ±15°, shear ±0.3, x/y scale 0.8-1.2, elastic warp,
thickening/thinning, then MNIST placement (fit a 20 px box, centre of mass at the centre of 28×28, ±1.5 px
jitter), blur, gamma and light noise. Fonts are screened once per actor by rendering every label: fonts
that miss a character, draw nothing, or draw a glyph closer to another label's glyph are dropped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydantic import Field

from gptfl_ray.config import ConfigError
from gptfl_ray.generate.base import Generator, GeneratorOptions, encode_png
from gptfl_ray.generate.registry import register

log = logging.getLogger(__name__)

SCREEN_SIZE = 28  # resolution at which fonts are screened
REFERENCE_FONT = "DejaVuSans.ttf"  # bundled with matplotlib, so present wherever this package installs
MIN_SIMILARITY = 0.45  # glyph vs reference glyph correlation accepted even when not the best match
MIN_PASS_FRACTION = 0.8
FONT_CACHE_VERSION = 1  # bump when the screening changes what it accepts


class GlyphOptions(GeneratorOptions):
    text: Literal["name", "text"] = "name"  # render the label name ("7") or its label text ("seven")
    fonts: list[str] | None = None  # font files or folders; default: system fonts + matplotlib's TTFs
    font_size: tuple[int, int] = (40, 72)  # px, drawn before placement
    stroke_max: int = Field(4, ge=0)  # px at a 64 px font; scaled with the size
    rotation: float = Field(15.0, ge=0)  # degrees, ±
    shear: float = Field(0.3, ge=0)  # ±
    scale: tuple[float, float] = (0.8, 1.2)  # independent x and y scale
    elastic_alpha: float = Field(4.0, ge=0)  # max displacement, px at a 48 px font
    elastic_sigma: float = Field(0.25, gt=0)  # control-point spacing of the warp, fraction of the font size
    thicken_prob: float = Field(0.5, ge=0, le=1)  # chance of one dilate-or-erode step
    box: float = Field(20 / 28, gt=0, le=1)  # longest side after placement, fraction of the image
    jitter: float = Field(1.5, ge=0)  # centre-of-mass jitter, px at 28×28
    blur_max: float = Field(0.6, ge=0)  # Gaussian radius, px
    gamma: tuple[float, float] = (0.7, 1.4)
    noise_max: float = Field(0.04, ge=0)  # Gaussian noise std, fraction of full scale
    invert: bool = False  # dark glyph on light ground (MNIST is light on dark)


@register
class GlyphImageGenerator(Generator):
    name = "glyphs"
    kind = "image"
    modality = "image"
    default_model_id = "pillow-fonts"
    Options = GlyphOptions

    def __init__(self, cfg, target):
        super().__init__(cfg, target)
        o: GlyphOptions = self.options  # type: ignore[assignment]
        if target.image_size is None:
            raise ConfigError("generate.generator: 'glyphs' needs an image dataset (data.dataset)")
        texts = target.label_names if o.text == "name" else target.label_text
        self.fonts = usable_fonts(tuple(texts), tuple(o.fonts or ()))
        missing = [t for t, fonts in self.fonts.items() if not fonts]
        if missing:
            where = "generate.options.fonts" if o.fonts else "the system fonts and matplotlib's fonts"
            raise ConfigError(f"{where}: no font draws {missing!r} recognisably")

    def generate(self, batch):
        o: GlyphOptions = self.options  # type: ignore[assignment]
        texts = batch["label_name"] if o.text == "name" else batch["label_text"]
        samples, meta = [], []
        for text, seed in zip(texts, batch["seed"], strict=True):
            pixels, info = self.render(str(text), np.random.default_rng(int(seed)))
            samples.append(encode_png(pixels))
            meta.append(info)
        return samples, meta

    def render(self, text: str, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
        """One distorted, MNIST-placed glyph image (uint8, task size and channels)."""
        o: GlyphOptions = self.options  # type: ignore[assignment]
        size = self.target.image_size
        assert size is not None
        fonts = self.fonts.get(text)
        if not fonts:
            raise ValueError(f"glyphs: label text {text!r} is not one of the task's labels")
        path = fonts[rng.integers(len(fonts))]
        px = int(rng.integers(o.font_size[0], o.font_size[1] + 1))
        stroke = int(rng.integers(0, o.stroke_max + 1))
        glyph = draw_text(text, path, px, round(stroke * px / 64))
        angle = rng.uniform(-o.rotation, o.rotation)
        shear = rng.uniform(-o.shear, o.shear)
        sx, sy = rng.uniform(*o.scale, size=2)
        glyph = affine(glyph, angle, shear, sx, sy)
        glyph = elastic(glyph, rng, alpha=o.elastic_alpha * px / 48, sigma=o.elastic_sigma * px)
        if rng.random() < o.thicken_prob:
            glyph = thicken_or_thin(glyph, k=3 if px < 56 else 5, thicken=rng.random() < 0.5)
        jitter = rng.uniform(-o.jitter, o.jitter, size=2) * size / 28
        img = place_like_mnist(glyph, size, o.box, jitter)
        radius = rng.uniform(0, o.blur_max)
        if radius > 0.05:
            img = (
                np.asarray(
                    Image.fromarray((img * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
                    dtype=np.float32,
                )
                / 255.0
            )
        img = img ** rng.uniform(*o.gamma)
        img = img + rng.normal(0, rng.uniform(0, o.noise_max), size=img.shape)
        img = np.clip(img, 0, 1)
        if o.invert:
            img = 1 - img
        if self.target.channels == 3:
            img = colorize(img, rng)
        info = {"font": Path(path).name, "size": px, "stroke": stroke, "rotation": round(float(angle), 2)}
        return (img * 255 + 0.5).astype(np.uint8), info


# ------------------------------------------------------------------------------------- drawing
@functools.lru_cache(maxsize=512)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def draw_text(text: str, path: str, px: int, stroke: int) -> Image.Image:
    """White text on black, with a margin for the distortions that follow."""
    font = _font(path, px)
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    w, h = max(1, right - left), max(1, bottom - top)
    pad = max(w, h) // 2 + 4
    img = Image.new("L", (w + 2 * pad, h + 2 * pad), 0)
    ImageDraw.Draw(img).text(
        (pad - left, pad - top), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    return img


def affine(img: Image.Image, angle_deg: float, shear: float, sx: float, sy: float) -> Image.Image:
    """Rotate, shear and scale about the image centre (Pillow wants the output->input map)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    inv = np.linalg.inv(m)
    cx, cy = img.width / 2, img.height / 2
    off = np.array([cx, cy]) - inv @ np.array([cx, cy])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)


def elastic(img: Image.Image, rng: np.random.Generator, alpha: float, sigma: float) -> Image.Image:
    """Smooth random displacement field (Simard et al. 2003) applied with torchvision's ``elastic`` warp.

    The smooth field is random control points every ``sigma`` px, upsampled bicubically: the same kind of
    field as Gaussian-blurred noise at a fraction of the cost. It is drawn from the sample's own numpy RNG
    (torchvision's ElasticTransform draws from torch's global RNG, so a sample would depend on its
    batch-mates).
    """
    if alpha <= 0:
        return img
    import torch
    import torch.nn.functional as F
    import torchvision.transforms.v2.functional as TF

    h, w = img.height, img.width
    gh, gw = max(2, math.ceil(h / sigma) + 1), max(2, math.ceil(w / sigma) + 1)
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, gh, gw)).astype(np.float32))
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
    field = field / field.abs().amax().clamp_min(1e-6) * alpha  # max displacement = alpha px
    # elastic() takes displacements in normalised [-1, 1] grid units: px * 2 / size.
    disp = torch.stack([field[0] * 2 / w, field[1] * 2 / h], dim=-1).unsqueeze(0)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32)).unsqueeze(0)
    out = TF.elastic(t, disp)
    return Image.fromarray((np.clip(out[0].numpy(), 0, 255) + 0.5).astype(np.uint8))


def thicken_or_thin(img: Image.Image, k: int, thicken: bool) -> Image.Image:
    """Dilate or erode by a k×k window; an erosion that would wipe out a thin font is skipped."""
    if thicken:
        return img.filter(ImageFilter.MaxFilter(k))
    thin = img.filter(ImageFilter.MinFilter(k))
    before = np.asarray(img, dtype=np.float32).sum()
    return thin if np.asarray(thin, dtype=np.float32).sum() >= 0.5 * before else img


def place_like_mnist(
    glyph: Image.Image, size: int, box: float, jitter: np.ndarray | None = None
) -> np.ndarray:
    """MNIST's normalisation: fit the ink into a ``box``·size square keeping the aspect ratio (antialiased),
    then put its centre of mass at the image centre (+ jitter). Returns float32 in [0, 1]."""
    bbox = glyph.getbbox()
    out = np.zeros((size, size), dtype=np.float32)
    if bbox is None:
        return out
    ink = glyph.crop(bbox)
    scale = box * size / max(ink.width, ink.height)
    w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    small = np.asarray(ink.resize((w, h), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    small = np.clip(small, 0, 1)
    mass = small.sum()
    if mass <= 0:
        return out
    ys, xs = np.indices(small.shape)
    com_y, com_x = (ys * small).sum() / mass, (xs * small).sum() / mass
    jx, jy = (0.0, 0.0) if jitter is None else (float(jitter[0]), float(jitter[1]))
    top = round(size / 2 - 0.5 - com_y + jy)
    left = round(size / 2 - 0.5 - com_x + jx)
    # Paste with clipping (a heavily sheared glyph may poke out of the frame).
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(size, top + h), min(size, left + w)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def colorize(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey glyph -> RGB: random foreground and background colours at least 0.4 apart in luminance."""
    while True:
        fg, bg = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        if abs(fg.mean() - bg.mean()) >= 0.4:
            break
    return bg * (1 - gray[..., None]) + fg * gray[..., None]


# ------------------------------------------------------------------------------------- fonts
def candidate_fonts(extra: tuple[str, ...] = ()) -> list[str]:
    """Font files: ``extra`` (files or folders) if given, else the system's TrueType fonts followed by
    matplotlib's bundled ones; duplicates (same family and style) keep the first."""
    import matplotlib
    import matplotlib.font_manager as fm

    if extra:
        paths: list[str] = []
        for item in extra:
            p = Path(item).expanduser()
            if p.is_dir():
                paths += sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in (".ttf", ".otf"))
            elif p.is_file():
                paths.append(str(p))
            else:
                raise ConfigError(f"generate.options.fonts: {item}: no such font file or folder")
    else:
        bundled = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        paths = sorted(fm.findSystemFonts(fontext="ttf")) + sorted(str(p) for p in bundled.glob("*.ttf"))
    seen, out = set(), []
    for p in paths:
        try:
            key = _font(p, 12).getname()
        except OSError:
            continue
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _has_chars(path: str, texts: tuple[str, ...]) -> bool:
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, lazy=True, fontNumber=0) as tt:
            cmap = tt.getBestCmap() or {}
    except Exception:
        return False
    return all(ord(ch) in cmap for t in texts for ch in t if not ch.isspace())


def _screen_image(text: str, path: str) -> np.ndarray:
    img = place_like_mnist(draw_text(text, path, 48, 0), SCREEN_SIZE, 20 / 28)
    v = img.ravel() - img.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


@functools.lru_cache(maxsize=8)
def usable_fonts(texts: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """For each text, the fonts that draw it recognisably.

    Rendered plainly and MNIST-placed, a font's glyph for a label must correlate with the reference font's
    glyph of the same label at least ``MIN_SIMILARITY`` or best among all labels. A font that passes for
    fewer than ``MIN_PASS_FRACTION`` of the labels is no text font for this label set (symbol fonts that
    map digits to delimiters, fallback fonts that draw boxes) and is dropped entirely; otherwise it is used
    for the labels it passes (a TeX italic "4" that looks like nothing else is left out, its "7" is kept).

    The screening (~2 s) would repeat in every generator actor: its result is cached on disk
    (``paths.cache_dir()``), keyed by the texts, every candidate and the reference font file (path, size,
    mtime), the thresholds and ``FONT_CACHE_VERSION``.
    """
    import matplotlib

    from gptfl_ray.io import atomic_write_json, read_json
    from gptfl_ray.paths import cache_dir

    reference = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / REFERENCE_FONT)
    candidates = candidate_fonts(extra)
    cached = cache_dir() / "fonts" / f"{_font_cache_key(texts, reference, candidates)}.json"
    if cached.is_file():
        try:
            usable = read_json(cached)
            if list(usable) == list(texts) and all(isinstance(v, list) for v in usable.values()):
                return usable
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable font cache (%s); screening again", cached, err)
    usable = _screen_fonts(texts, reference, candidates)
    try:
        atomic_write_json(cached, usable)
    except OSError as err:  # a read-only home or a full disk costs speed, never the run
        log.warning(
            "cannot write the font cache %s (%s); set GPTFL_CACHE_DIR to a writable folder", cached, err
        )
    return usable


def _font_cache_key(texts: tuple[str, ...], reference: str, candidates: list[str]) -> str:
    files = []
    for path in [reference, *candidates]:
        st = Path(path).stat()
        files.append([path, st.st_size, st.st_mtime_ns])
    settings = [FONT_CACHE_VERSION, SCREEN_SIZE, MIN_SIMILARITY, MIN_PASS_FRACTION, list(texts), files]
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:24]


def _screen_fonts(texts: tuple[str, ...], reference: str, candidates: list[str]) -> dict[str, list[str]]:
    ref = np.stack([_screen_image(t, reference) for t in texts])
    usable: dict[str, list[str]] = {t: [] for t in texts}
    for path in candidates:
        if not _has_chars(path, texts):
            continue
        imgs = np.stack([_screen_image(t, path) for t in texts])
        ok = np.linalg.norm(imgs, axis=1) > 0.5  # not blank
        if len(texts) > 1:
            sim = imgs @ ref.T
            own = np.diag(sim)
            ok &= (own >= MIN_SIMILARITY) | (sim.argmax(axis=1) == np.arange(len(texts)))
        if ok.mean() < MIN_PASS_FRACTION:
            continue
        for t, good in zip(texts, ok, strict=True):
            if good:
                usable[t].append(path)
    return usable
