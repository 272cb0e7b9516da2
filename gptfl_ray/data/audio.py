"""Waveform utilities shared by real and synthetic audio: read, resample, trim, fix length; cached loading.

File I/O is soundfile (torchaudio.load needs torchcodec + FFmpeg); resampling is torchaudio's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from gptfl_ray.config import AudioConfig
from gptfl_ray.errors import InputError
from gptfl_ray.io import atomic_path
from gptfl_ray.paths import DataNotFoundError, cache_dir
from gptfl_ray.training import one_torch_thread

log = logging.getLogger(__name__)
CLIP_CACHE_VERSION = 1  # bump when standardize_clip changes what it returns


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate."""
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise InputError(f"{path}: cannot read audio ({err})") from None
    return wav.mean(axis=1), int(sr)


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    if orig_sr == new_sr:
        return wav.astype(np.float32, copy=False)
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), orig_sr, new_sr).numpy()


def trim_silence(wav: np.ndarray, sr: int, top_db: float = 40.0, frame_ms: float = 10.0) -> np.ndarray:
    """Cut leading/trailing frames quieter than ``top_db`` below the loudest frame.

    Written here because torchaudio's ``vad`` only trims the front and is tuned for long utterances.
    """
    frame = max(1, int(sr * frame_ms / 1000))
    n = len(wav) // frame
    if n == 0:
        return wav
    rms = np.sqrt(np.mean(wav[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms / rms.max())
    loud = np.flatnonzero(db > -top_db)
    if loud.size == 0:
        return wav
    return wav[loud[0] * frame : (loud[-1] + 1) * frame]


def fix_length(wav: np.ndarray, length: int) -> np.ndarray:
    """Centre-crop or zero-pad (centred) to exactly ``length`` samples."""
    if len(wav) >= length:
        start = (len(wav) - length) // 2
        return wav[start : start + length]
    out = np.zeros(length, dtype=np.float32)
    off = (length - len(wav)) // 2
    out[off : off + len(wav)] = wav
    return out


def peak_normalize(wav: np.ndarray, peak: float = 0.9) -> np.ndarray:
    m = float(np.abs(wav).max()) if wav.size else 0.0
    return wav if m < 1e-8 else (wav * (peak / m)).astype(np.float32)


def standardize_clip(
    wav: np.ndarray, sr: int, target_sr: int, clip_seconds: float, trim: bool = True
) -> np.ndarray:
    """The one preprocessing every clip gets (real or synthetic): resample, trim, normalise, fix length."""
    wav = resample(wav, sr, target_sr)
    if trim:
        wav = trim_silence(wav, target_sr)
    wav = peak_normalize(wav)
    return fix_length(wav, round(target_sr * clip_seconds)).astype(np.float32)


def load_clips(paths: Sequence[Path], audio: AudioConfig) -> np.ndarray:
    """Standardised clips (N, T) float32 for audio files, decoded once and then read from the disk cache.

    Every run step and every Tune trial loads the real dataset in its own process; decoding Speech Commands'
    ~100k files takes minutes each time, so the decoded array is kept as ``.npy`` under ``cache_dir()`` and
    memory-mapped (copy-on-write) after that. The key covers each file's path, size and mtime and the clip
    settings: editing, adding or removing a file or changing ``data.audio`` decodes again. Written by hand
    because torchaudio/soundfile cache nothing and a datasets-library dependency would be heavier than this.
    """
    key = _clip_cache_key(paths, audio)
    cached = cache_dir() / "clips" / f"{key}.npy"
    shape = (len(paths), round(audio.sample_rate * audio.clip_seconds))
    if cached.is_file():
        try:
            x = np.load(cached, mmap_mode="c")
            if x.dtype == np.float32 and x.shape == shape:
                return np.asarray(x)  # a plain ndarray view of the copy-on-write map
            log.warning(
                "%s: clip cache has %s %s, expected float32 %s; decoding again",
                cached,
                x.dtype,
                x.shape,
                shape,
            )
        except (OSError, ValueError) as err:
            log.warning("%s: unreadable clip cache (%s); decoding again", cached, err)
    with one_torch_thread():
        x = np.stack(
            [
                standardize_clip(*read_wav(p), audio.sample_rate, audio.clip_seconds, audio.trim_silence)
                for p in paths
            ]
        )
    try:
        with atomic_path(cached) as tmp, open(tmp, "wb") as f:
            np.save(f, x)
    except OSError as err:  # a read-only home or a full disk costs speed, never the run
        log.warning(
            "cannot write the clip cache %s (%s); set GPTFL_CACHE_DIR to a writable folder", cached, err
        )
    return x


def _clip_cache_key(paths: Sequence[Path], audio: AudioConfig) -> str:
    h = hashlib.sha256()
    settings = [CLIP_CACHE_VERSION, audio.sample_rate, audio.clip_seconds, audio.trim_silence]
    h.update(json.dumps(settings).encode())
    for p in paths:
        try:
            st = Path(p).stat()
        except FileNotFoundError:
            raise DataNotFoundError(f"{p}: audio file missing") from None
        h.update(f"\n{Path(p).resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]
