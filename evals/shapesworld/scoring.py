"""Exact scores of a ShapesWorld drag edit, from segmentation of the edited image.

Every non-background object of the edited image is found with ``segment.segment_objects``. Objects that are the
scene's *other* (unedited) shapes are claimed first (nearest object of the same colour within ``CLAIM_RADIUS`` of the
shape's original centroid); among the rest, the edited shape is the object that best matches it: right colour
first, then right class, then nearest to where it should be. The scores:

* **MD** (mean distance): distance from that object's centroid to the ground-truth centroid, in px and as a fraction
  of the drag length. For ``resize`` the ground-truth centroid is the original one, so MD measures sliding.
* **size error**: object size minus ground-truth size (px; size from area: diameter / side / base-and-height of the
  same-class shape with that area, which blur affects less than the bounding box).
* **identity**: the object has the edited shape's class and colour.
* **preservation**: PSNR (dB, capped at ``PSNR_CAP``) vs the original image over pixels outside the union of the old
  and new footprints grown by ``PRESERVE_MARGIN_PX``.
* **ghosting**: saturated (shape-like) pixels inside the old footprint that neither the matched object nor the new
  footprint explains, as a fraction of the old footprint's area. Catches a left-behind copy, an off-colour leftover
  and (for shrink) a shape that did not shrink.
* **extra objects**: objects matched to nothing (duplicates elsewhere, speckle blobs).

Success: identity kept, MD <= ``SUCCESS_MD_PX``, ghost fraction < ``GHOST_THRESHOLD`` and, for resize, |size error|
<= max(``SIZE_TOL_MIN_PX``, ``SIZE_TOL_OF_CHANGE`` x |requested size change|).
All pixel thresholds are for the 64 px image and scale with its side.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from luciddrag.evals.shapesworld import world
from luciddrag.evals.shapesworld.segment import SegObject, foreground_mask, segment_objects, to_rgb_array
from luciddrag.evals.shapesworld.tasks import DragTask

SUCCESS_MD_PX = 3.0
GHOST_THRESHOLD = 0.10  # fraction of the old footprint
GHOST_EXPLAIN_MARGIN_PX = 1  # matched object / new footprint grown by this before subtracting (blurry rims)
PRESERVE_MARGIN_PX = 3
CLAIM_RADIUS_PX = 4.0
SIZE_TOL_OF_CHANGE = 0.3
SIZE_TOL_MIN_PX = 2.0
PSNR_CAP = 100.0
SHAPE_AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area = factor * size^2


class TaskScore(BaseModel):
    task_id: str
    family: str
    found: bool
    md_px: float | None
    md_frac: float | None
    size_px: float | None
    size_error_px: float | None
    class_kept: bool
    colour_kept: bool
    identity_kept: bool
    preservation_psnr: float
    ghost_fraction: float
    extra_objects: int
    success: bool


# --------------------------------------------------------------------------------------------------- pure pieces


def _px(value: float, size: int) -> float:
    return value * size / 64


def equivalent_size(area: float, shape: str) -> float:
    """Size (diameter / side / base) of a ``shape`` with this pixel area."""
    return math.sqrt(area / SHAPE_AREA_FACTOR.get(shape, 1.0))


def distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def psnr_outside(original: np.ndarray, edited: np.ndarray, protect: np.ndarray, cap: float = PSNR_CAP) -> float:
    """PSNR (dB) of ``edited`` vs ``original`` (HxWx3, [0, 255]) over pixels where ``protect`` is False."""
    keep = ~protect
    if not keep.any():
        return cap
    mse = float(np.mean((original[keep].astype(np.float64) - edited[keep].astype(np.float64)) ** 2))
    return cap if mse == 0 else min(cap, 10 * math.log10(255.0 ** 2 / mse))


def ghost_fraction(edited_fg: np.ndarray, old_footprint: np.ndarray, explained: np.ndarray) -> float:
    """Share of the old footprint that is still saturated but not explained (by the moved shape / new footprint)."""
    area = int(old_footprint.sum())
    if area == 0:
        return 0.0
    return float((edited_fg & old_footprint & ~explained).sum()) / area


def explained_pixels(task: DragTask, obj: SegObject | None, margin: int) -> np.ndarray:
    """Pixels a correct result may have saturated: the ground-truth footprint and, when the matched object is a
    clean shape (right class, area within 35% of the ground truth's), the ground-truth shape re-centred on that
    object (a move that lands a pixel off is not a ghost); grown by ``margin``. The matched object's own mask is
    deliberately *not* used: a copy left behind that touches the moved shape merges with it into one big blob, and
    a shape that failed to shrink would explain itself."""
    size = task.image_size
    new_spec = task.target.spec()
    explained = world.rasterize(new_spec, size, size)
    target_area = float(explained.sum())
    if obj is not None and obj.shape == task.source.shape and abs(obj.area - target_area) <= 0.35 * target_area:
        dx, dy = obj.centroid[0] - task.expected_centroid[0], obj.centroid[1] - task.expected_centroid[1]
        explained |= world.rasterize(new_spec.moved(dx, dy), size, size)
    return world.dilate(explained, margin)


def claim_objects(objects: list[SegObject], others: list[world.SceneShape], radius: float) -> list[SegObject]:
    """The objects left after each unedited shape claims its nearest same-colour object within ``radius``."""
    free = list(objects)
    for shp in others:
        near = [o for o in free if o.colour == shp.colour and distance(o.centroid, shp.centroid) <= radius]
        if near:
            free.remove(min(near, key=lambda o: distance(o.centroid, shp.centroid)))
    return free


def match_edited(objects: list[SegObject], shape: str, colour: str, expected: tuple[float, float]) -> SegObject | None:
    """The object best matching the edited shape: right colour, then right class, then nearest to ``expected``."""
    if not objects:
        return None
    return min(objects, key=lambda o: (o.colour != colour, o.shape != shape, distance(o.centroid, expected)))


# --------------------------------------------------------------------------------------------------- per task


def score_task(task: DragTask, edited: np.ndarray, original: np.ndarray | None = None,
               scene: world.Scene | None = None) -> TaskScore:
    """Score one edited image (HxWx3 uint8 or float) for ``task``. ``original`` defaults to the task's scene."""
    scene = scene or task.scene()
    original = to_rgb_array(scene.image if original is None else original)
    edited_rgb = to_rgb_array(edited)
    if edited_rgb.shape != original.shape:
        raise ValueError(f"edited image {edited_rgb.shape} and original {original.shape} differ in size")
    size = task.image_size
    old_fp, new_fp = task.source_mask(), task.target_mask()
    others = [s for i, s in enumerate(scene.shapes) if i != task.edited_index]

    objects = segment_objects(edited_rgb)
    free = claim_objects(objects, others, _px(CLAIM_RADIUS_PX, size))
    obj = match_edited(free, task.source.shape, task.source.colour, task.expected_centroid)
    n_extra = max(0, len(free) - (1 if obj is not None else 0))

    fg = foreground_mask(edited_rgb)
    margin = max(1, round(_px(GHOST_EXPLAIN_MARGIN_PX, size)))
    ghost = ghost_fraction(fg, old_fp, explained_pixels(task, obj, margin))
    protect = world.dilate(old_fp | new_fp, max(1, round(_px(PRESERVE_MARGIN_PX, size))))
    preservation = psnr_outside(original, edited_rgb, protect)

    if obj is None:
        return TaskScore(task_id=task.task_id, family=task.family, found=False, md_px=None, md_frac=None,
                         size_px=None, size_error_px=None, class_kept=False, colour_kept=False, identity_kept=False,
                         preservation_psnr=preservation, ghost_fraction=ghost, extra_objects=n_extra, success=False)
    md = distance(obj.centroid, task.expected_centroid)
    obj_size = equivalent_size(obj.area, task.source.shape)
    size_err = obj_size - task.expected_size
    class_kept, colour_kept = obj.shape == task.source.shape, obj.colour == task.source.colour
    ok = class_kept and colour_kept and md <= _px(SUCCESS_MD_PX, size) and ghost < GHOST_THRESHOLD
    if task.family == "resize":
        tol = max(_px(SIZE_TOL_MIN_PX, size), SIZE_TOL_OF_CHANGE * abs(task.expected_size - task.original_size))
        ok = ok and abs(size_err) <= tol
    return TaskScore(task_id=task.task_id, family=task.family, found=True, md_px=md,
                     md_frac=md / max(task.drag_length, 1e-6), size_px=obj_size, size_error_px=size_err,
                     class_kept=class_kept, colour_kept=colour_kept, identity_kept=class_kept and colour_kept,
                     preservation_psnr=preservation, ghost_fraction=ghost, extra_objects=n_extra, success=ok)


# --------------------------------------------------------------------------------------------------- aggregate


def _stat(values: list[float], fn) -> float | None:
    return float(fn(values)) if values else None


def aggregate(scores: list[TaskScore]) -> dict[str, dict[str, float | int | None]]:
    """Per-family table: n, success rate, mean/median MD (px, fraction; over tasks where the shape was found),
    found rate, identity rate, mean |size error|, mean preservation PSNR, mean ghost fraction and ghost rate
    (>= GHOST_THRESHOLD), mean extra objects."""
    table: dict[str, dict[str, float | int | None]] = {}
    for fam in sorted({s.family for s in scores}):
        fs = [s for s in scores if s.family == fam]
        md = [s.md_px for s in fs if s.md_px is not None]
        mdf = [s.md_frac for s in fs if s.md_frac is not None]
        se = [abs(s.size_error_px) for s in fs if s.size_error_px is not None]
        table[fam] = {
            "n": len(fs),
            "success_rate": float(np.mean([s.success for s in fs])),
            "found_rate": float(np.mean([s.found for s in fs])),
            "md_mean_px": _stat(md, np.mean),
            "md_median_px": _stat(md, np.median),
            "md_mean_frac": _stat(mdf, np.mean),
            "identity_rate": float(np.mean([s.identity_kept for s in fs])),
            "size_abs_error_mean_px": _stat(se, np.mean),
            "preservation_psnr_mean": float(np.mean([s.preservation_psnr for s in fs])),
            "ghost_fraction_mean": float(np.mean([s.ghost_fraction for s in fs])),
            "ghost_rate": float(np.mean([s.ghost_fraction >= GHOST_THRESHOLD for s in fs])),
            "extra_objects_mean": float(np.mean([s.extra_objects for s in fs])),
        }
    return table


def format_table(table: dict[str, dict[str, float | int | None]]) -> str:
    """Markdown table of ``aggregate``'s output, one row per family."""
    cols = ["n", "success_rate", "md_mean_px", "md_median_px", "md_mean_frac", "identity_rate",
            "size_abs_error_mean_px", "preservation_psnr_mean", "ghost_rate", "extra_objects_mean"]
    head = "| family | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"

    def fmt(v: float | int | None) -> str:
        return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.3g}")

    return head + "".join(f"| {fam} | " + " | ".join(fmt(row[c]) for c in cols) + " |\n"
                          for fam, row in table.items())
