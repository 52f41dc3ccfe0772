"""Typed graph state. Images are `ImageRef`s into the artifact store, never bytes (see agent/artifacts.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from luciddrag.agent.artifacts import ImageRef
from luciddrag.tools.schemas import DragPoints, Intention, LocatorResult


class Attempt(BaseModel):
    """One sampled intention and how the critic judged it."""

    index: int  # into `intentions`
    intention: str
    source_prompt: str
    target_prompt: str
    image: ImageRef
    tracked: list[tuple[float, float]] = Field(default_factory=list)  # where the handles' content was found
    md_px: float | None = None  # mean distance tracked -> target
    md_fraction: float | None = None  # ... relative to each drag's length, averaged
    quality: float | None = None  # discriminator P(real), when available
    verdict: Literal["accepted", "rejected", "pending"] = "pending"
    reason: str = ""
    seconds: float = 0.0


class InputState(TypedDict, total=False):
    """What callers pass: `graph.invoke({"image": ..., "points": [...]})`."""

    image: Any  # path | PIL.Image | ImageRef
    points: list[Any]  # [(hx, hy), (tx, ty), ...]
    mask: Any  # optional editable region: path | PIL.Image | array | ImageRef
    prompt: str  # optional original description (the paper's c)
    intention: Any  # optional: skip reasoning (str, or {intention, source_prompt, target_prompt})
    confirm: bool  # ask the user to choose among the intentions before any GPU work (interrupt)


class AgentState(InputState, total=False):
    drags: DragPoints
    alpha: ImageRef | None  # the input's alpha channel, re-attached to the result
    located: LocatorResult
    caption: str
    intentions: list[Intention]
    selected: int | None
    tried: list[int]
    attempts: list[Attempt]
    prepared: dict[int, ImageRef]  # intentions already sampled in a batch, waiting for critique
    result: ImageRef | None
    accepted: bool
    chosen: Attempt | None
    warnings: list[str]
    status: str


class OutputState(TypedDict, total=False):
    result: ImageRef | None
    accepted: bool
    chosen: Attempt | None
    attempts: list[Attempt]
    intentions: list[Intention]
    caption: str
    located: LocatorResult
    warnings: list[str]
    status: str
