"""`luciddrag serve sampler`: start the sampler deployment (mounted by the CLI as `app.add_typer(app, name="serve")`).

On a Ray cluster of GPU nodes (docs/scale-out.md): `ray start --head` on one node, `ray start --address=HEAD:6379` on
the others, then on any node `luciddrag serve sampler --address auto --replicas N --gpus-per-replica 1`.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import typer

from luciddrag.agent.serving.ray_app import DEFAULT_APP, SamplerSettings, import_ray, start_sampler
from luciddrag.engine.errors import LucidDragError

app = typer.Typer(help="Run parts of LucidDrag as services (Ray Serve).", no_args_is_help=True)


@app.callback()
def serve() -> None:
    """Run parts of LucidDrag as services (Ray Serve); docs/scale-out.md."""


@app.command("sampler")
def sampler(
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Base model id or folder."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cuda / cpu (default: auto)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join ('auto', ray://HEAD:10001); default: "
                                                     "start a local Ray on this machine."),
    replicas: int = typer.Option(1, min=1, help="Replicas (one per GPU)."),
    gpus_per_replica: float = typer.Option(0.0, min=0, help="GPUs each replica reserves (1 on GPU nodes)."),
    cpus_per_replica: float = typer.Option(1.0, min=0, help="CPUs each replica reserves."),
    max_batch_size: int = typer.Option(4, min=1, help="Requests gathered into one replica call."),
    batch_wait_ms: float = typer.Option(50.0, min=0, help="How long a batch waits to fill."),
    name: str = typer.Option(DEFAULT_APP, help="Serve app name (clients: LUCIDDRAG_SAMPLER=serve:NAME)."),
    http_host: Optional[str] = typer.Option(None, help="Also serve HTTP on this host (e.g. 127.0.0.1); clients: "
                                                       "LUCIDDRAG_SAMPLER=http://HOST:PORT/NAME."),
    http_port: int = typer.Option(8000, help="HTTP port, with --http-host."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs of a local Ray started here (default: all)."),
) -> None:
    """Start the sampler deployment and keep it up until Ctrl-C (then shut it down)."""
    try:
        settings = SamplerSettings(**{k: v for k, v in dict(
            model=model, device=device, app_name=name, num_replicas=replicas, num_gpus=gpus_per_replica,
            num_cpus=cpus_per_replica, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
        ).items() if v is not None})
        start_sampler(settings, address=address, http_host=http_host, http_port=http_port, num_cpus=num_cpus)
    except LucidDragError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    where = f"http://{http_host}:{http_port}/{name}" if http_host else f"serve:{name}"
    typer.echo(f"sampler up: {settings.model} x{replicas} replica(s); clients: LUCIDDRAG_SAMPLER={where}")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray, serve = import_ray()
    serve.delete(name)
    if address is None:  # we started this Ray: take it down with us
        serve.shutdown()
        ray.shutdown()
    typer.echo("sampler stopped")


if __name__ == "__main__":  # `python -m luciddrag.agent.serving.cli sampler ...`, same as `luciddrag serve sampler`
    app()
