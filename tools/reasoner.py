"""The reasoner: from the located object, the image description c and the drags, K candidate intentions.

Two backends:

* The LLM reasoner (the paper's GPT-3.5 step): the ``reason_intentions`` template (Appendix A.3's instruction and
  examples) plus drag information richer than the paper's (direction in words, length relative to the object,
  target inside/outside it, image size), answered as structured output (``IntentionSet``) through either
  ``json_schema`` or ``function_calling``, whichever the server supports.
* The offline reasoner: rules on the drag geometry relative to the located object (move; bigger/smaller;
  longer/taller/shorter; look toward; open/close). When a world plugin (luciddrag.tools.worlds) described the object,
  that world writes the intentions (ShapesWorld: captions in its grammar, changed only in the edited words, so its
  tiny model receives real semantic guidance). On a photo where nothing names the object, source and target prompts
  stay identical: the reasoner does not know what is there, so only the drag carries the edit.

Whatever the LLM returns is cleaned (blank, duplicate and surplus intentions dropped, missing ones topped up from
the offline reasoner, confidences normalised); an answer that fails the schema gets one repair attempt, then the
offline reasoner answers with a warning. ``select_intention`` picks one intention by sampling proportional to
confidence (the paper's Eq. 6, seeded) or by argmax, skipping those already tried.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from luciddrag.prompts import RenderedPrompt, load_template, parse_label
from luciddrag.tools.llm import (
    LLM_SERVICE_ERRORS,
    NO_LLM_NOTICE,
    LLMSettings,
    StructuredMethod,
    describe_llm_error,
    make_chat_model,
)
from luciddrag.tools.schemas import (
    DragPair,
    DragPoints,
    HandleDescription,
    Intention,
    IntentionSet,
    LocatorResult,
    Point,
    ReasonerResult,
    rle_to_mask,
)
from luciddrag.tools.worlds import WORLD_ATTRIBUTE, get_world

log = logging.getLogger(__name__)

DEFAULT_K = 3
OFFLINE_BACKEND = "offline"


class ReasonRequest(BaseModel):
    """Everything the reasoner needs; all of it is plain data (images stay with the caller)."""

    drags: DragPoints
    located: LocatorResult
    caption: str = Field(min_length=1)
    """The image description c (user, VLM caption, or ShapesWorld metadata)."""
    k: int = Field(default=DEFAULT_K, ge=1, le=8)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.located.image_size


class ReasonerConfig(BaseModel):
    backend: Literal["auto", "llm", "offline"] = "auto"
    llm: LLMSettings | None = None
    """None reads the environment (``LLMSettings.from_env``)."""
    prompt: str = "reason_intentions"
    repair_prompt: str = "repair_answer"
    structured_output: StructuredMethod | None = None
    """Overrides ``llm.structured_output`` (``json_schema`` or ``function_calling``)."""


# ------------------------------------------------------------------------------------------------ drag geometry

_DIRECTIONS = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
DIRECTION_PHRASES = {
    "right": "to the right", "up-right": "up and to the right", "up": "up", "up-left": "up and to the left",
    "left": "to the left", "down-left": "down and to the left", "down": "down", "down-right": "down and to the right",
}

Zone = Literal["interior", "edge", "outside"]


class DragGeometry(BaseModel):
    """One drag measured against the object under its handle."""

    index: int
    handle: Point
    target: Point
    dx: float
    dy: float
    length: float
    direction: str
    """One of eight compass words in image terms: right, up-right, up, ... (y grows downwards)."""
    object_extent: float | None = None
    """Length of the object's chord through its centroid along the drag direction, px."""
    relative_length: float | None = None
    """Drag length / object_extent."""
    target_inside: bool | None = None
    zone: Zone | None = None
    """Where the handle sits on the object: well inside, near its edge, or outside it."""
    radial: float | None = None
    """Cosine between the drag and the centroid-to-handle direction: +1 drags straight outward, -1 inward."""


def direction_word(dx: float, dy: float) -> str:
    """The compass word for an image-space vector (y down), e.g. (1, -1) -> "up-right"."""
    if dx == 0 and dy == 0:
        return "nowhere"
    angle = math.degrees(math.atan2(-dy, dx)) % 360
    return _DIRECTIONS[int(((angle + 22.5) % 360) // 45)]


def _region_mask(desc: HandleDescription, width: int, height: int) -> np.ndarray | None:
    """The object's mask when the locator found the object itself (a window around the handle says nothing about
    the object's extent, so it is not used)."""
    region = desc.region
    if region is None or region.source == "window":
        return None
    if region.mask_rle is not None:
        try:
            return rle_to_mask(region.mask_rle, height, width)
        except ValueError:
            log.warning("region mask of handle %d does not match the image size; using its box", desc.index + 1)
    x0, y0, x1, y1 = region.box
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _inside(mask: np.ndarray, p: Point) -> bool:
    x, y = int(round(p[0])), int(round(p[1]))
    h, w = mask.shape
    return 0 <= x < w and 0 <= y < h and bool(mask[y, x])


def ray_extent(mask: np.ndarray, origin: Point, direction: Point, step: float = 0.5) -> float:
    """Distance from ``origin`` along the unit ``direction`` to the last pixel still inside ``mask``."""
    if not _inside(mask, origin):
        return 0.0
    limit = math.hypot(*mask.shape)
    t = 0.0
    while t <= limit:
        nxt = t + step
        if not _inside(mask, (origin[0] + direction[0] * nxt, origin[1] + direction[1] * nxt)):
            return t
        t = nxt
    return t


def drag_geometry(pair: DragPair, desc: HandleDescription, image_size: tuple[int, int]) -> DragGeometry:
    """Measure a drag against the located object (object terms are None when the locator gave no object)."""
    width, height = image_size
    dx, dy = pair.vector
    length = pair.length
    geometry = DragGeometry(index=desc.index, handle=pair.handle, target=pair.target, dx=dx, dy=dy, length=length,
                            direction=direction_word(dx, dy))
    mask = _region_mask(desc, width, height)
    if mask is None or not mask.any():
        return geometry
    ys, xs = np.nonzero(mask)
    centre = (float(xs.mean()), float(ys.mean()))
    if not _inside(mask, centre):  # a non-convex object: ray from its pixel nearest to the centroid instead
        k = int(np.argmin(np.hypot(xs - centre[0], ys - centre[1])))
        centre = (float(xs[k]), float(ys[k]))
    ox, oy = pair.handle[0] - centre[0], pair.handle[1] - centre[1]
    r_handle = math.hypot(ox, oy)
    if r_handle < 0.5:
        zone: Zone = "interior"
        radial = 0.0
    else:
        boundary = ray_extent(mask, centre, (ox / r_handle, oy / r_handle)) + 0.5
        q = r_handle / max(boundary, 0.5)
        zone = "interior" if q < 0.6 else "edge" if q <= 1.35 else "outside"
        radial = ((dx * ox + dy * oy) / (length * r_handle)) if length > 0 else 0.0
    extent = None
    if length > 0:
        u = (dx / length, dy / length)
        extent = ray_extent(mask, centre, u) + ray_extent(mask, centre, (-u[0], -u[1])) + 1.0
    return geometry.model_copy(update={
        "object_extent": extent, "relative_length": (length / extent) if extent else None,
        "target_inside": _inside(mask, pair.target), "zone": zone, "radial": radial})


def request_geometry(request: ReasonRequest) -> list[DragGeometry]:
    by_index = {d.index: d for d in request.located.descriptions}
    out = []
    for i, pair in enumerate(request.drags.pairs):
        desc = by_index.get(i) or HandleDescription(index=i, handle=pair.handle,
                                                     description="the region around the handle")
        out.append(drag_geometry(pair, desc, request.image_size))
    return out


# ------------------------------------------------------------------------------------------------ LLM prompt


def _point(p: Point) -> str:
    return f"[{round(p[0])}, {round(p[1])}]"


def format_drag_information(request: ReasonRequest) -> str:
    """The drag block of the prompt: the paper's lines ("The start point is ...", "Direction is [[x0, y0],
    [x1, y1]].") for every drag, plus what helps an LLM that cannot see the image: the direction in words, the
    length in pixels and relative to the object, and whether the target lies inside the object."""
    descriptions = {d.index: d.description for d in request.located.descriptions}
    blocks = []
    for g in request_geometry(request):
        desc = descriptions.get(g.index, "the region around the handle")
        lines = [f"Drag information {g.index + 1}:",
                 f"The start point is {desc}.",
                 f"Direction is [{_point(g.handle)}, {_point(g.target)}]."]
        detail = f"The drag goes {g.direction}, {round(g.length)} pixels"
        if g.relative_length is not None:
            detail += f", about {g.relative_length:.1f} times the size of that object in this direction"
        lines.append(detail + ".")
        if g.target_inside is not None:
            lines.append("The end point lies inside that object." if g.target_inside
                         else "The end point lies outside that object.")
        if g.zone is not None:
            lines.append({"interior": "The start point is well inside the object.",
                          "edge": "The start point is on the object's edge.",
                          "outside": "The start point is just outside the object."}[g.zone])
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_examples(examples: list[dict[str, Any]]) -> str:
    """Few-shot examples in the paper's text layout (Appendix A.3)."""
    out = []
    for n, ex in enumerate(examples, start=1):
        inp, outp = ex["input"], ex["output"]
        lines = [f"example {n}:", "INPUT:", f"Original description: {inp['original_description']}"]
        for j, drag in enumerate(inp["drags"], start=1):
            (x0, y0), (x1, y1) = drag["direction"]
            lines += [f"Drag information {j}:", f"The start point is {drag['start']}.",
                      f"Direction is [[{x0}, {y0}], [{x1}, {y1}]]."]
        lines += ["OUTPUT:", f"Intention: {outp['intention']}", f"Source prompt: {outp['source_prompt']}",
                  f"Target prompt: {outp['target_prompt']}"]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def reasoner_variables(request: ReasonRequest, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Exactly the variables the code gives a ``reason_intentions`` template."""
    width, height = request.image_size
    return {"k": request.k, "image_width": width, "image_height": height, "examples": render_examples(examples),
            "original_description": request.caption.strip(), "drag_information": format_drag_information(request)}


def build_reasoner_prompt(request: ReasonRequest, prompt: str = "reason_intentions") -> RenderedPrompt:
    """The messages the LLM receives for this request (also what ``luciddrag prompts render`` prints)."""
    name, version = parse_label(prompt)
    template = load_template(name, version)
    return template.render(**reasoner_variables(request, template.examples()))


# ------------------------------------------------------------------------------------------------ cleaning


def normalise_confidences(values: Sequence[float]) -> list[float]:
    """Non-negative weights summing to 1. NaN/inf/negative count as 0 and percentages work as well as
    fractions (only ratios matter); if nothing positive is left, all are equally likely."""
    clean = [_finite_or_zero(v) for v in values]
    total = sum(clean)
    if not clean:
        return []
    if total <= 0:
        return [1.0 / len(clean)] * len(clean)
    out = [v / total for v in clean]
    out[-1] = max(0.0, 1.0 - sum(out[:-1]))  # exact sum 1 despite rounding
    return out


def _finite_or_zero(v: float) -> float:
    return v if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else 0.0


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def clean_intentions(raw: Sequence[Intention], k: int, *,
                     distinct_prompts: bool = True) -> tuple[list[Intention], list[str]]:
    """Distinct, complete intentions, most confident first, at most ``k``, confidences normalised.

    Dropped: blank fields; repeats of an earlier intention (same wording, or, with ``distinct_prompts``, the same
    source/target pair, which would steer the edit identically). A pair whose source equals its target is allowed
    (the paper's rule when a change is hard to describe) but noted.
    """
    notes: list[str] = []
    kept: list[Intention] = []
    seen_text: set[str] = set()
    seen_prompts: set[tuple[str, str]] = set()
    # Most confident first, so that of two duplicates the one the model (or rule) believed more survives.
    order = sorted(range(len(raw)), key=lambda i: (-_finite_or_zero(raw[i].confidence), i))
    for item in (raw[i] for i in order):
        fields = (item.intention.strip(), item.source_prompt.strip(), item.target_prompt.strip())
        if not all(fields):
            notes.append("dropped an intention with an empty field")
            continue
        text_key, prompt_key = _key(fields[0]), (_key(fields[1]), _key(fields[2]))
        if text_key in seen_text or (distinct_prompts and prompt_key in seen_prompts):
            notes.append(f"dropped a duplicate intention ({fields[0]!r})")
            continue
        seen_text.add(text_key)
        seen_prompts.add(prompt_key)
        kept.append(Intention(intention=fields[0], source_prompt=fields[1], target_prompt=fields[2],
                              confidence=item.confidence))
    weights = normalise_confidences([i.confidence for i in kept])
    if kept and all(_finite_or_zero(i.confidence) == 0 for i in kept):
        notes.append("no intention had a usable confidence; treating them as equally likely")
    ranked = sorted(zip(weights, range(len(kept))), key=lambda t: (-t[0], t[1]))
    top = [kept[i].model_copy(update={"confidence": w}) for w, i in ranked[:k]]
    if len(kept) > k:
        notes.append(f"kept the {k} most confident of {len(kept)} intentions")
    weights = normalise_confidences([i.confidence for i in top])
    top = [i.model_copy(update={"confidence": w}) for i, w in zip(top, weights)]
    for i in top:
        if _key(i.source_prompt) == _key(i.target_prompt):
            notes.append(f"intention {i.intention!r} has identical source and target prompts "
                         "(no semantic direction; the drag alone guides it)")
    return top, notes


# ------------------------------------------------------------------------------------------------ selection


def select_intention(intentions: Sequence[Intention], tried: set[int] | frozenset[int] = frozenset(),
                     mode: Literal["sample", "argmax"] = "sample", seed: int = 0) -> int | None:
    """Index of the next intention to try, or None when every one has been tried.

    ``sample``: drawn with probability proportional to confidence among the untried ones (the paper's Eq. 6;
    retries draw without replacement). The draw depends only on ``seed`` and ``tried``, so a run is reproducible
    and a retry never repeats an earlier pick. ``argmax``: the most confident untried one (ties: lowest index).
    """
    left = [i for i in range(len(intentions)) if i not in tried]
    if not left:
        return None
    raw = [intentions[i].confidence for i in left]
    weights = normalise_confidences(raw)
    if mode == "argmax":
        return left[max(range(len(left)), key=lambda j: (weights[j], -j))]
    if mode != "sample":
        raise ValueError(f"unknown selection mode {mode!r}; expected 'sample' or 'argmax'")
    rng = random.Random(f"{seed}|{','.join(map(str, sorted(tried)))}")
    return rng.choices(left, weights=weights, k=1)[0]


# ------------------------------------------------------------------------------------------------ offline reasoner

_ANIMATE_PARTS = ("head", "face", "nose", "eye", "eyes", "mouth", "chin", "muzzle", "snout", "beak", "ear", "ears",
                  "neck", "cheek", "forehead", "jaw", "lips", "lip")
_OPENABLE = {"mouth": "down", "jaw": "down", "beak": "down", "lips": "down", "lip": "down", "eye": "up",
             "eyes": "up", "eyelid": "up", "door": "any", "lid": "up", "wings": "any", "wing": "any"}


def _strip_determiner(phrase: str) -> str:
    return re.sub(r"^(the|a|an)\s+", "", phrase.strip(), flags=re.IGNORECASE)


def _part_and_owner(description: str) -> tuple[str, str | None]:
    """"the nose of a woman" -> ("nose", "the woman"); "the red circle" -> ("red circle", None)."""
    body = _strip_determiner(description)
    m = re.match(r"^(?P<part>.+?)\s+of\s+(?P<owner>.+)$", body)
    if m:
        return m.group("part"), "the " + _strip_determiner(m.group("owner"))
    return body, None


def _is_generic(desc: HandleDescription) -> bool:
    return desc.description.startswith("the region around") or desc.attributes.get("background") == "true"


def _look_word(dx: float, dy: float) -> str:
    if abs(dx) >= abs(dy):
        return "to the right" if dx > 0 else "to the left"
    return "up" if dy < 0 else "down"


class Candidate(BaseModel):
    """One scored reading of one drag, before the readings of several drags are merged into intentions."""

    kind: str
    """What kind of edit ("move", "bigger", ...): readings of the same kind from several drags merge."""
    score: float
    intention: str
    source_prompt: str
    target_prompt: str
    world: str | None = None
    """The world plugin that wrote this reading, if any."""
    edit: Any = None
    """That world's own record of the edit behind the prompts, so its ``combine`` can merge several drags'."""


def generic_candidates(g: DragGeometry, desc: HandleDescription, caption: str, *, part: str | None = None,
                       whole_image_words: bool = False) -> list[Candidate]:
    """Intentions for any image. A named part gets an adjective pair in the paper's style ("a short red
    motorcycle" -> "a long red motorcycle"). An unnamed region ("the region around (x, y)") keeps the caption on
    both sides: the reasoner does not know what is there, and "a photo" -> "a photo, smaller" would steer the whole
    picture, not the dragged thing (the paper's rule for changes that are hard to put in words: the drag itself
    carries it). A move keeps the caption on both sides too.

    ``part`` names the dragged thing when a world knows it better than the description's words; a world that knows
    its images are simple enough for whole-image words ("..., larger") asks for them with ``whole_image_words``.
    """
    c = caption.strip().rstrip(".")
    obj = desc.description
    part, owner = (part, None) if part is not None else _part_and_owner(obj)
    generic = _is_generic(desc)
    horizontal = abs(g.dx) >= abs(g.dy)
    axis = "horizontally" if horizontal else "vertically"
    stretch = "longer" if horizontal or g.dy > 0 else "taller"

    def pair(before: str, after: str, whole_change: str) -> tuple[str, str]:
        if generic:
            return (c, f"{c}, {whole_change}") if whole_image_words else (c, c)
        return f"{c}, with a {before} {part}", f"{c}, with a {after} {part}"

    zone, radial = g.zone, g.radial if g.radial is not None else 0.0
    outward, inward = radial > 0.35, radial < -0.35
    # Scores say how typical each reading is for this geometry; only their ratios matter.
    if zone is None:  # no object extent known: the direction alone
        s_move, s_big, s_small, s_stretch, s_shrink = 0.55, 0.25, 0.12, 0.3, 0.1
    elif zone == "interior":
        s_move = 1.0 if g.target_inside is False else 0.75
        s_big, s_small, s_stretch, s_shrink = 0.15, 0.05, 0.25, 0.05
    elif zone == "edge":
        s_move = 0.3 if (outward or inward) else 0.6
        s_big, s_stretch = (0.8, 0.7) if outward else (0.1, 0.15)
        s_small, s_shrink = (0.8, 0.6) if inward else (0.05, 0.05)
    else:  # the handle is outside the object
        s_move, s_big, s_small, s_stretch, s_shrink = 0.5, 0.3, 0.1, 0.3, 0.1

    specs = [
        ("move", s_move, f"move {obj} {DIRECTION_PHRASES.get(g.direction, '')}".strip(), (c, c)),
        ("bigger", s_big, f"make {obj} bigger", pair("small", "big", "larger")),
        ("smaller", s_small, f"make {obj} smaller", pair("big", "small", "smaller")),
        ("stretch", s_stretch, f"make {obj} {stretch}",
         pair("short", stretch.removesuffix("er"), f"stretched {axis}")),
        ("shrink", s_shrink, f"make {obj} shorter",
         pair("long" if horizontal or g.dy > 0 else "tall", "short", f"squashed {axis}")),
    ]
    words = set(re.findall(r"[a-z]+", part.lower()))
    if not generic and words & set(_ANIMATE_PARTS):
        look = _look_word(g.dx, g.dy)
        specs.append(("look", 0.3 if inward else 0.7, f"make {owner or obj} look {look}",
                      (f"{c}, looking forward", f"{c}, looking {look.removeprefix('to the ')}")))
    openable = next((w for w in sorted(words) if w in _OPENABLE), None)
    if not generic and openable:
        opens = {"down": g.dy > 0, "up": g.dy < 0, "any": outward or zone is None}[_OPENABLE[openable]]
        before, after, verb = ("closed", "open", "open") if opens else ("open", "closed", "close")
        specs.append(("open" if opens else "close", 0.6, f"{verb} {obj}",
                      (f"{c}, with {before} {part}", f"{c}, with {after} {part}")))
    return [Candidate(kind=kind, score=score, intention=text, source_prompt=src, target_prompt=tgt)
           for kind, score, text, (src, tgt) in specs]


def _world_candidates(g: DragGeometry, desc: HandleDescription, request: ReasonRequest) -> list[Candidate] | None:
    """The readings of the world plugin that described this handle (None: no world, or it leaves it to the generic
    rules)."""
    world = get_world(desc.attributes.get(WORLD_ATTRIBUTE))
    if world is None or world.reasoner is None:
        return None
    return world.reasoner.candidates(g, desc, request.caption, request.image_size)


def _combined_prompts(caption: str, cands: Sequence[Candidate]) -> tuple[str, str] | None:
    """One prompt pair for several drags' readings of one kind, when one world wrote all of them."""
    names = {c.world for c in cands}
    if len(names) != 1 or any(c.edit is None for c in cands):
        return None
    world = get_world(names.pop())
    return world.reasoner.combine(caption, [c.edit for c in cands]) if world and world.reasoner else None


def _object_masks(descriptions: Sequence[HandleDescription]) -> bool:
    """Some handle has an object mask (a segmenter's or a world's): readings with identical prompts then still differ
    in how the agent moves that mask (translate, rescale, patch drag), so they are all kept. (A world's "make the big
    circle bigger" has the caption on both sides, as has a move that keeps its position words; dropping one as the
    other's duplicate removed the move reading from 7 of 60 held-out ShapesWorld moves.)"""
    return any(d.region is not None and d.region.mask_rle is not None for d in descriptions)


def offline_reason(request: ReasonRequest) -> ReasonerResult:
    """Rule-based intentions from the drag geometry relative to the located object.

    With several drags, each drag proposes candidates; a kind of intention scores the length-weighted mean over
    drags (a long drag says more than a short one), its text names every dragged object, and its prompts combine
    every drag's edit when one world wrote them all (else they come from the longest drag).
    """
    geometries = request_geometry(request)
    by_index = {d.index: d for d in request.located.descriptions}
    total_length = sum(max(g.length, 1e-6) for g in geometries)
    per_kind: dict[str, list[tuple[float, DragGeometry, Candidate]]] = {}
    for g in geometries:
        desc = by_index.get(g.index) or HandleDescription(index=g.index, handle=g.handle,
                                                          description="the region around the handle")
        cands = _world_candidates(g, desc, request)
        if cands is None:
            cands = generic_candidates(g, desc, request.caption)
        for cand in cands:
            per_kind.setdefault(cand.kind, []).append((max(g.length, 1e-6) / total_length, g, cand))
    candidates = []
    for entries in per_kind.values():
        score = sum(w * c.score for w, _, c in entries)
        longest = max(entries, key=lambda e: e[1].length)[2]
        prompts = (longest.source_prompt, longest.target_prompt)
        if len(entries) > 1:
            prompts = _combined_prompts(request.caption, [c for _, _, c in entries]) or prompts
        texts = list(dict.fromkeys(c.intention for _, _, c in entries))  # distinct, in drag order
        candidates.append(Intention(intention=" and ".join(texts), source_prompt=prompts[0],
                                    target_prompt=prompts[1], confidence=score))
    # The rules' own duplicates (two readings that steer identically) are expected: no warnings for them.
    intentions, _ = clean_intentions(candidates, request.k,
                                     distinct_prompts=not _object_masks(request.located.descriptions))
    return ReasonerResult(intentions=intentions, backend=OFFLINE_BACKEND)


# ------------------------------------------------------------------------------------------------ LLM reasoner


def repair_variables(error: str, previous_answer: str) -> dict[str, Any]:
    """Exactly the variables the code gives a ``repair_answer`` template."""
    return {"error": error, "previous_answer": previous_answer}


class _AnswerError(Exception):
    def __init__(self, error: str, previous: str) -> None:
        super().__init__(error)
        self.error, self.previous = error, previous


def _raw_text(raw: Any) -> str:
    """What the model said, for the repair prompt: its text, or its tool-call arguments."""
    if raw is None:
        return "(nothing)"
    calls = getattr(raw, "tool_calls", None) or []
    if calls:
        return json.dumps([c.get("args") for c in calls])[:2000]
    invalid = getattr(raw, "invalid_tool_calls", None) or []
    if invalid:
        return str(invalid[0].get("args"))[:2000]
    content = getattr(raw, "content", raw)
    return (content if isinstance(content, str) else json.dumps(content, default=str))[:2000] or "(empty)"


def _ask(structured: Any, messages: list[Any]) -> IntentionSet:
    """One structured call; schema failures raise ``_AnswerError`` (repairable), service failures propagate."""
    try:
        out = structured.invoke(messages)
    except LLM_SERVICE_ERRORS:
        raise
    except (ValidationError, ValueError) as exc:
        # json_schema mode: the openai client parses the reply itself and raises here, before include_raw can
        # catch it; pydantic's message quotes the offending input, which is what the repair prompt needs.
        raise _AnswerError(_short_error(exc), _input_from_validation(exc)) from exc
    parsed, error, raw = out.get("parsed"), out.get("parsing_error"), out.get("raw")
    if error is not None or parsed is None:
        invalid = getattr(raw, "invalid_tool_calls", None) or []
        reason = (_short_error(error) if error is not None
                  else str(invalid[0].get("error") or "the tool call was invalid").split("For troubleshooting")[0]
                  if invalid else "no structured answer was returned")
        raise _AnswerError(reason.strip(), _raw_text(raw))
    if isinstance(parsed, dict):
        parsed = IntentionSet.model_validate(parsed)
    return parsed


def _short_error(exc: BaseException | Any) -> str:
    text = str(exc).strip()
    return text if len(text) <= 600 else text[:597] + "..."


def _input_from_validation(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        for err in exc.errors():
            if isinstance(err.get("input"), str):
                return err["input"][:2000]
    return "(not available)"


def llm_reason(request: ReasonRequest, chat_model: Any, *, method: StructuredMethod = "json_schema",
               prompt: str = "reason_intentions", repair_prompt: str = "repair_answer",
               backend_label: str = "llm") -> ReasonerResult:
    """Ask the chat model for intentions (one repair attempt on a schema failure), clean them, and top them up or
    replace them with the offline reasoner's when the answer is unusable. Service errors propagate (the caller
    decides about falling back)."""
    rendered = build_reasoner_prompt(request, prompt)
    messages = rendered.to_langchain()
    structured = chat_model.with_structured_output(IntentionSet, method=method, include_raw=True)
    warnings: list[str] = []
    answer: IntentionSet | None = None
    try:
        answer = _ask(structured, messages)
    except _AnswerError as first:
        log.info("LLM answer failed the schema (%s); asking once more", first.error)
        name, version = parse_label(repair_prompt)
        repair = load_template(name, version).render(**repair_variables(first.error, first.previous))
        try:
            answer = _ask(structured, messages + repair.to_langchain())
            warnings.append(f"the LLM's first answer failed the schema ({first.error.splitlines()[0][:160]}); "
                            "its repaired answer was used")
        except _AnswerError as second:
            warnings.append(f"the LLM's answer failed the schema twice ({second.error.splitlines()[0][:160]}); "
                            "used the offline reasoner instead")
    if answer is None:
        offline = offline_reason(request)
        return offline.model_copy(update={"warnings": warnings + offline.warnings})
    intentions, notes = clean_intentions(answer.intentions, request.k)
    warnings += notes
    if not intentions:
        offline = offline_reason(request)
        warnings.append("the LLM returned no usable intentions; used the offline reasoner instead")
        return offline.model_copy(update={"warnings": warnings + offline.warnings})
    if len(intentions) < request.k:
        missing = request.k - len(intentions)
        extra = [i for i in offline_reason(request.model_copy(update={"k": 8})).intentions
                 if _key(i.intention) not in {_key(j.intention) for j in intentions}]
        if extra:
            warnings.append(f"the LLM gave {len(intentions)} usable intention(s) of {request.k}; added "
                            f"{min(missing, len(extra))} from the offline reasoner")
            # LLM intentions keep their rank; offline ones share a small remainder of the probability mass.
            share = 0.1 * len(intentions) / request.k
            topped = [i.model_copy(update={"confidence": i.confidence * (1 - share)}) for i in intentions]
            fill = extra[:missing]
            fill_w = normalise_confidences([i.confidence for i in fill])
            topped += [i.model_copy(update={"confidence": share * w}) for i, w in zip(fill, fill_w)]
            weights = normalise_confidences([i.confidence for i in topped])
            intentions = [i.model_copy(update={"confidence": w}) for i, w in zip(topped, weights)]
    return ReasonerResult(intentions=intentions, backend=backend_label, prompt=rendered.label, warnings=warnings)


def reason(request: ReasonRequest, config: ReasonerConfig | None = None, *,
           chat_model: Any | None = None) -> ReasonerResult:
    """K intentions for the request (the agent's reasoner tool).

    ``auto`` uses the LLM when ``chat_model`` is given or settings/env configure one, else the offline reasoner
    with a one-line notice. LLM service failures (after the client's bounded retries) fall back to offline with a
    warning.
    """
    config = config or ReasonerConfig()
    settings = config.llm or LLMSettings.from_env()
    use_llm = config.backend != "offline" and (chat_model is not None or settings.configured)
    if not use_llm:
        result = offline_reason(request)
        if config.backend != "offline":  # asked for (or allowed) an LLM but none is configured
            result.warnings.insert(0, NO_LLM_NOTICE.format(what="reasoner"))
        return result
    method = config.structured_output or settings.structured_output
    label = f"llm:{settings.label()}" if chat_model is None else f"llm:{type(chat_model).__name__}"
    try:
        model = chat_model if chat_model is not None else make_chat_model(settings)
        return llm_reason(request, model, method=method, prompt=config.prompt, repair_prompt=config.repair_prompt,
                          backend_label=label)
    except LLM_SERVICE_ERRORS as exc:
        log.warning("LLM reasoner failed: %s", exc)
        result = offline_reason(request)
        result.warnings.insert(0, f"the LLM could not be used ({describe_llm_error(exc)}); "
                                  "used the offline reasoner instead")
        return result
