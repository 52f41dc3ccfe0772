"""`luciddrag`: the command line.

Every user-caused failure (bad points, unreadable file, missing weights, out of memory) prints one line starting with
"error:" and exits with code 2; nothing from deep inside torch reaches the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from engine.errors import LucidDragError

app = typer.Typer(
    help=(
        "LucidDrag: semantic-aware drag editing.\n\n"
        "Drag a handle point to a target point; LucidDrag works out what you mean (move it? make it bigger? turn it?),"
        " edits the image with a guided diffusion model, checks the result and tries another reading when it fails.\n\n"
        "Start with `luciddrag demo` (offline, CPU, under a minute). Then `luciddrag edit photo.png --drag 120,80:160,60"
        " --model stable-diffusion-v1-5/stable-diffusion-v1-5` on a GPU."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks that print numbers (speed, memory).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def parse_drag(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """'HX,HY:TX,TY' -> ((hx, hy), (tx, ty))."""
    try:
        h, t = text.split(":")
        hx, hy = (float(v) for v in h.split(","))
        tx, ty = (float(v) for v in t.split(","))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not HX,HY:TX,TY (e.g. 120,80:160,60)") from None
    return (hx, hy), (tx, ty)


def _quiet_libraries() -> None:
    """Library progress bars and warnings about optional speedups are noise in a CLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


@app.command()
def edit(
    image: Path = typer.Argument(..., help="Image to edit (PNG/JPEG/WebP/..., any size, any mode)."),
    drag: List[str] = typer.Option(..., "--drag", "-d", help="HX,HY:TX,TY in the image's pixels; repeat for several."),
    mask: Optional[Path] = typer.Option(None, help="Editable region (white = may change), same size as the image."),
    source_prompt: str = typer.Option("", help="Describes the image as it is (inversion prompt)."),
    target_prompt: str = typer.Option("", help="Describes the image as you want it (sampling prompt)."),
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Hub id or local diffusers folder."),
    steps: int = typer.Option(50, min=2, help="DDIM steps (the paper uses 50)."),
    guidance_scale: float = typer.Option(5.0, help="Classifier-free guidance scale (the paper uses 5)."),
    seed: int = typer.Option(0, help="Random seed."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cpu, cuda, cuda:1 ... (default: auto)."),
    out: Path = typer.Option(Path("edited.png"), "--out", "-o", help="Where to write the result."),
) -> None:
    """Drag-edit IMAGE with explicit prompts; writes OUT and OUT's side-by-side sheet (input with arrows | result)."""
    _quiet_libraries()
    from engine.pipeline import DragEditor
    from engine.request import EditRequest
    from tools.drawing import draw_drags
    from tools.sheet import contact_sheet

    pairs = [parse_drag(d) for d in drag]
    try:
        req = EditRequest.create(image=image, points=[p for pair in pairs for p in pair], mask=mask,
                                 source_prompt=source_prompt, target_prompt=target_prompt, steps=steps,
                                 guidance_scale=guidance_scale, seed=seed)
        editor = DragEditor.from_pretrained(model, device=device)
        result = editor.edit(req)
    except LucidDragError as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    from engine.preprocess import open_image, to_rgb

    original = to_rgb(open_image(image))[0]
    sheet = contact_sheet([("input + drags", draw_drags(original, pairs)), (f"result: {target_prompt or '(no prompt)'}",
                                                                            result.image)])
    side = out.with_name(out.stem + ".side.png")
    sheet.save(side)
    s = result.stats
    typer.echo(f"wrote {out} and {side}  ({s['total_s']:.1f} s, {s['unet_forward']} UNet forwards, "
               f"{s['unet_backward']} backwards, working size {s['working_size'][0]}x{s['working_size'][1]})")


@bench_app.command("engine")
def bench_engine(
    model: str = typer.Option("tiny", help="tiny | sd21-base | sd15 (random weights, no download) | hub id | folder."),
    resolution: Optional[int] = typer.Option(None, help="Square working resolution (default: the model's native)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
    intentions: int = typer.Option(3, min=1, max=4, help="K intentions for the batched run."),
    device: Optional[str] = typer.Option(None, help="cpu / cuda (default: auto)."),
    dtype: Optional[str] = typer.Option(None, help="fp16 / bf16 / fp32 (default: fp16 on CUDA, fp32 on CPU)."),
    repeats: int = typer.Option(1, min=1, help="Take the best of N timings."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers as JSON here."),
) -> None:
    """Time a guided edit against an unguided inversion+sampling in the same process; print passes and peak memory.

    GPU target run (one command, no downloads): `luciddrag bench engine --model sd21-base --device cuda --repeats 3`.
    """
    _quiet_libraries()
    from engine.bench import format_report, run_bench

    try:
        report = run_bench(model, resolution, steps, intentions, device, dtype, repeats)
    except LucidDragError as exc:
        _fail(str(exc))
    text = format_report(report)
    typer.echo(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)


def _mount_optional() -> None:
    """Sub-apps owned by other modules; mounted here so `luciddrag --help` lists them all."""
    from evals.shapesworld.cli import app as shapes_train_app

    app.add_typer(shapes_train_app, name="train")
    try:
        from prompts.cli import app as prompts_app
    except ImportError:  # prompts CLI not present in this checkout
        return
    app.add_typer(prompts_app, name="prompts")


_mount_optional()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
