"""Tiny random generative models built offline from configs, saved with ``save_pretrained``.

The generators load them back by local path through the same ``from_pretrained`` call a hub id takes.
Tokenizers are trained here on a small corpus (CLIP and RoBERTa: byte-level BPE with ``tokenizers``;
SpeechT5: a SentencePiece character model), so nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CORPUS = [
    "a photo of a zero",
    "a photo of a one two three four five six seven eight nine",
    "a sound of a dog barking in the rain",
    "a drawing of an airplane, a sketch of a cat, a painting of a ship",
    "zero one two three four five six seven eight nine ten",
    "the quick brown fox jumps over the lazy dog",
]


def _train_bpe(vocab_size: int, special: list[str], end_of_word_suffix: str | None) -> tuple[dict, list]:
    """Byte-level BPE trained on CORPUS; returns (vocab, merges) in the form the HF tokenizers take."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    suffix = {"end_of_word_suffix": end_of_word_suffix} if end_of_word_suffix else {}
    tok = Tokenizer(models.BPE(**suffix))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **suffix,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = dict(model["vocab"])
    if end_of_word_suffix:  # CLIP's BPE also needs every single byte-char with the word-end suffix
        for ch in pre_tokenizers.ByteLevel.alphabet():
            vocab.setdefault(ch + end_of_word_suffix, len(vocab))
    return vocab, merges


def _audible(vocoder) -> None:
    """HiFi-GAN's init (weights ~ N(0, 0.01)) makes a random vocoder output ~1e-11; rescale its conv
    weights so the tiny model's waveforms have a measurable level (still random weights)."""
    import torch

    with torch.no_grad():
        for name, p in vocoder.named_parameters():
            if name.endswith("weight") and p.ndim == 3:
                p.normal_(0.0, 1.0 / (p.shape[1] * p.shape[2]) ** 0.5)


def build_tiny_stable_diffusion(path: str | Path) -> Path:
    """A ~0.5 M-parameter Stable Diffusion pipeline (UNet, VAE, CLIP text encoder, CLIP tokenizer); 32×32."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    path = Path(path)
    vocab, merges = _train_bpe(400, ["<|startoftext|>", "<|endoftext|>"], "</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_speecht5(path: str | Path) -> tuple[Path, Path, Path]:
    """Tiny SpeechT5 TTS + HiFi-GAN vocoder + x-vector file: (model dir, vocoder dir, speakers .npy)."""
    import sentencepiece as spm
    import torch
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    torch.manual_seed(0)
    path = Path(path)
    model_dir, vocoder_dir = path / "speecht5", path / "hifigan"
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus = path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path / "spm_char"),
        model_type="char",
        vocab_size=40,
        character_coverage=1.0,
        bos_id=0,
        pad_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    tokenizer = SpeechT5Tokenizer(vocab_file=str(path / "spm_char.model"))
    processor = SpeechT5Processor(feature_extractor=SpeechT5FeatureExtractor(), tokenizer=tokenizer)
    config = SpeechT5Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        speech_decoder_prenet_units=32,
        speech_decoder_postnet_units=32,
        speech_decoder_postnet_layers=2,
        speaker_embedding_dim=16,
        num_mel_bins=80,
        reduction_factor=2,
        max_text_positions=64,
        max_speech_positions=256,
    )
    model = SpeechT5ForTextToSpeech(config)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=80,
            upsample_initial_channel=16,
            upsample_rates=[4, 4, 4, 4],
            upsample_kernel_sizes=[8, 8, 8, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            sampling_rate=16000,
        )
    )
    _audible(vocoder)
    vocoder.save_pretrained(vocoder_dir)
    speakers = path / "xvectors.npy"
    np.save(speakers, np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32))
    return model_dir, vocoder_dir, speakers


def build_tiny_audioldm(path: str | Path) -> Path:
    """Tiny AudioLDM pipeline (UNet, VAE, CLAP text encoder, RoBERTa tokenizer, HiFi-GAN vocoder)."""
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        RobertaTokenizer,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    torch.manual_seed(0)
    path = Path(path)
    vocab, merges = _train_bpe(400, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], None)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=32)
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=40,
            projection_dim=16,
            projection_hidden_size=16,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
        )
    )
    unet = UNet2DConditionModel(
        sample_size=(32, 16),
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(16, 32),
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=16,
        class_embeddings_concat=True,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=16,  # mel bins = latent width × VAE scale factor
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[8, 8, 4],  # 256 samples per mel frame: 1 s = 63 frames
            upsample_kernel_sizes=[16, 16, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    )
    _audible(vocoder)
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, steps_offset=1
    )
    pipe = AudioLDMPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )
    pipe.save_pretrained(path)
    return path
