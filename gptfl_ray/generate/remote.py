"""``remote``: generation as a service over HTTP (the paper treats generators as services).

Speaks the OpenAI-compatible APIs that image and speech servers implement: ``POST {base_url}/images/
generations`` (``response_format: b64_json``) for images, ``POST {base_url}/audio/speech`` (WAV body) for
speech and audio. The row's ``seed`` and ``guidance_scale`` are sent as extra fields, which servers that
support them (diffusers/vLLM-style servers) honour and others ignore. Requests run concurrently
(``max_concurrency``) with a per-request timeout and jittered exponential-backoff retries (``Retry-After``
honoured) on timeouts, connection errors and 408/429/5xx; a sample that still fails fails the batch (there
is no fallback sample to invent), and a rerun resumes from the finished shards. Replies above
``max_reply_mb`` are refused; the API key is never sent over plain http:// to another host unless
``allow_insecure_http`` (rules: :mod:`gptfl_ray.transport`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any, Literal

import numpy as np
import soundfile as sf
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from gptfl_ray.config import ConfigError
from gptfl_ray.data.audio import resample
from gptfl_ray.errors import shorten
from gptfl_ray.generate.base import Generator, GeneratorOptions, encode_png, to_task_image
from gptfl_ray.generate.registry import register
from gptfl_ray.transport import (
    RETRYABLE_STATUS,
    InsecureEndpointError,
    ReplyTooLarge,
    bearer_headers,
    read_capped,
    retry_wait,
)

RETRY_BACKOFF_S = 0.5
KEY_FIELD = "generate.options.base_url"
KEY_OPT_IN = "set generate.options.allow_insecure_http: true"


def check_key_rule(value: str | None, info: ValidationInfo) -> str | None:
    """``base_url`` validator of the generators' options: the API-key rule (:mod:`gptfl_ray.transport`) on the
    driver, before any actor starts (the actor applies it again)."""
    if value and value.startswith(("http://", "https://")):
        try:
            bearer_headers(
                value,
                info.data.get("api_key_env", "OPENAI_API_KEY"),
                field=KEY_FIELD,
                insecure=info.data.get("allow_insecure_http", False),
                opt_in=KEY_OPT_IN,
            )
        except InsecureEndpointError as err:  # parse_options names the field itself
            raise PydanticCustomError("insecure_url", str(err).removeprefix(f"{KEY_FIELD} ")) from None
    return value


class RemoteOptions(GeneratorOptions):
    api_key_env: str = "OPENAI_API_KEY"  # sent as a Bearer token when the variable is set
    # Allow sending that key over plain http:// to a host other than this machine.
    allow_insecure_http: bool = False
    base_url: str | None = None  # e.g. http://gen-server:8000/v1; required
    max_reply_mb: float = Field(64.0, gt=0)  # a larger reply fails the request (not retried)
    size: str | None = None  # images: requested "WxH"; default: the server's
    voices: list[str] = Field(default_factory=list)  # speech: one drawn per sample; empty = server default
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(3, ge=0)
    max_concurrency: int = Field(4, gt=0)
    audio_modality: Literal["speech", "audio"] = "speech"  # audio tasks: prompts for TTS or for sound

    @field_validator("base_url")
    @classmethod
    def _key_rule(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_key_rule(value, info)


class RemoteError(RuntimeError):
    """A request that failed after its retries (or with a non-retryable status)."""


class _Retryable(Exception):
    pass


@register
class RemoteGenerator(Generator):
    """One class for both kinds: ``kind`` follows the task (image or audio)."""

    name = "remote"
    kind = "any"
    modality = "any"
    Options = RemoteOptions

    @classmethod
    def prompt_modality(cls, options, data_modality):
        if data_modality == "text":  # text over HTTP is generator 'text-llm' (backend: openai)
            raise ConfigError(
                "generate.generator: 'remote' serves images and audio; for a text dataset use 'text-llm' "
                "with options.backend: openai"
            )
        return "image" if data_modality == "image" else options.audio_modality

    def __init__(self, cfg, target):
        self.kind = target.kind  # instance attribute: the service makes whatever the task needs
        super().__init__(cfg, target)
        o: RemoteOptions = self.options  # type: ignore[assignment]
        if not o.base_url or not o.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"generate.options.base_url: required, an http(s) URL such as http://host:8000/v1 (got {o.base_url!r})"
            )
        if not cfg.model_id:
            raise ConfigError(
                "generate.model_id: required for generator 'remote' (the model the server serves)"
            )
        self.url = o.base_url.rstrip("/") + (
            "/images/generations" if self.kind == "image" else "/audio/speech"
        )
        self.headers = bearer_headers(
            self.url, o.api_key_env, field=KEY_FIELD, insecure=o.allow_insecure_http, opt_in=KEY_OPT_IN
        )

    def generate(self, batch):
        rows = [
            {"prompt": str(p), "seed": int(s), "guidance_scale": float(g)}
            for p, s, g in zip(batch["prompt"], batch["seed"], batch["guidance_scale"], strict=True)
        ]
        bodies = asyncio.run(self._fetch_all(rows))
        samples, meta = [], []
        for row, body in zip(rows, bodies, strict=True):
            sample, info = self._decode(body, row)
            samples.append(sample)
            meta.append(info)
        return samples, meta

    # ------------------------------------------------------------------------------------- requests
    def request_body(self, row: dict[str, Any]) -> dict[str, Any]:
        o: RemoteOptions = self.options  # type: ignore[assignment]
        body: dict[str, Any] = {
            "model": self.model_id,
            "seed": row["seed"],
            "guidance_scale": row["guidance_scale"],
        }
        if self.kind == "image":
            body.update(prompt=row["prompt"], n=1, response_format="b64_json")
            if o.size:
                body["size"] = o.size
        else:
            body.update(input=row["prompt"], response_format="wav")
            if o.voices:
                body["voice"] = o.voices[np.random.default_rng(row["seed"]).integers(len(o.voices))]
        return {**body, **o.extra_body}

    async def _fetch_all(self, rows: list[dict[str, Any]]) -> list[bytes]:
        import aiohttp

        o: RemoteOptions = self.options  # type: ignore[assignment]
        limit = asyncio.Semaphore(o.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=o.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:

            async def one(row: dict[str, Any]) -> bytes:
                async with limit:
                    return await self._fetch(session, self.request_body(row))

            return list(await asyncio.gather(*(one(r) for r in rows)))

    async def _fetch(self, session: Any, body: dict[str, Any]) -> bytes:
        import aiohttp

        o: RemoteOptions = self.options  # type: ignore[assignment]
        limit = int(o.max_reply_mb * 2**20)
        last = ""
        retry_after: str | None = None
        for attempt in range(o.retries + 1):
            if attempt:
                wait = retry_wait(attempt, RETRY_BACKOFF_S, retry_after)
                if wait is None:
                    last += f" (Retry-After {retry_after!r}: too long to wait)"
                    break
                await asyncio.sleep(wait)
            retry_after = None
            try:
                async with session.post(self.url, json=body) as resp:
                    data = await read_capped(resp, limit)
                    if resp.status == 200:
                        return data
                    text = " ".join(data[:400].decode(errors="replace").split())
                    last = f"HTTP {resp.status}: {shorten(text, 160)}"
                    retry_after = resp.headers.get("Retry-After")
                    if resp.status not in RETRYABLE_STATUS:
                        break
            except ReplyTooLarge as err:
                last = f"{err} (generate.options.max_reply_mb)"
                break
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                last = f"{type(err).__name__}: {err}"
        raise RemoteError(f"remote generator: {self.url} failed for seed {body.get('seed')}: {last}")

    # ------------------------------------------------------------------------------------- replies
    def _decode(self, body: bytes, row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.kind == "image":
            from PIL import Image

            try:
                b64 = json.loads(body)["data"][0]["b64_json"]
                image = Image.open(io.BytesIO(base64.b64decode(b64)))
                image.load()
            except Exception as err:  # any malformed reply: say what was expected
                raise RemoteError(
                    f"remote generator: {self.url}: reply is not data[0].b64_json image ({err})"
                ) from None
            size, channels = self.target.image_size, self.target.channels
            assert size is not None
            return encode_png(to_task_image(image, size, channels)), {"served_size": list(image.size)}
        try:
            wav, sr = sf.read(io.BytesIO(body), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError) as err:
            raise RemoteError(f"remote generator: {self.url}: reply is not a WAV file ({err})") from None
        return resample(wav.mean(axis=1), int(sr), self.target.sample_rate), {"served_rate": int(sr)}
