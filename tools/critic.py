"""The region critic: where did the dragged object go, at what size, and did it arrive intact?

DIFT tracking of the handle point (the critique node's first check) cannot judge a resize: a resize drag is often
2-4 px long, under the features' 4 px stride, and the handle's content (an edge) looks alike all along the
object's rim. The region critic looks at the whole object instead. It matches the located object (its pixels plus a
thin ring of what surrounds it, so that a part of a uniform object cannot pass for the whole) against the edited
image under every similarity transform "scale s about the centroid, then put the centroid at c'" on a grid, and
keeps the best one. From that transform T it reads:

* **arrival**: each handle carried by the object's own motion, T(handle), should land on its target. This judges a
  move, a resize and a move + resize alike, whatever the intention;
* **extent**: the achieved scale against the one the intention asked for (1 for a move; the drag's for a resize);
* **intact**: how well the transformed object matches the result (RMSE over the object, in [0, 1] colour units,
  relative to the object's contrast with its surroundings);
* **left behind**: how much of the object's contrast is still at the pixels it vacated (a ghost);
* **spill**: the share of pixels away from the old and new footprints that changed strongly (a duplicate, a blob).

Everything is pure numpy / scipy on RGB arrays, works at any size (large images are matched at most ``MAX_SIDE``
px on the long side) and needs no model. The thresholds are data (``RegionCriticConfig``), fitted on a dev set and
reported on a test set by ``luciddrag.evals.shapesworld.agent_suite`` (docs/agent-eval.md).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy import ndimage, signal

Point = tuple[float, float]
Motion = Literal["translate", "scale"]

MAX_SIDE = 128  # matching resolution cap: the transform grid's cost grows with the pixel count
SCALES = tuple(float(s) for s in np.geomspace(0.4, 2.5, 41))  # ~4.7% apart: finer than a 1 px rim on a 20 px object
CHANGED = 0.2  # a pixel "changed strongly" when its mean |RGB difference| exceeds this (of 1.0)


class RegionCriticConfig(BaseModel):
    """Acceptance thresholds of the region critic (defaults: the largest value of each signal over the ShapesWorld
    dev set's faithful engine edits, region_critic_study; rates on its test set in docs/agent-eval.md).

    All are relative (to the drag's length, the object's size or its contrast), so they carry over to other image
    sizes; a photo's objects are less uniform than ShapesWorld's, which raises ``max_mismatch`` for good edits."""

    max_md_fraction: float = Field(0.5, description="T(handle) within this fraction of the drag length of its "
                                                    "target, or within min_md_px")
    min_md_px: float = Field(3.0, description="floor of the arrival tolerance, px at 64 px image side (scaled)")
    max_scale_error: float = Field(0.39, description="|log(achieved / requested scale)| allowed")
    max_mismatch: float = Field(0.38, description="RMSE over the moved object / its contrast with the surroundings")
    max_left: float = Field(0.1, description="share of the object's contrast still at the pixels it vacated")
    max_spill: float = Field(0.012, description="share of pixels away from both footprints that changed strongly")
    max_colour_shift: float = Field(0.2, description="mean colour change inside the object / its contrast")
    max_ring_mismatch: float = Field(0.39, description="RMSE over the ring around the moved object / its contrast")


class RegionFit(BaseModel):
    """The best similarity transform of the object: p -> centre_to + scale * (p - centre_from)."""

    scale: float
    centre_from: Point
    centre_to: Point
    mismatch: float = Field(description="RMSE over the object at the best transform / the object's contrast")
    colour_shift: float = Field(description="|mean colour change| over the object's interior / its contrast (a "
                                            "recoloured object; blur at the rim does not count)")
    ring_mismatch: float = Field(description="RMSE over the ring around the object / its contrast (a smear, a "
                                             "blob touching the object)")
    rmse: float = Field(description="RMSE over the object at the best transform, [0, 1] colour units")
    contrast: float


class RegionVerdict(BaseModel):
    ok: bool
    fit: RegionFit
    md_px: float = Field(description="mean distance of T(handle) from the target, px")
    md_fraction: float
    requested_scale: float | None
    left: float | None = Field(description="None when the object vacated no pixel (a grow in place)")
    spill: float
    reasons: list[str] = Field(description="what each check measured, failed ones first")


# --------------------------------------------------------------------------------------------------- pure pieces


def as_float_rgb(image) -> np.ndarray:
    """HxWx3 float32 in [0, 1] from a PIL image or an array (uint8 or float in [0, 1])."""
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    arr = arr[..., :3].astype(np.float32)
    return arr / 255.0 if arr.max() > 1.5 else arr


def centroid(mask: np.ndarray) -> Point:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def apply(fit: RegionFit, p: Point) -> Point:
    """T(p): where the object's motion carries the point p."""
    (cx, cy), (ux, uy) = fit.centre_from, fit.centre_to
    return ux + fit.scale * (p[0] - cx), uy + fit.scale * (p[1] - cy)


def requested_scale(centre: Point, handles: Sequence[Point], targets: Sequence[Point]) -> float | None:
    """The scale about ``centre`` that carries the handles to their targets (least squares along each handle's
    ray), or None when every handle sits at the centre."""
    num = den = 0.0
    for (hx, hy), (tx, ty) in zip(handles, targets):
        ox, oy = hx - centre[0], hy - centre[1]
        num += ox * (tx - centre[0]) + oy * (ty - centre[1])
        den += ox * ox + oy * oy
    return num / den if den > 1e-9 and num > 0 else None


def ring_width(mask: np.ndarray) -> int:
    """Context ring around the object: ~15% of its equivalent diameter, at least 1 px."""
    return max(1, int(round(0.15 * math.sqrt(4 * mask.sum() / math.pi))))


def _downscale(arr: np.ndarray, factor: float, order: int) -> np.ndarray:
    return ndimage.zoom(arr, (factor, factor) + (1,) * (arr.ndim - 2), order=order)


def _template(original: np.ndarray, obj: np.ndarray, ctx: np.ndarray, c: Point, s: float):
    """The object (and its ring) scaled by ``s`` about ``c``: colours, object weight, object+ring weight on an
    integer grid of offsets q (the template pixel q shows the original at c + q / s), and the grid's origin."""
    ys, xs = np.nonzero(ctx)
    x0, x1 = math.floor(s * (xs.min() - c[0])) - 1, math.ceil(s * (xs.max() - c[0])) + 1
    y0, y1 = math.floor(s * (ys.min() - c[1])) - 1, math.ceil(s * (ys.max() - c[1])) + 1
    qy, qx = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    coords = np.stack([c[1] + qy / s, c[0] + qx / s])
    rgb = np.stack([ndimage.map_coordinates(original[..., k], coords, order=1, mode="nearest") for k in range(3)], -1)
    w_obj = ndimage.map_coordinates(obj.astype(np.float32), coords, order=1, mode="constant")
    w_ctx = ndimage.map_coordinates(ctx.astype(np.float32), coords, order=1, mode="constant")
    inner = ndimage.binary_erosion(obj, iterations=1)
    w_in = ndimage.map_coordinates((inner if inner.sum() >= 4 else obj).astype(np.float32), coords, order=1,
                                   mode="constant")
    return rgb, w_obj, w_ctx, w_in, (x0, y0)


def _masked_mse(edited: np.ndarray, tmpl: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted mean squared difference of the template placed at every offset of ``edited`` (already padded so
    that every placement is inside): sum w (E - T)^2 / sum w, by FFT correlation."""
    total = np.zeros((edited.shape[0] - w.shape[0] + 1, edited.shape[1] - w.shape[1] + 1), np.float64)
    for k in range(3):
        e, t = edited[..., k].astype(np.float64), tmpl[..., k].astype(np.float64)
        total += ((w * t * t).sum() - 2 * signal.correlate(e, w * t, mode="valid", method="fft")
                  + signal.correlate(e * e, w, mode="valid", method="fft"))
    return np.maximum(total, 0.0) / max(float(w.sum()) * 3, 1e-9)


def fit_region(original: np.ndarray, edited: np.ndarray, region: np.ndarray, search: tuple[Point, float] | None = None,
               scales: Sequence[float] = SCALES) -> RegionFit:
    """The similarity transform (scale about the object's centroid + translation) that best matches the object and
    its ring (``region``: HxW bool, the object in ``original``) into ``edited``; arrays HxWx3 in [0, 1].

    ``search``: (centre, radius) in px: only placements of the centroid within the radius are considered (another
    object of the same look elsewhere must not pass for this one)."""
    h, w = region.shape
    f = min(1.0, MAX_SIDE / max(h, w))
    if f < 1.0:
        original, edited = _downscale(original, f, 1), _downscale(edited, f, 1)
        region = _downscale(region.astype(np.float32), f, 1) > 0.5
    c = centroid(region)
    ctx = ndimage.binary_dilation(region, iterations=ring_width(region))
    obj_rgb = original[region]
    ring_rgb = original[ctx & ~region]
    contrast = float(np.abs(obj_rgb.mean(0) - ring_rgb.mean(0)).mean()) if len(ring_rgb) else 1.0
    contrast = max(contrast, 0.05)  # a camouflaged object: do not divide by ~0
    best = (math.inf, 1.0, c, 0.0, 0.0, 0.0)
    for s in scales:
        tmpl, w_obj, w_ctx, w_in, (x0, y0) = _template(original, region, ctx, c, s)
        th, tw = w_ctx.shape
        # pad so that a placement may hang over the border by up to the template's size (edge colours beyond)
        padded = np.pad(edited, ((th, th), (tw, tw), (0, 0)), mode="edge")
        mse = _masked_mse(padded, tmpl, w_ctx)
        # placement index (i, j) puts template pixel q at padded[i + q - (y0, x0)] -> the centroid c' in the image
        iy, ix = np.mgrid[0:mse.shape[0], 0:mse.shape[1]]
        ux, uy = ix - x0 - tw, iy - y0 - th
        if search is not None:
            (sx, sy), radius = search
            far = np.hypot(ux - sx * f, uy - sy * f) > radius * f
            mse = np.where(far, np.inf, mse)
        k = int(np.argmin(mse))
        if mse.flat[k] < best[0]:
            i, j = divmod(k, mse.shape[1])
            win = padded[i:i + th, j:j + tw]
            sq = (win - tmpl) ** 2
            err = float(np.sqrt((w_obj[..., None] * sq).sum() / max(3 * w_obj.sum(), 1e-9)))
            w_ring = np.clip(w_ctx - w_obj, 0, 1)[..., None]
            ring = float(np.sqrt((w_ring * sq).sum() / max(3 * w_ring.sum(), 1e-9)))
            shift = np.abs((w_in[..., None] * (win - tmpl)).sum((0, 1)) / max(float(w_in.sum()), 1e-9)).mean()
            best = (float(mse.flat[k]), s, (float(ux[i, j]), float(uy[i, j])), err, ring, float(shift))
    _, s, (ux, uy), err, ring, shift = best
    return RegionFit(scale=s, centre_from=(c[0] / f, c[1] / f), centre_to=(ux / f, uy / f), rmse=err,
                     contrast=contrast, mismatch=err / contrast, colour_shift=shift / contrast,
                     ring_mismatch=ring / contrast)


def transformed_mask(region: np.ndarray, fit: RegionFit) -> np.ndarray:
    """The object's footprint after the transform (nearest-neighbour inverse warp)."""
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    (cx, cy), (ux, uy) = fit.centre_from, fit.centre_to
    src = np.stack([cy + (yy - uy) / fit.scale, cx + (xx - ux) / fit.scale])
    return ndimage.map_coordinates(region.astype(np.float32), src, order=1, mode="constant") > 0.5


def left_behind(original: np.ndarray, edited: np.ndarray, region: np.ndarray, moved: np.ndarray,
                contrast: float) -> float | None:
    """Share of the object's contrast still present at the pixels it vacated (1: untouched, 0: fully replaced by
    something else); None when it vacated (almost) nothing. Both footprints are grown by 1 px first: blurry rims
    are neither object nor background."""
    vacated = ndimage.binary_erosion(region, iterations=1) & ~ndimage.binary_dilation(moved, iterations=1)
    if vacated.sum() < 3:
        return None
    change = float(np.abs(edited[vacated] - original[vacated]).mean())
    return float(np.clip(1.0 - change / contrast, 0.0, 1.0))


def spill(original: np.ndarray, edited: np.ndarray, region: np.ndarray, moved: np.ndarray) -> float:
    """Share of the pixels away from both footprints (grown by ~15% of the object's size) that changed strongly."""
    grow = max(1, 2 * ring_width(region))
    near = ndimage.binary_dilation(region | moved, iterations=grow)
    far = ~near
    if not far.any():
        return 0.0
    diff = np.abs(edited - original).mean(-1)
    return float((diff[far] > CHANGED).sum() / far.size)


def region_check(original, edited, region: np.ndarray, handles: Sequence[Point], targets: Sequence[Point],
                 motion: Motion | None = None, config: RegionCriticConfig | None = None,
                 search: float | None = 2.0) -> RegionVerdict:
    """Judge one drag edit of one object. ``region``: the object's mask in ``original``; ``motion``: what the
    intention asked for ("translate": same size; "scale": the drag's scale; None: size not checked); ``search``:
    the object's centroid is looked for within this multiple of the longest drag (at least 10% of the image side)
    around where the drags ask it to be."""
    cfg = config or RegionCriticConfig()
    a, b = as_float_rgb(original), as_float_rgb(edited)
    if a.shape != b.shape:
        raise ValueError(f"original {a.shape} and edited {b.shape} differ in size")
    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise ValueError("region is empty: the critic needs the dragged object's mask")
    side = min(region.shape)
    c = centroid(region)
    lengths = [math.hypot(t[0] - h[0], t[1] - h[1]) for h, t in zip(handles, targets)]
    window = None
    if search is not None:
        mean_drag = (float(np.mean([t[0] - h[0] for h, t in zip(handles, targets)])),
                     float(np.mean([t[1] - h[1] for h, t in zip(handles, targets)])))
        window = ((c[0] + mean_drag[0] / 2, c[1] + mean_drag[1] / 2), max(search * max(lengths), 0.1 * side))
    fit = fit_region(a, b, region, window)
    dists = [math.hypot(*np.subtract(apply(fit, h), t)) for h, t in zip(handles, targets)]
    md = float(np.mean(dists))
    frac = float(np.mean([d / max(l, 1e-6) for d, l in zip(dists, lengths)]))
    floor = cfg.min_md_px * side / 64
    arrived = all(d <= max(cfg.max_md_fraction * l, floor) for d, l in zip(dists, lengths))
    want = 1.0 if motion == "translate" else requested_scale(c, handles, targets) if motion == "scale" else None
    moved = transformed_mask(region, fit)
    left = left_behind(a, b, region, moved, fit.contrast)
    sp = spill(a, b, region, moved)
    checks = [(arrived, f"object carried the handle {md:.1f} px from target ({frac:.0%} of the drag)")]
    if want is not None:
        err = abs(math.log(fit.scale / want)) if want > 0 else math.inf
        checks.append((err <= cfg.max_scale_error, f"scale x{fit.scale:.2f} (asked x{want:.2f})"))
    checks.append((fit.mismatch <= cfg.max_mismatch, f"object mismatch {fit.mismatch:.2f} of its contrast"))
    checks.append((fit.colour_shift <= cfg.max_colour_shift, f"colour shift {fit.colour_shift:.2f} of its contrast"))
    checks.append((fit.ring_mismatch <= cfg.max_ring_mismatch,
                   f"surroundings mismatch {fit.ring_mismatch:.2f} of its contrast"))
    if left is not None:
        checks.append((left <= cfg.max_left, f"{left:.0%} of the object left at its old place"))
    checks.append((sp <= cfg.max_spill, f"{sp:.1%} of the image changed away from the object"))
    ok = all(flag for flag, _ in checks)
    reasons = [t for flag, t in checks if not flag] + [t for flag, t in checks if flag]
    return RegionVerdict(ok=ok, fit=fit, md_px=md, md_fraction=frac, requested_scale=want, left=left, spill=sp,
                         reasons=reasons)
