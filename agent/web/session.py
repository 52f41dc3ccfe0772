"""The web app's per-browser-session model, settings and pure image helpers (no Gradio imports: unit-testable).

A `Session` lives in a `gr.State`, so every browser tab gets its own: its own artifact folder, its own LangGraph thread
ids, its own points and results. Nothing in here is shared between sessions except the loaded model (agent/tools.py).
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from luciddrag.agent.artifacts import ImageRef
from luciddrag.agent.context import AgentContext, model_defaults
from luciddrag.engine.errors import InputError
from luciddrag.engine.request import DEFAULT_GUIDANCE_SCALE, GuidanceConfig
from luciddrag.tools.drawing import drag_overlay
from luciddrag.tools.llm import LLMSettings

Point = tuple[int, int]

DISPLAY_SIDE = 384
"""Small images (ShapesWorld is 64 px) are shown enlarged so that a click can hit a single pixel."""
MAX_DISPLAY_SIDE = 768
"""Large photos are shown reduced; clicks are mapped back to the image's own pixels either way."""

VERDICT_COLOURS = {"accepted": (46, 160, 67), "rejected": (150, 150, 150), "best": (230, 150, 20),
                   "pending": (0, 130, 200)}


# -- settings ---------------------------------------------------------------------------------------------------------

class WebSettings(BaseModel):
    """Everything the Settings panel controls, validated in one place (bad values -> one clear InputError line)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hub id or local diffusers folder")
    device: str | None = None
    steps: int = Field(50, ge=2, le=200)
    # defaults written once, in the engine (the model's luciddrag.json / family preset override them on load)
    guidance_scale: float = Field(DEFAULT_GUIDANCE_SCALE, ge=0.0, le=30.0)
    w_edit: float = Field(GuidanceConfig.model_fields["w_edit"].default, ge=0.0)
    w_content: float = Field(GuidanceConfig.model_fields["w_content"].default, ge=0.0)
    w_inpaint: float = Field(GuidanceConfig.model_fields["w_inpaint"].default, ge=0.0)
    k: int = Field(3, ge=1, le=8)
    max_attempts: int = Field(3, ge=1, le=8)
    seed: int = Field(0, ge=0)
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    """Typed in the page, kept server-side as a SecretStr and never sent back to the browser."""
    critic_ensemble: int | None = Field(None, ge=1, le=16)
    """Not in the panel (None: the model's recommendation, else the agent's default); tests lower it."""

    @classmethod
    def parse(cls, **values: Any) -> WebSettings:
        """From raw form values: blanks mean 'default', numbers may arrive as floats; errors become InputError."""
        clean = {k: (v.strip() if isinstance(v, str) else v) for k, v in values.items()}
        clean = {k: v for k, v in clean.items() if v not in (None, "")}
        for key in ("steps", "k", "max_attempts", "seed", "critic_ensemble"):
            if key in clean:
                clean[key] = int(round(float(clean[key])))
        try:
            return cls.model_validate(clean)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            raise InputError(f"setting {where!r}: {first['msg']}") from None

    @property
    def llm_configured(self) -> bool:
        return bool(self.llm_base_url or self.llm_api_key)

    @classmethod
    def for_model(cls, model: str, **overrides: Any) -> WebSettings:
        """Settings whose panel values start from the model folder's recommendations (its luciddrag.json: e.g. CFG 1
        and w_edit 1000 for ShapesWorld); explicit overrides win."""
        rec = model_defaults(model)
        base: dict[str, Any] = {k: rec[k] for k in ("steps", "guidance_scale", "critic_ensemble") if k in rec}
        if "guidance" in rec:
            g = rec["guidance"]
            base.update(w_edit=g.w_edit, w_content=g.w_content, w_inpaint=g.w_inpaint)
        return cls(model=model, **{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def context(self, artifacts_dir: Path):
        """The agent's run context: the model's recommended settings (critic calibration, region drags, ...), then
        the panel's values on top. Without an LLM the offline locator and reasoner are used, so the app works on a
        fresh machine; with an endpoint or key, the LLM-backed ones."""
        llm = None
        if self.llm_configured:
            llm = LLMSettings.from_env(base_url=self.llm_base_url, model=self.llm_model or None,
                                       api_key=self.llm_api_key)
        rec = model_defaults(self.model)
        rec_guidance = rec.pop("guidance").model_dump() if "guidance" in rec else {}
        guidance = GuidanceConfig(**{**rec_guidance, "w_edit": self.w_edit, "w_content": self.w_content,
                                     "w_inpaint": self.w_inpaint})
        panel: dict[str, Any] = dict(model=self.model, device=self.device, steps=self.steps,
                                     guidance_scale=self.guidance_scale, seed=self.seed, guidance=guidance, k=self.k,
                                     max_attempts=self.max_attempts, locator="auto" if llm else "offline",
                                     reasoner="llm" if llm else "offline", llm=llm, artifacts_dir=str(artifacts_dir))
        if self.critic_ensemble is not None:
            panel["critic_ensemble"] = self.critic_ensemble
        return AgentContext(**{**rec, **panel})


# -- session ------------------------------------------------------------------------------------------------------------

@dataclass
class GalleryItem:
    path: str
    label: str


@dataclass
class Pending:
    """A drag-graph run paused at its `choose` interrupt after "Reason": resumed by "Edit" if nothing changed."""

    thread_id: str
    signature: str
    intentions: list[dict]
    used: bool = False  # resumed once; later Edits with the same drag reuse the intentions without reasoning again


@dataclass
class Session:
    id: str
    dir: Path
    image: Image.Image | None = None  # the image being clicked on, RGB, at its own resolution
    image_ref: ImageRef | None = None
    points: list[Point] = field(default_factory=list)  # handle, target, handle, target, ...
    mask: np.ndarray | None = None  # HxW bool editable region, or None
    pending: Pending | None = None
    gallery: list[GalleryItem] = field(default_factory=list)
    result: Image.Image | None = None
    result_path: Path | None = None
    runs: int = 0  # drag-graph runs so far (each gets its own thread id)
    chat_waiting: bool = False  # the chat thread is paused at its "which one did you mean?" interrupt

    @classmethod
    def new(cls, root: Path) -> Session:
        sid = uuid.uuid4().hex
        d = root / "sessions" / sid
        d.mkdir(parents=True, exist_ok=True)
        return cls(id=sid, dir=d)

    @property
    def chat_thread(self) -> str:
        return f"web-{self.id}"

    def next_edit_thread(self) -> str:
        self.runs += 1
        return f"web-{self.id}-edit-{self.runs}"

    def set_image(self, image: Image.Image, ref: ImageRef) -> None:
        self.image, self.image_ref = image, ref
        self.points, self.mask, self.pending = [], None, None

    def pairs(self) -> list[tuple[Point, Point]]:
        return [(self.points[i], self.points[i + 1]) for i in range(0, len(self.points) - 1, 2)]

    def signature(self, prompt: str | None) -> str:
        """What a paused Reason depends on: if any of it changed, "Edit" reasons afresh."""
        mask = None if self.mask is None else int(np.packbits(self.mask).sum())
        return json.dumps([self.image_ref.sha256 if self.image_ref else None, self.points, mask, prompt or ""])

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- coordinates and drawing ------------------------------------------------------------------------------------------

def display_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size an image is shown at: small images enlarged by a whole factor (crisp pixels), big ones reduced."""
    w, h = size
    if min(w, h) < DISPLAY_SIDE:
        s = math.ceil(DISPLAY_SIDE / min(w, h))
        if max(w, h) * s > 2 * MAX_DISPLAY_SIDE:  # very elongated small images: cap
            s = max(1, (2 * MAX_DISPLAY_SIDE) // max(w, h))
        return w * s, h * s
    if max(w, h) > MAX_DISPLAY_SIDE:
        f = MAX_DISPLAY_SIDE / max(w, h)
        return max(1, round(w * f)), max(1, round(h * f))
    return w, h


def to_image_px(xy: tuple[float, float], image_size: tuple[int, int], shown_size: tuple[int, int]) -> Point:
    """A click at display pixel (x, y) -> the image pixel under it (integer, clamped to the image)."""
    (w, h), (dw, dh) = image_size, shown_size
    x = int(math.floor(xy[0] * w / dw))
    y = int(math.floor(xy[1] * h / dh))
    return min(max(x, 0), w - 1), min(max(y, 0), h - 1)


def to_display_px(p: tuple[float, float], image_size: tuple[int, int], shown_size: tuple[int, int]) -> tuple[float, float]:
    """Image pixel centre -> display coordinates of that pixel's centre (drawing uses pixel-centre coordinates)."""
    (w, h), (dw, dh) = image_size, shown_size
    return (p[0] + 0.5) * dw / w - 0.5, (p[1] + 0.5) * dh / h - 0.5


def enlarge(image: Image.Image) -> Image.Image:
    """The image at its display size (nearest-neighbour when enlarging: ShapesWorld pixels stay crisp)."""
    size = display_size(image.size)
    if size == image.size:
        return image.convert("RGB")
    resample = Image.Resampling.NEAREST if size[0] > image.width else Image.Resampling.LANCZOS
    return image.convert("RGB").resize(size, resample)


def dim_outside(display: Image.Image, mask: np.ndarray) -> Image.Image:
    """Darken everything outside the editable region, as drag editors show it."""
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize(display.size, Image.Resampling.NEAREST)
    dark = Image.blend(display, Image.new("RGB", display.size, (0, 0, 0)), 0.55)
    return Image.composite(display, dark, m)


def render_canvas(image: Image.Image, points: list[Point], mask: np.ndarray | None = None) -> Image.Image:
    """What the user clicks on: the enlarged image, dimmed outside the mask, with numbered drag pairs (a lone handle
    waiting for its target is drawn as its numbered dot)."""
    shown = enlarge(image)
    if mask is not None and mask.any():
        shown = dim_outside(shown, mask)
    pts = [to_display_px(p, image.size, shown.size) for p in points]
    pairs = [(pts[i], pts[i + 1]) for i in range(0, len(pts) - 1, 2)]
    if len(pts) % 2:
        pairs.append((pts[-1], pts[-1]))  # zero-length: dot and ring, no arrow
    if not pairs:
        return shown
    overlay = drag_overlay(shown.size, pairs)
    return Image.alpha_composite(shown.convert("RGBA"), overlay).convert("RGB")


def framed(image: Image.Image, verdict: str) -> Image.Image:
    """An attempt for the gallery: enlarged, with a coloured frame by verdict (green = the accepted result)."""
    shown = enlarge(image)
    width = max(4, min(shown.size) // 40)
    return ImageOps.expand(shown, border=width, fill=VERDICT_COLOURS.get(verdict, VERDICT_COLOURS["pending"]))


def attempt_caption(n: int, attempt: Any, role: str) -> str:
    """Gallery caption: number, role (accepted / rejected / best effort / being judged), critic score, intention."""
    md = getattr(attempt, "md_px", None)
    frac = getattr(attempt, "md_fraction", None)
    score = f"{md:.1f} px from target ({frac:.0%} of the drag)" if md is not None and frac is not None else "not scored"
    q = f", fidelity {attempt.quality:.2f}" if getattr(attempt, "quality", None) is not None else ""
    mark = {"accepted": "✓ ACCEPTED", "rejected": "✗ rejected", "best": "⚠ best effort, not accepted",
            "pending": "… judging"}[role]
    return f"{n}. {mark} — {attempt.intention} · {score}{q}"


def points_from_text(text: str) -> list[Point]:
    """'[[hx, hy], [tx, ty], ...]' or 'hx,hy tx,ty ...' -> points (the API's way to set what clicks set)."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        flat = [tuple(p) for p in data]
    except (ValueError, TypeError):
        import re

        flat = [(float(a), float(b)) for a, b in re.findall(r"(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)", text)]
    try:
        return [(int(round(float(x))), int(round(float(y)))) for x, y in flat]
    except (ValueError, TypeError):
        raise InputError(f"points {text!r}: write them as [[hx, hy], [tx, ty], ...]") from None


def check_points(points: list[Point], size: tuple[int, int]) -> None:
    """The web app's own checks before any model work (the graph re-validates with the engine's rules)."""
    if not points:
        raise InputError("no drag yet: click a handle point on the image, then where it should go")
    if len(points) % 2:
        raise InputError(f"drag {len(points) // 2 + 1} has a handle but no target: click where it should go")
    w, h = size
    for x, y in points:
        if not (0 <= x < w and 0 <= y < h):
            raise InputError(f"point ({x}, {y}) is outside the {w}x{h} image")
