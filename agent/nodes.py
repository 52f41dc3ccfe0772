"""The graph's nodes: ingest -> locate -> reason -> choose -> sample -> critique (-> sample ...).

Each node reads the typed state and the run's context and returns a partial update. Images enter and leave through
the artifact store; the only heavy work is in `sample` and `critique` (both behind tools in agent/tools.py).
"""

from __future__ import annotations

import re
import time
from typing import Any, NamedTuple

import numpy as np
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from PIL import Image

from luciddrag.agent.artifacts import ArtifactStore, ImageRef
from luciddrag.agent.context import AgentContext, check_image_kind, check_model_path, resolve_context
from luciddrag.agent.object_checks import object_checks
from luciddrag.agent.state import AgentState, Attempt
from luciddrag.agent.tools import sample_intentions, score_drag
from luciddrag.engine.errors import InputError
from luciddrag.engine.preprocess import MIN_SIDE, load_mask, open_image, resize_mask, scale_point, to_rgb
from luciddrag.tools.locator import describe_image, locate
from luciddrag.tools.reasoner import ReasonerConfig, ReasonRequest, reason, select_intention
from luciddrag.tools.schemas import DragPoints, Intention


def _ctx(runtime: Runtime[AgentContext]) -> AgentContext:
    """The run's context; invoked without one, the environment's defaults (as AgentContext documents)."""
    return resolve_context(runtime.context)


def _store(runtime: Runtime[AgentContext]) -> ArtifactStore:
    return ArtifactStore(_ctx(runtime).artifacts_dir)


def _image(value: Any) -> Image.Image:
    """An image from whatever the state holds: ImageRef (model or dict), path, PIL image, array."""
    if isinstance(value, ImageRef) or (isinstance(value, dict) and "sha256" in value):
        return ArtifactStore.get_image(value)
    return open_image(value)


def _mask_array(state: AgentState) -> np.ndarray | None:
    m = state.get("mask")
    return None if m is None else np.asarray(_image(m).convert("L")) > 127


def _emit(runtime: Runtime[AgentContext], **event: Any) -> None:
    if runtime.stream_writer is not None:
        runtime.stream_writer(event)


# -- nodes ---------------------------------------------------------------------------------------------------------

MAX_INPUT_SIDE = 4096
"""Working-size policy: a larger image is scaled down once at the entry (with a note), its points and mask with it.
The engine works at the model's native size (~512 px) anyway; this bounds the memory of everything around it
(decoding, restoring the result, tracking, contact sheets). Images PIL considers decompression bombs are refused."""


class Request(NamedTuple):
    """A checked request, in the (possibly scaled-down) working image's pixels."""

    image: Image.Image  # RGB
    alpha: Image.Image | None  # the input's alpha channel (re-attached to the results)
    drags: DragPoints
    mask: np.ndarray | None
    notes: list[str]


def check_request(state: dict, ctx: AgentContext) -> Request:
    """Everything about a request that can be wrong, checked before any work (one clear InputError each): the
    image (readable, big enough, of a kind the model can draw), the points (read once, inside the image, non-zero
    drags), the mask. The CLI calls it before running the graph; `ingest` calls it at the graph's entry."""
    if state.get("image") is None:
        raise InputError("no image given: invoke with {'image': <path or PIL image>, 'points': [...]}")
    check_model_path(ctx.model)
    image, alpha = to_rgb(_image(state["image"]))
    if min(image.size) < MIN_SIDE:
        raise InputError(f"image is {image.width}x{image.height}: too small, each side must be at least {MIN_SIDE} px")
    check_image_kind(ctx.model, image.size)
    drags = DragPoints.parse(state.get("points"), image.size)
    mask = None
    if state.get("mask") is not None:
        raw = state["mask"]
        mask = load_mask(_image(raw) if isinstance(raw, (ImageRef, dict)) else raw, image.size)
    notes: list[str] = []
    if max(image.size) > MAX_INPUT_SIDE:
        size = image.size
        s = MAX_INPUT_SIDE / max(size)
        new = (max(MIN_SIDE, round(size[0] * s)), max(MIN_SIDE, round(size[1] * s)))
        image = image.resize(new, Image.Resampling.LANCZOS)
        alpha = None if alpha is None else alpha.resize(new, Image.Resampling.LANCZOS)
        drags = DragPoints.from_pairs([(scale_point(p.handle, size, new), scale_point(p.target, size, new))
                                       for p in drags.pairs])
        mask = None if mask is None else resize_mask(mask, size, new)
        notes.append(f"image scaled from {size[0]}x{size[1]} to {new[0]}x{new[1]} (largest side at most "
                     f"{MAX_INPUT_SIDE} px); the result is at that size")
    return Request(image, alpha, drags, mask, notes)


def ingest(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Validate the request at the graph's entry (`check_request`) and store images by reference."""
    req = check_request(state, _ctx(runtime))
    store = _store(runtime)
    update: dict[str, Any] = {"image": store.put_image(req.image), "drags": req.drags, "warnings": req.notes,
                              "attempts": [], "tried": [], "prepared": {}, "result": None, "accepted": False,
                              "chosen": None, "alpha": None if req.alpha is None else store.put_image(req.alpha)}
    if req.mask is not None:
        update["mask"] = store.put_image(Image.fromarray(req.mask.astype(np.uint8) * 255))
    w, h = req.image.size
    update["status"] = f"{len(req.drags.pairs)} drag(s) on a {w}x{h} image"
    return update


def locate_node(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Locator tool: what is under each handle, and the image's description c."""
    ctx = _ctx(runtime)
    image = _image(state["image"])
    cfg = ctx.locator_config()
    located = locate(image, state["drags"], _mask_array(state), cfg)
    caption, source = describe_image(image, state.get("prompt"), located=located, config=cfg)
    what = "; ".join(d.description for d in located.descriptions)
    _emit(runtime, node="locate", message=f"handle: {what} ({located.backend}); image: {caption} ({source})")
    return {"located": located, "caption": caption, "warnings": [*state.get("warnings", []), *located.warnings],
            "status": f"located: {what}"}


def _given_intention(value: Any, caption: str) -> tuple[Intention, str | None]:
    if isinstance(value, Intention):
        return value.model_copy(update={"confidence": 1.0}), None
    if isinstance(value, dict):
        data = {"source_prompt": caption, "target_prompt": caption, **value, "confidence": 1.0}
        return Intention.model_validate(data), None
    text = str(value).strip()
    if not text:
        raise InputError("intention is empty: give a short phrase, or leave it out to let the agent reason")
    return (Intention(intention=text, source_prompt=caption, target_prompt=caption, confidence=1.0),
            "intention given without prompts: both prompts are the image description (no semantic guidance)")


_STOP = {"a", "an", "the", "it", "its", "this", "that", "make", "please", "to", "of", "and", "me", "bit", "little"}


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP}


def match_intention(text: str, intentions: list[Intention]) -> int | None:
    """The proposal that covers most of the user's content words ("make it bigger" -> "make the red circle
    bigger"), if it covers at least half of them; ties go to the more confident proposal (they come sorted)."""
    want = _content_words(text)
    if not want or not intentions:
        return None
    scores = [len(want & _content_words(i.intention)) / len(want) for i in intentions]
    best = max(range(len(scores)), key=lambda k: scores[k])
    return best if scores[best] >= 0.5 else None


def reason_node(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Reasoner tool: K intentions with prompts and confidences; the first pick is drawn by confidence (Eq. 6).

    A user-given intention skips the choice: with prompts it is used as is; as bare text it is matched against the
    reasoner's proposals (to borrow their prompts, i.e. semantic guidance), else used with the caption as both
    prompts.
    """
    ctx = _ctx(runtime)
    warnings = list(state.get("warnings", []))
    given = state.get("intention")
    proposals: list[Intention] = []
    if given is None or isinstance(given, str):
        result = reason(ReasonRequest(drags=state["drags"], located=state["located"], caption=state["caption"],
                                      k=ctx.k), ReasonerConfig(backend=ctx.reasoner, llm=ctx.llm))
        proposals = result.intentions
        warnings += result.warnings
    if given is None:
        intentions = proposals
        if not intentions:
            raise InputError("the reasoner proposed no intention for this drag")
        selected = select_intention(intentions, set(), ctx.selection, ctx.seed)
    else:
        k = match_intention(given, proposals) if isinstance(given, str) else None
        if k is not None:
            intention = proposals[k].model_copy(update={"intention": given.strip(), "confidence": 1.0})
        else:
            intention, note = _given_intention(given, state["caption"])
            warnings += [note] if note else []
        intentions, selected = [intention], 0
    listing = ", ".join(f"{i.intention} ({i.confidence:.2f})" for i in intentions)
    _emit(runtime, node="reason", message=f"intentions: {listing}")
    return {"intentions": intentions, "selected": selected, "warnings": warnings,
            "status": f"trying: {intentions[selected].intention}"}


def choose_node(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Human in the loop: when asked to confirm, pause with the intentions before any GPU work.

    Resume with `Command(resume=<index> | {"intention", "source_prompt", "target_prompt"} | "auto")`.
    """
    if not state.get("confirm"):
        return {}
    options = [{"index": k, **i.model_dump()} for k, i in enumerate(state["intentions"])]
    answer = interrupt({"question": "Which intention should I edit with?", "intentions": options})
    if answer in (None, "auto"):
        return {"confirm": False}
    if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
        k = int(answer)
        if not 0 <= k < len(state["intentions"]):
            raise InputError(f"choice {k} is not one of the {len(state['intentions'])} intentions")
        return {"selected": k, "confirm": False, "status": f"trying: {state['intentions'][k].intention}"}
    chosen, _ = _given_intention(answer, state["caption"])
    intentions = [*state["intentions"], chosen]
    return {"intentions": intentions, "selected": len(intentions) - 1, "confirm": False,
            "status": f"trying: {chosen.intention}"}


def _batch(ctx: AgentContext) -> bool:
    if ctx.batch_intentions == "auto":
        import torch

        return (ctx.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return ctx.batch_intentions == "on"


MOVE_VERBS = ("move", "shift", "slide", "relocate", "translate", "reposition", "carry", "bring", "put", "place")
SIZE_WORDS = ("bigger", "smaller", "larger", "enlarge", "shrink", "grow", "scale", "resize", "tiny", "huge")
GROW_WORDS = ("bigger", "larger", "enlarge", "enlarged", "grow", "huge", "expand", "wider", "taller")
SHRINK_WORDS = ("smaller", "shrink", "shrunk", "tiny", "reduce", "narrower", "shorter")
MAX_REGION_FRACTION = 0.5  # a "region" over half the image is the background or a failed segmentation, not an object


def region_motion(intention: Intention, ctx: AgentContext) -> str | None:
    """How this intention drags the locator's object region: "translate" (move the whole object), "scale" (resize
    it about its centre), "similarity" (resize and move it), or None (deform around the handle point: a patch drag).

    'auto' reads the intention: a leading move verb ("move the circle to the right") translates; a size word
    ("make the circle bigger") scales, and with a move verb too ("make it bigger and move it left") also moves;
    anything else ("raise the horse's head") is a patch drag.
    """
    if ctx.handle_regions == "never":
        return None
    words = re.findall(r"[a-z]+", intention.intention.lower())
    if words and words[0] in MOVE_VERBS:
        return "translate"
    if any(w in SIZE_WORDS for w in words):
        return "similarity" if any(w in MOVE_VERBS for w in words) else "scale"
    return "translate" if ctx.handle_regions == "always" else None


def word_factor(size_change: float, direction: str | None) -> float | None:
    """A size word's factor: "grow" -> `size_change`, "shrink" -> its reciprocal, no word -> None."""
    return size_change if direction == "grow" else 1.0 / size_change if direction == "shrink" else None


def size_factor(ctx: AgentContext, direction: str | None) -> float | None:
    """The size factor a resize-and-move with one drag per object gets from its word (see AgentContext.size_change):
    "bigger" -> size_change, "smaller" -> its reciprocal, no word -> None (the engine then only moves it)."""
    if not 1.0 < ctx.size_change <= 10.0:
        raise InputError(f"size_change must be in (1, 10], not {ctx.size_change!r}: it is how much 'bigger' grows")
    return word_factor(ctx.size_change, direction)


def scale_direction(intention: Intention) -> str | None:
    """'grow' / 'shrink' when the intention's words say which way the size goes (None: neither or both). The engine
    keeps the factor's magnitude from the drag and its direction from this word, so "smaller" can never enlarge."""
    words = set(re.findall(r"[a-z]+", intention.intention.lower()))
    grow, shrink = bool(words & set(GROW_WORDS)), bool(words & set(SHRINK_WORDS))
    return "grow" if grow and not shrink else "shrink" if shrink and not grow else None


def moves_object(intention: Intention, ctx: AgentContext) -> bool:
    """Does this intention drag the whole located object (translated or scaled) rather than a patch?"""
    return region_motion(intention, ctx) is not None


def handle_regions(located: Any, size: tuple[int, int]) -> list[np.ndarray | None] | None:
    """The locator's object mask under each handle (None where it has only a box or an implausible region)."""
    from luciddrag.tools.schemas import rle_to_mask

    if located is None:
        return None
    w, h = size
    out: list[np.ndarray | None] = []
    for d in sorted(located.descriptions, key=lambda d: d.index):
        region = d.region
        if region is None or not region.mask_rle:
            out.append(None)
            continue
        m = rle_to_mask(region.mask_rle, h, w)
        out.append(m if 0 < m.mean() <= MAX_REGION_FRACTION else None)
    return out if any(m is not None for m in out) else None


def painted_regions(mask: np.ndarray | None, drags: DragPoints) -> list[np.ndarray | None] | None:
    """The user's painted mask as the object under each handle it covers (the object-moving task: DragonDiffusion's
    move mode paints the object), or None when there is no mask, it is not object-sized, or no handle is on it."""
    if mask is None or not 0 < mask.mean() <= MAX_REGION_FRACTION:
        return None
    h, w = mask.shape
    out = [mask if mask[min(max(int(p.handle[1]), 0), h - 1), min(max(int(p.handle[0]), 0), w - 1)] else None
           for p in drags.pairs]
    return out if any(m is not None for m in out) else None


def sample_node(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Sampler tool: edit with the selected intention (or, batched, with every untried one at once)."""
    ctx = _ctx(runtime)
    k = state["selected"]
    intentions = state["intentions"]
    prepared = dict(state.get("prepared") or {})
    t0 = time.perf_counter()
    if k not in prepared:
        image = _image(state["image"])
        # rigid motion only with an object mask (segmenter or exact): offline on a photo there is none -> patch drag
        objects = handle_regions(state.get("located"), image.size)
        mask = _mask_array(state)
        painted = False
        if objects is None:  # the object-moving task: a user-painted mask is the object under the handles it covers
            objects = painted_regions(mask, state["drags"])
            painted = objects is not None

        def how(j: int) -> tuple[str | None, str | None]:
            motion = region_motion(intentions[j], ctx) if objects is not None else None
            return motion, scale_direction(intentions[j]) if motion in ("scale", "similarity") else None

        motion, direction = how(k)
        todo = [k]
        if _batch(ctx):  # one batch shares one drag geometry: batch only intentions that drag the same way
            todo += [j for j in range(len(intentions)) if j != k and j not in state.get("tried", [])
                     and how(j) == (motion, direction)]

        def progress(ev):
            _emit(runtime, node="sample", phase=ev.phase, step=ev.step, total=ev.total, intention=intentions[k].intention)

        regions = objects if motion else None
        if regions is not None and painted:
            mask = None  # the painted mask is the object, not the editable area: it must be free to leave and arrive
        res = sample_intentions(ctx, image, state["drags"], mask,
                                [intentions[j] for j in todo], progress, regions=regions, motion=motion,
                                scale_direction=direction,
                                region_scale=size_factor(ctx, direction) if motion == "similarity" else None)
        store = _store(runtime)
        for j, im in zip(todo, res.images):
            prepared[j] = store.put_image(im)
    it = intentions[k]
    attempt = Attempt(index=k, intention=it.intention, source_prompt=it.source_prompt, target_prompt=it.target_prompt,
                      image=prepared.pop(k), seconds=time.perf_counter() - t0)
    return {"attempts": [*state.get("attempts", []), attempt], "prepared": prepared,
            "tried": [*state.get("tried", []), k], "status": f"sampled: {it.intention}"}


def critique_node(state: AgentState, runtime: Runtime[AgentContext]) -> dict:
    """Scorer tool: did the handle content arrive (DIFT tracking), and is the image faithful (discriminator)?

    Accept -> done. Reject -> pick the next intention (by confidence, without replacement) while the attempt budget
    lasts; when it is spent, return the best attempt, flagged as not accepted.
    """
    ctx = _ctx(runtime)
    attempts = list(state["attempts"])
    current = attempts[-1]
    original, edited = _image(state["image"]), _image(current.image)
    score = score_drag(ctx, original, edited, state["drags"], prompt=current.target_prompt)
    # Each check says what it measured either way, so an accepted attempt's "why" is as informative as a rejection's.
    arrived = score["md_fraction"] <= ctx.accept_md_fraction
    checks = [(arrived, f"handle landed {score['md_px']:.1f} px from target ({score['md_fraction']:.0%} of the drag "
                        f"{'<=' if arrived else '>'} {ctx.accept_md_fraction:.0%})")]
    quality, min_quality = _quality(ctx, edited, current.target_prompt)
    if quality is not None and min_quality is not None:
        faithful = quality >= min_quality
        checks.append((faithful, f"fidelity {quality:.2f} {'>=' if faithful else '<'} {min_quality:.2f}"))
    # whole-object checks (agent/object_checks.py): the region critic for moves/resizes, the optional LLM judge
    checks = object_checks(ctx, checks, original, edited, state["drags"],
                           handle_regions(state.get("located"), original.size),
                           region_motion(state["intentions"][current.index], ctx), current.intention)
    failed = [text for ok, text in checks if not ok]
    verdict = "rejected" if failed else "accepted"
    current = current.model_copy(update={**score, "quality": quality, "verdict": verdict,
                                         "reason": "; ".join(failed or [text for _, text in checks])})
    attempts[-1] = current
    _emit(runtime, node="critique", message=f"{current.intention}: {verdict} ({current.reason})")
    update: dict[str, Any] = {"attempts": attempts}
    if verdict == "accepted":
        return {**update, "accepted": True, "chosen": current, "selected": None,
                "result": _with_alpha(state, current.image, runtime),
                "status": f"accepted: {current.intention}"}
    nxt = None
    if len(attempts) < ctx.max_attempts:
        nxt = select_intention(state["intentions"], set(state.get("tried", [])), ctx.selection, ctx.seed)
    if nxt is not None:
        return {**update, "selected": nxt, "status": f"rejected {current.intention}; trying "
                                                     f"{state['intentions'][nxt].intention}"}
    best = min(attempts, key=lambda a: (a.md_fraction if a.md_fraction is not None else float("inf")))
    return {**update, "accepted": False, "chosen": best, "selected": None,
            "result": _with_alpha(state, best.image, runtime),
            "status": f"no attempt accepted after {len(attempts)}; returning the best ({best.intention}), "
                      "flagged as not accepted"}


def _with_alpha(state: AgentState, ref: ImageRef, runtime: Runtime[AgentContext]) -> ImageRef:
    """The result with the input's alpha channel re-attached (the engine edits the image composited on white)."""
    if state.get("alpha") is None:
        return ref
    out = _image(ref).convert("RGBA")
    out.putalpha(_image(state["alpha"]).convert("L").resize(out.size))
    return _store(runtime).put_image(out)


def _quality(ctx: AgentContext, image: Image.Image, prompt: str) -> tuple[float | None, float | None]:
    """Discriminator P(real) of the result and the acceptance threshold (ctx.min_quality, else the one calibrated
    and stored with the discriminator), when a discriminator is configured; (None, None) otherwise."""
    if not ctx.discriminator:
        return None, None
    from luciddrag.agent.tools import get_editor
    from luciddrag.engine.discriminator import load_discriminator, score_image

    disc = load_discriminator(ctx.discriminator, get_editor(ctx).c)
    threshold = ctx.min_quality if ctx.min_quality is not None else disc.config.threshold
    return score_image(disc, get_editor(ctx).c, image, prompt), threshold


def after_critique(state: AgentState) -> str:
    return "sample" if state.get("selected") is not None else "__end__"
