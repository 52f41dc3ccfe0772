"""A local OpenAI-compatible HTTP server for tests, serving recorded answers on 127.0.0.1.

It lets the tests drive the real ``ChatOpenAI`` client (and the real ``openai`` HTTP stack under it, retries
included) without a network or a key. Answers are queued per test; every request is recorded (path, headers, JSON
body) so tests can check what was really sent (image blocks, response_format, tools). A request with no answer left
gets HTTP 500 with an explanatory error, which makes the test fail visibly instead of hanging.

Also used for the fake Osprey server: ``ScriptedHTTPServer`` takes any handler function.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Answer:
    """One HTTP answer: status, JSON (or raw text) body, headers, and an optional delay before sending."""

    body: dict[str, Any] | str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Handler = Callable[[RecordedRequest], Answer]


class ScriptedHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (free port) answering through ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        outer = self

        class _Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    body = raw.decode("utf-8", "replace")
                request = RecordedRequest(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                outer.requests.append(request)
                answer = outer.handler(request)
                if answer.delay_s:
                    time.sleep(answer.delay_s)
                payload = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)
                data = payload.encode("utf-8")
                self.send_response(answer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self._serve("POST")

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScriptedHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class FakeOpenAIServer(ScriptedHTTPServer):
    """OpenAI-compatible: answers ``POST /v1/chat/completions`` from a queue of recorded answers."""

    def __init__(self) -> None:
        self.answers: deque[Answer] = deque()
        super().__init__(self._answer)

    @property
    def url(self) -> str:
        """The ``base_url`` to give ChatOpenAI."""
        return self.base + "/v1"

    def queue(self, *answers: Answer | dict[str, Any]) -> None:
        for a in answers:
            self.answers.append(a if isinstance(a, Answer) else Answer(body=a))

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def _answer(self, request: RecordedRequest) -> Answer:
        if not request.path.endswith("/chat/completions"):
            return Answer({"error": {"message": f"unknown path {request.path}", "type": "invalid_request_error"}}, 404)
        if not self.answers:
            return Answer({"error": {"message": "test server: no recorded answer left", "type": "server_error"}},
                          500, {"x-should-retry": "false"})
        return self.answers.popleft()


# ------------------------------------------------------------------------------------------------ recorded answers
# Shaped like real Chat Completions responses (as OpenAI and vLLM send them), trimmed of nothing the client reads.


def chat_completion(content: str | None = None, *, tool_calls: list[dict[str, Any]] | None = None,
                    model: str = "gpt-4.1-mini-2025-04-14", finish_reason: str | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None, "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-BXq3rT0recorded",
        "object": "chat.completion",
        "created": 1747000000,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop")}],
        "usage": {"prompt_tokens": 812, "completion_tokens": 143, "total_tokens": 955},
        "service_tier": "default",
        "system_fingerprint": "fp_recorded",
    }


def tool_call(name: str, arguments: dict[str, Any] | str, call_id: str = "call_R3c0rd3d") -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def rate_limited(retry_after_ms: int = 20) -> Answer:
    return Answer({"error": {"message": "Rate limit reached for gpt-4.1-mini in organization org-test on requests "
                                        "per min (RPM): Limit 3, Used 3, Requested 1.",
                             "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
                  status=429, headers={"retry-after-ms": str(retry_after_ms)})


def server_error(status: int = 503) -> Answer:
    return Answer({"error": {"message": "The server is overloaded or not ready yet.", "type": "server_error"}},
                  status=status, headers={"retry-after-ms": "20"})


RECORDED_INTENTIONS: dict[str, Any] = {
    "intentions": [
        {"intention": "make the raccoon look sideways",
         "source_prompt": "a photo of a raccoon looking forward",
         "target_prompt": "a photo of a raccoon looking sideways", "confidence": 0.6},
        {"intention": "move the raccoon's head up and to the right",
         "source_prompt": "a photo of a raccoon", "target_prompt": "a photo of a raccoon with its head raised",
         "confidence": 0.25},
        {"intention": "make the raccoon's nose longer",
         "source_prompt": "a photo of a raccoon with a short nose",
         "target_prompt": "a photo of a raccoon with a long nose", "confidence": 0.15},
    ]
}

RECORDED_LOCATOR_REPLY = "1: the nose of a raccoon\n2: the left ear of the raccoon"


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAIServer]:
    """A running FakeOpenAIServer; the environment is cleared of real OpenAI settings for the test."""
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE", "LUCIDDRAG_LLM_MODEL",
                "LUCIDDRAG_VISION_MODEL", "LUCIDDRAG_STRUCTURED_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FakeOpenAIServer().start()
    try:
        yield server
    finally:
        server.stop()
