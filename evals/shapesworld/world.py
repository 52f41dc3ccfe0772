"""ShapesWorld: saturated coloured shapes on soft pastel textured backgrounds, with captions.

Everything here is deterministic given a seed, so training scenes, held-out scenes and benchmark tasks are
reproducible bit for bit. Two properties matter to the rest of the project:

* Shapes are saturated, backgrounds never are (HSV saturation <= ``MAX_BACKGROUND_SATURATION``), so
  ``segment.segment_objects`` can find every object exactly on rendered images and robustly on generated ones.
* Captions come from one small grammar (``describe_shape`` / ``caption_for``), which the word-level tokenizer, the
  trained model and the intention reasoner all share. ``VOCABULARY`` lists every word a caption can contain.

Coordinates: pixel ``(col x, row y)`` has its centre at ``(x, y)``; centroids are means of mask pixel indices.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Saturated, well separated in hue (red 0, yellow ~51, green ~129, blue ~229, purple ~283 degrees) so that the
# segmenter can name a colour by hue alone and call anything in between (e.g. an orange ghost) "unknown".
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 205, 25),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "purple": (150, 50, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_WORDS: tuple[str, ...] = ("small", "big")

# Row-major 3x3 grid: POSITION_PHRASES[row][col].
POSITION_GRID: tuple[tuple[str, str, str], ...] = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
POSITION_PHRASES: tuple[str, ...] = tuple(p for row in POSITION_GRID for p in row)

# Shape size is the circle diameter, the square side, or the triangle's base (= its height), as a fraction of the
# image side. The two size classes have a gap between them so the size word is never ambiguous.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "big": (0.31, 0.41)}
SIZE_SPLIT = 0.265  # between the two ranges; size_word() cuts here

MAX_BACKGROUND_SATURATION = 0.22
MAX_SHAPES = 3
MIN_GAP_PX = 2  # shapes keep at least this many background pixels between them (at 64 px)

CAPTION_JOINER = " and "


def _words(*phrases: str) -> set[str]:
    return {w for p in phrases for w in p.split()}


VOCABULARY: tuple[str, ...] = tuple(
    sorted(_words("a", "and", *COLOURS, *SHAPES, *SIZE_WORDS, *POSITION_PHRASES))
)


# --------------------------------------------------------------------------------------------------- grammar


def grid_cell(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """The (row, col) of the 3x3 grid cell holding pixel-centre coordinate (x, y)."""
    col = min(max(int(3 * (x + 0.5) / width), 0), 2)
    row = min(max(int(3 * (y + 0.5) / height), 0), 2)
    return row, col


def position_phrase(x: float, y: float, width: int, height: int) -> str:
    """The caption phrase for a centroid at (x, y) in a width x height image, e.g. "at the top left"."""
    row, col = grid_cell(x, y, width, height)
    return POSITION_GRID[row][col]


def cell_of_phrase(phrase: str) -> tuple[int, int]:
    """Inverse of the grid lookup: the (row, col) a position phrase names."""
    for r, row in enumerate(POSITION_GRID):
        if phrase in row:
            return r, row.index(phrase)
    raise ValueError(f"unknown position phrase {phrase!r}; expected one of {POSITION_PHRASES}")


def cell_centre(phrase: str, width: int, height: int) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of the grid cell a position phrase names."""
    row, col = cell_of_phrase(phrase)
    return (col + 0.5) * width / 3 - 0.5, (row + 0.5) * height / 3 - 0.5


def size_word(size_px: float, image_size: int = 64) -> str:
    """"small" or "big" for a shape of ``size_px`` pixels in an ``image_size``-pixel image.

    Pass ``image_size=1`` to give the size as a fraction of the image side.
    """
    return "small" if size_px / image_size < SIZE_SPLIT else "big"


def describe_shape(shape: str, colour: str, size: str | None = None, position: str | None = None) -> str:
    """One shape's description: "a small red circle on the left". ``size`` is a size word, ``position`` a phrase;
    either may be omitted ("a red circle")."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if size is not None and size not in SIZE_WORDS:
        raise ValueError(f"unknown size word {size!r}; expected one of {SIZE_WORDS}")
    if position is not None and position not in POSITION_PHRASES:
        raise ValueError(f"unknown position phrase {position!r}; expected one of {POSITION_PHRASES}")
    words = ["a"] + ([size] if size else []) + [colour, shape] + ([position] if position else [])
    return " ".join(words)


def join_descriptions(descriptions: list[str]) -> str:
    """A caption from shape descriptions: joined with " and "."""
    return CAPTION_JOINER.join(descriptions)


# --------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ShapeSpec:
    """What to draw: a shape class, a colour name, its size in px and its geometric centre (x, y).

    For the triangle the centre is its centroid (one third of the height above the base), so scaling a spec about
    ``(cx, cy)`` scales the drawn shape about its centroid.
    """

    shape: str
    colour: str
    size: float
    cx: float
    cy: float

    def moved(self, dx: float, dy: float) -> "ShapeSpec":
        return ShapeSpec(self.shape, self.colour, self.size, self.cx + dx, self.cy + dy)

    def resized(self, size: float) -> "ShapeSpec":
        return ShapeSpec(self.shape, self.colour, size, self.cx, self.cy)


def rasterize(spec: ShapeSpec, height: int, width: int) -> np.ndarray:
    """Hard-edged boolean mask of a shape (pixel centres inside the shape)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    s = spec.size
    if spec.shape == "circle":
        return (xs - spec.cx) ** 2 + (ys - spec.cy) ** 2 <= (s / 2) ** 2
    if spec.shape == "square":
        return (np.abs(xs - spec.cx) < s / 2) & (np.abs(ys - spec.cy) < s / 2)
    if spec.shape == "triangle":
        # Upright isosceles triangle, base s, height s; apex 2s/3 above the centroid, base s/3 below it.
        top, base = spec.cy - 2 * s / 3, spec.cy + s / 3
        t = (ys - top) / s  # 0 at apex, 1 at base
        return (ys >= top) & (ys < base) & (np.abs(xs - spec.cx) <= t * s / 2)
    raise ValueError(f"unknown shape {spec.shape!r}")


def extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """Distances (left, right, up, down) from a shape's centre to its bounding box edges."""
    if shape == "triangle":
        return size / 2, size / 2, 2 * size / 3, size / 3
    return size / 2, size / 2, size / 2, size / 2


def fits(shape: str, size: float, cx: float, cy: float, height: int, width: int, margin: float = 1.0) -> bool:
    """Whether a shape at (cx, cy) lies inside the image with ``margin`` pixels to spare."""
    left, right, up, down = extent(shape, size)
    return (cx - left >= margin - 0.5 and cx + right <= width - 0.5 - margin
            and cy - up >= margin - 0.5 and cy + down <= height - 0.5 - margin)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square (numpy only: scipy is not a dependency)."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx == 0 and dy == 0:
                continue
            src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)] |= src
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a (2r+1)^2 square; pixels outside the image count as background."""
    padded = np.pad(~mask, radius, constant_values=True)
    return ~dilate(padded, radius)[radius:-radius or None, radius:-radius or None]


# --------------------------------------------------------------------------------------------------- rendering


def render_background(rng: np.random.Generator, height: int = 64, width: int = 64) -> np.ndarray:
    """Soft pastel background, float32 HxWx3 in [0, 255]: a random pale colour plus low-frequency colour noise.

    The noise is a 3x3..5x5 random grid upsampled bicubically, so it has no edges a segmenter could mistake for an
    object; saturation is clipped below ``MAX_BACKGROUND_SATURATION`` so no pixel ever looks like a shape.
    """
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.05, 0.16)
    val = rng.uniform(0.82, 0.94)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    cells = int(rng.integers(3, 6))
    amp = rng.uniform(6, 16)
    noise = rng.normal(0, 1, size=(cells, cells, 3)).astype(np.float32)
    up = np.stack([
        np.asarray(Image.fromarray(noise[..., c]).resize((width, height), Image.BICUBIC)) for c in range(3)
    ], axis=-1)
    img = np.clip(base + amp * up, 0, 255)
    return _cap_saturation(img, MAX_BACKGROUND_SATURATION - 0.02)


def _cap_saturation(img: np.ndarray, max_sat: float) -> np.ndarray:
    """Pull each pixel towards its own max channel until its HSV saturation is at most ``max_sat``."""
    mx = img.max(axis=-1, keepdims=True)
    mn = img.min(axis=-1, keepdims=True)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    scale = np.where(sat > max_sat, max_sat / np.maximum(sat, 1e-6), 1.0)
    return (mx - (mx - img) * scale).astype(np.float32)


def compose(background: np.ndarray, specs: list[ShapeSpec]) -> Image.Image:
    """Paint shapes (flat palette colour, hard edges) over a background; later specs paint over earlier ones."""
    h, w = background.shape[:2]
    img = background.copy()
    for spec in specs:
        img[rasterize(spec, h, w)] = COLOURS[spec.colour]
    return Image.fromarray(np.round(img).astype(np.uint8), "RGB")


@dataclass
class SceneShape:
    """One drawn shape with everything the scorer and the caption need."""

    spec: ShapeSpec
    mask: np.ndarray  # HxW bool, exactly the painted pixels
    centroid: tuple[float, float]  # (x, y), mean of mask pixel coordinates
    size_word: str
    position: str  # position phrase of the centroid

    @property
    def shape(self) -> str:
        return self.spec.shape

    @property
    def colour(self) -> str:
        return self.spec.colour

    @property
    def size(self) -> float:
        return self.spec.size

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def description(self, with_size: bool = True, with_position: bool = True) -> str:
        return describe_shape(self.shape, self.colour, self.size_word if with_size else None,
                              self.position if with_position else None)


@dataclass
class Scene:
    """A rendered ShapesWorld image with its caption and per-shape ground truth."""

    image: Image.Image
    background: np.ndarray  # float32 HxWx3, the image without shapes (for rendering ground-truth edits)
    shapes: list[SceneShape]
    caption: str
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.image.size[0]

    def array(self) -> np.ndarray:
        return np.asarray(self.image)


def scene_shape(spec: ShapeSpec, height: int, width: int) -> SceneShape:
    """Ground truth for one spec drawn in a height x width image."""
    mask = rasterize(spec, height, width)
    ys, xs = np.nonzero(mask)
    cx, cy = (float(xs.mean()), float(ys.mean())) if len(xs) else (spec.cx, spec.cy)
    return SceneShape(spec, mask, (cx, cy), size_word(spec.size, width), position_phrase(cx, cy, width, height))


def scene_from_specs(background: np.ndarray, specs: list[ShapeSpec], seed: int | None = None) -> Scene:
    """Build a Scene (image, caption, ground truth) from a background and shape specs."""
    h, w = background.shape[:2]
    shapes = [scene_shape(s, h, w) for s in specs]
    caption = join_descriptions([s.description() for s in shapes])
    return Scene(compose(background, specs), background, shapes, caption, seed)


def overlaps(mask: np.ndarray, others: list[np.ndarray], gap: int) -> bool:
    """Whether ``mask`` comes within ``gap`` pixels of any mask in ``others``."""
    grown = dilate(mask, gap)
    return any((grown & o).any() for o in others)


def sample_spec(rng: np.random.Generator, size: int, shape: str | None = None, colour: str | None = None,
                size_class: str | None = None) -> ShapeSpec:
    """A random shape spec that fits inside a size x size image."""
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
    size_class = size_class or SIZE_WORDS[int(rng.integers(len(SIZE_WORDS)))]
    lo, hi = SIZE_RANGES[size_class]
    s = float(rng.uniform(lo, hi)) * size
    left, right, up, down = extent(shape, s)
    cx = float(rng.uniform(left + 0.5, size - 1.5 - right))
    cy = float(rng.uniform(up + 0.5, size - 1.5 - down))
    return ShapeSpec(shape, colour, s, cx, cy)


def _as_rng(seed_or_rng: int | np.random.Generator) -> tuple[np.random.Generator, int | None]:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng, None
    return np.random.default_rng(int(seed_or_rng)), int(seed_or_rng)


def render_scene(seed_or_rng: int | np.random.Generator, size: int = 64, n_shapes: int | None = None,
                 max_tries: int = 200) -> Scene:
    """A random scene: pastel background, 1..MAX_SHAPES non-touching shapes, and its caption.

    Same seed, same scene. Shapes keep ``MIN_GAP_PX`` (scaled with ``size``) background pixels between them so that
    each one is its own connected component. If a shape cannot be placed after ``max_tries`` attempts the scene
    simply has fewer shapes (only possible with three big shapes).
    """
    rng, seed = _as_rng(seed_or_rng)
    n = int(n_shapes) if n_shapes is not None else int(rng.integers(1, MAX_SHAPES + 1))
    background = render_background(rng, size, size)
    gap = max(1, round(MIN_GAP_PX * size / 64))
    specs: list[ShapeSpec] = []
    masks: list[np.ndarray] = []
    for _ in range(n):
        for _ in range(max_tries):
            spec = sample_spec(rng, size)
            mask = rasterize(spec, size, size)
            if not overlaps(mask, masks, gap):
                specs.append(spec)
                masks.append(mask)
                break
    return scene_from_specs(background, specs, seed)


def caption_for(scene: Scene, rng: np.random.Generator | None = None, drop_prob: float = 0.0) -> str:
    """The scene caption, optionally dropping each shape's size word / position phrase with ``drop_prob``
    (training-time augmentation so the model also follows partial prompts such as "a red circle")."""
    if rng is None or drop_prob <= 0:
        return scene.caption
    parts = [s.description(with_size=rng.random() >= drop_prob, with_position=rng.random() >= drop_prob)
             for s in scene.shapes]
    return join_descriptions(parts)
