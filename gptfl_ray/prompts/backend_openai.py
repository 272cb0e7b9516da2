"""``openai`` expansion backend: any OpenAI-compatible chat-completions endpoint (``vllm serve``, OpenAI, ...).

Written on aiohttp rather than Ray's ``HttpRequestProcessorConfig`` stage because that stage fails the whole
dataset once a request exhausts its retries, has no per-request timeout and does not retry a malformed 200
reply; here every such failure becomes a template fallback for that row only (counted in the manifest).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from gptfl_ray.prompts.instruction import chat_messages, check_columns

if TYPE_CHECKING:
    import aiohttp

    from gptfl_ray.config import ExpanderConfig

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0


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

    Each request has a ``timeout_s`` deadline and up to ``retries`` extra attempts (exponential backoff,
    ``Retry-After`` honoured) after a timeout, connection error, 408/429/5xx or malformed reply. Other HTTP
    errors (400, 401, 404, ...) are not retried. A row whose attempts all fail gets ``raw_expansion`` None.
    The row's seed is sent as ``seed`` so servers that support it (vLLM, OpenAI) sample reproducibly.
    """

    def __init__(self, cfg: ExpanderConfig):
        self.cfg = cfg
        self.url = f"{cfg.base_url.rstrip('/')}/chat/completions"
        key = os.environ.get(cfg.api_key_env)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

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
        return [text for text, _ in results]

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
        wait = 0.0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(max(wait, self.cfg.retry_backoff_s * 2 ** (attempt - 1)))
            wait = 0.0
            try:
                async with limit, session.post(self.url, json=payload) as resp:
                    body = await resp.text()
                    status = resp.status
                    retry_after = resp.headers.get("Retry-After")
                if status in RETRYABLE_STATUS:
                    reason = f"HTTP {status}"
                    wait = _retry_after_seconds(retry_after)
                    continue
                if status >= 400:
                    return None, f"HTTP {status} (not retried)"
                return parse_chat_completion(body), ""
            except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11 on
                reason = "timeout"
            except aiohttp.ClientError as err:
                reason = f"connection error ({type(err).__name__})"
            except MalformedReply as err:
                reason = f"malformed reply ({err})"
        return None, reason

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names)
        raw = self.generate(batch.to_pylist())
        if "raw_expansion" in batch.column_names:
            batch = batch.drop_columns(["raw_expansion"])
        return batch.append_column("raw_expansion", pa.array(raw, pa.string()))


def _retry_after_seconds(value: str | None) -> float:
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value else 0.0
    except ValueError:  # an HTTP date: fall back to the exponential backoff
        return 0.0
