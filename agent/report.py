"""What a run leaves for people: the result, a labelled contact sheet, and a short text report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from luciddrag.agent.artifacts import ArtifactStore
from luciddrag.engine.errors import InputError
from luciddrag.engine.preprocess import scale_point
from luciddrag.tools.drawing import draw_drags
from luciddrag.tools.sheet import contact_sheet


def attempt_label(k: int, a: Any) -> str:
    score = f"{a.md_px:.1f} px off" if a.md_px is not None else "not scored"
    q = f", fidelity {a.quality:.2f}" if a.quality is not None else ""
    return f"{k}. {a.verdict}: {score}{q}\n{a.intention}"


SHEET_INPUT_SIDE = 1024  # the sheet's input tile is drawn from a copy at most this large: memory stays bounded


def check_output_path(out: Path) -> None:
    """Refuse, before any work, an output the edit could not be written to: an unknown image extension, a folder,
    a parent that is a file or not writable."""
    out = Path(out)
    ext = out.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"--out {out}: {ext or 'no extension'} is not an image format PIL can write "
                         "(use .png, .jpg or .webp)")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: give a file name, e.g. {out / 'edited.png'}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: the folder {parent} is not writable")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_outputs(out: Path, original: Image.Image, points: list[tuple[float, float]], state: dict) -> dict[str, Path]:
    """Write OUT (the chosen result), OUT.sheet.png (input with drags | every attempt) and OUT.report.md.

    All three are written to temporary files first and renamed into place only when all of them were written: an
    interrupted or failed write (Ctrl-C, a full disk) leaves the previous outputs whole, never half-overwritten."""
    out = Path(out)
    check_output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = out.with_name(out.stem + ".sheet.png")
    report = out.with_name(out.stem + ".report.md")
    result = ArtifactStore.get_image(state["result"])
    fmt = Image.registered_extensions()[out.suffix.lower()]
    if fmt == "JPEG" and result.mode not in ("RGB", "L"):
        result = result.convert("RGB")  # JPEG has no alpha
    pairs = [(points[i], points[i + 1]) for i in range(0, len(points), 2)]
    thumb, pairs = _bounded(original.convert("RGB"), pairs)
    tiles = [("input + drags", draw_drags(thumb, pairs, min_side=256))]
    attempts = state.get("attempts") or []
    chosen = state.get("chosen")
    highlight = None
    for k, a in enumerate(attempts, 1):
        tiles.append((attempt_label(k, a), ArtifactStore.get_image(a.image)))
        if chosen is not None and a.image.sha256 == chosen.image.sha256 and state.get("accepted"):
            highlight = k
    sheet_image = contact_sheet(tiles, tile_height=max(256, min(original.height, 512)), highlight=highlight)
    writes = [(out, lambda p: result.save(p, format=fmt)), (sheet, lambda p: sheet_image.save(p, format="PNG")),
              (report, lambda p: p.write_text(format_report(state, out, sheet)))]
    temps = []
    try:
        for final, write in writes:
            temps.append(_tmp(final))
            write(temps[-1])
        for (final, _), tmp in zip(writes, temps):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return {"result": out, "sheet": sheet, "report": report}


def _bounded(image: Image.Image, pairs: list) -> tuple[Image.Image, list]:
    """A copy of the image at most SHEET_INPUT_SIDE px, with the drags scaled to it (drawing marks on a 10000 px
    image at full resolution would take gigabytes)."""
    if max(image.size) <= SHEET_INPUT_SIDE:
        return image, pairs
    s = SHEET_INPUT_SIDE / max(image.size)
    size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
    return (image.resize(size, Image.Resampling.LANCZOS),
            [(scale_point(h, image.size, size), scale_point(t, image.size, size)) for h, t in pairs])


def format_report(state: dict, out: Path | None = None, sheet: Path | None = None) -> str:
    lines = ["# LucidDrag run", ""]
    located = state.get("located")
    if located is not None:
        lines.append(f"- handle: {'; '.join(d.description for d in located.descriptions)} (locator: {located.backend})")
    if state.get("caption"):
        lines.append(f"- image description: {state['caption']}")
    lines += ["", "## Intentions", "", "| # | intention | confidence | source prompt | target prompt |", "|---|---|---|---|---|"]
    for k, i in enumerate(state.get("intentions") or [], 1):
        lines.append(f"| {k} | {i.intention} | {i.confidence:.2f} | {i.source_prompt} | {i.target_prompt} |")
    attempts = state.get("attempts") or []
    # the discriminator's P(real) gets a column only when one scored the attempts (LUCIDDRAG_DISCRIMINATOR set)
    scored = any(a.quality is not None for a in attempts)
    header = ["#", "intention", "verdict", "landed from target", "drag fraction"] + (["fidelity"] if scored else [])
    header.append("why")
    lines += ["", "## Attempts", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, a in enumerate(attempts, 1):
        md = f"{a.md_px:.1f} px" if a.md_px is not None else "-"
        fr = f"{a.md_fraction:.0%}" if a.md_fraction is not None else "-"
        q = [f"{a.quality:.2f}" if a.quality is not None else "-"] if scored else []
        lines.append("| " + " | ".join([str(k), a.intention, a.verdict, md, fr, *q, a.reason]) + " |")
    lines += ["", f"**{'Accepted' if state.get('accepted') else 'Not accepted'}**: {state.get('status', '')}"]
    if state.get("warnings"):
        lines += ["", "## Notices", ""] + [f"- {w}" for w in state["warnings"]]
    if out is not None:
        lines += ["", f"Result: `{out}`" + (f" -- contact sheet: `{sheet}`" if sheet else "")]
    return "\n".join(lines) + "\n"
