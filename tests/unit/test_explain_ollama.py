"""The native Ollama path against Ollama's HTTP contract (POST /api/chat, non-streaming), served by a
tiny fake that implements that contract as documented; the same fake speaks the OpenAI-compatible
``/v1/chat/completions`` for the other tests. Real servers: tests/integration/test_llm_narratives.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from decision_platform.api.app import create_app
from decision_platform.config import Settings
from decision_platform.explain.llm import LLMError, LLMTimeout, OllamaChat, OpenAIChat
from decision_platform.observability import metrics
from decision_platform.serving.platform import Platform

DENYLISTED = "dev-known-stolen-0001"
Reply = Callable[[dict[str, Any]], str]


def opening_of(request: dict[str, Any]) -> str:
    """The opening the prompt asks for (``Begin with: "..."``): a narrative that is true by construction."""
    prompt = request["messages"][-1]["content"]
    return prompt.rsplit('Begin with: "', 1)[1].split('"', 1)[0] + "."


def schema_of(request: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request constrains its answer to (Ollama ``format``, OpenAI ``response_format``)."""
    if isinstance(request.get("format"), dict):
        return request["format"]
    response_format = request.get("response_format") or {}
    return (response_format.get("json_schema") or {}).get("schema")


def answer_of(request: dict[str, Any]) -> str:
    """What a well-behaved model answers: the first fact the schema offers (structured prompt), else the
    opening (free text)."""
    schema = schema_of(request)
    if schema is None:
        return opening_of(request)
    return json.dumps({"mention": schema["properties"]["mention"]["items"]["enum"][:1]})


class FakeLLM:
    """A local HTTP server speaking Ollama's /api/chat and OpenAI's /v1/chat/completions.

    ``replies`` are used in order (the last one repeats): each is a string or a function of the request.
    ``delay_s`` makes every answer late (timeouts); requests are recorded for contract checks."""

    def __init__(self, replies: list[str | Reply] | None = None, delay_s: float = 0.0) -> None:
        self.replies = list(replies or [answer_of])
        self.delay_s = delay_s
        self.requests: list[tuple[str, dict[str, Any]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append((self.path, body))
                reply = fake.replies[min(len(fake.requests) - 1, len(fake.replies) - 1)]
                text = reply(body) if callable(reply) else reply
                deadline = time.monotonic() + fake.delay_s
                while time.monotonic() < deadline and not fake.stopping:
                    time.sleep(0.02)
                if self.path == "/api/chat":  # https://github.com/ollama/ollama/blob/main/docs/api.md
                    payload: dict[str, Any] = {
                        "model": body["model"],
                        "created_at": datetime.now(UTC).isoformat(),
                        "message": {"role": "assistant", "content": text},
                        "done": True,
                        "done_reason": "stop",
                        "total_duration": 1_000_000,
                        "load_duration": 1000,
                        "prompt_eval_count": 100,
                        "prompt_eval_duration": 1000,
                        "eval_count": 20,
                        "eval_duration": 1000,
                    }
                elif self.path == "/v1/chat/completions":
                    payload = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    }
                else:
                    self.send_error(404)
                    return
                data = json.dumps(payload).encode()
                try:
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout): nothing to answer
                    pass

        self.stopping = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_llm() -> Iterator[Callable[..., FakeLLM]]:
    started: list[FakeLLM] = []

    def start(replies: list[str | Reply] | None = None, delay_s: float = 0.0) -> FakeLLM:
        started.append(FakeLLM(replies, delay_s))
        return started[-1]

    yield start
    for fake in started:
        fake.close()


def test_ollama_client_speaks_the_native_chat_contract(fake_llm: Callable[..., FakeLLM]) -> None:
    fake = fake_llm(["Blocked because the rule denylisted_device fired."])
    client = OllamaChat(fake.url, "qwen2.5:1.5b", timeout_s=5, connect_timeout_s=1)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    result = client.chat(messages, max_tokens=50, temperature=0.0)
    client.close()
    assert result.text == "Blocked because the rule denylisted_device fired."
    assert result.model == "qwen2.5:1.5b" and result.latency_s > 0
    ((path, body),) = fake.requests
    assert path == "/api/chat"
    assert body["model"] == "qwen2.5:1.5b" and body["messages"] == messages
    assert body["stream"] is False  # one JSON object back, not a stream of chunks
    assert body["options"]["num_predict"] == 50 and body["options"]["temperature"] == 0.0
    assert body.get("format") is None  # free text: no schema


def test_ollama_client_sends_the_schema_as_format(fake_llm: Callable[..., FakeLLM]) -> None:
    fake = fake_llm(['{"mention": ["risk"]}'])
    client = OllamaChat(fake.url, "qwen2.5:1.5b", timeout_s=5, connect_timeout_s=1)
    schema = {"type": "object", "properties": {"mention": {"type": "array"}}, "required": ["mention"]}
    result = client.chat([{"role": "user", "content": "u"}], max_tokens=50, temperature=0.0, schema=schema)
    client.close()
    ((_, body),) = fake.requests
    assert body["format"] == schema and "repeat_penalty" not in body["options"]
    assert result.text == '{"mention": ["risk"]}'
    assert (result.prompt_tokens, result.completion_tokens) == (100, 20)  # prompt_eval_count, eval_count


def test_narratives_through_ollama_are_served_and_cached(
    fake_llm: Callable[..., FakeLLM],
    make_settings: Callable[..., Settings],
    start_platform: Callable[[Settings], Platform],
) -> None:
    fake = fake_llm()
    settings = make_settings(llm_url=fake.url, llm_model="qwen2.5:1.5b", llm_eager_actions=())
    with TestClient(create_app(settings, start_platform(settings))) as client:
        event = {"event_id": "ol-1", "amount": 10.0, "attributes": {"device_id": DENYLISTED}}
        decided = client.post("/decide", json={"entity_id": "ol", "event": event}).json()
        assert decided["action"] == 2
        url = f"/decisions/{decided['decision_id']}/explanation"
        explanation = client.get(url, params={"wait": "true", "timeout": 10}).json()
        assert explanation["status"] == "ready" and explanation["source"] == "llm", explanation
        # the model chose the first fact offered (the risk); the platform wrote the narrative
        assert explanation["narrative"].startswith(
            "Blocked because the rule denylisted_device (block tier) fired."
        )
        assert "The risk of fraud was" in explanation["narrative"]
        assert explanation["grounding"]["chosen"] == ["risk"]
        assert explanation["model"] == "qwen2.5:1.5b" and explanation["prompt_version"] == "narrative-v2"
        assert explanation["grounding"]["passed"] is True and explanation["latency_ms"] > 0
        assert client.get(url).json() == explanation  # cached: the model is not asked twice
        assert [path for path, _ in fake.requests] == ["/api/chat"]


def serve_posts(answer: Callable[[BaseHTTPRequestHandler], None]) -> tuple[ThreadingHTTPServer, str]:
    """A local HTTP server (and its URL) that reads each POST's body, then lets ``answer`` reply."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            answer(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class MisbehavingLLM:
    """An LLM endpoint gone wrong at the HTTP level: ``drip`` answers 200 and then a byte of its body every
    50 ms (a server wedged mid-answer, a proxy trickling), ``huge`` streams a 64 MB body of garbage.
    ``sent`` counts the body bytes the client took before it hung up."""

    def __init__(self, mode: str) -> None:
        self.sent = 0
        self.stopping = threading.Event()

        def answer(handler: BaseHTTPRequestHandler) -> None:
            size = 64 * 1024 * 1024
            chunk = b" " if mode == "drip" else b"x" * 65536
            try:
                handler.send_response(200)
                handler.send_header("content-type", "application/json")
                handler.send_header("content-length", str(size))
                handler.end_headers()
                while self.sent < size and not self.stopping.is_set():
                    handler.wfile.write(chunk)
                    handler.wfile.flush()
                    self.sent += len(chunk)
                    if mode == "drip":
                        self.stopping.wait(0.05)
            except OSError:  # the client hung up: what a bounded client does
                pass

        self.server, self.url = serve_posts(answer)

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("backend", ["ollama", "openai"])
@pytest.mark.parametrize("mode", ["drip", "huge"])
def test_an_llm_that_trickles_or_floods_its_answer_is_given_up_in_time(backend: str, mode: str) -> None:
    """httpx's timeout bounds each read, not the call: an endpoint that kept sending a byte now and then
    held the narrator's thread for as long as it liked (no narrative, no timeout counted), and one that
    sent a huge body had it read into the server's memory. Now the call ends by ``timeout_s`` with
    LLMTimeout, and a body over ``max_response_bytes`` is refused (LLMError) as soon as it is over."""
    fake = MisbehavingLLM(mode)
    client = (
        OllamaChat(fake.url, "m", timeout_s=1.0, connect_timeout_s=1.0, max_response_bytes=256 * 1024)
        if backend == "ollama"
        else OpenAIChat(fake.url + "/v1", "m", 1.0, 1.0, max_response_bytes=256 * 1024)
    )
    started = time.monotonic()
    try:
        with pytest.raises(LLMTimeout if mode == "drip" else LLMError):
            client.chat([{"role": "user", "content": "u"}], max_tokens=50, temperature=0.0)
        elapsed = time.monotonic() - started
    finally:
        client.close()
        fake.close()
    assert elapsed < 3.0, f"the call took {elapsed:.1f} s (timeout 1 s)"
    assert fake.sent < 16 * 1024 * 1024, f"{fake.sent} bytes of the answer were read (limit 256 kB)"


class OddShapedLLM:
    """An LLM endpoint that answers every call 200 with one fixed body: what a URL pointing at something
    else (a login page, a proxy's error page, another API) or a server of another version gives."""

    def __init__(self, body: bytes, content_type: str = "application/json") -> None:
        self.calls = 0

        def answer(handler: BaseHTTPRequestHandler) -> None:
            self.calls += 1
            handler.send_response(200)
            handler.send_header("content-type", content_type)
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        self.server, self.url = serve_posts(answer)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _both(answer: dict[str, Any], **extra: Any) -> bytes:
    """One body both clients read: an OpenAI ``choices`` answer and an Ollama ``message`` answer."""
    message = {"role": "assistant", "content": answer.get("content", "Allowed.")}
    return json.dumps({"model": "m", "choices": [{"message": message}], "message": message, **extra}).encode()


ODD_BODIES = {
    "an HTML page": b"<html><body>Sign in to continue</body></html>",
    "a JSON list": b"[]",
    "an object without an answer": b"{}",
    "text that is a number": _both({"content": 123}),
}


@pytest.mark.parametrize("backend", ["ollama", "openai"])
@pytest.mark.parametrize("body", list(ODD_BODIES.values()), ids=list(ODD_BODIES))
def test_an_answer_of_another_shape_is_an_llm_error(backend: str, body: bytes) -> None:
    """A 200 whose body is not a chat answer (HTML, JSON of another shape) raised JSONDecodeError,
    pydantic's ValidationError or TypeError out of the client -- not LLMError, so the narrator neither
    counted it nor backed off: a traceback logged for every decision, the explanation "pending" however
    long one waited, and ``decision-platform explain`` stopped with a traceback. Now it is LLMError."""
    fake = OddShapedLLM(body)
    client = (
        OllamaChat(fake.url, "m", timeout_s=5.0, connect_timeout_s=1.0)
        if backend == "ollama"
        else OpenAIChat(fake.url + "/v1", "m", 5.0, 1.0)
    )
    try:
        with pytest.raises(LLMError, match="not a chat answer"):
            client.chat([{"role": "user", "content": "u"}], max_tokens=50, temperature=0.0)
    finally:
        client.close()
        fake.close()


@pytest.mark.parametrize(
    "extra",
    [
        {"usage": "n/a"},
        {"usage": {"prompt_tokens": "x", "completion_tokens": -1}, "timings": [1, 2]},
        {"usage": {"prompt_tokens_details": 5}},
    ],
    ids=["usage text", "counts not counts", "token details a number"],
)
def test_token_counts_of_another_shape_are_left_out_and_the_answer_kept(extra: dict[str, Any]) -> None:
    """The counts are informative: an OpenAI-compatible answer with ``usage`` or ``timings`` of another
    shape raised AttributeError from the client, or ValueError from the narrator summing them (a
    traceback for every narrative of such a server)."""
    fake = OddShapedLLM(_both({}, **extra))
    client = OpenAIChat(fake.url + "/v1", "m", 5.0, 1.0)
    try:
        result = client.chat([{"role": "user", "content": "u"}], max_tokens=50, temperature=0.0)
    finally:
        client.close()
        fake.close()
    assert result.text == "Allowed."
    assert (result.prompt_tokens, result.cached_tokens, result.completion_tokens) == (None, None, None)


def test_an_llm_url_answering_a_web_page_gives_the_template_said_so_and_backs_off(
    make_settings: Callable[..., Settings], start_platform: Callable[[Settings], Platform]
) -> None:
    """DP_LLM_URL pointing at a web page (a proxy's sign-in page answers 200): the explanation is the
    template with ``reason`` "llm_error", counted, and the LLM is left alone for DP_LLM_RETRY_AFTER_S --
    it was answered 202 "pending" however long the caller waited, with a traceback logged each time."""
    fake = OddShapedLLM(ODD_BODIES["an HTML page"], "text/html")
    settings = make_settings(llm_url=fake.url, llm_eager_actions=(), llm_retry_after_s=60.0)
    errors = metrics.LLM_NARRATIVES.labels(result="error")
    before = errors._value.get()
    try:
        with TestClient(create_app(settings, start_platform(settings))) as client:
            for i in range(2):
                event = {"event_id": f"odd-{i}", "amount": 10.0, "attributes": {"device_id": DENYLISTED}}
                decided = client.post("/decide", json={"entity_id": "odd", "event": event}).json()
                url = f"/decisions/{decided['decision_id']}/explanation"
                answer = client.get(url, params={"wait": "true", "timeout": 10})
                assert answer.status_code == 200, answer.json()
                explanation = answer.json()
                assert explanation["source"] == "template"
                assert explanation["reason"] == ("llm_error" if i == 0 else "llm_unavailable")
    finally:
        fake.close()
    assert errors._value.get() == before + 1
    assert fake.calls == 1  # backed off after the first odd answer
