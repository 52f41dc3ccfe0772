"""Seeded ShapesWorld drag tasks with exact ground truth.

A task is a rendered scene (reproducible from its ``scene_seed``), one edited shape, drag pairs, an editable mask,
the ground-truth shape after the edit (so the ideal edited image can be rendered exactly), and a source/target
caption pair whose differing words say what the drag means (for semantic guidance).

Families
--------
* ``move``: the handle is inside a shape, the target is handle + d with the moved shape landing in empty space
  (inside the image, ``MIN_GAP_PX`` away from the other shapes). The shape should translate by d. By default the
  move changes the shape's grid cell, so the target caption differs in the position phrase.
* ``resize``: the handle sits on the shape's edge along a ray from its centroid, the target on the same ray at the
  new size's edge (outward to grow small -> big, inward to shrink big -> small). The shape should scale about its
  centroid, not slide; the target caption differs in the size word.

Coordinates are (x, y) pixels of the 64 px image. Task scene seeds start at ``TASK_SEED_BASE``, disjoint from the
training scenes (seed x 10^7 + i, i < 10^7 for run seeds < 80) and from the held-out quality scenes (9 x 10^8).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from luciddrag.engine.request import DragPair
from luciddrag.evals.shapesworld import world

TASK_SEED_BASE = 800_000_000
FAMILY_SEED_OFFSET = {"move": 0, "resize": 50_000_000}
Family = Literal["move", "resize"]
Point = tuple[float, float]

MOVE_LENGTH_RANGE = (8.0, 22.0)  # drag length in px at 64 px
MASK_MARGIN_PX = 3  # editable mask = union of old and new footprints grown by this many px (at 64 px)


class SpecModel(BaseModel):
    """JSON form of ``world.ShapeSpec``."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float

    @classmethod
    def of(cls, spec: world.ShapeSpec) -> "SpecModel":
        return cls(shape=spec.shape, colour=spec.colour, size=spec.size, cx=spec.cx, cy=spec.cy)

    def spec(self) -> world.ShapeSpec:
        return world.ShapeSpec(self.shape, self.colour, self.size, self.cx, self.cy)


Drag = DragPair  # a task's drags are the engine's drags


class DragTask(BaseModel):
    task_id: str
    family: Family
    scene_seed: int
    image_size: int = 64
    n_shapes: int
    edited_index: int = Field(description="Index of the edited shape in the scene's shape list.")
    drags: list[Drag]
    source: SpecModel = Field(description="The edited shape before the edit.")
    target: SpecModel = Field(description="Ground truth: the edited shape after the edit.")
    expected_centroid: Point = Field(description="Mask centroid (x, y) of the ground-truth shape.")
    original_centroid: Point
    expected_size: float
    original_size: float
    source_prompt: str
    target_prompt: str
    changed_words: tuple[str, str] = Field(description="(source phrase, target phrase) that differ, or ('', '').")
    mask_margin_px: int = MASK_MARGIN_PX

    # ----------------------------------------------------------------------------------------- rebuilding

    def scene(self) -> world.Scene:
        """The original scene (deterministic from the seed)."""
        return world.render_scene(self.scene_seed, self.image_size, self.n_shapes)

    def image(self) -> np.ndarray:
        return self.scene().array()

    def other_specs(self) -> list[world.ShapeSpec]:
        return [s.spec for i, s in enumerate(self.scene().shapes) if i != self.edited_index]

    def ground_truth_scene(self) -> world.Scene:
        """The ideal result: same background and other shapes, edited shape at its ground-truth place/size."""
        sc = self.scene()
        specs = [s.spec for s in sc.shapes]
        specs[self.edited_index] = self.target.spec()
        return world.scene_from_specs(sc.background, specs, self.scene_seed)

    def source_mask(self) -> np.ndarray:
        return world.rasterize(self.source.spec(), self.image_size, self.image_size)

    def target_mask(self) -> np.ndarray:
        return world.rasterize(self.target.spec(), self.image_size, self.image_size)

    def editable_mask(self) -> np.ndarray:
        """HxW bool: where the edit may change pixels (old and new footprints, grown by ``mask_margin_px``)."""
        return world.dilate(self.source_mask() | self.target_mask(), self.mask_margin_px)

    @property
    def points(self) -> list[Point]:
        """Alternating handle/target points (DragBench layout, ``engine.request.drags_from_points``)."""
        return [p for d in self.drags for p in (d.handle, d.target)]

    @property
    def drag_length(self) -> float:
        return float(np.mean([d.length for d in self.drags]))


class TaskSuite(BaseModel):
    name: str
    tasks: list[DragTask]

    def family(self, family: Family) -> list[DragTask]:
        return [t for t in self.tasks if t.family == family]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TaskSuite":
        return cls.model_validate(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------------- geometry


def boundary_distance(spec: world.ShapeSpec, angle: float) -> float:
    """Distance from the shape's centre (cx, cy) to its outline along direction ``angle`` (radians, y down).

    Exact for the continuous shapes ``world.rasterize`` draws, and proportional to ``spec.size``, so scaling a shape
    about its centre moves an edge point p to c + (s'/s)(p - c): the resize drag's target.
    """
    ux, uy = math.cos(angle), math.sin(angle)
    s = spec.size
    if spec.shape == "circle":
        return s / 2
    if spec.shape == "square":
        return (s / 2) / max(abs(ux), abs(uy))
    if spec.shape == "triangle":
        verts = [(0.0, -2 * s / 3), (s / 2, s / 3), (-s / 2, s / 3)]
        best = math.inf
        for (ax, ay), (bx, by) in zip(verts, verts[1:] + verts[:1]):
            # Solve t*u = a + k*(b - a) for t > 0, 0 <= k <= 1.
            ex, ey = bx - ax, by - ay
            den = ux * ey - uy * ex
            if abs(den) < 1e-12:
                continue
            t = (ax * ey - ay * ex) / den
            k = (ax * uy - ay * ux) / den
            if t > 0 and -1e-9 <= k <= 1 + 1e-9:
                best = min(best, t)
        return best
    raise ValueError(f"unknown shape {spec.shape!r}")


def _clear_of_others(spec: world.ShapeSpec, others: list[world.ShapeSpec], size: int) -> bool:
    gap = max(1, round(world.MIN_GAP_PX * size / 64))
    mask = world.rasterize(spec, size, size)
    return not world.overlaps(mask, [world.rasterize(o, size, size) for o in others], gap)


def _placeable(spec: world.ShapeSpec, others: list[world.ShapeSpec], size: int) -> bool:
    return world.fits(spec.shape, spec.size, spec.cx, spec.cy, size, size) and _clear_of_others(spec, others, size)


def _changed(src: str, dst: str) -> tuple[str, str]:
    return ("", "") if src == dst else (src, dst)


# --------------------------------------------------------------------------------------------------- families


def make_move_task(scene: world.Scene, rng: np.random.Generator, task_id: str, n_shapes: int,
                   require_phrase_change: bool = True, tries: int = 200) -> DragTask | None:
    """A move task on a random shape of ``scene``, or None if no valid drag was found."""
    size = scene.size
    k = int(rng.integers(len(scene.shapes)))
    shp = scene.shapes[k]
    others = [s.spec for i, s in enumerate(scene.shapes) if i != k]
    inner = np.argwhere(world.erode(shp.mask, 1))  # handle strictly inside the shape, not on its rim
    if len(inner) == 0:
        return None
    lo, hi = (v * size / 64 for v in MOVE_LENGTH_RANGE)
    for _ in range(tries):
        length, angle = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
        dx, dy = round(length * math.cos(angle)), round(length * math.sin(angle))  # integer: exact pixel shift
        new = shp.spec.moved(dx, dy)
        if not _placeable(new, others, size):
            continue
        gt = world.scene_shape(new, size, size)
        if require_phrase_change and gt.position == shp.position:
            continue
        hy, hx = inner[int(rng.integers(len(inner)))]
        src_caption = scene.caption
        tgt_caption = world.join_descriptions(
            [gt.description() if i == k else s.description() for i, s in enumerate(scene.shapes)])
        return DragTask(
            task_id=task_id, family="move", scene_seed=int(scene.seed), image_size=size, n_shapes=n_shapes,
            edited_index=k, drags=[Drag(handle=(float(hx), float(hy)), target=(float(hx + dx), float(hy + dy)))],
            source=SpecModel.of(shp.spec), target=SpecModel.of(new), expected_centroid=gt.centroid,
            original_centroid=shp.centroid, expected_size=new.size, original_size=shp.size,
            source_prompt=src_caption, target_prompt=tgt_caption, changed_words=_changed(shp.position, gt.position))
    return None


def edge_drags(old: world.ShapeSpec, new: world.ShapeSpec, base_angle: float, n_points: int) -> list[Drag]:
    """Drags on the edge of ``old`` along rays from its centre (``base_angle``, then the opposite side), each to
    where the resize-and-move old -> new carries it: new centre + (new size / old size) x edge offset."""
    scale = new.size / old.size
    drags = []
    for j in range(n_points):
        a = base_angle + j * math.pi
        r = boundary_distance(old, a)
        drags.append(Drag(handle=(old.cx + r * math.cos(a), old.cy + r * math.sin(a)),
                          target=(new.cx + scale * r * math.cos(a), new.cy + scale * r * math.sin(a))))
    return drags


def make_resize_task(scene: world.Scene, rng: np.random.Generator, task_id: str, n_shapes: int,
                     n_points: int = 1, tries: int = 100) -> DragTask | None:
    """A resize task (small -> big or big -> small about the centroid), or None if the new size does not fit.

    ``n_points`` = 2 adds a second drag on the opposite side of the shape (a less ambiguous request).
    """
    size = scene.size
    k = int(rng.integers(len(scene.shapes)))
    shp = scene.shapes[k]
    others = [s.spec for i, s in enumerate(scene.shapes) if i != k]
    new_word = "big" if shp.size_word == "small" else "small"
    lo, hi = world.SIZE_RANGES[new_word]
    for _ in range(tries):
        new = shp.spec.resized(float(rng.uniform(lo, hi)) * size)
        if not _placeable(new, others, size):
            continue
        gt = world.scene_shape(new, size, size)
        if gt.position != shp.position:
            # Discretisation moved the centroid across a grid line: the caption would change two words.
            continue
        drags = edge_drags(shp.spec, new, rng.uniform(0, 2 * math.pi), n_points)
        tgt_caption = world.join_descriptions(
            [gt.description() if i == k else s.description() for i, s in enumerate(scene.shapes)])
        return DragTask(
            task_id=task_id, family="resize", scene_seed=int(scene.seed), image_size=size, n_shapes=n_shapes,
            edited_index=k, drags=drags, source=SpecModel.of(shp.spec), target=SpecModel.of(new),
            expected_centroid=gt.centroid, original_centroid=shp.centroid, expected_size=new.size,
            original_size=shp.size, source_prompt=scene.caption, target_prompt=tgt_caption,
            changed_words=_changed(shp.size_word, gt.size_word))
    return None


def generate_tasks(family: Family, n: int, seed_base: int = TASK_SEED_BASE, size: int = 64,
                   resize_points: int = 1) -> list[DragTask]:
    """``n`` tasks of one family from consecutive scene seeds (scenes without a valid task are skipped)."""
    tasks: list[DragTask] = []
    seed = seed_base + FAMILY_SEED_OFFSET[family]
    while len(tasks) < n:
        rng = np.random.default_rng(seed)
        n_shapes = int(rng.integers(1, world.MAX_SHAPES + 1))
        scene = world.render_scene(seed, size, n_shapes)
        task_rng = np.random.default_rng([seed, 1])
        tid = f"{family}-{len(tasks):03d}"
        task = (make_move_task(scene, task_rng, tid, n_shapes) if family == "move"
                else make_resize_task(scene, task_rng, tid, n_shapes, resize_points))
        if task is not None:
            tasks.append(task)
        seed += 1
    return tasks


def default_suite(n_per_family: int = 100, seed_base: int = TASK_SEED_BASE) -> TaskSuite:
    """The fixed held-out benchmark: ``n_per_family`` move and resize tasks."""
    return TaskSuite(name=f"shapesworld-{n_per_family}x2-seed{seed_base}",
                     tasks=generate_tasks("move", n_per_family, seed_base)
                     + generate_tasks("resize", n_per_family, seed_base))
