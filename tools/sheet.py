"""Labelled contact sheets: the input with its drags beside each result, for people to look at."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def contact_sheet(tiles: Sequence[tuple[str, Image.Image]], tile_height: int = 256, columns: int | None = None,
                  highlight: int | None = None) -> Image.Image:
    """Tiles scaled to a common height (nearest-neighbour when enlarging, so small images stay crisp), each with its
    label below; `highlight` draws a green frame around one tile (the accepted result)."""
    if not tiles:
        raise ValueError("contact_sheet needs at least one tile")
    cols = columns or len(tiles)
    rows = (len(tiles) + cols - 1) // cols
    scaled = []
    for label, im in tiles:
        im = im.convert("RGB")
        w = max(1, round(im.width * tile_height / im.height))
        method = Image.Resampling.NEAREST if tile_height > im.height else Image.Resampling.LANCZOS
        scaled.append((label, im.resize((w, tile_height), method)))
    cell_w = max(im.width for _, im in scaled)
    font = _font(max(12, tile_height // 16))
    label_h = max(16, tile_height // 16) * 3 + 8
    pad = 8
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (tile_height + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, im) in enumerate(scaled):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (tile_height + label_h + pad)
        sheet.paste(im, (x, y))
        if i == highlight:
            draw.rectangle([x - 4, y - 4, x + im.width + 3, y + tile_height + 3], outline=(20, 170, 60), width=4)
        _wrapped(draw, label, (x, y + tile_height + 4), cell_w, font)
    return sheet


def _wrapped(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], width: int, font) -> None:
    """Greedy word wrap into at most three lines (the rest is elided)."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not cur:
                cur = trial
            else:
                lines.append(cur)
                cur = word
        lines.append(cur)
    if len(lines) > 3:
        lines = lines[:2] + [lines[2] + " ..."]
    step = int(getattr(font, "size", 12) * 1.2)
    for k, line in enumerate(lines):
        draw.text((xy[0], xy[1] + k * step), line, fill=(20, 20, 20), font=font)
