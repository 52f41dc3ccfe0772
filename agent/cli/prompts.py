"""``luciddrag prompts list | show | render``: iterate on prompt templates and see exactly what an LLM receives.

``render`` builds the variables through the same functions the tools use (drag geometry, few-shot examples,
coordinates text) for a real image and drag, and prints the messages; it never calls the LLM it renders for.
(For ``reason_intentions`` it does run the locator, offline by default, to get the start-point descriptions.)
Point ``LUCIDDRAG_PROMPTS_DIR`` at a folder of your own ``<name>.v<N>.md`` files to try edits without touching the
installed templates: they shadow the built-in ones of the same name and version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer

from luciddrag.agent.cli.common import DRAG_HELP, parse_drag
from luciddrag.engine.errors import InputError
from luciddrag.prompts import PromptError, list_templates, load_template, parse_label

app = typer.Typer(help="Prompt templates: list them, show one, render one for an image and drag (no LLM call).",
                  no_args_is_help=True, add_completion=False)


def _parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--var takes NAME=VALUE; got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


@app.command("list")
def list_command() -> None:
    """Every template and version, with the variables it uses."""
    templates = list_templates()
    if not templates:
        typer.echo("no templates found")
        raise typer.Exit(1)
    for t in templates:
        examples = f", {len(t.examples())} examples" if t.examples_path.exists() else ""
        typer.echo(f"{t.label:<24} variables: {', '.join(sorted(t.variables)) or '-'}{examples}")
        if t.description:
            typer.echo(f"{'':<24} {t.description}")
        typer.echo(f"{'':<24} {t.path}")


@app.command("show")
def show_command(
    template: Annotated[str, typer.Argument(help="NAME (latest version) or NAME.vN")],
    examples: Annotated[bool, typer.Option("--examples", help="Also print the few-shot examples file.")] = False,
) -> None:
    """Print a template file as it is on disk."""
    name, version = parse_label(template)
    t = load_template(name, version)
    typer.echo(t.source(), nl=False)
    if examples and t.examples_path.exists():
        typer.echo(f"\n----- {t.examples_path.name} -----")
        typer.echo(t.examples_path.read_text(encoding="utf-8"), nl=False)


def _drag_inputs(image: Path | None, drags: list[str]) -> tuple[Any, Any]:
    from luciddrag.tools.locator import load_image
    from luciddrag.tools.schemas import DragPoints

    if image is None or not drags:
        raise typer.BadParameter("this template needs --image and at least one --drag HX,HY:TX,TY")
    img = load_image(image)
    points = DragPoints.from_pairs([parse_drag(d) for d in drags])
    points.check_inside(*img.size)
    return img, points


@app.command("render")
def render_command(
    template: Annotated[str, typer.Argument(help="NAME (latest version) or NAME.vN")],
    image: Annotated[Path | None, typer.Option(help="Input image.")] = None,
    drag: Annotated[list[str], typer.Option(help=DRAG_HELP)] = [],  # noqa: B006
    caption: Annotated[str | None, typer.Option(help="Image description c (default: from the image).")] = None,
    start: Annotated[list[str], typer.Option(help="Start-point description per drag (skips the locator).")] = [],  # noqa: B006
    locator: Annotated[str, typer.Option(help="Locator backend for start-point descriptions.")] = "offline",
    k: Annotated[int, typer.Option(help="Number of intentions asked for.")] = 3,
    var: Annotated[list[str], typer.Option(help="NAME=VALUE for templates the code has no builder for.")] = [],  # noqa: B006
    save_images: Annotated[Path | None, typer.Option(help="Folder to write the pictures a VLM prompt sends.")] = None,
) -> None:
    """Render a template with the variables the code would give it, and print the messages."""
    try:
        name, version = parse_label(template)
        t = load_template(name, version)
        label = t.label
        if name == "reason_intentions":
            text = _render_reasoner(label, image, drag, caption, start, locator, k)
        elif name == "locate_region":
            text = _render_locator(label, image, drag, save_images)
        elif name == "caption_image":
            from luciddrag.tools.locator import caption_variables, load_image

            if image is None:
                raise typer.BadParameter("caption_image needs --image")
            text = t.render(**caption_variables(load_image(image).size)).as_text() + "[image 1: the input image]\n"
        else:
            text = t.render(**_parse_vars(var)).as_text()
    except (PromptError, InputError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(text, nl=False)


def _render_reasoner(label: str, image: Path | None, drags: list[str], caption: str | None, starts: list[str],
                     locator: str, k: int) -> str:
    from luciddrag.tools.locator import LocatorConfig, describe_image, locate
    from luciddrag.tools.reasoner import ReasonRequest, build_reasoner_prompt
    from luciddrag.tools.schemas import HandleDescription, LocatorResult

    img, points = _drag_inputs(image, drags)
    if starts:
        if len(starts) != len(points.pairs):
            raise typer.BadParameter(f"--start given {len(starts)} time(s) for {len(points.pairs)} drag(s)")
        located = LocatorResult(
            descriptions=[HandleDescription(index=i, handle=p.handle, description=s)
                          for i, (p, s) in enumerate(zip(points.pairs, starts))],
            backend="user", image_size=img.size)
    else:
        located = locate(img, points, config=LocatorConfig(backend=locator))  # type: ignore[arg-type]
    c, _ = describe_image(img, caption, located=located, config=LocatorConfig(backend="offline"))
    request = ReasonRequest(drags=points, located=located, caption=c, k=k)
    notes = "".join(f"# note: {w}\n" for w in located.warnings)
    return notes + build_reasoner_prompt(request, label).as_text()


def _render_locator(label: str, image: Path | None, drags: list[str], save_images: Path | None) -> str:
    from luciddrag.tools.llm import LLMSettings
    from luciddrag.tools.locator import OpenAIVisionLocator

    img, points = _drag_inputs(image, drags)
    # Settings only name the model in the printout; build_prompt never contacts it.
    vlm = OpenAIVisionLocator(LLMSettings.from_env(), prompt=label)
    rendered, pictures = vlm.build_prompt(img, points)
    lines = [rendered.as_text().rstrip("\n")]
    for i, (caption, picture) in enumerate(pictures, start=1):
        where = ""
        if save_images is not None:
            save_images.mkdir(parents=True, exist_ok=True)
            path = save_images / f"{label}.image{i}.png"
            picture.save(path)
            where = f" -> {path}"
        lines.append(f"{caption} [image {i}: {picture.width}x{picture.height} PNG{where}]".strip())
    return "\n".join(lines) + "\n"
