"""The locator: what lies under each handle point ("the nose of a woman", "the small red circle on the left").

The paper's locator is Osprey (a mask-level VLM). Backends here, chosen by ``LocatorConfig.backend``, all implement
the small ``Locator`` protocol:

* ``openai``  - any OpenAI-compatible vision chat model (OpenAI, vLLM, Ollama, llama.cpp) through ``ChatOpenAI``:
  the image with numbered dots and arrows drawn on it (visual prompting), one zoomed crop per handle, and the
  coordinates in text; the prompt is the ``locate_region`` template.
* ``florence2`` - Florence-2 in transformers (``<REGION_TO_DESCRIPTION>`` on a box around the handle, optionally the
  box of a SAM mask from the point, which is how Osprey's demo turns a click into a region).
* ``osprey``  - Osprey itself, which only runs in its own environment, over HTTP (contract: docs/osprey-server.md).
* ``offline`` - no model: exact shape/colour names on ShapesWorld images from their segmentation, and
  "the region around (x, y)" with a colour-grown region elsewhere.

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
from collections import deque
from collections.abc import Callable, Sequence
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

log = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path
LocatorBackend = Literal["auto", "offline", "openai", "florence2", "osprey"]


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
    sam_model: str = "facebook/sam-vit-base"
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
        return Region(box=clipped, source=source, area=int(mask.sum()), mask_rle=mask_to_rle(mask))  # type: ignore[arg-type]
    return Region(box=clipped, source=source)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ offline


def shapesworld_objects(image: Image.Image) -> list[Any] | None:
    """ShapesWorld segmentation when the image looks like a ShapesWorld scene, else None.

    A ShapesWorld scene is a pastel background with a few saturated, nameable shapes: every segmented object has a
    known shape and colour and together they hold nearly all saturated pixels. Photos fail that test (saturated
    pixels there form many unnameable blobs), so they get the generic path.
    """
    if max(image.size) > 1024:
        return None  # ShapesWorld renders are small; don't spend time segmenting large photos
    try:
        from luciddrag.evals.shapesworld.segment import foreground_mask, segment_objects
    except ImportError:  # a trimmed install without the evals package
        return None
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


def shapesworld_attributes(obj: Any, width: int, height: int) -> dict[str, str]:
    """Caption-grammar attributes of a segmented shape: shape, colour, size word, position phrase, phrase."""
    from luciddrag.evals.shapesworld.world import describe_shape, position_phrase, size_word

    size = size_word(obj.size, width)
    position = position_phrase(obj.centroid[0], obj.centroid[1], width, height)
    return {"shape": obj.shape, "colour": obj.colour, "size": size, "position": position,
            "phrase": describe_shape(obj.shape, obj.colour, size, position)}


def _distance_to_mask(mask: np.ndarray, point: Point) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.min(np.hypot(xs - point[0], ys - point[1]))) if len(xs) else float("inf")


def object_at(objects: Sequence[Any], point: Point) -> Any | None:
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


def region_grow(image: Image.Image, seed: Point, tolerance: float = 30.0, max_side: int = 128) -> np.ndarray:
    """Pixels connected to ``seed`` whose colour is within ``tolerance`` (RGB distance) of the seed's colour.

    Runs on a copy downscaled to ``max_side`` (a plain BFS in Python is fast at that size) and scales the mask
    back. The seed colour is the median of a 3x3 patch so a single noisy pixel does not decide the region.
    """
    width, height = image.size
    scale = min(1.0, max_side / max(width, height))
    sw, sh = max(1, round(width * scale)), max(1, round(height * scale))
    small = np.asarray(image.convert("RGB").resize((sw, sh), Image.Resampling.BILINEAR), dtype=np.float32)
    sx = min(max(int(seed[0] * sw / width), 0), sw - 1)
    sy = min(max(int(seed[1] * sh / height), 0), sh - 1)
    patch = small[max(0, sy - 1):sy + 2, max(0, sx - 1):sx + 2].reshape(-1, 3)
    ref = np.median(patch, axis=0)
    similar = np.linalg.norm(small - ref, axis=-1) <= tolerance
    grown = np.zeros((sh, sw), dtype=bool)
    if similar[sy, sx]:
        grown[sy, sx] = True
        queue = deque([(sy, sx)])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < sh and 0 <= nx < sw and similar[ny, nx] and not grown[ny, nx]:
                    grown[ny, nx] = True
                    queue.append((ny, nx))
    else:
        grown[sy, sx] = True
    full = Image.fromarray(grown.astype(np.uint8) * 255, "L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(full) > 0


class OfflineLocator:
    """No model: ShapesWorld objects by segmentation (exact), elsewhere "the region around (x, y)"."""

    name = "offline"

    def __init__(self, tolerance: float = 30.0) -> None:
        self.tolerance = tolerance

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        objects = shapesworld_objects(image)
        descriptions = []
        for i, pair in enumerate(drags.pairs):
            if objects is not None:
                descriptions.append(self._shapesworld(objects, i, pair.handle, width, height))
            else:
                grown = region_grow(image, pair.handle, self.tolerance)
                descriptions.append(HandleDescription(
                    index=i, handle=pair.handle, description=generic_description(pair.handle),
                    region=checked_region(mask_box(grown), width, height, "region-grow", grown)))
        caption = self._caption_from(objects, width, height) if objects is not None else None
        backend = "offline:shapesworld" if objects is not None else "offline"
        return LocatorResult(descriptions=descriptions, backend=backend, image_size=(width, height),
                             caption=caption)

    @staticmethod
    def _shapesworld(objects: list[Any], index: int, handle: Point, width: int, height: int) -> HandleDescription:
        obj = object_at(objects, handle)
        if obj is None:
            from luciddrag.evals.shapesworld.world import position_phrase

            where = position_phrase(handle[0], handle[1], width, height)
            return HandleDescription(index=index, handle=handle, description=f"the empty background {where}",
                                     attributes={"background": "true", "position": where})
        attrs = shapesworld_attributes(obj, width, height)
        return HandleDescription(
            index=index, handle=handle, description="the " + attrs["phrase"].removeprefix("a "),
            region=checked_region(obj.bbox, width, height, "segmentation", obj.mask), attributes=attrs)

    @staticmethod
    def _caption_from(objects: list[Any], width: int, height: int) -> str:
        from luciddrag.evals.shapesworld.world import join_descriptions

        # Reading order (top to bottom, left to right) so the rebuilt caption does not depend on object areas.
        ordered = sorted(objects, key=lambda o: (round(o.centroid[1] / max(1, height / 3)), o.centroid[0]))
        return join_descriptions([shapesworld_attributes(o, width, height)["phrase"] for o in ordered])

    def caption(self, image: Image.Image) -> str | None:
        objects = shapesworld_objects(image)
        return None if objects is None else self._caption_from(objects, *image.size)


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


def _local_only(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _load_pretrained(loader: Callable[..., Any], model_id: str, local_files_only: bool, what: str) -> Any:
    try:
        return loader(model_id, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        hint = ("it is not in the local Hugging Face cache" if local_files_only
                else "it could not be downloaded (no network?)")
        raise ModelLoadError(
            f"cannot load {what} '{model_id}': {hint}. Download it once with "
            f"`huggingface-cli download {model_id}` on a machine with network access, or use --locator offline"
        ) from exc


class SamPointSegmenter:
    """SAM (transformers ``SamModel``) turning a click into a mask, as Osprey's demo does."""

    def __init__(self, model_id: str = "facebook/sam-vit-base", device: str = "cpu",
                 local_files_only: bool | None = None) -> None:
        self.model_id, self.device, self.local_files_only = model_id, device, _local_only(local_files_only)
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> None:
        if self._model is None:
            from transformers import SamModel, SamProcessor

            self._processor = _load_pretrained(SamProcessor.from_pretrained, self.model_id, self.local_files_only,
                                               "SAM processor")
            self._model = _load_pretrained(SamModel.from_pretrained, self.model_id, self.local_files_only,
                                           "SAM").to(self.device).eval()

    def mask(self, image: Image.Image, point: Point) -> np.ndarray:
        """The highest-scoring of SAM's three masks for a single foreground point (HxW bool)."""
        import torch

        self._load()
        inputs = self._processor(images=image, input_points=[[[list(point)]]], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self._model(**inputs)
        masks = self._processor.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                   inputs["reshaped_input_sizes"].cpu())[0][0]
        best = int(out.iou_scores[0, 0].argmax())
        return masks[best].numpy().astype(bool)


class Florence2Locator:
    """Florence-2's ``<REGION_TO_DESCRIPTION>`` on a box around each handle (or around SAM's mask of it)."""

    def __init__(self, model_id: str = "florence-community/Florence-2-base", *, device: str = "cpu",
                 box_fraction: float = 0.15, sam: SamPointSegmenter | None = None,
                 local_files_only: bool | None = None, max_new_tokens: int = 32) -> None:
        self.model_id, self.device, self.box_fraction, self.sam = model_id, device, box_fraction, sam
        self.local_files_only = _local_only(local_files_only)
        self.max_new_tokens = max_new_tokens
        self.name = f"florence2:{model_id}"
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        """Load the processor and model (lazily, on first use); ``ModelLoadError`` if the weights are missing."""
        if self._model is not None:
            return
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self._processor = _load_pretrained(AutoProcessor.from_pretrained, self.model_id, self.local_files_only,
                                           "Florence-2 processor")
        self._model = _load_pretrained(Florence2ForConditionalGeneration.from_pretrained, self.model_id,
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
            box = mask_box(m)
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

    def build_request(self, image: Image.Image, drags: DragPoints) -> OspreyRequest:
        regions = [OspreyRegion(id=i, point=p.handle) for i, p in enumerate(drags.pairs)]
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

    def locate(self, image: Image.Image, drags: DragPoints, mask: np.ndarray | None = None) -> LocatorResult:
        width, height = image.size
        drags.check_inside(width, height)
        request = self.build_request(image, drags)
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


# ------------------------------------------------------------------------------------------------ factory, entry


@lru_cache(maxsize=2)
def _florence_locator(model_id: str, device: str, box_fraction: float, sam_model: str | None,
                      local_files_only: bool | None) -> Florence2Locator:
    """One Florence-2 (+ SAM) instance per configuration: ``locate()`` is called once per edit, and reloading the
    weights every time would cost seconds each."""
    sam = SamPointSegmenter(sam_model, device, local_files_only) if sam_model else None
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
    if backend == "openai":
        if not settings.configured:
            raise InputError("the openai locator needs OPENAI_API_KEY (OpenAI) or OPENAI_BASE_URL (a local "
                             "OpenAI-compatible server)")
        return OpenAIVisionLocator(settings, prompt=config.prompt, caption_prompt=config.caption_prompt,
                                   crop_fraction=config.crop_fraction,
                                   min_display_side=config.min_display_side), notices
    if backend == "florence2":
        return _florence_locator(config.florence_model, config.device, config.box_fraction,
                                 config.sam_model if config.use_sam else None, config.local_files_only), notices
    if backend == "osprey":
        url = config.osprey_url or os.environ.get("LUCIDDRAG_OSPREY_URL")
        if not url:
            raise InputError("the osprey locator needs a server URL: set LUCIDDRAG_OSPREY_URL or --osprey-url "
                             "(see docs/osprey-server.md)")
        return OspreyHttpLocator(url, timeout_s=config.timeout_s, max_retries=config.max_retries), notices
    raise InputError(f"unknown locator backend {backend!r}")


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

    Order: the user's caption; the locator result's own caption (ShapesWorld segmentation); the configured
    backend's captioner (a VLM); else the generic "an image". ShapesWorld scenes carry their caption in metadata:
    pass it as ``caption``.
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
    offline = OfflineLocator().caption(img)
    if offline:
        return offline, "offline:shapesworld"
    return "an image", "default"
