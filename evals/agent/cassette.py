"""Record/replay of LLM answers at the HTTP level: a local OpenAI-compatible endpoint in front of the real one.

The agent's real client stack (ChatOpenAI -> openai -> HTTP) talks to ``CassetteServer.url``. Each chat-completions
request is keyed by the sha256 of its *rendered* content -- messages, response_format, tools, tool_choice -- so any
change to a prompt template, its examples, the drag formatting or the output schema changes the key:

* replay: a known key is answered from the cassette; an unknown key is a **miss**: HTTP 400 with an explanation (the
  client does not retry 400s), recorded in ``misses`` so the eval reports the case as stale instead of silently
  scoring the offline fallback;
* record: the request is forwarded to the upstream OpenAI-compatible API (``OPENAI_BASE_URL`` or api.openai.com, key
  ``OPENAI_API_KEY``) and its answer stored.

Cassettes live in ``cassettes/<prompt label>/<case id>.json`` (one per case and prompt version) with metadata
saying how they were made (model, upstream, date, and whether the answers are a real model's or scripted).
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field

CASSETTE_DIR = Path(__file__).resolve().parent / "cassettes"
KEY_FIELDS = ("messages", "response_format", "tools", "tool_choice")
Mode = Literal["replay", "record"]


def request_key(body: dict[str, Any]) -> str:
    """sha256 of the rendered request (what the model is asked), independent of model name and sampling settings."""
    content = {k: body.get(k) for k in KEY_FIELDS if body.get(k) is not None}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class CassetteMeta(BaseModel):
    case: str
    prompt: str
    """Template label, e.g. reason_intentions.v1."""
    template_sha256: str | None = None
    model: str | None = None
    upstream: str | None = None
    recorded_at: str | None = None
    synthetic: bool = False
    """True when the answers were written by hand and served by a scripted server, not produced by an LLM."""
    note: str = ""


class CassetteEntry(BaseModel):
    key: str
    request: dict[str, Any]
    response: dict[str, Any]


class Cassette(BaseModel):
    meta: CassetteMeta
    entries: list[CassetteEntry] = Field(default_factory=list)

    def find(self, key: str) -> CassetteEntry | None:
        return next((e for e in self.entries if e.key == key), None)


def cassette_path(root: Path, prompt: str, case: str) -> Path:
    return root / prompt / f"{case}.json"


def load_cassette(root: Path, prompt: str, case: str) -> Cassette | None:
    path = cassette_path(root, prompt, case)
    return Cassette.model_validate_json(path.read_text()) if path.is_file() else None


class Miss(BaseModel):
    case: str
    key: str
    reason: str


class CassetteServer:
    """The local endpoint. Set ``case`` before each case's run (cases run one at a time)."""

    def __init__(self, root: Path, prompt: str, mode: Mode, *, upstream: str | None = None,
                 api_key: str | None = None, meta_defaults: dict[str, Any] | None = None,
                 template_sha256: str | None = None, forward: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.root, self.prompt, self.mode = root, prompt, mode
        self.upstream = (upstream or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key
        self.meta_defaults = meta_defaults or {}
        self.template_sha256 = template_sha256
        self._forward = forward or self._http_forward
        self.case: str | None = None
        self.misses: list[Miss] = []
        self.hits: dict[str, int] = {}
        self.recorded: dict[str, int] = {}
        self._lock = threading.Lock()
        self._cache: dict[str, Cassette] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    body = {}
                status, answer = outer.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> CassetteServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self.mode == "record":
            for cassette in self._cache.values():
                path = cassette_path(self.root, self.prompt, cassette.meta.case)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(cassette.model_dump_json(indent=1) + "\n")

    # -------------------------------------------------------------------------------------------- answering

    def _cassette(self, case: str) -> Cassette:
        if case not in self._cache:
            existing = None if self.mode == "record" else load_cassette(self.root, self.prompt, case)
            self._cache[case] = existing or Cassette(meta=CassetteMeta(
                case=case, prompt=self.prompt, template_sha256=self.template_sha256,
                recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), upstream=self.upstream,
                **self.meta_defaults))
        return self._cache[case]

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"cassette server: unknown path {path}", "type": "invalid_request_error"}}
        case = self.case or "unknown"
        key = request_key(body)
        with self._lock:
            cassette = self._cassette(case)
            if self.mode == "replay":
                entry = cassette.find(key)
                if entry is not None:
                    self.hits[case] = self.hits.get(case, 0) + 1
                    return 200, entry.response
                reason = ("no cassette for this case and prompt version" if not cassette.entries else
                          "the rendered request differs from every recorded one (changed template, examples, "
                          "drag formatting or schema?): re-record with --record")
                self.misses.append(Miss(case=case, key=key, reason=reason))
                return 400, {"error": {"message": f"cassette miss for case {case!r}: {reason}",
                                       "type": "invalid_request_error", "code": "cassette_miss"}}
        try:
            response = self._forward(body)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a server error
            return 502, {"error": {"message": f"upstream failed: {exc}", "type": "server_error"}}
        with self._lock:
            if cassette.meta.model is None:
                cassette.meta.model = response.get("model") or body.get("model")
            if cassette.find(key) is None:
                cassette.entries.append(CassetteEntry(key=key, request={k: body.get(k) for k in KEY_FIELDS
                                                                        if body.get(k) is not None},
                                                      response=response))
            self.recorded[case] = self.recorded.get(case, 0) + 1
        return 200, response

    def _http_forward(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = httpx.post(f"{self.upstream}/chat/completions", json=body, headers=headers, timeout=120.0)
        r.raise_for_status()
        return r.json()
