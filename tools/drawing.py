"""Drag annotations drawn on images: numbered handle dots, target rings and arrows.

Used for visual prompting (a VLM is shown where the points are, which works far better than coordinates alone), by
the web app and by CLI contact sheets. Marks are drawn on a transparent overlay at ``SUPERSAMPLE`` times the image
size and downsampled with a Lanczos filter, which antialiases them (PIL's ImageDraw itself does not); their size
follows the image's shorter side so they read the same on a 64 px ShapesWorld scene and a 1024 px photo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from luciddrag.tools.schemas import Box, DragPoints, Point

RGB = tuple[int, int, int]

# Distinct, saturated and readable on both light and dark photos (white outlines do the rest). Red and blue come
# first because the drag-editing literature draws handle points red and targets blue: pair 1 looks familiar.
PALETTE: tuple[RGB, ...] = (
    (230, 25, 75),  # red
    (0, 130, 200),  # blue
    (60, 180, 75),  # green
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (0, 190, 190),  # teal
    (240, 50, 230),  # magenta
    (128, 128, 0),  # olive
    (170, 110, 40),  # brown
    (0, 0, 128),  # navy
)
OUTLINE: RGB = (255, 255, 255)
SHADOW: tuple[int, int, int, int] = (0, 0, 0, 150)
MASK_TINT: tuple[int, int, int, int] = (30, 144, 255, 80)
SUPERSAMPLE = 4


def pair_colour(index: int) -> RGB:
    """Colour of drag pair ``index`` (0-based); cycles through ``PALETTE``."""
    return PALETTE[index % len(PALETTE)]


def mark_radius(width: int, height: int) -> float:
    """Radius of a handle dot in pixels of the final image: ~2.2% of the shorter side, never below 2.5 px."""
    return max(2.5, 0.022 * min(width, height))


@lru_cache(maxsize=32)
def _font(size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size_px)
    except (OSError, TypeError, ValueError):  # Pillow built without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _as_pairs(drags: DragPoints | Sequence[tuple[Point, Point]]) -> list[tuple[Point, Point]]:
    if isinstance(drags, DragPoints):
        return [(p.handle, p.target) for p in drags.pairs]
    return [(tuple(h), tuple(t)) for h, t in drags]


def _arrow(draw: ImageDraw.ImageDraw, start: Point, end: Point, colour: RGB, width: float, head: float,
           gap_start: float = 0.0, gap_end: float = 0.0) -> None:
    """A straight arrow from ``start`` to ``end``, leaving ``gap_start``/``gap_end`` free around them (so the
    handle dot and the target ring stay clean); a dark halo under it keeps it visible on any background."""
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = math.hypot(dx, dy)
    if length <= gap_start + gap_end + 1e-6:
        return  # the marks touch: an arrow would only clutter them
    ux, uy = dx / length, dy / length
    start = (start[0] + ux * gap_start, start[1] + uy * gap_start)
    end = (end[0] - ux * gap_end, end[1] - uy * gap_end)
    length -= gap_start + gap_end
    head = min(head, 0.6 * length)  # short drags: keep the head from swallowing the shaft
    base = (end[0] - ux * head, end[1] - uy * head)
    left = (base[0] - uy * head * 0.55, base[1] + ux * head * 0.55)
    right = (base[0] + uy * head * 0.55, base[1] - ux * head * 0.55)
    halo = max(1.0, width * 0.6)
    draw.line([start, base], fill=SHADOW, width=round(width + 2 * halo))
    draw.polygon([end, left, right], fill=SHADOW, outline=SHADOW, width=round(halo * 2))
    draw.line([start, base], fill=colour + (255,), width=round(width))
    draw.polygon([end, left, right], fill=colour + (255,))


def _dot(draw: ImageDraw.ImageDraw, centre: Point, radius: float, colour: RGB, outline_w: float) -> None:
    x, y = centre
    r = radius + outline_w
    draw.ellipse([x - r, y - r, x + r, y + r], fill=OUTLINE + (255,))
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour + (255,))


def _ring(draw: ImageDraw.ImageDraw, centre: Point, radius: float, colour: RGB, thickness: float) -> None:
    x, y = centre
    r_out = radius + thickness * 0.5
    draw.ellipse([x - r_out - thickness * 0.4, y - r_out - thickness * 0.4, x + r_out + thickness * 0.4,
                  y + r_out + thickness * 0.4], outline=OUTLINE + (255,), width=round(thickness * 1.8))
    draw.ellipse([x - r_out, y - r_out, x + r_out, y + r_out], outline=colour + (255,), width=round(thickness))


def _label(draw: ImageDraw.ImageDraw, centre: Point, text: str, radius: float) -> None:
    font = _font(max(6, round(radius * 1.5)))
    draw.text(centre, text, fill=(255, 255, 255, 255), font=font, anchor="mm",
              stroke_width=max(1, round(radius * 0.12)), stroke_fill=(0, 0, 0, 200))


def drag_overlay(size: tuple[int, int], drags: DragPoints | Sequence[tuple[Point, Point]], *,
                 mask: np.ndarray | None = None, numbers: bool = True, radius: float | None = None,
                 start_index: int = 0) -> Image.Image:
    """A transparent RGBA overlay of the given size with the drags (and optional mask tint) drawn on it."""
    width, height = size
    r = radius if radius is not None else mark_radius(width, height)
    s = SUPERSAMPLE
    big = Image.new("RGBA", (width * s, height * s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(big)

    def up(p: Point) -> Point:  # pixel centres: pixel (x, y) spans [x, x + 1) so its centre is x + 0.5
        return ((p[0] + 0.5) * s, (p[1] + 0.5) * s)

    for i, (handle, target) in enumerate(_as_pairs(drags), start=start_index):
        colour = pair_colour(i)
        _arrow(draw, up(handle), up(target), colour, width=r * 0.55 * s, head=r * 2.2 * s,
               gap_start=r * 0.5 * s, gap_end=r * 1.6 * s)
    for i, (handle, target) in enumerate(_as_pairs(drags), start=start_index):
        colour = pair_colour(i)
        _ring(draw, up(target), r * 0.9 * s, colour, thickness=max(1.0, r * 0.45) * s)
        _dot(draw, up(handle), r * s, colour, outline_w=max(0.6, r * 0.25) * s)
        if numbers:
            _label(draw, up(handle), str(i + 1), r * s)
    overlay = big.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None:
        tint = Image.new("RGBA", (width, height), MASK_TINT)
        alpha = Image.fromarray((np.asarray(mask, dtype=bool) * 255).astype(np.uint8), "L")
        base = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        base.paste(tint, (0, 0), alpha)
        overlay = Image.alpha_composite(base, overlay)
    return overlay


def draw_drags(image: Image.Image, drags: DragPoints | Sequence[tuple[Point, Point]], *,
               mask: np.ndarray | None = None, numbers: bool = True, radius: float | None = None,
               min_side: int | None = None) -> Image.Image:
    """The image (RGB) with numbered handle dots, target rings and arrows for every drag pair.

    ``mask`` (HxW bool, the user's editable region) is tinted blue. ``min_side`` first enlarges small images
    (nearest-neighbour, so pixels stay crisp) until their shorter side reaches it: a VLM cannot read marks on a 64 px
    image. Points stay in the original image's coordinates.
    """
    rgb = image.convert("RGB")
    scale = 1
    if min_side is not None and min(rgb.size) < min_side:
        scale = math.ceil(min_side / min(rgb.size))
        rgb = rgb.resize((rgb.width * scale, rgb.height * scale), Image.Resampling.NEAREST)
    pairs = [(_scale_point(h, scale), _scale_point(t, scale)) for h, t in _as_pairs(drags)]
    if mask is not None and scale != 1:
        mask = np.kron(np.asarray(mask, dtype=bool), np.ones((scale, scale), dtype=bool))
    overlay = drag_overlay(rgb.size, pairs, mask=mask, numbers=numbers,
                           radius=None if radius is None else radius * scale)
    return Image.alpha_composite(rgb.convert("RGBA"), overlay).convert("RGB")


def _scale_point(p: Point, scale: int) -> Point:
    # Keep pixel centres on pixel centres: pixel x becomes pixels [x*s, x*s + s), centre x*s + (s - 1) / 2.
    return (p[0] * scale + (scale - 1) / 2, p[1] * scale + (scale - 1) / 2)


def crop_window(point: Point, half: int, width: int, height: int) -> Box:
    """A square box of side ``2 * half`` around ``point``, shifted (not shrunk) to stay inside the image."""
    side = min(2 * half, width, height)
    x0 = int(round(point[0])) - side // 2
    y0 = int(round(point[1])) - side // 2
    x0 = min(max(x0, 0), width - side)
    y0 = min(max(y0, 0), height - side)
    return x0, y0, x0 + side, y0 + side


def zoomed_crop(image: Image.Image, handle: Point, index: int, *, fraction: float = 0.25,
                out_side: int = 384, target: Point | None = None) -> tuple[Image.Image, Box]:
    """A close-up around one handle, enlarged to ``out_side`` px, with its numbered dot (and arrow) drawn on it.

    Returns the crop and the box it was cut from. ``fraction`` is the crop side relative to the image's shorter
    side; the close-up lets a VLM name small parts ("the left eye") that it would miss at full-image scale.
    """
    width, height = image.size
    half = max(4, round(fraction * min(width, height) / 2))
    box = crop_window(handle, half, width, height)
    crop = image.convert("RGB").crop(box)
    zoom = out_side / crop.width
    resample = Image.Resampling.NEAREST if zoom >= 4 else Image.Resampling.LANCZOS
    crop = crop.resize((out_side, round(crop.height * zoom)), resample)

    def local(p: Point) -> Point:
        return ((p[0] - box[0] + 0.5) * zoom - 0.5, (p[1] - box[1] + 0.5) * zoom - 0.5)

    tgt = local(target) if target is not None else local(handle)
    # Marks a little larger than on a full image: the crop exists to be looked at closely.
    overlay = drag_overlay(crop.size, [(local(handle), tgt)], numbers=True, start_index=index,
                           radius=1.4 * mark_radius(*crop.size))
    return Image.alpha_composite(crop.convert("RGBA"), overlay).convert("RGB"), box
