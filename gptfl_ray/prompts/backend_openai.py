"""``openai`` expansion backend: any OpenAI-compatible chat-completions endpoint (``vllm serve``, OpenAI, ...).

Written on aiohttp rather than Ray's ``HttpRequestProcessorConfig`` stage because that stage fails the whole
dataset once a request exhausts its retries, has no per-request timeout and does not retry a malformed 200
reply; here every such failure becomes a template fallback for that row only (counted in the manifest, and
capped by ``prompts.expander.max_fallback_fraction``). The key, reply-size and retry rules are
:mod:`gptfl_ray.transport`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from gptfl_ray.errors import shorten
from gptfl_ray.prompts.expand import RAW_COLUMN, REASON_COLUMN
from gptfl_ray.prompts.instruction import chat_messages, check_columns
from gptfl_ray.transport import (
    RETRYABLE_STATUS,
    ReplyTooLarge,
    bearer_headers,
    read_capped,
    retry_wait,
)

if TYPE_CHECKING:
    import aiohttp

    from gptfl_ray.config import ExpanderConfig

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1 << 20  # a chat completion of max_new_tokens tokens is a few KiB


class MalformedReply(ValueError):
    """A 200 reply that is not a chat completion with a text message."""


def parse_chat_completion(body: str) -> str:
    """``choices[0].message.content`` of a chat-completions reply, or MalformedReply."""
    try:
        reply = json.loads(body)
    except json.JSONDecodeError as err:
        raise MalformedReply(f"not JSON ({err.msg})") from None
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("no choices[0].message.content") from None
    if not isinstance(content, str):
        raise MalformedReply(f"content is {type(content).__name__}, not a string")
    return content


class OpenAIPromptExpander:
    """Ray Data actor: one chat-completions request per row, ``cfg.max_concurrency`` in flight.

    Each request has a ``timeout_s`` deadline and up to ``retries`` extra attempts (jittered exponential
    backoff, ``Retry-After`` honoured) after a timeout, connection error, 408/429/5xx or malformed reply. Other
    HTTP errors (400, 401, 404, ...) and replies over ``MAX_REPLY_BYTES`` are not retried. A row whose attempts
    all fail gets ``raw_expansion`` None and the last failure in ``expansion_error``.
    The row's seed is sent as ``seed`` so servers that support it (vLLM, OpenAI) sample reproducibly.
    """

    def __init__(self, cfg: ExpanderConfig):
        self.cfg = cfg
        self.url = endpoint_url(cfg)
        self.headers = api_headers(cfg)

    def payload(self, row: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": chat_messages(cfg, row),
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "n": 1,
        }
        if cfg.temperature > 0:
            body["seed"] = int(row["seed"])
        return body

    def generate(self, rows: list[dict[str, Any]]) -> list[str | None]:
        return [text for text, _ in self.generate_with_reasons(rows)]

    def generate_with_reasons(self, rows: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
        """(text, "") per row, or (None, why the row's last attempt failed)."""
        results = asyncio.run(self._generate_all(rows))
        failures = Counter(reason for _, reason in results if reason)
        if failures:
            detail = ", ".join(f"{reason}: {n}" for reason, n in failures.most_common())
            logger.warning(
                "prompt expander (openai %s): %d/%d requests failed, using templates (%s)",
                self.url,
                sum(failures.values()),
                len(rows),
                detail,
            )
        return results

    async def _generate_all(self, rows: list[dict[str, Any]]) -> list[tuple[str | None, str]]:
        import aiohttp

        limit = asyncio.Semaphore(self.cfg.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency)
        async with aiohttp.ClientSession(
            timeout=timeout, headers=self.headers, connector=connector
        ) as session:
            return await asyncio.gather(*(self._request(session, limit, row) for row in rows))

    async def _request(
        self, session: aiohttp.ClientSession, limit: asyncio.Semaphore, row: dict[str, Any]
    ) -> tuple[str | None, str]:
        """(text, "") on success, else (None, reason of the last failure)."""
        import aiohttp

        payload = self.payload(row)
        reason = ""
        retry_after: str | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                wait = retry_wait(attempt, self.cfg.retry_backoff_s, retry_after)
                if wait is None:
                    return None, f"{reason}, Retry-After {shorten(retry_after or '', 40)} (not retried)"
                await asyncio.sleep(wait)
            retry_after = None
            try:
                async with limit, session.post(self.url, json=payload) as resp:
                    raw = await read_capped(resp, MAX_REPLY_BYTES)
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                    body = raw.decode(resp.charset or "utf-8", errors="replace")
                if status in RETRYABLE_STATUS:
                    reason = f"HTTP {status}"
                    continue
                if status >= 400:
                    detail = shorten(" ".join(body.split()), 80)
                    return None, f"HTTP {status} (not retried)" + (f": {detail}" if detail else "")
                return parse_chat_completion(body), ""
            except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on
                reason = "timeout"
            except aiohttp.ClientError as err:
                reason = f"connection error ({type(err).__name__})"
            except MalformedReply as err:
                reason = f"malformed reply ({err})"
            except ReplyTooLarge as err:
                return None, f"{err} (not retried)"
        return None, reason

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names)
        results = self.generate_with_reasons(batch.to_pylist())
        batch = batch.drop_columns([c for c in (RAW_COLUMN, REASON_COLUMN) if c in batch.column_names])
        batch = batch.append_column(RAW_COLUMN, pa.array([t for t, _ in results], pa.string()))
        return batch.append_column(REASON_COLUMN, pa.array([r or None for _, r in results], pa.string()))


def endpoint_url(cfg: ExpanderConfig) -> str:
    return f"{(cfg.base_url or '').rstrip('/')}/chat/completions"


def api_headers(cfg: ExpanderConfig) -> dict[str, str]:
    """The Authorization header for ``cfg``'s endpoint; refuses to send the key over plain http off this host."""
    return bearer_headers(
        endpoint_url(cfg),
        cfg.api_key_env,
        field="prompts.expander.base_url",
        insecure=cfg.allow_insecure_http,
        opt_in="set prompts.expander.allow_insecure_http: true",
    )
