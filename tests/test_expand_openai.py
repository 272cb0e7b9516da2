"""``openai`` backend against a local OpenAI-compatible server (POST /v1/chat/completions on 127.0.0.1).

The server's behaviour is scripted per class so one table exercises every path: valid replies, a retryable
503, timeouts, malformed 200 replies, a non-retryable 400, replies that miss the label, and duplicates; a
wrong API key gets 401 for every class. Most tests look at rows, so they lift the fallback cap
(``max_fallback_fraction: 1``); the cap itself has its own tests.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pytest

from gptfl_ray.config import ExpanderConfig, PromptsConfig
from gptfl_ray.errors import UserError
from gptfl_ray.prompts import build_prompt_table, count_fallbacks, expand_prompts, expand_rows
from gptfl_ray.prompts.backend_openai import MalformedReply, parse_chat_completion
from gptfl_ray.prompts.expand import ExpansionFallbackError
from gptfl_ray.transport import InsecureEndpointError

TIMEOUT_S = 0.4
RETRIES = 2
INSTRUCTION = "class=<{label}> base=<{prompt}>"  # easy for the fake server to parse


class FakeOpenAI(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()  # (class, seed) -> requests
        self.requests: list[dict] = []
        self.auth: set[str | None] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def _reply(text: str) -> bytes:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    body = {"id": "x", "object": "chat.completion", "model": "fake", "choices": [choice]}
    return json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAI

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_POST(self):
        srv = self.server
        if self.path != "/v1/chat/completions":
            return self._send(404, b"{}")
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        label = re.search(r"class=<(.+?)>", payload["messages"][-1]["content"]).group(1)
        seed = payload.get("seed")
        # Abandoned (timed-out) requests keep their server thread busy: count only the prompt ones.
        counted = label != "ship"
        with srv.lock:
            srv.attempts[(label, seed)] += 1
            attempt = srv.attempts[(label, seed)]
            srv.requests.append(payload)
            srv.auth.add(self.headers.get("Authorization"))
            srv.in_flight += counted
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            if self.headers.get("Authorization") == "Bearer wrong-key":
                self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
            elif label == "wolf":  # 429 with a Retry-After, then fine
                if attempt == 1:
                    self._send(429, b'{"error": "slow down"}', {"Retry-After": "1"})
                else:
                    self._send(200, _reply(f"A grey wolf howls, take {seed}."))
            elif label == "whale":  # a reply far over the client's cap
                self._send(200, _reply("A whale. " * 200_000))
            elif label == "cat":  # valid, unique per row
                time.sleep(0.05)
                self._send(200, _reply(f"A fluffy cat naps on a red sofa, take {seed}."))
            elif label == "dog":  # valid but identical every time -> only the first survives dedupe
                self._send(200, _reply("A happy dog runs in the park."))
            elif label == "bird":  # 503 once, then fine
                if attempt == 1:
                    self._send(503, b'{"error": "busy"}')
                else:
                    self._send(200, _reply(f"A small bird sings at dawn, take {seed}."))
            elif label == "ship":  # never answers in time
                time.sleep(TIMEOUT_S * 3)
                self._send(200, _reply("A ship, too late."))
            elif label == "horse":  # 200 with a body that is not a chat completion
                self._send(200, b'{"choices": [], "oops": tru')
            elif label == "frog":  # answers, but never names the class
                self._send(200, _reply("A green amphibian on a lily pad."))
            else:  # "tree": a client error, not retried
                self._send(400, b'{"error": "bad request"}')
        finally:
            with srv.lock:
                srv.in_flight -= counted


@pytest.fixture
def server():
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


LABELS = ["cat", "dog", "bird", "ship", "horse", "frog", "tree"]


def prompt_rows(labels=LABELS, n=4):
    cfg = PromptsConfig(num_per_class=n, seed=1)
    return build_prompt_table(cfg, labels, modality="image", label_text={}).to_pylist()


def expander(server, **kw) -> ExpanderConfig:
    base = dict(backend="openai", model="fake-model", base_url=server.base_url, instruction=INSTRUCTION)
    base.update(timeout_s=TIMEOUT_S, retries=RETRIES, retry_backoff_s=0.05, max_concurrency=3, batch_size=8)
    return ExpanderConfig(**{**base, "max_fallback_fraction": 1.0, **kw})


def test_parse_chat_completion():
    assert parse_chat_completion(_reply("hi").decode()) == "hi"
    for body in ["not json", "{}", '{"choices": []}', '{"choices": [{"message": {"content": null}}]}']:
        with pytest.raises(MalformedReply):
            parse_chat_completion(body)


def test_openai_backend_retries_timeouts_malformed_and_fallbacks(server, monkeypatch):
    monkeypatch.setenv("GPTFL_TEST_KEY", "sk-test")
    rows = prompt_rows()
    t0 = time.perf_counter()
    out = expand_rows(rows, expander(server, api_key_env="GPTFL_TEST_KEY"))
    elapsed = time.perf_counter() - t0
    by_class: dict[str, list[dict]] = {}
    for r in out:
        by_class.setdefault(r["label_name"], []).append(r)
    seeds = {(r["label_name"], r["index"]): r["seed"] for r in rows}

    def attempts(label):
        return [server.attempts[(label, seeds[(label, i)])] for i in range(4)]

    # valid replies are used, one request each, the row's seed is sent
    assert [r["expansion_fallback"] for r in by_class["cat"]] == [False] * 4
    assert all(r["prompt"] == f"A fluffy cat naps on a red sofa, take {r['seed']}." for r in by_class["cat"])
    assert attempts("cat") == [1] * 4
    # a 503 is retried and then succeeds
    assert [r["expansion_fallback"] for r in by_class["bird"]] == [False] * 4
    assert attempts("bird") == [2] * 4
    # timeouts and malformed replies: 1 + RETRIES attempts, then the template
    for label in ("ship", "horse"):
        assert attempts(label) == [1 + RETRIES] * 4, label
        assert all(
            r["expansion_fallback"] and r["prompt"] == f"a photo of a {label}" for r in by_class[label]
        )
    # not retried: client error, or a reply that fails validation
    for label in ("tree", "frog"):
        assert attempts(label) == [1] * 4, label
        assert all(r["expansion_fallback"] for r in by_class[label])
    # duplicates: the first (lowest index) survives
    assert [r["expansion_fallback"] for r in by_class["dog"]] == [False, True, True, True]
    assert by_class["dog"][0]["prompt"] == "A happy dog runs in the park."

    assert count_fallbacks(out) == 3 + 4 * 4  # dog 3 + ship, horse, tree, frog
    assert server.max_in_flight <= 3  # the concurrency cap holds ...
    assert server.max_in_flight >= 2  # ... and requests do overlap
    assert server.auth == {"Bearer sk-test"}
    sent = server.requests[0]
    assert sent["model"] == "fake-model" and sent["max_tokens"] == 40 and sent["temperature"] == 0.8
    # 4 ship rows time out 3 times each, 3 at a time: far below the serial 12 x 0.4 s
    assert elapsed < 12 * TIMEOUT_S


def test_openai_greedy_sends_no_seed_and_no_key_no_auth(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rows = prompt_rows(["cat"], n=2)
    out = expand_rows(rows, expander(server, temperature=0.0))
    assert server.auth == {None}
    assert all("seed" not in p for p in server.requests)
    # the fake server's text depends on the seed: without one both replies are equal -> one dedupe fallback
    assert count_fallbacks(out) == 1


def test_unreachable_endpoint_fails_the_step_in_one_line(monkeypatch):
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    cfg = ExpanderConfig(backend="openai", model="m", base_url=url, retries=1, retry_backoff_s=0.01)
    with pytest.raises(ExpansionFallbackError) as err:
        expand_rows(prompt_rows(["cat"], n=3), cfg)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert msg.startswith("prompts.expander.max_fallback_fraction: 3/3 prompts (100%) fell back")
    assert f"endpoint {url}/chat/completions: connection error (ClientConnectorError) ×3" in msg
    # explicitly allowed: the run goes on with the templates
    out = expand_rows(prompt_rows(["cat"], n=3), cfg.model_copy(update={"max_fallback_fraction": 1.0}))
    assert count_fallbacks(out) == 3


def test_wrong_key_401_fails_the_step_naming_endpoint_and_status(server, monkeypatch):
    monkeypatch.setenv("GPTFL_TEST_KEY", "wrong-key")
    cfg = expander(server, api_key_env="GPTFL_TEST_KEY", max_fallback_fraction=0.1)
    with pytest.raises(ExpansionFallbackError) as err:
        expand_rows(prompt_rows(["cat"], n=4), cfg)
    msg = str(err.value)
    assert "\n" not in msg and "4/4 prompts (100%)" in msg and "more than 0.1" in msg
    assert f"endpoint {server.base_url}/chat/completions: HTTP 401 (not retried): " in msg
    assert "Incorrect API key provided" in msg
    assert sum(server.attempts.values()) == 4  # a 401 is not retried


def test_fallback_cap_counts_validation_rejections_too(server):
    """cat: 4 valid; frog: 4 replies that never name the class -> 4/8 fall back."""
    rows = prompt_rows(["cat", "frog"], n=4)
    assert (
        count_fallbacks(expand_rows(rows, expander(server, max_fallback_fraction=0.5))) == 4
    )  # 0.5: at the cap
    with pytest.raises(ExpansionFallbackError, match=r"4/8 prompts \(50%\) .*rejected by validation .* ×4"):
        expand_rows(rows, expander(server, max_fallback_fraction=0.4))


def test_retry_after_is_honoured_and_big_replies_are_cut(server):
    rows = prompt_rows(["wolf", "whale"], n=1)
    t0 = time.perf_counter()
    out = {r["label_name"]: r for r in expand_rows(rows, expander(server, timeout_s=5.0))}
    assert time.perf_counter() - t0 >= 1.0  # Retry-After: 1 beats the 0.05 s backoff
    assert not out["wolf"]["expansion_fallback"] and out["wolf"]["prompt"].startswith("A grey wolf howls")
    assert out["whale"]["expansion_fallback"]  # ~2 MB reply: refused at the 1 MiB cap ...
    assert server.attempts[("whale", rows[1]["seed"])] == 1  # ... and not retried


def test_api_key_never_goes_over_plain_http_to_another_host(monkeypatch):
    monkeypatch.setenv("GPTFL_TEST_KEY", "sk-secret")
    rows = prompt_rows(["cat"], n=1)
    remote = ExpanderConfig(
        backend="openai", model="m", base_url="http://10.0.0.7:8000/v1", api_key_env="GPTFL_TEST_KEY"
    )
    with pytest.raises(
        InsecureEndpointError, match=r"^prompts\.expander\.base_url http://10\.0\.0\.7:8000/v1/chat"
    ):
        expand_rows(rows, remote)  # before any request: nothing listens there
    with pytest.raises(InsecureEndpointError, match=r"allow_insecure_http: true"):
        from gptfl_ray.prompts.backend_openai import OpenAIPromptExpander

        OpenAIPromptExpander(remote)  # the actor applies the same rule
    monkeypatch.delenv("GPTFL_TEST_KEY")
    from gptfl_ray.prompts.backend_openai import api_headers

    assert api_headers(remote) == {}  # no key: nothing secret travels, plain http is fine
    monkeypatch.setenv("GPTFL_TEST_KEY", "sk-secret")
    for url in ("https://10.0.0.7/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1"):
        assert api_headers(remote.model_copy(update={"base_url": url})) == {
            "Authorization": "Bearer sk-secret"
        }
    assert api_headers(remote.model_copy(update={"allow_insecure_http": True}))  # the explicit opt-in


def test_openai_backend_in_ray_data_actor_pool(server, ray_session):
    import ray.data

    rows = prompt_rows(["cat", "dog", "horse"], n=5)
    cfg = expander(server, batch_size=4, concurrency=1, num_cpus=0.5)
    with pytest.raises(ExpansionFallbackError, match=r"9/15 .*malformed reply .* ×5; rejected by validation"):
        expand_prompts(ray.data.from_items(rows), cfg.model_copy(update={"max_fallback_fraction": 0.5}))
    ds = expand_prompts(ray.data.from_items(rows), cfg)
    out = sorted(ds.take_all(), key=lambda r: (r["label"], r["index"]))
    assert len(out) == 15
    assert [r["expansion_fallback"] for r in out] == [False] * 5 + [False] + [True] * 4 + [True] * 5
    assert count_fallbacks(ds) == 9
    assert out[0]["prompt"] == f"A fluffy cat naps on a red sofa, take {out[0]['seed']}."
    assert set(out[0]) == set(rows[0]) | {"expansion_fallback"}
    schema = ray.get(ds.to_arrow_refs())[0].schema  # from_items inferred float64: the table types come back
    assert schema.field("guidance_scale").type == pa.float32() and schema.field("seed").type == pa.int64()
