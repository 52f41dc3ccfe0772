"""The client behind the agent's sample tool: in-process by default, the Serve deployment when configured.

`LUCIDDRAG_SAMPLER` (or an AgentContext `sampler` field, when the context has one) says where sampling happens:

* unset, "" or "local": in this process (`get_sampler` returns None; nothing changes for a single user);
* `serve:APP`: the Serve app APP in this process's Ray session, else in the local cluster (`ray.init("auto")`);
* `ray://HEAD:10001[/APP]`: a remote cluster through Ray Client (APP defaults to luciddrag-sampler);
* `http://HOST:PORT/APP`: Serve's HTTP proxy (JSON over HTTP; no Ray needed on the client).

A replica that dies mid-request is retried (sampling is a pure function of the job, so a retry is safe); when the
retries run out the caller gets one ServiceError line, and the graph's last checkpoint is still there to resume from.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image

from luciddrag.agent.serving.protocol import (SampleJob, SampleReply, ServiceError, TrackJob, TrackReply, edit_result,
                                              png_b64, sample_job)
from luciddrag.agent.serving.ray_app import DEFAULT_APP, import_ray
from luciddrag.engine.errors import InputError
from luciddrag.engine.pipeline import EditResult
from luciddrag.engine.request import EditRequest

ENV = "LUCIDDRAG_SAMPLER"
LOCAL = ("", "local", "inprocess", "in-process")


@dataclass(frozen=True)
class Endpoint:
    """A parsed LUCIDDRAG_SAMPLER value."""

    kind: str  # "serve" | "ray" | "http"
    app: str = DEFAULT_APP
    address: str | None = None  # Ray address (ray://..., or None: current session / "auto")
    url: str | None = None  # http(s) base URL of the app's route


def parse_endpoint(spec: str) -> Endpoint | None:
    """None for in-process; an InputError naming the accepted forms for anything unrecognised."""
    spec = spec.strip()
    if spec.lower() in LOCAL:
        return None
    if spec.startswith("serve:"):
        return Endpoint("serve", app=spec[len("serve:"):].strip("/") or DEFAULT_APP)
    if spec.startswith("ray://"):
        host, _, app = spec[len("ray://"):].partition("/")
        if not host:
            raise InputError(f"{ENV}={spec!r} names no Ray head: use ray://HOST:10001[/APP]")
        return Endpoint("ray", app=app.strip("/") or DEFAULT_APP, address=f"ray://{host}")
    if spec.startswith(("http://", "https://")):
        return Endpoint("http", url=spec.rstrip("/"))
    raise InputError(f"{ENV}={spec!r} is not a sampler: use 'local', serve:APP, ray://HOST:PORT[/APP] or "
                     "http://HOST:PORT/APP")


# -- transports: send JSON text, get JSON text -------------------------------------------------------------------

# Errors that mean "the replica is gone or not there yet": worth a retry, the job itself is fine.
_RETRYABLE_NAMES = {"ActorDiedError", "ActorUnavailableError", "RayActorError", "ActorUnschedulableError",
                    "BackPressureError", "DeploymentUnavailableError", "NodeDiedError", "WorkerCrashedError",
                    "ConnectError", "RemoteProtocolError", "ReadError"}


_UNREACHABLE = {"ConnectError", "DeploymentUnavailableError"}


def _retryable(exc: BaseException) -> bool:
    return any(c.__name__ in _RETRYABLE_NAMES for c in type(exc).__mro__)


class _RayTransport:
    def __init__(self, endpoint: Endpoint) -> None:
        ray, serve = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=endpoint.address or "auto", log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line for the user
                raise ServiceError(f"cannot reach the Ray cluster at {endpoint.address or 'auto'}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        try:
            self.handle = serve.get_app_handle(endpoint.app)
        except Exception as exc:  # noqa: BLE001 - RayServeException when the app is not running
            raise ServiceError(f"no Serve app {endpoint.app!r} is running in the Ray cluster (start it with "
                               f"`luciddrag serve sampler`): {str(exc).splitlines()[0]}") from None
        self.name = f"serve app {endpoint.app!r}"

    def call(self, method: str, text: str, timeout_s: float) -> str:
        return getattr(self.handle, method).remote(text).result(timeout_s=timeout_s)


class _HttpTransport:
    def __init__(self, endpoint: Endpoint) -> None:
        import httpx

        self.url = endpoint.url
        self.client = httpx.Client()
        self.name = f"sampler at {endpoint.url}"

    def call(self, method: str, text: str, timeout_s: float) -> str:
        resp = self.client.post(f"{self.url}/{method}", content=text, timeout=timeout_s,
                                headers={"content-type": "application/json"})
        if resp.status_code >= 500:
            raise ServiceError(f"{self.name} answered HTTP {resp.status_code}")
        resp.raise_for_status()
        return resp.text


# -- the client ------------------------------------------------------------------------------------------------

class ServeSampler:
    """Sampling (and the critic's tracking) on the deployment. Thread-safe: handles may be shared by threads."""

    def __init__(self, endpoint: Endpoint, *, retries: int = 2, backoff_s: float = 1.0,
                 timeout_s: float = 1800.0) -> None:
        self.endpoint = endpoint
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self._transport: Any = None
        self._lock = threading.Lock()
        self.retried = 0  # replica failures survived so far (for logs and tests)

    def _connect(self) -> Any:
        with self._lock:
            if self._transport is None:
                self._transport = (_HttpTransport(self.endpoint) if self.endpoint.kind == "http"
                                   else _RayTransport(self.endpoint))
            return self._transport

    def _call(self, method: str, text: str) -> str:
        transport = self._connect()
        for attempt in range(self.retries + 1):
            try:
                return transport.call(method, text, self.timeout_s)
            except ServiceError:
                raise
            except Exception as exc:  # noqa: BLE001 - sorted into retry / one clear line below
                if isinstance(exc, TimeoutError) or type(exc).__name__ == "GetTimeoutError":
                    raise ServiceError(f"{transport.name} did not answer within {self.timeout_s:.0f} s") from None
                if not _retryable(exc):
                    raise ServiceError(f"{transport.name} failed: {type(exc).__name__}: "
                                       f"{(str(exc).splitlines() or [''])[0][:300]}") from None
                if attempt == self.retries:
                    what = ("could not be reached" if type(exc).__name__ in _UNREACHABLE
                            else "replica died while working")
                    raise ServiceError(
                        f"the sampler {what} ({type(exc).__name__}; {transport.name}) and {self.retries} "
                        f"retr{'y' if self.retries == 1 else 'ies'} failed too; nothing before this step is lost: "
                        "run the same thread again to resume from its last checkpoint") from None
                self.retried += 1
                time.sleep(min(self.backoff_s * 2 ** attempt, 10.0))  # Serve is starting a new replica meanwhile
        raise AssertionError("unreachable")

    def sample_job(self, job: SampleJob) -> SampleReply:
        return SampleReply.model_validate_json(self._call("sample", job.model_dump_json()))

    def edit(self, request: EditRequest, intentions: Sequence[tuple[str, str]] | None = None,
             model: str | None = None) -> EditResult:
        """`DragEditor.edit(request, intentions)` on the deployment (`model`: the base model this run expects; the
        replica refuses a job for another). Progress is not streamed: a replica works on whole batches."""
        return edit_result(self.sample_job(sample_job(request, intentions or [], model)))

    def track(self, ctx: Any, original: Image.Image, edited: Image.Image, handles: Sequence[tuple[float, float]],
              prompt: str = "", radii: Sequence[float] | None = None) -> list[tuple[float, float]]:
        """The critic's DIFT tracking (`track_points` with the context's critic settings) on the deployment."""
        job = TrackJob(model=ctx.model, original_png=png_b64(original), edited_png=png_b64(edited),
                       handles=[(float(x), float(y)) for x, y in handles], prompt=prompt, t=ctx.critic_timestep,
                       up_block=ctx.critic_block, ensemble=ctx.critic_ensemble, seed=ctx.seed,
                       radii=list(radii) if radii is not None else None)
        reply = TrackReply.model_validate_json(self._call("track", job.model_dump_json()))
        if reply.failure is not None:
            raise reply.failure.exception()
        return list(reply.points)


@functools.lru_cache(maxsize=8)
def _client(spec: str) -> ServeSampler | None:
    endpoint = parse_endpoint(spec)
    return None if endpoint is None else ServeSampler(endpoint)


def get_sampler(ctx: Any = None) -> ServeSampler | None:
    """The sampler a run should use: None = in this process (the default); else the configured deployment.
    Reads `ctx.sampler` when the context has that field, else LUCIDDRAG_SAMPLER. One client per endpoint."""
    spec = getattr(ctx, "sampler", None) or os.environ.get(ENV, "")
    return _client(spec.strip())


def reset_clients() -> None:
    """Forget cached clients (after the Ray session they used was shut down)."""
    _client.cache_clear()
