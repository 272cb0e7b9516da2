"""gptfl_ray/transport.py: the URL/secret rule, capped reads and retry waits shared by the HTTP clients
(``gptfl submit``, the ``openai`` expander, the ``remote`` generator; their own tests cover the wiring)."""

from __future__ import annotations

import asyncio
import random
import time
from email.utils import formatdate

import pytest

from gptfl_ray.errors import UserError
from gptfl_ray.transport import (
    MAX_RETRY_WAIT_S,
    InsecureEndpointError,
    ReplyTooLarge,
    check_endpoint,
    is_loopback,
    read_capped,
    retry_after_seconds,
    retry_wait,
)


def test_loopback_hosts():
    for host in ("localhost", "LOCALHOST.", "api.localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("", None, "10.0.0.7", "0.0.0.0", "example.org", "localhost.example.org", "::ffff:8.8.8.8"):
        assert not is_loopback(host), host


def test_secret_never_in_clear_text_to_another_host():
    rule = dict(field="x.url", insecure=False, opt_in="set x.insecure: true")
    check_endpoint("http://127.0.0.1:8000/v1", secret="the key", **rule)
    check_endpoint("https://example.org/v1", secret="the key", **rule)
    check_endpoint("http://example.org/v1", secret=None, **rule)  # nothing secret travels
    check_endpoint("http://example.org/v1", secret="the key", **{**rule, "insecure": True})
    with pytest.raises(InsecureEndpointError) as err:
        check_endpoint("http://example.org/v1", secret="the key", **rule)
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    assert str(err.value) == (
        "x.url http://example.org/v1: the key would travel in clear text over http:// to example.org; "
        "use https:// (or, on a network you trust, set x.insecure: true)"
    )
    for bad in ("example.org:80", "ftp://example.org", "http://"):
        with pytest.raises(InsecureEndpointError, match=r"^x\.url: expected an http\(s\)://HOST"):
            check_endpoint(bad, secret=None, **rule)


def test_retry_wait_backoff_jitter_and_retry_after():
    rng = random.Random(0)
    waits = [retry_wait(3, 0.5, rng=rng) for _ in range(200)]
    assert all(1.0 <= w < 3.0 for w in waits)  # 0.5 · 2² × [0.5, 1.5)
    assert max(waits) - min(waits) > 1.0  # spread out, not lock-step
    assert 5.0 <= retry_wait(1, 0.5, "5", rng=rng) <= 5.5  # the server's wait wins when longer
    assert 1.0 <= retry_wait(3, 0.5, "0", rng=rng) < 3.0
    assert retry_wait(10, 1.0, rng=rng) == MAX_RETRY_WAIT_S  # the backoff is capped ...
    assert retry_wait(1, 0.5, str(MAX_RETRY_WAIT_S + 1)) is None  # ... a longer Retry-After: give up
    now = time.time()
    assert 29 <= retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) <= 31  # an HTTP date
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") == retry_after_seconds(None) == retry_after_seconds("-3") == 0.0


class _Content:
    def __init__(self, chunks):
        self.chunks = chunks

    async def iter_chunked(self, n):
        for c in self.chunks:
            yield c


class _Reply:
    """The two attributes of an aiohttp ClientResponse that read_capped uses."""

    def __init__(self, chunks, content_length=None):
        self.content, self.content_length = _Content(chunks), content_length


def test_read_capped():
    assert asyncio.run(read_capped(_Reply([b"ab", b"cd"]), 4)) == b"abcd"
    with pytest.raises(ReplyTooLarge, match="over the 3-byte cap"):  # a streamed body past the cap
        asyncio.run(read_capped(_Reply([b"ab", b"cd"]), 3))
    with pytest.raises(ReplyTooLarge, match="reply of 10 bytes is over the 3-byte cap"):  # refused unread
        asyncio.run(read_capped(_Reply([], content_length=10), 3))
