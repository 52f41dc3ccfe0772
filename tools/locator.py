"""The locator: what lies under each handle point ("the nose of a woman", "the small red circle on the left").

The paper's locator is Osprey (a mask-level VLM). Backends here, chosen by ``LocatorConfig.backend``, all implement
the small ``Locator`` protocol:

* ``openai``  - any OpenAI-compatible vision chat model (OpenAI, vLLM, Ollama, llama.cpp) through ``ChatOpenAI``:
  the image with numbered dots and arrows drawn on it (visual prompting), one zoomed crop per handle, and the
  coordinates in text; the prompt is the ``locate_region`` template.
* ``florence2`` - Florence-2 in transformers (``<REGION_TO_DESCRIPTION>`` on a box around the handle, optionally the
  box of a SAM mask from the point, which is how Osprey's demo turns a click into a region).
* ``osprey``  - Osprey itself, which only runs in its own environment, over HTTP (contract: docs/osprey-server.md).
* ``sam``     - SAM (transformers, tools/segmenter.py) turns each handle into an object mask; the description is the
  world's name when a world plugin recognises the image, else "the region around (x, y)".
* ``offline`` - no model: a registered world's exact names and masks on images it recognises (ShapesWorld ships as
  one, luciddrag.tools.worlds), and "the region around (x, y)" with no region elsewhere (patch drags only).

``use_sam`` puts SAM's masks under the ``openai`` / ``osprey`` / ``florence2`` namers: the mask comes from SAM, the
name from the model (Osprey receives the masks in its request, as the paper's Osprey describes SAM masks).
``auto`` picks ``openai`` when an API key or a base URL is configured and ``offline`` otherwise. Service failures
(network, HTTP errors after retries) fall back to ``offline`` with a warning in the result; a backend the user asked
for whose weights are missing raises ``ModelLoadError`` instead, because silently describing nothing is worse.

Whatever a backend answers, the result never contains coordinates outside the image: handles are checked on the way
in and every region box is clipped on the way out.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.prompts import RenderedPrompt, load_template, parse_label
from luciddrag.tools.drawing import crop_window, draw_drags, zoomed_crop
from luciddrag.tools.llm import LLM_SERVICE_ERRORS, NO_LLM_NOTICE, LLMSettings, describe_llm_error, make_chat_model
from luciddrag.tools.segmenter import DEFAULT_SAM_MODEL, SamSegmenter, load_pretrained, local_only
from luciddrag.tools.schemas import (
    Box,
    DragPoints,
    HandleDescription,
    LocatorResult,
    Point,
    Region,
    clamp_box,
    mask_box,
    mask_to_rle,
    rle_to_mask,
)
from luciddrag.tools.worlds import recognise as recognise_world

log = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path
LocatorBackend = Literal["auto", "offline", "sam", "openai", "florence2", "osprey"]


class LocatorConfig(BaseModel):
    """Which locator to use and its knobs (every field has a working default)."""

    backend: LocatorBackend = "auto"
    llm: LLMSettings | None = None
    """For ``openai``; None reads the environment (``LLMSettings.from_env``)."""
    prompt: str = "locate_region"
    """Template for the VLM locator, ``name`` (latest version) or ``name.vN``."""
    caption_prompt: str = "caption_image"
    crop_fraction: float = Field(default=0.25, gt=0, le=1)
    """Side of each close-up, as a fraction of the image's shorter side."""
    min_display_side: int = 512
    """Small images are enlarged (nearest) to this before marks are drawn, so a VLM can read them."""
    florence_model: str = "florence-community/Florence-2-base"
    box_fraction: float = Field(default=0.15, gt=0, le=1)
    """Side of the box around a handle for Florence-2 (fraction of the shorter side) when SAM is off."""
    use_sam: bool = False
    """SAM masks under the ``openai`` / ``osprey`` / ``florence2`` namers (the ``sam`` backend always uses SAM)."""
    sam_model: str = Field(default_factory=lambda: os.environ.get("LUCIDDRAG_SAM_MODEL", DEFAULT_SAM_MODEL))
    """SAM checkpoint for ``sam`` / ``use_sam``: a hub id or a local folder (``LUCIDDRAG_SAM_MODEL``)."""
    device: str = "cpu"
    local_files_only: bool | None = None
    """Load weights from the local cache only; None follows ``HF_HUB_OFFLINE``."""
    osprey_url: str | None = None
    """Base URL of an Osprey server (docs/osprey-server.md); None reads ``LUCIDDRAG_OSPREY_URL``."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Per request to the Osprey server (the openai backend takes its timeout from ``llm``)."""
    max_retries: int = Field(default=3, ge=0, le=10)
    """Retries of the Osprey client on 429 / 5xx / connection errors."""


@runtime_checkable
class Locator(Protocol):
    """A locator backend."""

    name: str

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        """One description per drag pair, in order."""
        ...

    def caption(self, image: Image.Image) -> str | None:
        """A description of the whole image (the paper's c), or None if this backend cannot caption."""
        ...


# ------------------------------------------------------------------------------------------------ shared helpers


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path (``InputError`` if the file is not an image)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def as_mask(mask: np.ndarray | Image.Image | str | Path | None, width: int, height: int) -> np.ndarray | None:
    """A HxW bool mask from an array, a PIL image or an image file (nonzero = inside), checked against the image
    size."""
    if mask is None:
        return None
    if isinstance(mask, (str, Path)):
        try:
            with Image.open(mask) as im:
                mask = im.convert("L")
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read mask {mask}: {exc}") from exc
    arr = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.shape != (height, width):
        raise InputError(f"mask is {arr.shape[1]}x{arr.shape[0]} but the image is {width}x{height}")
    return arr > 0


def image_to_data_url(image: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URL (the image block format OpenAI-compatible servers accept)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "his", "her", "its", "their", "my", "your",
                "our", "some", "two", "three", "one", "both", "each"}


def clean_description(text: str, max_words: int = 16) -> str:
    """A model's answer as a short noun phrase: trimmed, no quotes or final period, lower-case start, a leading
    determiner ("the") if it has none, at most ``max_words`` words. Empty input stays empty."""
    text = re.sub(r"<[^>]+>", " ", text)  # special tokens (<s>, </s>, <pad>, <loc_12>)
    text = text.strip().strip("\"'`*").strip()
    text = re.sub(r"^(?:it is|this is|that is|there is)\s+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text).rstrip(" .;,:!")
    if not text:
        return ""
    words = text.split(" ")[:max_words]
    if not (len(words[0]) > 1 and words[0].isupper()):  # keep acronyms ("TV screen")
        words[0] = words[0][:1].lower() + words[0][1:]
    if words[0].lower() not in _DETERMINERS:
        words.insert(0, "the")
    return " ".join(words)


def generic_description(point: Point) -> str:
    return f"the region around ({round(point[0])}, {round(point[1])})"


def checked_region(box: tuple[float, float, float, float] | None, width: int, height: int, source: str,
                   mask: np.ndarray | None = None) -> Region | None:
    """A Region clipped to the image; None when nothing of it is inside."""
    if box is None:
        return None
    clipped = clamp_box(box, width, height)
    if clipped is None:
        return None
    if mask is not None and mask.any():
        return Region(box=clipped, source=source, area=int(mask.sum()),  # type: ignore[arg-type]
                      mask_rle=mask_to_rle(mask))
    return Region(box=clipped, source=source)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ offline


class OfflineLocator:
    """No model. On an image a registered world recognises (luciddrag.tools.worlds; ShapesWorld ships as one), that
    world's exact names, masks and caption. Anywhere else "the region around (x, y)" with no region: without a
    segmenter nothing here knows where an object ends, and a colour blob passed off as an object would be dragged
    rigidly, tearing the photo (use the ``sam`` backend for object masks)."""

    name = "offline"

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        claimed = recognise_world(image)
        if claimed is None:
            descriptions = [HandleDescription(index=i, handle=pair.handle, description=generic_description(pair.handle))
                            for i, pair in enumerate(drags.pairs)]
            return LocatorResult(descriptions=descriptions, backend=self.name, image_size=(width, height))
        world, scene = claimed
        assert world.locator is not None  # recognise_world only asks worlds that have one
        descriptions = [world.locator.describe(scene, i, pair.handle) for i, pair in enumerate(drags.pairs)]
        return LocatorResult(descriptions=descriptions, backend=f"{self.name}:{world.name}",
                             image_size=(width, height), caption=world.locator.caption(scene))

    def caption(self, image: Image.Image) -> str | None:
        captioned = self.caption_source(image)
        return captioned[0] if captioned else None

    def caption_source(self, image: Image.Image) -> tuple[str, str] | None:
        """(caption, "offline:<world>") when a world recognises the image and captions it, else None."""
        claimed = recognise_world(image)
        if claimed is None:
            return None
        world, scene = claimed
        text = world.locator.caption(scene) if world.locator is not None else None
        return (text, f"{self.name}:{world.name}") if text else None


# ------------------------------------------------------------------------------------------------ OpenAI vision


def format_points(drags: DragPoints) -> str:
    """The coordinates block of the locator prompt, one line per drag."""
    lines = []
    for i, p in enumerate(drags.pairs, start=1):
        lines.append(f"Handle {i}: at ({round(p.handle[0])}, {round(p.handle[1])}), "
                     f"dragged to ({round(p.target[0])}, {round(p.target[1])}).")
    return "\n".join(lines)


def parse_numbered_lines(text: str, n: int) -> dict[int, str]:
    """``{1: "the nose of a woman", ...}`` from a reply of lines ``N: phrase`` (also ``N.``/``N)``/``- N:``).

    Lines outside 1..n and repeats of a number are ignored; a reply of a single unnumbered line for a single point
    is accepted as that point's answer (small local models often drop the number).
    """
    found: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"^\s*[-*]?\s*(?:handle|point)?\s*#?(\d+)\s*[:.)\-]\s*(.+?)\s*$", line, re.IGNORECASE)
        if m:
            k = int(m.group(1))
            if 1 <= k <= n and k not in found and clean_description(m.group(2)):
                found[k] = clean_description(m.group(2))
    if not found and n == 1:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) == 1 and clean_description(lines[0]):
            found[1] = clean_description(lines[0])
    return found


def message_text(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of content blocks)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def locator_variables(image_size: tuple[int, int], display_size: tuple[int, int],
                      drags: DragPoints) -> dict[str, Any]:
    """Exactly the variables the code gives a ``locate_region`` template."""
    return {"image_width": image_size[0], "image_height": image_size[1], "display_width": display_size[0],
            "display_height": display_size[1], "points": format_points(drags), "n_points": len(drags.pairs)}


def caption_variables(image_size: tuple[int, int]) -> dict[str, Any]:
    """Exactly the variables the code gives a ``caption_image`` template."""
    return {"image_width": image_size[0], "image_height": image_size[1]}


class OpenAIVisionLocator:
    """Visual prompting through any OpenAI-compatible vision chat model."""

    def __init__(self, settings: LLMSettings, *, prompt: str = "locate_region", caption_prompt: str = "caption_image",
                 crop_fraction: float = 0.25, min_display_side: int = 512, chat_model: Any | None = None) -> None:
        self.settings = settings
        self.prompt = prompt
        self.caption_prompt = caption_prompt
        self.crop_fraction = crop_fraction
        self.min_display_side = min_display_side
        self._model = chat_model
        self.name = f"openai:{settings.label(vision=True)}"

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = make_chat_model(self.settings, vision=True)
        return self._model

    def build_prompt(self, image: Image.Image, drags: DragPoints,
                     mask: np.ndarray | None = None) -> tuple[RenderedPrompt, list[tuple[str, Image.Image]]]:
        """The rendered text prompt and the pictures that go with it, as (caption, image) in sending order."""
        width, height = image.size
        annotated = draw_drags(image, drags, mask=mask, min_side=self.min_display_side)
        name, version = parse_label(self.prompt)
        rendered = load_template(name, version).render(**locator_variables(image.size, annotated.size, drags))
        pictures: list[tuple[str, Image.Image]] = [("The image with the drags drawn on it:", annotated)]
        for i, pair in enumerate(drags.pairs):
            crop, _ = zoomed_crop(image, pair.handle, i, fraction=self.crop_fraction, target=pair.target)
            pictures.append((f"Close-up around handle {i + 1}:", crop))
        return rendered, pictures

    def build_messages(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> list[Any]:
        """The exact chat messages sent: system text, then one user message with text and image blocks."""
        rendered, pictures = self.build_prompt(image, drags, mask)
        return _vision_messages(rendered, pictures)

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        reply = self.model.invoke(self.build_messages(image, drags, mask))
        answers = parse_numbered_lines(message_text(reply.content), len(drags.pairs))
        warnings = []
        missing = [i + 1 for i in range(len(drags.pairs)) if i + 1 not in answers]
        if missing:
            warnings.append(f"the vision model gave no usable description for handle(s) "
                            f"{', '.join(map(str, missing))}; using the generic description")
        half = max(4, round(self.crop_fraction * min(width, height) / 2))
        descriptions = [
            HandleDescription(index=i, handle=p.handle,
                              description=answers.get(i + 1) or generic_description(p.handle),
                              region=checked_region(crop_window(p.handle, half, width, height), width, height,
                                                    "window"))
            for i, p in enumerate(drags.pairs)
        ]
        return LocatorResult(descriptions=descriptions, backend=self.name, image_size=(width, height),
                             warnings=warnings)

    def caption(self, image: Image.Image) -> str | None:
        name, version = parse_label(self.caption_prompt)
        rendered = load_template(name, version).render(**caption_variables(image.size))
        shown = image if min(image.size) >= self.min_display_side else draw_drags(
            image, [], min_side=self.min_display_side)
        reply = self.model.invoke(_vision_messages(rendered, [("", shown)]))
        text = message_text(reply.content).strip().strip("\"'").strip()
        return text or None


def _vision_messages(rendered: RenderedPrompt, pictures: list[tuple[str, Image.Image]]) -> list[Any]:
    """System messages as text; the last user message becomes text + image_url blocks (OpenAI's vision format)."""
    from langchain_core.messages import HumanMessage

    messages = rendered.to_langchain()
    last_user = max(i for i, m in enumerate(rendered.messages) if m.role == "user")
    blocks: list[dict[str, Any]] = [{"type": "text", "text": rendered.messages[last_user].content}]
    for caption, picture in pictures:
        if caption:
            blocks.append({"type": "text", "text": caption})
        blocks.append({"type": "image_url", "image_url": {"url": image_to_data_url(picture)}})
    messages[last_user] = HumanMessage(content=blocks)
    return messages


# ------------------------------------------------------------------------------------------------ Florence-2

FLORENCE_REGION_TASK = "<REGION_TO_DESCRIPTION>"
FLORENCE_CAPTION_TASK = "<CAPTION>"
FLORENCE_BINS = 1000


def quantize_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box as Florence-2 location bins 0..999 (floor(coord / (size / 1000)), clamped), the same rule as
    ``Florence2PostProcessor.quantize`` in transformers, so what we send decodes back to our box."""
    x0, y0, x1, y1 = box
    bw, bh = width / FLORENCE_BINS, height / FLORENCE_BINS

    def q(v: float, per_bin: float) -> int:
        # floor(v / per_bin), not v // per_bin: the two differ in floating point and transformers uses the former.
        return int(min(max(math.floor(v / per_bin), 0), FLORENCE_BINS - 1))

    return q(x0, bw), q(y0, bh), q(x1, bw), q(y1, bh)


def florence_region_prompt(box: tuple[float, float, float, float], width: int, height: int) -> str:
    """``<REGION_TO_DESCRIPTION><loc_x0><loc_y0><loc_x1><loc_y1>`` for a pixel box."""
    return FLORENCE_REGION_TASK + "".join(f"<loc_{v}>" for v in quantize_box(box, width, height))


def parse_florence_output(text: str) -> str:
    """The description in a decoded Florence-2 generation (special and location tokens removed)."""
    for token in (FLORENCE_REGION_TASK, FLORENCE_CAPTION_TASK):
        text = text.replace(token, " ")
    text = re.sub(r"<loc_\d+>|</?s>|<pad>|<unk>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def box_around(point: Point, fraction: float, width: int, height: int) -> Box:
    """A square box of side ``fraction`` x the shorter image side, centred on the point, kept inside the image."""
    half = max(2, round(fraction * min(width, height) / 2))
    return crop_window(point, half, width, height)


class Florence2Locator:
    """Florence-2's ``<REGION_TO_DESCRIPTION>`` on a box around each handle (or around SAM's mask of it)."""

    def __init__(self, model_id: str = "florence-community/Florence-2-base", *, device: str = "cpu",
                 box_fraction: float = 0.15, sam: SamSegmenter | None = None,
                 local_files_only: bool | None = None, max_new_tokens: int = 32) -> None:
        self.model_id, self.device, self.box_fraction, self.sam = model_id, device, box_fraction, sam
        self.local_files_only = local_only(local_files_only)
        self.max_new_tokens = max_new_tokens
        self.name = f"florence2:{model_id}"
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        """Load the processor and model (lazily, on first use); ``ModelLoadError`` if the weights are missing."""
        if self._model is not None:
            return
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self._processor = load_pretrained(AutoProcessor.from_pretrained, self.model_id, self.local_files_only,
                                           "Florence-2 processor")
        self._model = load_pretrained(Florence2ForConditionalGeneration.from_pretrained, self.model_id,
                                       self.local_files_only, "Florence-2").to(self.device).eval()

    def _generate(self, image: Image.Image, prompt: str) -> str:
        import torch

        self.load()
        inputs = self._processor(text=prompt, images=image, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        with torch.inference_mode():
            ids = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=3, do_sample=False)
        return self._processor.batch_decode(ids, skip_special_tokens=False)[0]

    def region_for(self, image: Image.Image, handle: Point) -> tuple[Box, np.ndarray | None, str]:
        """The box to describe: SAM's mask box if SAM is on (and finds something), else a window."""
        width, height = image.size
        if self.sam is not None:
            m = self.sam.mask(image, handle)
            box = mask_box(m) if m is not None else None
            if box is not None:
                return box, m, "sam"
        return box_around(handle, self.box_fraction, width, height), None, "window"

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        descriptions, warnings = [], []
        for i, pair in enumerate(drags.pairs):
            box, region_mask, source = self.region_for(image, pair.handle)
            text = clean_description(parse_florence_output(
                self._generate(image, florence_region_prompt(box, width, height))))
            if not text:
                warnings.append(f"Florence-2 returned nothing for handle {i + 1}; using the generic description")
            descriptions.append(HandleDescription(
                index=i, handle=pair.handle, description=text or generic_description(pair.handle),
                region=checked_region(box, width, height, source, region_mask)))
        return LocatorResult(descriptions=descriptions, backend=self.name, image_size=(width, height),
                             warnings=warnings)

    def caption(self, image: Image.Image) -> str | None:
        return parse_florence_output(self._generate(image, FLORENCE_CAPTION_TASK)) or None


# ------------------------------------------------------------------------------------------------ Osprey over HTTP

OSPREY_DESCRIBE_PATH = "/v1/describe"
OSPREY_HEALTH_PATH = "/v1/health"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 30.0


class OspreyError(RuntimeError):
    """The Osprey server could not be reached or answered outside the contract."""


class OspreyRegion(BaseModel):
    """One region in a describe request (docs/osprey-server.md)."""

    id: int
    point: tuple[float, float]
    box: tuple[int, int, int, int] | None = None
    mask: dict[str, Any] | None = None
    """COCO uncompressed RLE ``{"size": [h, w], "counts": [...]}``."""


class OspreyRequest(BaseModel):
    image: str
    """Base64 PNG, no ``data:`` prefix."""
    width: int
    height: int
    regions: list[OspreyRegion]
    detail: Literal["short", "detailed"] = "short"


class OspreyRegionAnswer(BaseModel):
    id: int
    description: str
    box: tuple[float, float, float, float] | None = None
    mask: dict[str, Any] | None = None


class OspreyResponse(BaseModel):
    model: str = "osprey"
    regions: list[OspreyRegionAnswer]


def backoff_delay(attempt: int, retry_after: str | None, base: float = 0.5, cap: float = 8.0) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): the server's Retry-After (seconds, capped at
    ``MAX_RETRY_AFTER_S``) when given, else ``base * 2**attempt`` capped at ``cap``."""
    if retry_after is not None:
        try:
            return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass  # an HTTP date: fall back to exponential backoff
    return min(base * 2**attempt, cap)


class OspreyHttpLocator:
    """Client for an Osprey server implementing docs/osprey-server.md."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, max_retries: int = 3,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.max_retries, self._sleep = timeout_s, max_retries, sleep
        self.name = f"osprey:{self.url}"

    def build_request(self, image: Image.Image, drags: DragPoints,
                      masks: list[np.ndarray | None] | None = None) -> OspreyRequest:
        """The describe request; ``masks`` (one per handle, None where there is none) are sent with their boxes so
        the server describes exactly those regions (a SAM mask from the handle, as in the paper)."""
        masks = masks or [None] * len(drags.pairs)
        regions = [OspreyRegion(id=i, point=p.handle) if m is None or not m.any() else
                   OspreyRegion(id=i, point=p.handle, box=mask_box(m),
                                mask={"size": [image.height, image.width], "counts": mask_to_rle(m)})
                   for i, (p, m) in enumerate(zip(drags.pairs, masks))]
        return OspreyRequest(image=base64.b64encode(png_bytes(image)).decode("ascii"), width=image.width,
                             height=image.height, regions=regions)

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        import httpx

        last: str = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                response = httpx.post(self.url + path, json=payload, timeout=self.timeout_s)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        return response.json()
                    except json.JSONDecodeError as exc:
                        raise OspreyError(f"Osprey server at {self.url} sent invalid JSON: {exc}") from exc
                last = f"HTTP {response.status_code}: {_error_text(response)}"
                if response.status_code not in RETRY_STATUSES:
                    raise OspreyError(f"Osprey server at {self.url} refused the request ({last})")
                retry_after = response.headers.get("retry-after")
            if attempt < self.max_retries:
                self._sleep(backoff_delay(attempt, retry_after))
        raise OspreyError(f"Osprey server at {self.url} failed after {self.max_retries + 1} attempt(s) ({last})")

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None, *,
               region_masks: list[np.ndarray | None] | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        request = self.build_request(image, drags, region_masks)
        try:
            answer = OspreyResponse.model_validate(self._post(OSPREY_DESCRIBE_PATH, request.model_dump()))
        except ValueError as exc:  # pydantic ValidationError
            raise OspreyError(f"Osprey server at {self.url} answered outside the contract: {exc}") from exc
        by_id = {r.id: r for r in answer.regions}
        descriptions, warnings = [], []
        for i, pair in enumerate(drags.pairs):
            got = by_id.get(i)
            text = clean_description(got.description) if got else ""
            if not text:
                warnings.append(f"Osprey gave no description for handle {i + 1}; using the generic description")
            region_mask = None
            if got is not None and got.mask is not None:
                region_mask = _decode_contract_mask(got.mask, width, height)
                if region_mask is None:
                    warnings.append(f"Osprey's mask for handle {i + 1} does not fit the image; ignored")
            box = mask_box(region_mask) if region_mask is not None else (got.box if got else None)
            region = checked_region(box, width, height, "server", region_mask)
            if got is not None and got.box is not None and region is None:
                warnings.append(f"Osprey's box for handle {i + 1} lies outside the image; ignored")
            descriptions.append(HandleDescription(index=i, handle=pair.handle,
                                                  description=text or generic_description(pair.handle),
                                                  region=region))
        return LocatorResult(descriptions=descriptions, backend=f"{self.name} ({answer.model})",
                             image_size=(width, height), warnings=warnings)

    def caption(self, image: Image.Image) -> str | None:
        return None  # Osprey describes regions; the image description comes from the user or another backend

    def health(self) -> dict[str, Any]:
        import httpx

        try:
            response = httpx.get(self.url + OSPREY_HEALTH_PATH, timeout=min(self.timeout_s, 10.0))
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            raise OspreyError(f"Osprey server at {self.url} is not healthy: {exc}") from exc


def _error_text(response: Any) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])[:200]
    except (json.JSONDecodeError, ValueError):
        pass
    return (response.text or "")[:200]


def _decode_contract_mask(mask: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    try:
        h, w = (int(v) for v in mask["size"])
        if (h, w) != (height, width):
            return None
        decoded = rle_to_mask([int(c) for c in mask["counts"]], h, w)
    except (KeyError, TypeError, ValueError):
        return None
    return decoded if decoded.any() else None


# ------------------------------------------------------------------------------------------------ SAM


class SamLocator:
    """Object masks from SAM (one per handle); names from a namer when one is given (a vision LLM, Osprey), else
    from a world plugin that recognises the image, else "the region around (x, y)".

    SAM is the region authority here: a namer's own window or mask is replaced by SAM's mask where SAM found an
    object under the handle. When the namer's service fails, the masks are kept and the names fall back, with a
    warning (the masks are what the edit needs most)."""

    def __init__(self, segmenter: SamSegmenter, namer: Locator | None = None) -> None:
        self.segmenter, self.namer = segmenter, namer
        self.name = segmenter.name if namer is None else f"{namer.name}+{segmenter.name}"

    def _names(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None,
               masks: list[np.ndarray | None]) -> tuple[LocatorResult | None, list[str]]:
        if self.namer is None:
            return None, []
        try:
            if isinstance(self.namer, OspreyHttpLocator):
                return self.namer.locate(image, drags, mask, region_masks=masks), []
            return self.namer.locate(image, drags, mask), []
        except (OspreyError, *LLM_SERVICE_ERRORS) as exc:
            log.warning("namer %s failed: %s", self.namer.name, exc)
            reason = str(exc) if isinstance(exc, OspreyError) else describe_llm_error(exc)
            return None, [f"locator {self.namer.name} failed ({reason}); kept SAM's masks without names"]

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        masks = self.segmenter.masks(image, [p.handle for p in drags.pairs])
        named, warnings = self._names(image, drags, mask, masks)
        world = recognise_world(image) if named is None else None
        descriptions = []
        for i, (pair, m) in enumerate(zip(drags.pairs, masks)):
            if named is not None:
                desc = named.descriptions[i]
            elif world is not None and world[0].locator is not None:
                desc = world[0].locator.describe(world[1], i, pair.handle)
            else:
                desc = HandleDescription(index=i, handle=pair.handle, description=generic_description(pair.handle))
            region = checked_region(mask_box(m), width, height, "sam", m) if m is not None else None
            if region is None:
                warnings.append(f"SAM found no object-sized mask under handle {i + 1}; it will be a patch drag")
            descriptions.append(desc.model_copy(update={"region": region}))
        if named is not None:
            warnings[:0] = named.warnings
        caption = named.caption if named is not None else None
        return LocatorResult(descriptions=descriptions, backend=self.name, image_size=(width, height),
                             caption=caption, warnings=warnings)

    def caption(self, image: Image.Image) -> str | None:
        return self.namer.caption(image) if self.namer is not None else None


# ------------------------------------------------------------------------------------------------ factory, entry


@lru_cache(maxsize=2)
def _sam_segmenter(model_id: str, device: str, local_files_only: bool | None) -> SamSegmenter:
    """One SAM per configuration (weights load lazily, once, not per edit)."""
    return SamSegmenter(model_id, device, local_files_only)


@lru_cache(maxsize=2)
def _florence_locator(model_id: str, device: str, box_fraction: float, sam_model: str | None,
                      local_files_only: bool | None) -> Florence2Locator:
    """One Florence-2 (+ SAM) instance per configuration: ``locate()`` is called once per edit, and reloading the
    weights every time would cost seconds each."""
    sam = _sam_segmenter(sam_model, device, local_files_only) if sam_model else None
    return Florence2Locator(model_id, device=device, box_fraction=box_fraction, sam=sam,
                            local_files_only=local_files_only)


def make_locator(config: LocatorConfig | None = None) -> tuple[Locator, list[str]]:
    """The configured locator and any notices about the choice (e.g. why ``auto`` chose offline)."""
    config = config or LocatorConfig()
    notices: list[str] = []
    backend = config.backend
    settings = config.llm or LLMSettings.from_env()
    if backend == "auto":
        backend = "openai" if settings.configured else "offline"
        if backend == "offline":
            notices.append(NO_LLM_NOTICE.format(what="locator"))
    if backend == "offline":
        return OfflineLocator(), notices
    if backend == "sam":
        return SamLocator(_sam_segmenter(config.sam_model, config.device, config.local_files_only)), notices
    if backend == "florence2":
        return _florence_locator(config.florence_model, config.device, config.box_fraction,
                                 config.sam_model if config.use_sam else None, config.local_files_only), notices
    namer: Locator
    if backend == "openai":
        if not settings.configured:
            raise InputError("the openai locator needs OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL (a local "
                             "OpenAI-compatible server)")
        namer = OpenAIVisionLocator(settings, prompt=config.prompt, caption_prompt=config.caption_prompt,
                                    crop_fraction=config.crop_fraction, min_display_side=config.min_display_side)
    elif backend == "osprey":
        url = config.osprey_url or os.environ.get("LUCIDDRAG_OSPREY_URL")
        if not url:
            raise InputError("the osprey locator needs a server URL: set LUCIDDRAG_OSPREY_URL or --osprey-url "
                             "(see docs/osprey-server.md)")
        namer = OspreyHttpLocator(url, timeout_s=config.timeout_s, max_retries=config.max_retries)
    else:
        raise InputError(f"unknown locator backend {backend!r}")
    if config.use_sam:
        return SamLocator(_sam_segmenter(config.sam_model, config.device, config.local_files_only), namer), notices
    return namer, notices


def locate(image: ImageLike, drags: DragPoints, mask: np.ndarray | Image.Image | str | Path | None = None,
           config: LocatorConfig | None = None, *, locator: Locator | None = None) -> LocatorResult:
    """Describe what lies under each handle (the agent's locator tool).

    Service failures of the ``openai``/``osprey`` backends fall back to the offline locator, with the reason in
    ``warnings``; bad input (points outside the image, wrong mask size) raises ``InputError``.
    """
    img = load_image(image)
    width, height = img.size
    drags.check_inside(width, height)
    user_mask = as_mask(mask, width, height)
    notices: list[str] = []
    if locator is None:
        locator, notices = make_locator(config)
    try:
        result = locator.locate(img, drags, user_mask)
    except (OspreyError, *LLM_SERVICE_ERRORS) as exc:
        log.warning("locator %s failed: %s", locator.name, exc)
        fallback = OfflineLocator().locate(img, drags, user_mask)
        reason = describe_llm_error(exc) if not isinstance(exc, OspreyError) else str(exc)
        fallback.warnings.insert(0, f"locator {locator.name} failed ({reason}); used the offline locator instead")
        result = fallback
    result.warnings[:0] = notices
    return result


def describe_image(image: ImageLike, caption: str | None = None, *, located: LocatorResult | None = None,
                   config: LocatorConfig | None = None, locator: Locator | None = None) -> tuple[str, str]:
    """The image description c and where it came from: ``(text, source)``.

    Order: the user's caption; the locator result's own caption (a world plugin's, e.g. rebuilt from ShapesWorld's
    segmentation); the configured backend's captioner (a VLM); a world that recognises the image; else the generic
    "an image". A world's scenes may carry their caption in metadata: pass it as ``caption``.
    """
    if caption and caption.strip():
        return caption.strip(), "user"
    if located is not None and located.caption:
        return located.caption, located.backend
    img = load_image(image)
    if locator is None:
        locator, _ = make_locator(config)
    try:
        text = locator.caption(img)
    except (OspreyError, *LLM_SERVICE_ERRORS) as exc:
        log.warning("captioning with %s failed: %s", locator.name, exc)
        text = None
    if text:
        return text, locator.name
    offline = OfflineLocator().caption_source(img)
    if offline:
        return offline
    return "an image", "default"
