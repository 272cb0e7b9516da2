"""Model-backed generators on tiny random models built offline, loaded by local path like a hub id; and the
remote generator against a local HTTP service."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from gptfl_ray.config import ConfigError, GenerateConfig, validate_config
from gptfl_ray.data.synthetic import load_synthetic
from gptfl_ray.generate.base import Target
from gptfl_ray.generate.pipeline import generate
from tests.tiny_generators import build_tiny_audioldm, build_tiny_speecht5, build_tiny_stable_diffusion

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    t5, vocoder, xvectors = build_tiny_speecht5(root / "t5")
    return {
        "sd": build_tiny_stable_diffusion(root / "sd"),
        "t5": t5,
        "vocoder": vocoder,
        "xvectors": xvectors,
        "ldm": build_tiny_audioldm(root / "ldm"),
    }


def audio_cfg(generator: str, model_id: Path, options: dict) -> object:
    return validate_config(
        {
            "data": {"dataset": "fsdd", "audio": {"sample_rate": 8000}},
            "prompts": {"num_per_class": 2},
            "generate": {
                "generator": generator,
                "model_id": str(model_id),
                "batch_size": 2,
                "rows_per_shard": 3,
                "options": options,
            },
        }
    )


def test_diffusers_pipeline_end_to_end(ray_session, tiny, tmp_path):
    cfg = validate_config(
        {
            "data": {"dataset": "mnist"},
            "prompts": {"num_per_class": 3},
            "generate": {
                "generator": "diffusers",
                "model_id": str(tiny["sd"]),
                "batch_size": 3,
                "rows_per_shard": 4,
                "options": {"num_inference_steps": 2},
            },
        }
    )
    manifest = generate(cfg, tmp_path / "sd", label_names=["3", "5"])
    assert manifest["counts_per_class"] == [3, 3]
    assert manifest["model_id"] == str(tiny["sd"])
    table = pq.read_table(sorted((tmp_path / "sd" / "shards").glob("*.parquet")))
    assert set(table["guidance_scale"].to_pylist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert table["prompt"].to_pylist()[0] == "a photo of a three"
    for png, meta in zip(table["image"].to_pylist(), table["meta"].to_pylist(), strict=True):
        img = Image.open(io.BytesIO(png))
        assert (img.size, img.mode) == ((28, 28), "L")  # generated at 32×32, resized to the task
        assert json.loads(meta)["native_size"] == [32, 32]
    ds = load_synthetic(tmp_path / "sd", cfg.data)
    assert ds.x.shape == (6, 28, 28)
    assert len({x.tobytes() for x in ds.x}) == 6


def test_diffusers_sample_depends_only_on_its_row(tiny):
    from gptfl_ray.generate.image_diffusers import DiffusersImageGenerator

    gen = DiffusersImageGenerator(
        GenerateConfig(generator="diffusers", model_id=str(tiny["sd"]), options={"num_inference_steps": 2}),
        Target("image", image_size=28, channels=1),
    )
    batch = {
        "prompt": np.array(["a photo of a one", "a photo of a two", "a photo of a one"], dtype=object),
        "seed": np.array([1, 2, 3]),
        "guidance_scale": np.array([2.0, 4.0, 2.0], dtype=np.float32),
        "label": np.array([1, 2, 1]),
    }
    together = gen(batch)["image"].to_pylist()
    alone = gen({k: v[2:] for k, v in batch.items()})["image"].to_pylist()
    a, b = (np.asarray(Image.open(io.BytesIO(x)), dtype=int) for x in (together[2], alone[0]))
    assert np.abs(a - b).max() <= 1  # batch composition changes nothing beyond float rounding
    assert together[0] != together[2]  # other seed, other image


MIXED = {  # five rows, five distinct guidance scales (one at 1: no guidance; one non-integer)
    "prompt": np.array([f"a photo of a {w}" for w in ("one", "two", "three", "one", "five")], dtype=object),
    "seed": np.array([11, 12, 13, 14, 15]),
    "guidance_scale": np.array([1.0, 2.0, 3.5, 4.0, 5.0], dtype=np.float32),
    "label": np.array([1, 2, 3, 1, 5]),
}


def count_unet_forwards(pipe) -> list[int]:
    """Rows the UNet computes in each forward from now on (one forward per step per pipeline call)."""
    seen: list[int] = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: seen.append(int(args[0].shape[0])))
    return seen


def test_diffusers_one_pipeline_call_per_batch_with_per_row_guidance(tiny):
    import torch

    from gptfl_ray.generate.base import encode_png, to_task_image
    from gptfl_ray.generate.image_diffusers import DiffusersImageGenerator

    options = {"num_inference_steps": 2, "negative_prompt": "a sketch of a cat"}
    gen = DiffusersImageGenerator(
        GenerateConfig(generator="diffusers", model_id=str(tiny["sd"]), options=options),
        Target("image", image_size=28, channels=1),
    )
    seen = count_unet_forwards(gen.pipe)
    batch = gen(MIXED)["image"].to_pylist()
    # one pipeline call (2 steps); the unguided row (scale 1) needs no unconditional prediction
    assert seen == [4 + 5] * 2
    for i, g in enumerate(MIXED["guidance_scale"]):  # each row == diffusers alone with its scale and seed
        ref = gen.pipe(
            prompt=[MIXED["prompt"][i]],
            negative_prompt=[options["negative_prompt"]],
            guidance_scale=float(g),
            num_inference_steps=2,
            generator=[torch.Generator().manual_seed(int(MIXED["seed"][i]))],
        ).images[0]
        a, b = (
            np.asarray(Image.open(io.BytesIO(x)), dtype=int)
            for x in (batch[i], encode_png(to_task_image(ref, 28, 1)))
        )
        assert np.abs(a - b).max() <= 1, f"row {i} (scale {g})"
    assert len(set(batch)) == 5


def test_audioldm_one_pipeline_call_per_batch_with_per_row_guidance(tiny):
    import torch

    from gptfl_ray.generate.audio_ldm import AudioLDMGenerator

    gen = AudioLDMGenerator(
        GenerateConfig(
            generator="audioldm",
            model_id=str(tiny["ldm"]),
            options={"num_inference_steps": 2, "audio_length_in_s": 0.25},
        ),
        Target("audio", sample_rate=16000),  # the vocoder's rate: no resampling
    )
    seen = count_unet_forwards(gen.pipe)
    batch = gen(MIXED)["audio"].to_pylist()
    assert seen == [4 + 5] * 2
    for i, g in enumerate(MIXED["guidance_scale"]):
        ref = gen.pipe(
            prompt=[MIXED["prompt"][i]],
            negative_prompt=[gen.options.negative_prompt],
            guidance_scale=float(g),
            num_inference_steps=2,
            audio_length_in_s=0.25,
            generator=[torch.Generator().manual_seed(int(MIXED["seed"][i]))],
            output_type="np",
        ).audios[0]
        peak = np.abs(ref).max()
        assert peak > 0 and np.allclose(batch[i], np.clip(ref, -1, 1), rtol=0, atol=1e-4 * peak), f"row {i}"


def test_run_guided_falls_back_to_one_call_per_scale():
    from gptfl_ray.generate.guidance import run_guided

    calls: list[tuple[float, list[int]]] = []

    def call(scale, idx):
        calls.append((scale, idx.tolist()))
        return [f"{scale}:{i}" for i in idx]

    scales = np.array([2.0, 3.0, 2.0], dtype=np.float32)
    out = run_guided(object(), scales, call)  # an unknown pipeline: its guidance formula is not known
    assert out == ["2.0:0", "3.0:1", "2.0:2"] and calls == [(2.0, [0, 2]), (3.0, [1])]
    calls.clear()
    assert run_guided(object(), np.array([0.5, 1.0]), call) == ["0.5:0", "0.5:1"]  # both unguided
    assert calls == [(0.5, [0, 1])]


def test_speecht5_pipeline_end_to_end(ray_session, tiny, tmp_path):
    options = {
        "vocoder": str(tiny["vocoder"]),
        "speaker_embeddings": str(tiny["xvectors"]),
        "minlenratio": 1.0,
    }
    cfg = audio_cfg("speecht5", tiny["t5"], options)
    manifest = generate(cfg, tmp_path / "t5", label_names=["0", "1"])
    assert manifest["counts_per_class"] == [2, 2] and manifest["sample_rate"] == 8000
    table = pq.read_table(sorted((tmp_path / "t5" / "shards").glob("*.parquet")))
    assert table["prompt"].to_pylist() == ["zero", "zero", "one", "one"]
    speakers = [json.loads(m)["speaker"] for m in table["meta"].to_pylist()]
    assert all(0 <= s < 4 for s in speakers)
    for wav in table["audio"].to_pylist():
        # 16 kHz vocoder output resampled to 8 kHz: 256 vocoder samples per frame -> 128 at the task rate.
        assert len(wav) > 0 and len(wav) % 128 == 0 and np.std(wav) > 0
    assert load_synthetic(tmp_path / "t5", cfg.data).x.shape == (4, 8000)


def test_speecht5_needs_a_speaker_file(tiny):
    from gptfl_ray.generate.speech_t5 import SpeechT5Generator

    cfg = GenerateConfig(
        generator="speecht5", model_id=str(tiny["t5"]), options={"vocoder": str(tiny["vocoder"])}
    )
    with pytest.raises(ConfigError, match="generate.options.speaker_embeddings: required"):
        SpeechT5Generator(cfg, Target("speech", sample_rate=8000))


def test_audioldm_pipeline_end_to_end(ray_session, tiny, tmp_path):
    cfg = audio_cfg("audioldm", tiny["ldm"], {"num_inference_steps": 2, "audio_length_in_s": 0.5})
    manifest = generate(cfg, tmp_path / "ldm", label_names=["0", "1"])
    assert manifest["counts_per_class"] == [2, 2] and manifest["modality"] == "audio"
    table = pq.read_table(sorted((tmp_path / "ldm" / "shards").glob("*.parquet")))
    assert table["prompt"].to_pylist()[0] == "a sound of zero"
    lengths = {len(w) for w in table["audio"].to_pylist()}
    assert len(lengths) == 1 and 0.4 * 8000 <= lengths.pop() <= 0.5 * 8000
    assert load_synthetic(tmp_path / "ldm", cfg.data).x.shape == (4, 8000)


def test_missing_local_model_names_the_field(tmp_path):
    from gptfl_ray.generate.image_diffusers import DiffusersImageGenerator

    cfg = GenerateConfig(generator="diffusers", model_id=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="generate.model_id: .*nope: not a diffusers pipeline folder"):
        DiffusersImageGenerator(cfg, Target("image", image_size=28))


# --------------------------------------------------------------------------------------------- remote
class GenerationService:
    """A local OpenAI-compatible image + speech service backed by the real offline generators."""

    def __init__(self, fail_first: int = 0, retry_after: str | None = None):
        from gptfl_ray.generate.image_glyphs import GlyphImageGenerator
        from gptfl_ray.generate.speech_espeak import EspeakSpeechGenerator

        digits = tuple(str(i) for i in range(10))
        self.glyphs = GlyphImageGenerator(
            GenerateConfig(), Target("image", 64, 1, label_names=digits, label_text=digits)
        )
        self.speech = EspeakSpeechGenerator(
            GenerateConfig(generator="espeak"), Target("speech", sample_rate=16000)
        )
        self.fail_first, self.retry_after = fail_first, retry_after
        self.requests: list[dict] = []
        self.times: list[float] = []  # monotonic arrival time of each request
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(30)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _serve(self):
        from aiohttp import web

        async def images(request):
            body = await request.json()
            self.requests.append(body)
            self.times.append(time.monotonic())
            if len(self.requests) <= self.fail_first:
                headers = {"Retry-After": self.retry_after} if self.retry_after else None
                return web.Response(status=503, text="busy", headers=headers)
            if body.get("response_format") != "b64_json" or "prompt" not in body:
                return web.Response(status=400, text="bad request")
            digit = body["prompt"].split()[-1]
            row = {"label_name": np.array([digit], dtype=object), "seed": np.array([body["seed"]])}
            png = self.glyphs.generate(row)[0][0]
            return web.json_response({"data": [{"b64_json": base64.b64encode(png).decode()}]})

        async def speech(request):
            body = await request.json()
            self.requests.append(body)
            wav, sr, _ = self.speech.speak(body["input"], np.random.default_rng(body["seed"]))
            buf = io.BytesIO()
            sf.write(buf, wav, sr, format="WAV")
            return web.Response(body=buf.getvalue(), content_type="audio/wav")

        app = web.Application()
        app.router.add_post("/v1/images/generations", images)
        app.router.add_post("/v1/audio/speech", speech)
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())


def remote_batch(prompts: list[str]) -> dict[str, np.ndarray]:
    n = len(prompts)
    return {
        "prompt": np.array(prompts, dtype=object),
        "seed": np.arange(n) + 10,
        "guidance_scale": np.full(n, 3.0, dtype=np.float32),
        "label": np.arange(n),
    }


def test_remote_images_through_an_http_service_with_retries():
    from gptfl_ray.generate.remote import RemoteGenerator

    service = GenerationService(fail_first=2)
    with service as url:
        gen = RemoteGenerator(
            GenerateConfig(
                generator="remote", model_id="glyph-server", options={"base_url": url, "max_concurrency": 2}
            ),
            Target("image", image_size=28, channels=1),
        )
        out = gen(remote_batch(["a photo of a 4", "a photo of a 9", "a photo of a 4"]))
    assert len(service.requests) == 3 + 2  # two 503 replies were retried
    assert {r["model"] for r in service.requests} == {"glyph-server"}
    assert sorted(r["seed"] for r in service.requests[2:]) == [10, 11, 12]
    imgs = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"].to_pylist()]
    assert all(i.shape == (28, 28) for i in imgs)  # served at 64×64, resized to the task
    assert not np.array_equal(imgs[0], imgs[2])  # other seed
    assert json.loads(out["meta"].to_pylist()[0]) == {"served_size": [64, 64]}


def test_remote_speech_and_errors():
    from gptfl_ray.generate.remote import RemoteError, RemoteGenerator

    with GenerationService() as url:
        svc_cfg = {"base_url": url, "voices": ["a", "b"], "retries": 1}
        gen = RemoteGenerator(
            GenerateConfig(generator="remote", model_id="tts", options=svc_cfg),
            Target("speech", sample_rate=8000),
        )
        out = gen(remote_batch(["seven", "two"]))
        waves = out["audio"].to_pylist()
        assert all(0.2 * 8000 < len(w) < 2.5 * 8000 for w in waves)
        bad = RemoteGenerator(
            GenerateConfig(
                generator="remote",
                model_id="x",
                options={"base_url": url, "extra_body": {"response_format": "url"}, "retries": 0},
            ),
            Target("image", image_size=28),
        )
        with pytest.raises(RemoteError, match="HTTP 400"):
            bad(remote_batch(["a photo of a 1"]))
    with pytest.raises(ConfigError, match="generate.options.base_url"):
        RemoteGenerator(GenerateConfig(generator="remote", model_id="x"), Target("image", image_size=28))


def test_remote_honours_retry_after_and_caps_replies():
    from gptfl_ray.generate.remote import RemoteError, RemoteGenerator

    service = GenerationService(fail_first=1, retry_after="1")
    with service as url:
        opts = {"base_url": url, "retries": 1}
        gen = RemoteGenerator(
            GenerateConfig(generator="remote", model_id="g", options=opts), Target("image", image_size=28)
        )
        gen(remote_batch(["a photo of a 4"]))
        assert len(service.times) == 2 and service.times[1] - service.times[0] >= 1.0  # not the 0.5 s backoff
        small = RemoteGenerator(  # a 1 s WAV is ~32 KB: over a 10 KB cap, and not retried
            GenerateConfig(generator="remote", model_id="t", options={**opts, "max_reply_mb": 0.01}),
            Target("speech", sample_rate=8000),
        )
        with pytest.raises(RemoteError, match=r"over the 10485-byte cap \(generate\.options\.max_reply_mb\)"):
            small(remote_batch(["seven"]))
    assert len(service.requests) == 3


def test_remote_api_key_never_goes_over_plain_http_to_another_host(monkeypatch):
    from gptfl_ray.generate.registry import get_generator
    from gptfl_ray.generate.remote import RemoteGenerator

    monkeypatch.setenv("GPTFL_TEST_KEY", "sk-secret")
    opts = {"base_url": "http://gen.example.org:8000/v1", "api_key_env": "GPTFL_TEST_KEY"}
    # on the driver, where the pipeline validates the options before Ray starts: one line naming the field
    with pytest.raises(ConfigError, match=r"^generate\.options\.base_url: .*\$GPTFL_TEST_KEY would travel"):
        get_generator("remote").parse_options(opts)
    cfg = GenerateConfig(generator="remote", model_id="g", options={**opts, "allow_insecure_http": True})
    gen = RemoteGenerator(cfg, Target("image", image_size=28))  # the explicit opt-in
    assert gen.headers == {"Authorization": "Bearer sk-secret"}
    with pytest.raises(ConfigError, match="allow_insecure_http: true"):  # the actor side, same rule
        RemoteGenerator.__init__(
            gen, cfg.model_copy(update={"options": opts}), Target("image", image_size=28)
        )
    for url in ("https://gen.example.org/v1", "http://127.0.0.1:8000/v1"):
        get_generator("remote").parse_options({**opts, "base_url": url})
    monkeypatch.delenv("GPTFL_TEST_KEY")
    assert (
        RemoteGenerator(cfg.model_copy(update={"options": opts}), Target("image", image_size=28)).headers
        == {}
    )
