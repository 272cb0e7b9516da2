"""SpeechT5 runs a whole batch in one ``model.generate`` call, each row under its own seeded dropout stream."""

from __future__ import annotations

import numpy as np
import pytest

from gptfl_ray.config import GenerateConfig
from gptfl_ray.generate.base import Target
from tests.tiny_generators import build_tiny_speecht5

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPTS = np.array(["zero", "one two three", "seven", "a photo of a cat"])  # different token lengths
SEEDS = np.array([11, 22, 33, 44], dtype=np.int64)
# The tiny HiFi-GAN's reach past a frame: conv_pre (kernel 7) sees 3 frames each side, the later layers
# less than one more; 256 vocoder samples per frame.
VOCODER_REACH = 4 * 256


@pytest.fixture(scope="module")
def t5_gen(tmp_path_factory):
    from gptfl_ray.generate.speech_t5 import SpeechT5Generator

    t5, vocoder, xvectors = build_tiny_speecht5(tmp_path_factory.mktemp("t5"))
    # threshold 1.0: the tiny random model decodes several steps before it stops, so the pre-net
    # dropout draws at several steps; the task rate is the vocoder's (no resampling in the comparison).
    options = {"vocoder": str(vocoder), "speaker_embeddings": str(xvectors), "threshold": 1.0}
    cfg = GenerateConfig(generator="speecht5", model_id=str(t5), batch_size=4, options=options)
    return SpeechT5Generator(cfg, Target("speech", sample_rate=16000))


def count_calls(model) -> list[int]:
    """Record the batch size of every ``model.generate`` call (the real method still runs)."""
    sizes: list[int] = []
    original = model.generate

    def spy(input_ids, **kwargs):
        sizes.append(int(input_ids.shape[0]))
        return original(input_ids, **kwargs)

    model.generate = spy
    return sizes


def test_speecht5_batch_is_one_call_reproducible_and_equal_to_one_row_calls(t5_gen):
    import torch

    calls = count_calls(t5_gen.model)
    try:
        batch, meta = t5_gen.generate({"prompt": PROMPTS, "seed": SEEDS})
        again, _ = t5_gen.generate({"prompt": PROMPTS, "seed": SEEDS})
        assert calls == [4, 4]  # one call per batch (it was one per row)
        ones = [
            t5_gen.generate({"prompt": PROMPTS[i : i + 1], "seed": SEEDS[i : i + 1]})[0][0] for i in range(4)
        ]
    finally:
        del t5_gen.model.generate
    longest = max(len(w) for w in batch)
    for i, wav in enumerate(batch):
        assert wav.dtype == np.float32 and np.isfinite(wav).all() and np.std(wav) > 0
        assert len(wav) % 256 == 0 and len(wav) >= 4 * 256  # whole frames (256 samples each), several steps
        assert np.array_equal(wav, again[i])  # same rows, same batch -> identical samples
        # Padding is masked and the dropout masks are the row's own: the same length as the one-row call and
        # equal up to the rounding of padded matmuls, except that the batched vocoder sees zero frames after a
        # shorter row's end: its last VOCODER_REACH samples may differ (a longest row's may not).
        assert len(ones[i]) == len(wav)
        head = len(wav) if len(wav) == longest else len(wav) - VOCODER_REACH
        assert np.allclose(wav[:head], ones[i][:head], atol=1e-6)
    assert longest > min(len(w) for w in batch)  # rows of one batch end at their own lengths

    # The one-row call is plain transformers' one-row generation under torch.manual_seed(seed).
    for i in (0, 3):
        spk = meta[i]["speaker"]
        inputs = t5_gen.processor(text=str(PROMPTS[i]), return_tensors="pt")
        torch.manual_seed(int(SEEDS[i]))
        with torch.no_grad():
            ref = t5_gen.model.generate(
                inputs["input_ids"],
                speaker_embeddings=t5_gen.speakers[spk : spk + 1],
                vocoder=t5_gen.vocoder,
                threshold=1.0,
            )
        assert np.array_equal(ones[i], ref.numpy())


def test_speecht5_rows_draw_their_own_dropout_masks(t5_gen):
    """Two rows of one batch with the same text: the same seed gives the same sample, another seed another
    one (with transformers' shared batch mask both pairs would be equal)."""
    speaker = [int(np.random.default_rng(s).integers(4)) for s in range(100)]  # the speaker a seed draws
    twin = next(s for s in range(23, 100) if speaker[s] == speaker[22])  # same speaker as seed 22
    same, meta = t5_gen.generate({"prompt": PROMPTS[[1, 1]], "seed": np.array([22, 22])})
    other, meta_other = t5_gen.generate({"prompt": PROMPTS[[1, 1]], "seed": np.array([22, twin])})
    assert meta == meta_other  # same text, same speaker: only the dropout stream differs
    # Identical rows of one batch compute identically, so any difference comes from the dropout masks.
    assert np.array_equal(same[0], same[1])
    assert not np.array_equal(other[0], other[1])
