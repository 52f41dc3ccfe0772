"""Typed inputs and outputs of the intention reasoner's tools (locator, reasoner).

Everything that crosses a tool boundary is a pydantic model so the agent can wrap these functions as tools, store
results in LangGraph checkpoints (plain JSON, no images or arrays) and show them in the UI. Coordinates are pixels
``(x, y)`` with the origin at the top-left corner and y pointing down, the convention of DragBench and PIL.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from luciddrag.engine.preprocess import check_inside, validate_drags
from luciddrag.engine.request import DragPair, drags_from_points  # DragPair re-exported: one drag type

Point = tuple[float, float]
"""A pixel position (x, y)."""

Box = tuple[int, int, int, int]
"""A pixel box (x0, y0, x1, y1), inclusive of x0/y0 and exclusive of x1/y1 (like array slicing and PIL's crop)."""


class DragPoints(BaseModel):
    """The user's drags, in order; pair ``i`` is labelled ``i + 1`` on drawings and in prompts."""

    model_config = ConfigDict(frozen=True)

    pairs: Annotated[list[DragPair], Field(min_length=1)]

    @classmethod
    def from_flat(cls, points: Any) -> DragPoints:
        """From DragBench's layout: a flat list (or (2N, 2) array) alternating handle, target, handle, target, ...
        Read by the engine's one point reader (strings, bools, NaN refused)."""
        return cls(pairs=drags_from_points(points))

    @classmethod
    def parse(cls, points: Any, size: tuple[int, int]) -> DragPoints:
        """The user's points for an image of `size`: read once, inside the image, each drag of non-zero length.
        Raises ``InputError`` with one line otherwise."""
        drags = cls.from_flat(points)
        validate_drags(drags.pairs, size)
        return drags

    @classmethod
    def from_pairs(cls, pairs: list[tuple[Point, Point]]) -> DragPoints:
        return cls(pairs=[DragPair(handle=h, target=t) for h, t in pairs])

    def check_inside(self, width: int, height: int) -> None:
        """Raise ``InputError`` if any point lies outside a width x height image (the engine's one bounds rule:
        pixel centres, [0, width - 1] x [0, height - 1])."""
        check_inside(self.pairs, (width, height))


class Region(BaseModel):
    """The image region a locator looked at for one handle."""

    box: Box
    source: Literal["segmentation", "region-grow", "window", "sam", "mask", "server"]
    """How the region was found: ShapesWorld segmentation, colour region growing, a fixed window around the
    handle, a SAM mask from the point, the user's mask, or whatever the remote (Osprey) server reported."""
    area: int | None = None
    """Pixels in the region's mask, when there is a mask (not just a box)."""
    mask_rle: list[int] | None = None
    """The mask as COCO-style uncompressed run lengths (column-major, starting with a run of zeros); see
    ``mask_to_rle``. Absent when only a box is known."""

    @model_validator(mode="after")
    def _ordered(self) -> Region:
        x0, y0, x1, y1 = self.box
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty box {self.box}")
        return self


class HandleDescription(BaseModel):
    """What lies under one handle point."""

    index: int
    """Pair index (0-based); drawings and prompts show it as ``index + 1``."""
    handle: Point
    description: str
    """A short noun phrase: "the nose of a woman", "the small red circle"."""
    region: Region | None = None
    attributes: dict[str, str] = Field(default_factory=dict)
    """Structured facts when the backend knows them (ShapesWorld: shape, colour, size, position)."""


class LocatorResult(BaseModel):
    """The locator's answer: one description per drag pair, in pair order."""

    descriptions: list[HandleDescription]
    backend: str
    """Which backend produced the descriptions ("offline", "offline:shapesworld", "openai:gpt-4o-mini",
    "florence2:florence-community/Florence-2-base", "osprey:http://...")."""
    image_size: tuple[int, int]
    """(width, height) of the image the coordinates refer to."""
    caption: str | None = None
    """A description of the whole image (the paper's c) when the backend produced one."""
    warnings: list[str] = Field(default_factory=list)


class Intention(BaseModel):
    """One reasoned intention: what the drag means, and the prompt pair that steers the edit towards it."""

    intention: str = Field(description="What the user wants, as a short imperative, e.g. 'make the neck longer'.")
    source_prompt: str = Field(description="A description of the image before the edit.")
    target_prompt: str = Field(
        description="The same description after the edit; it differs from the source prompt only in the edited words."
    )
    confidence: float = Field(description="How likely this intention is, between 0 and 1.")


class IntentionSet(BaseModel):
    """What the LLM is asked to return (its structured-output schema)."""

    intentions: list[Intention] = Field(description="Distinct candidate intentions, most likely first.")


class ReasonerResult(BaseModel):
    """The reasoner's answer: cleaned intentions (distinct, confidences summing to 1, most likely first)."""

    intentions: list[Intention]
    backend: str
    """"offline" or "llm:<model>"."""
    prompt: str | None = None
    """The prompt template used, as ``name.vN`` (None for the offline reasoner)."""
    warnings: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _normalised(self) -> ReasonerResult:
        if self.intentions:
            total = sum(i.confidence for i in self.intentions)
            if abs(total - 1.0) > 1e-6 or any(i.confidence < 0 for i in self.intentions):
                raise ValueError(f"intention confidences must be >= 0 and sum to 1, got sum {total}")
        return self


# ------------------------------------------------------------------------------------------------- mask <-> RLE


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Run lengths of a boolean mask in COCO's uncompressed layout (column-major, first run counts zeros).

    Column-major so that ``pycocotools.mask.frPyObjects({"size": [h, w], "counts": rle}, h, w)`` reads it as is.
    """
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of ``mask_to_rle``."""
    if sum(rle) != height * width:
        raise ValueError(f"RLE covers {sum(rle)} pixels, expected {height * width}")
    values = np.zeros(len(rle), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle)
    return flat.reshape((height, width), order="F")


def mask_box(mask: np.ndarray) -> Box | None:
    """Tight box of a boolean mask, or None if it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def clamp_box(box: tuple[float, float, float, float], width: int, height: int) -> Box | None:
    """A box clipped to the image (so no backend ever reports coordinates outside it); None if nothing is left."""
    x0, y0, x1, y1 = box
    cx0 = int(min(max(math.floor(x0), 0), width))
    cy0 = int(min(max(math.floor(y0), 0), height))
    cx1 = int(min(max(math.ceil(x1), 0), width))
    cy1 = int(min(max(math.ceil(y1), 0), height))
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return cx0, cy0, cx1, cy1
