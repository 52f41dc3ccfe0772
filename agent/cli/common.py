"""What every `luciddrag` command shares: the one `--drag` syntax, the one-line error exit, quiet libraries."""

from __future__ import annotations

import os

import typer

DRAG_HELP = "HX,HY:TX,TY in the image's pixels (handle, then target); repeat for several drags."


def fail(message: str) -> None:
    """A user-caused failure: one red line on stderr starting with 'error:', exit code 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def parse_drag(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """'HX,HY:TX,TY' -> ((hx, hy), (tx, ty)): the one drag syntax of every command."""
    try:
        h, t = text.split(":")
        hx, hy = (float(v) for v in h.split(","))
        tx, ty = (float(v) for v in t.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not HX,HY:TX,TY (e.g. 120,80:160,60)") from None
    return (hx, hy), (tx, ty)


def quiet_libraries() -> None:
    """Library progress bars and warnings about optional speedups are noise in a CLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
