"""`luciddrag web`: the click-to-drag web app (Gradio). See agent/web/app.py.

Gradio is imported only when the command runs: `luciddrag --help` and every other command stay fast, and keep working
in an install without it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

__all__ = ["web_command"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def web_command(
    host: str = typer.Option("127.0.0.1", help="Address to bind. Loopback by default; 0.0.0.0 exposes it to the network."),
    port: int = typer.Option(7860, min=1, max=65535, help="Port to serve on."),
    model: Optional[str] = typer.Option(None, help="Hub id or local diffusers folder (default: the shipped ShapesWorld "
                                                    "model, which runs offline on a CPU)."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cpu, cuda, cuda:1 ... (default: auto)."),
    steps: Optional[int] = typer.Option(None, min=2, max=200, help="Default DDIM steps (changeable in the page; "
                                                                   "default: the model's recommendation, else 50)."),
    k: int = typer.Option(3, min=1, max=8, help="Default number of intentions to reason."),
    attempts: int = typer.Option(3, min=1, max=8, help="Default attempt budget."),
    llm_base_url: Optional[str] = typer.Option(None, envvar="OPENAI_BASE_URL",
                                               help="OpenAI-compatible endpoint for the reasoner/chat (default: "
                                                    "offline reasoner and command grammar)."),
    workdir: Optional[Path] = typer.Option(None, help="Where sessions keep their images (default: a fresh temp dir)."),
    share: bool = typer.Option(False, help="Also open a public gradio.live link (needs internet)."),
) -> None:
    """Open the web app: click handle and target points, see the intentions, edit, and chat with the editor.

    Works on a fresh machine: the ShapesWorld model and the offline reasoner need no download and no key.
    """
    try:
        from luciddrag.agent.web.app import build_app, default_settings, launch
    except ModuleNotFoundError as exc:
        typer.secho(f"error: the web app needs {exc.name}: pip install 'gradio>=6,<7'", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    from luciddrag.engine.errors import LucidDragError

    if not _is_loopback(host):
        typer.secho(f"note: serving on {host}: anyone who can reach this address can use the app (no login).",
                    fg=typer.colors.YELLOW, err=True)
    try:
        defaults = default_settings(model=model, device=device, steps=steps, k=k, max_attempts=attempts,
                                    llm_base_url=llm_base_url or None)
        demo = build_app(defaults, root=workdir)
    except LucidDragError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    launch(demo, host=host, port=port, share=share)
