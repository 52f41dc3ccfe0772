"""The edit request: what a caller hands the engine, validated at the boundary.

Coordinates are always in the *original* image's pixels, (x, y) with x to the right and y down. The engine maps them
to its working resolution and back; callers never see the working size.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from luciddrag.engine.errors import InputError

Point = tuple[float, float]


class DragPair(BaseModel):
    """One drag: the content under `handle` should end up at `target`. The one definition of a drag, shared by the
    engine, the tools and the agent (``tools.schemas`` re-exports it)."""

    model_config = ConfigDict(frozen=True)

    handle: Point
    target: Point

    @field_validator("handle", "target")
    @classmethod
    def _finite(cls, v: Point) -> Point:
        if not all(math.isfinite(c) for c in v):
            raise ValueError(f"point {v} is not finite (NaN or inf)")
        return v

    @property
    def vector(self) -> Point:
        return (self.target[0] - self.handle[0], self.target[1] - self.handle[1])

    @property
    def length(self) -> float:
        return math.hypot(*self.vector)


class GuidanceConfig(BaseModel):
    """Weights and schedule of the guidance terms.

    Units (ours, documented because the paper's equations were lost): every energy is dimensionless and O(1)
    (similarities live in [0, 1]); the sampler adds ``sqrt(1 - alpha_bar_t) * w * dE/dz`` to the CFG noise estimate,
    as classifier guidance does (paper Eq. 5/12/16). DragonDiffusion multiplies its raw gradient by
    ``energy_scale (2e3) * 4e-2 = 80`` with w_edit 4 / w_content 6, i.e. effective weights of 320 / 480 on energies of the
    same 1/(1 + 4 s) form. The paper's 4e-4 / 4e-4 / 1e-3 are weights in *its* (unpublished) normalisation and cannot be
    mapped exactly; our defaults were chosen by measurement on ShapesWorld (see README "Guidance weights").
    """

    model_config = ConfigDict(extra="forbid")

    w_edit: float = Field(300.0, ge=0, description="Drag energy: target-region features -> handle reference features.")
    w_content: float = Field(300.0, ge=0, description="Content energy: keep the unrelated region like the reference.")
    w_inpaint: float = Field(30.0, ge=0, description="Push the vacated handle region away from its old content.")
    edit_steps: int = Field(30, ge=0, description="n1: editing guidance is applied on the first n1 sampling steps.")
    patch_radius: int = Field(1, ge=0, description="Half-size of the handle/target patches on the feature grid.")
    feature_blocks: tuple[int, ...] = Field((1, 2), description="UNet up_blocks whose outputs are the features.")
    resize_feature_blocks: tuple[int, ...] | None = Field(
        None, description="The features of an edit that resizes an object region (region_motion 'scale' or "
                          "'similarity'), when they should differ from `feature_blocks` (ShapesWorld: the finer block "
                          "alone matches a resized shape better); None: `feature_blocks`.")
    kv_injection: bool = Field(True, description="Inject the inversion's self-attention K/V into the decoder.")
    kv_start_step: int = Field(5, ge=0, description="First sampling step that uses the memory bank's K/V.")
    kv_mode: Literal["concat", "replace"] = Field("concat", description="concat: attend to own + memory K/V.")
    init_copy: bool = Field(True, description="Copy the handle's latent patch (or handle region) onto the target in z_T.")
    vacate_noise: float = Field(
        1.0, ge=0, le=1, description="With init_copy and a handle region: fresh noise mixed into the z_T cells the "
                                     "region left (against ghosts).")
    blend_outside: bool = Field(
        True, description="Outside the editable region, pin each sampling step to the inversion's latent of that "
                          "step, so the unedited part reproduces the input exactly (up to the VAE).")
    reference_features: Literal["inversion", "matched"] = Field(
        "inversion", description="What the energies compare against at step t. inversion: the features captured while "
                                 "inverting (source prompt, one step less noisy; free). matched: the UNet's features at "
                                 "the inverted latent z_t of the same step with the target prompt, as DragonDiffusion "
                                 "does (one more no-grad UNet forward per guided step).")
    schedule: Literal["default", "dragon"] = Field(
        "default", description="default: one pass per step. dragon: DragonDiffusion's repeated guided steps -- steps "
                               "22/24/26/28 of 50 (scaled to other step counts) run 3 passes each, re-noised back to "
                               "the step's noise level in between.")
    max_region_cells: int = Field(
        192, ge=1, description="Handle regions are sampled on the patch grid; at most this many cells per drag.")
    auto_mask_radius: float = Field(
        0.5, gt=0, description="No user mask: editable region = capsule around each drag, radius x drag length."
    )
    auto_mask_min: float = Field(0.1, ge=0, description="... and at least this fraction of the image's short side.")


DEFAULT_GUIDANCE_SCALE = 5.0
"""Classifier-free guidance scale when neither the model's settings nor the user say otherwise (the paper's CFG 5;
the one place this default is written)."""

FAST_STEPS = 25  # the fast preset's sampling steps; the guidance schedule is scaled to it


class QualityGuidance(BaseModel):
    """Quality guidance (the paper's discriminator term): which discriminator, and overrides of what it recommends.
    The engine decides whether it applies to an edit (by the kind of drag: the discriminator's `quality_motions`, or
    `motions` here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    discriminator: str = Field(description="Folder of a trained discriminator (`luciddrag train-discriminator`).")
    weight: float | None = Field(None, ge=0, description="w_q; None: the discriminator's recommendation; 0: off.")
    steps: int | None = Field(None, ge=0, description="n2: quality guidance on the first n2 sampling steps.")
    motions: tuple[Literal["translate", "scale", "patch"], ...] | None = Field(
        None, description="Kinds of drag guided by it; None: the discriminator's recommendation.")


class EditRequest(BaseModel):
    """One drag edit. `target_prompts` lets the agent sample several intentions from one inversion."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    image: Any = Field(description="Path, PIL.Image or HxWxC uint8 array.")
    drags: list[DragPair] = Field(min_length=1)
    mask: Any | None = Field(None, description="Editable region: path, PIL.Image or HxW array; nonzero = editable.")
    handle_masks: list[Any | None] | None = Field(
        None, description="Per drag (or None): the region that moves with the handle, e.g. the locator's object "
                          "mask. The drag energy then moves that whole region, not just a patch around the point.")
    region_motion: Literal["translate", "scale", "similarity"] = Field(
        "translate", description="How a handle region follows its drag: translated by the drag vector (move an "
                                 "object), scaled about its centre so the handle reaches the target (resize it), or "
                                 "both at once (similarity: resized by `region_scale` or by the factor its drags "
                                 "fit, and moved so they reach their targets).")
    region_scale: float | None = Field(
        None, gt=0, le=10, description="With region_motion 'similarity': the size factor of a region with a single drag "
                                       "(one point cannot tell a resize from a move; e.g. from the intention's size "
                                       "word). Regions with two or more drags fit their own. None: 1.")
    scale_direction: Literal["grow", "shrink"] | None = Field(
        None, description="With region_motion 'scale' or 'similarity': the way the intention's word says the size goes. The factor's "
                          "magnitude comes from the drag geometry; a factor the other way is replaced by its reciprocal "
                          "('bigger' never shrinks, 'smaller' never grows). None: the geometry alone decides.")
    source_prompt: str = ""
    target_prompt: str = ""
    seed: int = 0
    steps: int = Field(50, ge=2, le=1000)
    guidance_scale: float = Field(DEFAULT_GUIDANCE_SCALE, ge=1.0, le=30.0)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    quality: QualityGuidance | None = Field(None, description="Quality guidance, when a discriminator is chosen.")
    fast: bool = Field(False, description=f"Fast mode: at most {FAST_STEPS} sampling steps, with the guidance "
                                          "schedule (edit_steps, kv_start_step) scaled from `steps` to them.")

    @classmethod
    def create(cls, **kwargs: Any) -> "EditRequest":
        """Build a request, turning pydantic's validation report into one clear InputError line."""
        if "points" in kwargs:
            kwargs["drags"] = drags_from_points(kwargs.pop("points"))
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise InputError(f"invalid edit request: {where}: {first.get('msg')}") from None


def _point(value: Any, k: int) -> Point:
    """One (x, y) point of real numbers: strings, bools and anything not of length 2 are refused, never guessed
    (float("120,80"[0]) would silently read a string point as 1)."""
    if isinstance(value, (str, bytes)):
        raise InputError(f"point {k} is a string {value!r}: give (x, y) numbers, e.g. [(120, 80), (160, 60)]")
    try:
        coords = [] if isinstance(value, dict) else list(value)
    except TypeError:
        raise InputError(f"point {k} is not two numbers (x, y): {value!r}") from None
    if len(coords) != 2 or not all(isinstance(c, numbers.Real) and not isinstance(c, (bool, np.bool_))
                                   for c in coords):
        if any(isinstance(c, (str, bytes)) for c in coords):
            raise InputError(f"point {k} has a string coordinate {value!r}: give (x, y) numbers")
        raise InputError(f"point {k} is not two numbers (x, y): {value!r}")
    return float(coords[0]), float(coords[1])


def drags_from_points(points: Any) -> list[DragPair]:
    """Alternating handle/target points (DragBench's layout, the agent's `points`: a list, tuple or (2N, 2) array)
    -> drag pairs. The one reader of user points: it parses or refuses, never misreads."""
    if points is None:
        points = []
    if isinstance(points, np.ndarray):
        if points.size and (points.ndim != 2 or points.shape[1] != 2):
            raise InputError(f"points array has shape {points.shape}: give (2N, 2), handle and target alternating")
        points = points.tolist()
    if isinstance(points, (str, bytes, dict)):
        raise InputError(f"points must be a list of (x, y) pairs, not {type(points).__name__}")
    try:
        pts = list(points)
    except TypeError:
        raise InputError(f"points must be a list of (x, y) pairs, not {type(points).__name__}") from None
    if len(pts) == 0:
        raise InputError("no drag points given: pass handle and target points in pairs, e.g. [(hx, hy), (tx, ty)]")
    if len(pts) % 2:
        raise InputError(f"got {len(pts)} points, an odd number: points alternate handle, target (in pairs)")
    out = []
    for i in range(0, len(pts), 2):
        h, t = _point(pts[i], i + 1), _point(pts[i + 1], i + 2)
        try:
            out.append(DragPair(handle=h, target=t))
        except ValidationError:
            raise InputError(f"point pair {i // 2 + 1} has a NaN or infinite coordinate: {h} -> {t}") from None
    return out
