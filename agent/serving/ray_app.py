"""The sampler as a Ray Serve deployment: the model loaded once per replica, one replica per GPU, `@serve.batch`.

    start_sampler(SamplerSettings(model=..., num_replicas=4, num_gpus=1))   # or: luciddrag serve sampler ...

Ray is imported here only when a deployment is built or started (it is an optional extra: `luciddrag[serve]`).
Set before Ray is imported (done by `import_ray`): RAY_USAGE_STATS_ENABLED=0 (no usage report leaves the machine)
and RAY_AUTH_MODE=disabled (Ray 2.60 otherwise writes an auth token file into the home folder).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from luciddrag.agent.serving.protocol import (SampleJob, SampleReply, TrackJob, TrackReply, replica_name,
                                              run_sample_batch, run_track)
from luciddrag.engine.errors import InputError, ResourceError
from luciddrag.engine.loading import DEFAULT_MODEL

DEFAULT_APP = "luciddrag-sampler"


class SamplerSettings(BaseModel):
    """How the deployment runs (the CLI's options)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default_factory=lambda: os.environ.get("LUCIDDRAG_MODEL") or DEFAULT_MODEL)
    device: str | None = None
    dtype: str | None = None
    app_name: str = DEFAULT_APP
    num_replicas: int = Field(1, ge=1, description="One per GPU on a GPU cluster.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (1 on a GPU cluster; 0 on CPU).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    max_batch_size: int = Field(4, ge=1, description="Requests @serve.batch gathers into one replica call.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="How long a batch waits to fill.")
    health_check_period_s: float = Field(2.0, gt=0, description="How often Serve checks a replica is alive.")


def import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), with Ray's environment set first; a clear error when the extra is not installed."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("the sampler service needs Ray Serve: pip install 'luciddrag[serve]'") from None
    return ray, serve


@functools.lru_cache(maxsize=1)
def replica_class() -> type:
    """The replica, defined once Ray is importable (`@serve.batch` needs Ray at class definition)."""
    _, serve = import_ray()

    class SamplerReplica:
        """One model in memory; batches of edit requests; DIFT tracking for the critic on the same model."""

        def __init__(self, settings_json: str) -> None:
            from luciddrag.engine.pipeline import DragEditor

            self.settings = SamplerSettings.model_validate_json(settings_json)
            s = self.settings
            self.editor = DragEditor.from_pretrained(s.model, device=s.device, dtype=s.dtype, show_progress=False)
            self._lock = threading.Lock()  # one engine call at a time: the memory bank lives on the UNet
            self._batch.set_max_batch_size(s.max_batch_size)
            self._batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)

        def _run(self, texts: list[str]) -> list[str]:
            jobs, replies, bad = [], [None] * len(texts), {}
            for i, text in enumerate(texts):
                try:
                    jobs.append((i, SampleJob.model_validate_json(text)))
                except ValueError as exc:
                    bad[i] = SampleReply(failure={"error_type": "InputError",
                                                  "message": f"not a sample job: {str(exc).splitlines()[0]}"})
            with self._lock:
                answers = run_sample_batch(self.editor, self.settings.model, [j for _, j in jobs])
            for (i, _), reply in zip(jobs, answers):
                replies[i] = reply
            for i, reply in bad.items():
                replies[i] = reply
            return [r.model_dump_json() for r in replies]

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def _batch(self, texts: list[str]) -> list[str]:
            # the engine blocks for seconds: run it off the event loop so requests keep queueing for the next batch
            return await asyncio.to_thread(self._run, texts)

        async def sample(self, job_json: str) -> str:
            """A SampleJob as JSON -> a SampleReply as JSON."""
            return await self._batch(job_json)

        def _track(self, job_json: str) -> str:
            try:
                job = TrackJob.model_validate_json(job_json)
            except ValueError as exc:
                return TrackReply(failure={"error_type": "InputError",
                                           "message": f"not a track job: {str(exc).splitlines()[0]}"}).model_dump_json()
            with self._lock:
                return run_track(self.editor, self.settings.model, job).model_dump_json()

        async def track(self, job_json: str) -> str:
            """A TrackJob as JSON -> a TrackReply as JSON."""
            return await asyncio.to_thread(self._track, job_json)

        async def __call__(self, request: Any) -> Any:
            """HTTP (when Serve's proxy is on): POST the job's JSON to <route>/sample or <route>/track."""
            from starlette.responses import Response

            body = (await request.body()).decode()
            out = await (self.track(body) if request.url.path.rstrip("/").endswith("/track") else self.sample(body))
            return Response(out, media_type="application/json")

        def whoami(self) -> dict:
            return {"replica": replica_name(), "pid": os.getpid(), "model": self.settings.model}

    return SamplerReplica


def build_app(settings: SamplerSettings) -> Any:
    """The Serve application (bound deployment) for `settings`."""
    _, serve = import_ray()
    deployment = serve.deployment(
        replica_class(), name="SamplerReplica", num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        # room for a full batch to queue while the previous one runs
        max_ongoing_requests=max(2 * settings.max_batch_size, 8),
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=max(30.0, 3 * settings.health_check_period_s),
    )
    return deployment.bind(settings.model_dump_json())


def start_sampler(settings: SamplerSettings, *, address: str | None = None, http_host: str | None = None,
                  http_port: int = 8000, num_cpus: int | None = None) -> Any:
    """Start (or update) the deployment and return its handle.

    `address`: an existing Ray cluster ("auto", "ray://head:10001"); None: the current Ray session, else a new local
    one with `num_cpus`. `http_host`: also serve HTTP on that host and `http_port` (route /<app_name>); None: handles
    only (Ray clients in the cluster)."""
    ray, serve = import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        elif num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(**kwargs)
    route = f"/{settings.app_name}" if http_host else None
    try:
        if http_host:
            serve.start(http_options={"host": http_host, "port": http_port})
        else:
            serve.start(proxy_location="Disabled")
        return serve.run(build_app(settings), name=settings.app_name, route_prefix=route)
    except Exception as exc:
        # Serve's proxy reports a taken port from inside a Ray task, as a traceback from another process
        if "Failed to bind" in str(exc):
            raise PortInUseError(f"{http_host}:{http_port} is already in use: pick another --http-port, or stop "
                                 "what listens there") from None
        raise


class PortInUseError(ResourceError):
    """The HTTP port asked for is taken (Serve's proxy could not bind it)."""
