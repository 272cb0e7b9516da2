"""Waveform utilities shared by real and synthetic audio: read, resample, trim, fix length.

File I/O is soundfile (torchaudio.load needs torchcodec + FFmpeg); resampling is torchaudio's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate."""
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise ValueError(f"{path}: cannot read audio ({err})") from None
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
