"""Turn raw samples into model inputs: normalised image tensors, log-mel spectrograms or token ids.

Real and synthetic data go through the same functions, so a model pretrained on synthetic data sees the
same input distribution the clients' data produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.transforms as AT

from gptfl_ray.config import AudioConfig, DataConfig, TextConfig
from gptfl_ray.data.base import ArrayDataset, get_spec


class LogMel(torch.nn.Module):
    """Waveform (N, T) -> log-mel (N, 1, n_mels, frames)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.mel = AT.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels
        )
        self.to_db = AT.AmplitudeToDB(stype="power", top_db=80.0)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        db = self.to_db(self.mel(wav) + 1e-10)
        # Per-clip standardisation: loudness differs wildly between TTS engines and microphones.
        mean = db.mean(dim=(-2, -1), keepdim=True)
        std = db.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
        return ((db - mean) / std).unsqueeze(1)


def audio_input_shape(cfg: AudioConfig) -> tuple[int, int, int]:
    frames = round(cfg.sample_rate * cfg.clip_seconds) // cfg.hop_length + 1
    return (1, cfg.n_mels, frames)


def image_tensor(x: np.ndarray, dataset: str) -> torch.Tensor:
    """uint8 (N,H,W[,C]) -> normalised float32 (N,C,H,W) using the dataset's mean/std (the user's data keeps
    its channels)."""
    spec = get_spec(dataset)
    t = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    if spec.channels and t.shape[1] != spec.channels:
        t = t.mean(dim=1, keepdim=True) if spec.channels == 1 else t.expand(-1, spec.channels, -1, -1)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return ((t - mean) / std).contiguous()


def audio_tensor(wav: np.ndarray, cfg: AudioConfig, batch: int = 512) -> torch.Tensor:
    """float32 waveforms (N, T) at cfg.sample_rate -> log-mel (N, 1, n_mels, frames)."""
    logmel = LogMel(cfg)
    parts = [
        logmel(torch.from_numpy(np.ascontiguousarray(wav[i : i + batch]))) for i in range(0, len(wav), batch)
    ]
    return torch.cat(parts) if parts else torch.empty(0, *audio_input_shape(cfg))


def text_tensor(texts: np.ndarray | list[str], text: TextConfig | None) -> torch.Tensor:
    """Texts -> int64 token ids (N, text.max_length), -1 = padding (gptfl_ray/data/text.py)."""
    from gptfl_ray.data.text import text_ids

    return torch.from_numpy(text_ids(list(texts), text))


def to_tensors(ds: ArrayDataset, dataset: str, audio: AudioConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs and int64 labels for a whole dataset (texts: with the ``data.text`` settings they carry)."""
    if ds.modality == "text":
        x = text_tensor(ds.x, ds.text)
    else:
        x = image_tensor(ds.x, dataset) if ds.modality == "image" else audio_tensor(ds.x, audio)
    return x, torch.from_numpy(np.asarray(ds.y, dtype=np.int64))


def input_shape(
    dataset: str | DataConfig, audio: AudioConfig, data_dir: str | Path | None = None
) -> tuple[int, ...]:
    """(C, H, W) models see, (max_length,) token ids for text; datasets read from the user's data need their
    ``DataConfig``."""
    spec = get_spec(dataset, data_dir)
    if spec.modality == "audio":
        return audio_input_shape(audio)
    if spec.modality == "text":
        text = dataset.text if isinstance(dataset, DataConfig) else None
        return ((text or TextConfig()).max_length,)
    return (spec.channels, spec.image_size, spec.image_size)
