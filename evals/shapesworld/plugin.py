"""ShapesWorld as a world plugin: the offline locator and reasoner backends that read its scenes exactly.

Registered through the ``luciddrag.worlds`` entry point (pyproject.toml), so the tools layer (luciddrag.tools.worlds)
finds it without naming it. What it plugs in:

* locator: recognises a ShapesWorld scene (a pastel background with a few saturated, nameable shapes), segments it,
  names the shape under each handle in the caption grammar ("the small red circle on the left") with its exact mask,
  and rebuilds the caption;
* reasoner: move / resize intentions whose prompts are the scene's caption edited only in the changed words (size
  word, position phrase), which the tiny ShapesWorld model follows word by word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from luciddrag.evals.shapesworld import MODEL_DIR, world
from luciddrag.evals.shapesworld.segment import SegObject, foreground_mask, segment_objects
from luciddrag.tools.locator import checked_region
from luciddrag.tools.reasoner import DIRECTION_PHRASES, Candidate, DragGeometry, generic_candidates
from luciddrag.tools.schemas import HandleDescription, Point, rle_to_mask
from luciddrag.tools.worlds import WORLD_ATTRIBUTE, World, register_world

NAME = "shapesworld"

ShapeEdit = tuple[dict[str, str], dict[str, str]]
"""A caption edit: (attributes of the located shape, the words to change: {"size"/"position": ...})."""

# ------------------------------------------------------------------------------------------------ locator


@dataclass(frozen=True)
class ShapesScene:
    """What the locator recognised: the segmented shapes and the image size."""

    objects: list[SegObject]
    width: int
    height: int


def shapesworld_objects(image: Image.Image) -> list[SegObject] | None:
    """ShapesWorld segmentation when the image looks like a ShapesWorld scene, else None.

    A ShapesWorld scene is a pastel background with a few saturated, nameable shapes: every segmented object has a
    known shape and colour and together they hold nearly all saturated pixels. Photos fail that test (saturated
    pixels there form many unnameable blobs), so they get the generic path.
    """
    if max(image.size) > 1024:
        return None  # ShapesWorld renders are small; don't spend time segmenting large photos
    objects = segment_objects(image)
    if not objects or len(objects) > 8:
        return None
    if any(o.shape == "unknown" or o.colour == "unknown" for o in objects):
        return None
    fg = foreground_mask(image)
    if fg.mean() > 0.6:
        return None
    covered = sum(o.area for o in objects)
    if covered < 0.9 * fg.sum():
        return None
    return objects


def shapesworld_attributes(obj: SegObject, width: int, height: int) -> dict[str, str]:
    """Caption-grammar attributes of a segmented shape: shape, colour, size word, position phrase, phrase."""
    size = world.size_word(obj.size, width)
    position = world.position_phrase(obj.centroid[0], obj.centroid[1], width, height)
    return {"shape": obj.shape, "colour": obj.colour, "size": size, "position": position,
            "phrase": world.describe_shape(obj.shape, obj.colour, size, position)}


def _distance_to_mask(mask: np.ndarray, point: Point) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.min(np.hypot(xs - point[0], ys - point[1]))) if len(xs) else float("inf")


def object_at(objects: Sequence[SegObject], point: Point) -> SegObject | None:
    """The segmented object under ``point``: inside its mask, or within a small tolerance of its edge (a user
    grabbing a shape's edge often clicks a pixel or two outside it)."""
    x, y = int(round(point[0])), int(round(point[1]))
    for obj in objects:
        h, w = obj.mask.shape
        if 0 <= y < h and 0 <= x < w and obj.mask[y, x]:
            return obj
    best, best_d = None, float("inf")
    for obj in objects:
        d = _distance_to_mask(obj.mask, point)
        tolerance = max(1.5, 0.12 * obj.size)
        if d <= tolerance and d < best_d:
            best, best_d = obj, d
    return best


class ShapesWorldLocator:
    """Exact shape names and masks from ShapesWorld's own segmentation."""

    def recognise(self, image: Image.Image) -> ShapesScene | None:
        objects = shapesworld_objects(image)
        return None if objects is None else ShapesScene(objects, *image.size)

    def describe(self, scene: ShapesScene, index: int, handle: Point) -> HandleDescription:
        width, height = scene.width, scene.height
        obj = object_at(scene.objects, handle)
        if obj is None:
            where = world.position_phrase(handle[0], handle[1], width, height)
            return HandleDescription(index=index, handle=handle, description=f"the empty background {where}",
                                     attributes={"background": "true", "position": where, WORLD_ATTRIBUTE: NAME})
        attrs = shapesworld_attributes(obj, width, height)
        return HandleDescription(
            index=index, handle=handle, description="the " + attrs["phrase"].removeprefix("a "),
            region=checked_region(obj.bbox, width, height, "segmentation", obj.mask),
            attributes={**attrs, WORLD_ATTRIBUTE: NAME})

    def caption(self, scene: ShapesScene) -> str:
        # Reading order (top to bottom, left to right) so the rebuilt caption does not depend on object areas.
        ordered = sorted(scene.objects,
                         key=lambda o: (round(o.centroid[1] / max(1, scene.height / 3)), o.centroid[0]))
        return world.join_descriptions([shapesworld_attributes(o, scene.width, scene.height)["phrase"]
                                        for o in ordered])


# ------------------------------------------------------------------------------------------------ reasoner


@lru_cache(maxsize=1)
def caption_pattern() -> re.Pattern[str]:
    """One shape's phrase in the caption grammar (``world.describe_shape``), with its words as named groups."""
    colours = "|".join(world.COLOURS)
    shapes = "|".join(world.SHAPES)
    sizes = "|".join(world.SIZE_WORDS)
    positions = "|".join(re.escape(p) for p in world.POSITION_PHRASES)
    return re.compile(rf"^a (?:(?P<size>{sizes}) )?(?P<colour>{colours}) (?P<shape>{shapes})"
                      rf"(?: (?P<position>{positions}))?$")


def edit_shapes_caption(caption: str, attrs: dict[str, str], *, size: str | None = None,
                        position: str | None = None) -> tuple[str, str] | None:
    """(source, target) captions for a ShapesWorld edit of one shape, or None if ``caption`` is not in the grammar.

    The shape's own phrase is made explicit in both (its current size word / position phrase filled in where the
    caption left them out), and the target differs only in the edited words, e.g. "a small red circle on the left"
    -> "a big red circle on the left".
    """
    change = {k: v for k, v in (("size", size), ("position", position)) if v is not None}
    return edit_shapes_caption_multi(caption, [(attrs, change)])


def edit_shapes_caption_multi(caption: str, edits: Sequence[ShapeEdit]) -> tuple[str, str] | None:
    """Like ``edit_shapes_caption`` for several shapes at once (one drag each); edits of the same shape combine."""
    pattern = caption_pattern()
    parts = [p.strip() for p in caption.strip().rstrip(".").split(world.CAPTION_JOINER)]
    parsed = [pattern.match(p) for p in parts]
    if not all(parsed):
        return None
    source_parts, target_parts = list(parts), list(parts)
    targets: dict[int, dict[str, str]] = {}
    for attrs, change in edits:
        matches = [i for i, m in enumerate(parsed) if m and m["shape"] == attrs["shape"]
                   and m["colour"] == attrs["colour"]]
        if not matches:
            return None
        # Two shapes of the same kind and colour: the caption phrase that agrees with the located one.
        which = max(matches, key=lambda i: (parsed[i]["size"] == attrs["size"])  # type: ignore[index]
                    + (parsed[i]["position"] == attrs["position"]))  # type: ignore[index]
        source_parts[which] = world.describe_shape(attrs["shape"], attrs["colour"], attrs["size"], attrs["position"])
        edited = targets.setdefault(which, dict(attrs))
        edited.update(change)
        target_parts[which] = world.describe_shape(edited["shape"], edited["colour"], edited["size"],
                                                   edited["position"])
    return world.join_descriptions(source_parts), world.join_descriptions(target_parts)


_SHAPE_KEYS = {"shape", "colour", "size", "position"}


class ShapesWorldReasoner:
    """Move / resize intentions with prompts in the caption grammar."""

    def candidates(self, g: DragGeometry, desc: HandleDescription, caption: str,
                   image_size: tuple[int, int]) -> list[Candidate] | None:
        attrs = {k: v for k, v in desc.attributes.items() if k != WORLD_ATTRIBUTE}
        if attrs.get("background") == "true":
            # The world knows the handle is on empty background: whole-image words still give a direction.
            return generic_candidates(g, desc, caption, whole_image_words=True)
        if not _SHAPE_KEYS <= set(attrs):
            return None
        shape_candidates = self._shape_candidates(g, desc, attrs, caption, image_size)
        if shape_candidates is None:  # a free-form caption: generic rules, naming the shape by colour and class
            return generic_candidates(g, desc, caption, part=f"{attrs['colour']} {attrs['shape']}")
        return shape_candidates

    def combine(self, caption: str, edits: Sequence[Any]) -> tuple[str, str] | None:
        return edit_shapes_caption_multi(caption, edits)

    @staticmethod
    def _shape_candidates(g: DragGeometry, desc: HandleDescription, attrs: dict[str, str], caption: str,
                          image_size: tuple[int, int]) -> list[Candidate] | None:
        width, height = image_size
        obj = desc.description
        ys_xs = None
        if desc.region is not None and desc.region.mask_rle is not None:
            ys_xs = np.nonzero(rle_to_mask(desc.region.mask_rle, height, width))
        centre = (float(ys_xs[1].mean()), float(ys_xs[0].mean())) if ys_xs is not None else g.handle
        moved_to = world.position_phrase(min(max(centre[0] + g.dx, 0), width - 1),
                                         min(max(centre[1] + g.dy, 0), height - 1), width, height)
        small, big = world.SIZE_WORDS[0], world.SIZE_WORDS[-1]
        grow_to = big if attrs["size"] == small else attrs["size"]
        shrink_to = small if attrs["size"] == big else attrs["size"]
        edits = {"move": {"position": moved_to}, "bigger": {"size": grow_to}, "smaller": {"size": shrink_to},
                 "move+bigger": {"position": moved_to, "size": grow_to},
                 "move+smaller": {"position": moved_to, "size": shrink_to}}
        # A combined reading whose size word cannot change (a big shape made bigger) has the move's very prompts;
        # kept, it would out-score the move as a duplicate and take the move's place with a resize motion (7 of 60
        # held-out moves had no move reading left that way). It *is* the move: dropped.
        for kind, size in (("move+bigger", grow_to), ("move+smaller", shrink_to)):
            if size == attrs["size"]:
                del edits[kind]
        prompts: dict[str, tuple[str, str]] = {}
        for kind, change in edits.items():
            pair = edit_shapes_caption(caption, attrs, **change)
            if pair is None:
                return None
            prompts[kind] = pair

        zone, radial = g.zone, g.radial if g.radial is not None else 0.0
        outward, inward = radial > 0.35, radial < -0.35
        if zone == "edge" and outward:
            scores = {"bigger": 0.9, "move": 0.3, "move+bigger": 0.35, "smaller": 0.02, "move+smaller": 0.02}
        elif zone == "edge" and inward:
            scores = {"smaller": 0.9, "move": 0.3, "move+smaller": 0.35, "bigger": 0.02, "move+bigger": 0.02}
        elif zone == "interior" or zone is None:
            scores = {"move": 1.0 if g.target_inside is not True else 0.8, "move+bigger": 0.2, "bigger": 0.12,
                      "move+smaller": 0.1, "smaller": 0.05}
        else:
            scores = {"move": 0.6, "bigger": 0.3, "move+bigger": 0.2, "smaller": 0.1, "move+smaller": 0.05}
        # A resize the vocabulary cannot express (a big shape made bigger) leaves source == target: less useful.
        for kind, (src, tgt) in prompts.items():
            if src == tgt:
                scores[kind] *= 0.3
        direction = DIRECTION_PHRASES.get(g.direction, "")
        texts = {"move": f"move {obj} {direction}", "bigger": f"make {obj} bigger",
                 "smaller": f"make {obj} smaller", "move+bigger": f"make {obj} bigger and move it {direction}",
                 "move+smaller": f"make {obj} smaller and move it {direction}"}
        shape = {k: attrs[k] for k in ("shape", "colour", "size", "position")}
        return [Candidate(kind=kind, score=scores[kind], intention=texts[kind].strip(),
                          source_prompt=prompts[kind][0], target_prompt=prompts[kind][1], world=NAME,
                          edit=(dict(shape), edits[kind])) for kind in edits]


# ------------------------------------------------------------------------------------------------ registration

SHAPESWORLD = World(name=NAME, locator=ShapesWorldLocator(), reasoner=ShapesWorldReasoner(), model_dir=MODEL_DIR)


def register() -> World:
    """Entry point of the ``luciddrag.worlds`` group: register ShapesWorld with the tools' world registry."""
    return register_world(SHAPESWORLD)
