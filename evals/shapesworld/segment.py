"""Find every object in a ShapesWorld image (rendered, generated or edited) and name its shape and colour.

Objects are the saturated pixels: ShapesWorld backgrounds are pastel (HSV saturation <= 0.22) and every palette
colour has saturation >= 0.74, so a threshold halfway between separates them, also on the model's blurry output
(an edge pixel half shape, half background lands near the threshold, so the mask boundary sits at the 50% contour
and centroids stay unbiased). Connected components of that mask are objects; a component mixing two palette colours
(two shapes touching, or a shape with a solid off-colour ghost stuck to it) is split by colour.

Colour is named by hue, not RGB distance: hue survives the brightness/tint changes diffusion introduces, and a hue
between palette entries (an orange leftover of a red circle) comes out "unknown" instead of being forced onto a
palette name. Shape class comes from scale-free geometry (overlap with an equal-area circle / square / triangle
centred on the object), so all thresholds work at any image size. Areas are thresholded as fractions of the image area.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from luciddrag.evals.shapesworld.world import COLOURS, ShapeSpec, dilate, erode, rasterize

SAT_THRESHOLD = 0.45  # HSV saturation: background <= 0.22, palette >= 0.74
MIN_VALUE = 0.16  # below this brightness, hue/saturation are noise
MIN_OBJECT_FRACTION = 0.002  # components smaller than this fraction of the image are specks, not objects
# How far (degrees) a hue may be from a palette hue and still take its name. Narrow for red and yellow so orange
# (16-36 deg, what a red/yellow mix or a drifting red turns into) is "unknown"; wide elsewhere because the VAE
# drifts purple towards blue and green towards teal by ~20 degrees on small shapes.
HUE_TOLERANCE_DEG: dict[str, float] = {"red": 15.0, "yellow": 15.0, "green": 25.0, "blue": 25.0, "purple": 25.0}

PALETTE_HUES: dict[str, float] = {
    name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()
}


@dataclass(eq=False)  # identity equality: fields hold arrays
class SegObject:
    """One object found in an image.

    ``bbox`` is (x0, y0, x1, y1) with x1, y1 exclusive (slice bounds); ``centroid`` is (x, y), the mean of the mask's
    pixel coordinates.
    """

    shape: str  # 'circle' | 'square' | 'triangle' | 'unknown'
    colour: str  # a COLOURS name or 'unknown'
    mask: np.ndarray
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]

    @property
    def size(self) -> float:
        """Characteristic size in px: the mean of bounding-box width and height (= diameter / side / base)."""
        x0, y0, x1, y1 = self.bbox
        return ((x1 - x0) + (y1 - y0)) / 2


# --------------------------------------------------------------------------------------------------- pixels


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """HxWx3 float32 in [0, 255] from a PIL image, a uint8 array, or a float array in [0, 1] or [0, 255]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    arr = arr.astype(np.float32)
    return arr * 255 if arr.max() <= 1.0 + 1e-6 else arr


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised HSV of an HxWx3 [0, 255] array: hue in degrees [0, 360), saturation and value in [0, 1]."""
    x = rgb / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    safe = np.where(d > 0, d, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    h = np.where(d > 0, h, 0.0)
    s = np.where(mx > 0, d / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


def foreground_mask(image: np.ndarray | Image.Image) -> np.ndarray:
    """HxW bool: pixels saturated enough to belong to a shape (including ghosts and specks)."""
    _, s, v = hsv(to_rgb_array(image))
    return (s >= SAT_THRESHOLD) & (v >= MIN_VALUE)


def background_mask(image: np.ndarray | Image.Image) -> np.ndarray:
    """HxW bool: pastel background pixels, i.e. everything that is not saturated."""
    return ~foreground_mask(image)


def hue_distance(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """Circular distance between hues in degrees."""
    d = np.abs(np.asarray(a) - np.asarray(b)) % 360
    return np.minimum(d, 360 - d)


def colour_of_hue(hue: float) -> str:
    """Nearest palette colour name by hue, or 'unknown' if none is within HUE_TOLERANCE_DEG."""
    name, dist = min(((n, float(hue_distance(hue, h))) for n, h in PALETTE_HUES.items()), key=lambda t: t[1])
    return name if dist <= HUE_TOLERANCE_DEG[name] else "unknown"


def pixel_colour_labels(hue: np.ndarray) -> np.ndarray:
    """Per-pixel palette index by hue (len(COLOURS) = 'unknown')."""
    names = list(PALETTE_HUES)
    dists = np.stack([hue_distance(hue, PALETTE_HUES[n]) for n in names], axis=-1)
    idx = dists.argmin(-1)
    tol = np.array([HUE_TOLERANCE_DEG[n] for n in names])[idx]
    return np.where(dists.min(-1) <= tol, idx, len(names))


def mean_hue(hue: np.ndarray, weight: np.ndarray) -> float:
    """Weighted circular mean of hues in degrees."""
    rad = np.deg2rad(hue)
    x, y = float((np.cos(rad) * weight).sum()), float((np.sin(rad) * weight).sum())
    return float(np.rad2deg(np.arctan2(y, x)) % 360)


# --------------------------------------------------------------------------------------------------- components


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels of a bool mask: (labels HxW int, 0 = background, 1..n), n.

    Min-label propagation with pointer jumping in numpy (scipy is not a project dependency); converges in a few
    dozen vectorised passes even on 512 px images.
    """
    h, w = mask.shape
    big = h * w
    idx = np.arange(big, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, idx, big)
    while True:
        padded = np.pad(lab, 1, constant_values=big)
        nb = lab.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    nb = np.minimum(nb, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        nb = np.where(mask, nb, big)
        # Pointer jumping: a label is a pixel index, and that pixel's own label is at least as small.
        flat = np.append(nb.ravel(), big)
        for _ in range(4):
            flat[:-1] = flat[np.minimum(flat[:-1], big)]
        nb = flat[:-1].reshape(h, w)
        if np.array_equal(nb, lab):
            break
        lab = nb
    roots = np.unique(lab[mask])
    out = np.zeros((h, w), dtype=np.int32)
    if len(roots):
        out[mask] = np.searchsorted(roots, lab[mask]) + 1
    return out, len(roots)


# --------------------------------------------------------------------------------------------------- geometry


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def centroid_of(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Scale-free geometry of a mask: bbox fill ratio, bbox aspect (w/h), and vertical mass asymmetry.

    Asymmetry = (area below the bbox's middle row - area above) / area: ~0.5 for an upright triangle (3/4 of its
    area is in the lower half), ~0 for circles and squares.
    """
    x0, y0, x1, y1 = bbox_of(mask)
    w, h = x1 - x0, y1 - y0
    area = float(mask.sum())
    mid = (y0 + y1 - 1) / 2
    ys = np.nonzero(mask)[0]
    asym = (float((ys > mid).sum()) - float((ys < mid).sum())) / area
    # Corner occupancy: squares fill the corners of their bbox, circles leave them empty (the circle is 0.146 d
    # away from the bbox corner along each axis), which separates small discretised circles (fill up to ~0.88)
    # from squares better than fill alone.
    k = max(1, int(round(0.2 * min(w, h))))
    box = mask[y0:y1, x0:x1]
    corners = [box[:k, :k], box[:k, -k:], box[-k:, :k], box[-k:, -k:]]
    corner_fill = float(np.mean([c.mean() for c in corners]))
    return {"fill": area / (w * h), "aspect": w / h, "asym": asym, "corner": corner_fill}


SHAPE_AREA_FACTOR = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area = factor * size^2
MIN_TEMPLATE_IOU = 0.6  # below this for every class the blob is not a clean shape
# Blur rounds corners, which costs the square template overlap and gains the circle template some; measured on
# rendered scenes blurred with a 1 px Gaussian plus noise, square - circle IoU is >= -0.04 for every square and
# <= -0.076 for every circle (clean: >= +0.14 vs <= -0.11), so squares get this head start.
SQUARE_IOU_BONUS = 0.05


def template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask with each class's ideal shape of the same area, centred on the mask's centroid.

    Blur rounds a square's corners and shrinks a triangle's apex, which moves fill ratios a lot on small shapes, but a
    rounded square still overlaps an equal-area square far better than an equal-area circle, so template overlap is
    the robust test. Computed on a crop around the mask, so it is cheap at any image size.
    """
    x0, y0, x1, y1 = bbox_of(mask)
    pad = max(2, (x1 - x0) // 2)
    cy0, cx0 = max(0, y0 - pad), max(0, x0 - pad)
    crop = mask[cy0:y1 + pad, cx0:x1 + pad]
    cx, cy = centroid_of(crop)
    area = float(crop.sum())
    out = {}
    for shape, factor in SHAPE_AREA_FACTOR.items():
        tpl = rasterize(ShapeSpec(shape, "red", float(np.sqrt(area / factor)), cx, cy), *crop.shape)
        out[shape] = float((tpl & crop).sum()) / float((tpl | crop).sum())
    return out


def classify_shape(mask: np.ndarray) -> str:
    """'circle' | 'square' | 'triangle' | 'unknown': the class whose equal-area template overlaps the mask best.

    'unknown' when no template reaches ``MIN_TEMPLATE_IOU`` (merged shapes, smears, partial ghosts) or the bounding
    box is elongated (every ShapesWorld shape has aspect ~1). ``shape_features`` stays available for diagnostics.
    """
    f = shape_features(mask)
    if not 0.65 <= f["aspect"] <= 1.55:
        return "unknown"
    ious = template_ious(mask)
    if ious["triangle"] >= max(ious["circle"], ious["square"]):
        best = "triangle"
    else:  # the head start is only for square vs circle, the pair blur confuses
        best = "square" if ious["square"] + SQUARE_IOU_BONUS >= ious["circle"] else "circle"
    return best if ious[best] >= MIN_TEMPLATE_IOU else "unknown"


# --------------------------------------------------------------------------------------------------- objects


def _make_object(mask: np.ndarray, hue: np.ndarray, sat: np.ndarray) -> SegObject:
    colour = colour_of_hue(mean_hue(hue[mask], sat[mask]))
    return SegObject(classify_shape(mask), colour, mask, centroid_of(mask), int(mask.sum()), bbox_of(mask))


def _solid_parts(region: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Connected parts of ``region`` that keep at least ``min_area`` pixels after a 1 px erosion: real blobs, not
    the thin off-hue rims the VAE draws around shapes (e.g. teal edges on green)."""
    sub, n = connected_components(region)
    parts = [sub == i for i in range(1, n + 1)]
    return [p for p in parts if p.sum() >= min_area and erode(p, 1).sum() >= min_area]


def _grow_into(component: np.ndarray, seeds: list[np.ndarray]) -> list[np.ndarray]:
    """Give every pixel of ``component`` to the seed that reaches it first by 8-connected growth inside it."""
    owner = np.full(component.shape, -1, dtype=np.int32)
    for i, seed in enumerate(seeds):
        owner[seed & (owner < 0)] = i
    while True:
        todo = component & (owner < 0)
        if not todo.any():
            break
        changed = False
        for i in range(len(seeds)):
            grab = dilate(owner == i, 1) & todo
            if grab.any():
                owner[grab] = i
                todo &= ~grab
                changed = True
        if not changed:
            break
    return [owner == i for i in range(len(seeds))]


def _split_by_colour(component: np.ndarray, colour_labels: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Split a component into per-colour objects when it holds two or more solid single-colour parts (shapes that
    touch, a shape with a solid off-colour leftover stuck to it). Rims and specks of other hues join the part they
    touch, so a shape with a blurry off-hue edge stays one object."""
    seeds: list[np.ndarray] = []
    for lab in np.unique(colour_labels[component]):
        seeds.extend(_solid_parts(component & (colour_labels == lab), min_area))
    if len(seeds) < 2:
        return [component]
    return _grow_into(component, seeds)


def segment_objects(image: np.ndarray | Image.Image, min_fraction: float = MIN_OBJECT_FRACTION) -> list[SegObject]:
    """Every non-background object in ``image``, largest first.

    ``min_fraction``: components smaller than this fraction of the image area are ignored (noise specks; a ghost
    big enough to matter is far above it: the smallest ShapesWorld shape covers ~1.2% of a 64 px image).
    """
    rgb = to_rgb_array(image)
    hue, sat, val = hsv(rgb)
    fg = (sat >= SAT_THRESHOLD) & (val >= MIN_VALUE)
    min_area = max(1, int(round(min_fraction * fg.size)))
    comps, n = connected_components(fg)
    colour_labels = pixel_colour_labels(hue)
    objects: list[SegObject] = []
    for i in range(1, n + 1):
        comp = comps == i
        if comp.sum() < min_area:
            continue
        objects.extend(_make_object(part, hue, sat) for part in _split_by_colour(comp, colour_labels, min_area))
    return sorted(objects, key=lambda o: -o.area)
