"""Rules shared by the project's HTTP clients: ``gptfl submit``, the ``openai`` prompt expander and the ``remote``
generator. One place decides where a secret may travel, how much of a reply is read and how long to wait
before a retry.

- A secret (Ray auth token, API key) never goes over plain ``http://`` to a host other than this machine
  (loopback: ``localhost``, 127.0.0.0/8, ::1) unless the caller's explicit opt-in is set.
- Replies are read up to a byte cap (:func:`read_capped`); a larger one is an error, not a memory spike.
- Retry ``k`` waits ``backoff · 2^(k-1)`` with ±50 % jitter, or the server's ``Retry-After`` if longer; a
  ``Retry-After`` beyond :data:`MAX_RETRY_WAIT_S` means "do not retry" (:func:`retry_wait` returns None).
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from gptfl_ray.errors import UserError

MAX_RETRY_WAIT_S = 60.0
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})  # worth another attempt
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_CHUNK = 64 * 1024


class InsecureEndpointError(UserError, ValueError):
    """A URL a secret must not be sent to (one line naming the field); a ValueError for config validators."""


class ReplyTooLarge(ValueError):
    """A reply above the caller's byte cap."""


# ------------------------------------------------------------------------------------------ URL rule
_KEYS_FROM_THIS_ENV = contextvars.ContextVar("keys_from_this_env", default=True)


@contextmanager
def keys_from_another_environment() -> Iterator[None]:
    """Validation of a job that runs elsewhere (``gptfl submit``): its API keys come from the environment there,
    so this machine's variables are not read (URLs are still checked; the job applies the key rule itself)."""
    token = _KEYS_FROM_THIS_ENV.set(False)
    try:
        yield
    finally:
        _KEYS_FROM_THIS_ENV.reset(token)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a name or an IP literal, brackets allowed) is this machine."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_is_loopback(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname)


def check_endpoint(url: str, *, field: str, secret: str | None, insecure: bool, opt_in: str) -> None:
    """Refuse to send ``secret`` (what travels, e.g. "the API key in $X"; None: nothing secret) in clear text.

    Raises :class:`InsecureEndpointError` for a URL that is not ``http(s)://HOST...`` and for plain http to a
    non-loopback host while a secret would travel, unless ``insecure`` (the caller's opt-in, named by ``opt_in``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InsecureEndpointError(f"{field}: expected an http(s)://HOST[:PORT] URL (got {url!r})")
    if secret and parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise InsecureEndpointError(
            f"{field} {url}: {secret} would travel in clear text over http:// to {parts.hostname}; "
            f"use https:// (or, on a network you trust, {opt_in})"
        )


def bearer_headers(url: str, key_env: str, *, field: str, insecure: bool, opt_in: str) -> dict[str, str]:
    """``Authorization: Bearer $key_env`` for ``url`` (none when the variable is unset), after :func:`check_endpoint`."""
    key = os.environ.get(key_env, "").strip() if _KEYS_FROM_THIS_ENV.get() else ""
    check_endpoint(
        url,
        field=field,
        secret=f"the API key in ${key_env}" if key else None,
        insecure=insecure,
        opt_in=opt_in,
    )
    return {"Authorization": f"Bearer {key}"} if key else {}


# ---------------------------------------------------------------------------------------- replies
async def read_capped(resp: Any, limit: int) -> bytes:
    """The body of an aiohttp response, or :class:`ReplyTooLarge` once it passes ``limit`` bytes (decoded)."""
    length = resp.content_length
    if length is not None and length > limit:
        raise ReplyTooLarge(f"reply of {length} bytes is over the {limit}-byte cap")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge(f"reply is over the {limit}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------------------- retries
def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date); 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0
    return max(when - (time.time() if now is None else now), 0.0)


def retry_wait(
    attempt: int,
    backoff_s: float,
    retry_after: str | None = None,
    *,
    cap_s: float = MAX_RETRY_WAIT_S,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds to wait before retry ``attempt`` (1 = the first retry), or None when the server asked for
    longer than ``cap_s`` (the caller gives up rather than hang or come back early).

    ``backoff_s · 2^(attempt-1)`` scaled by a random factor in [0.5, 1.5), so that clients that failed
    together do not retry together; a ``Retry-After`` is honoured (plus up to 10 % jitter) when longer.
    """
    rng = rng or random
    asked = retry_after_seconds(retry_after)
    if asked > cap_s:
        return None
    backoff = backoff_s * 2 ** max(attempt - 1, 0) * (0.5 + rng.random())
    return min(max(backoff, asked * (1 + 0.1 * rng.random())), cap_s)
