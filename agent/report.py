"""What a run leaves for people: the result, a labelled contact sheet, and a short text report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from luciddrag.agent.artifacts import ArtifactStore
from luciddrag.tools.drawing import draw_drags
from luciddrag.tools.sheet import contact_sheet


def attempt_label(k: int, a: Any) -> str:
    score = f"{a.md_px:.1f} px off" if a.md_px is not None else "not scored"
    q = f", fidelity {a.quality:.2f}" if a.quality is not None else ""
    return f"{k}. {a.verdict}: {score}{q}\n{a.intention}"


def write_outputs(out: Path, original: Image.Image, points: list[tuple[float, float]], state: dict) -> dict[str, Path]:
    """Write OUT (the chosen result), OUT.sheet.png (input with drags | every attempt) and OUT.report.md."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result = ArtifactStore.get_image(state["result"])
    result.save(out)
    pairs = [(points[i], points[i + 1]) for i in range(0, len(points), 2)]
    tiles = [("input + drags", draw_drags(original.convert("RGB"), pairs, min_side=256))]
    attempts = state.get("attempts") or []
    chosen = state.get("chosen")
    highlight = None
    for k, a in enumerate(attempts, 1):
        tiles.append((attempt_label(k, a), ArtifactStore.get_image(a.image)))
        if chosen is not None and a.image.sha256 == chosen.image.sha256 and state.get("accepted"):
            highlight = k
    sheet = out.with_name(out.stem + ".sheet.png")
    contact_sheet(tiles, tile_height=max(256, min(original.height, 512)), highlight=highlight).save(sheet)
    report = out.with_name(out.stem + ".report.md")
    report.write_text(format_report(state, out, sheet))
    return {"result": out, "sheet": sheet, "report": report}


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
