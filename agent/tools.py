"""The agent's tools: locator, reasoner, sampler, scorer.

Each is a plain typed function that the graph's nodes call with the run's context. (The chat model's tools are the
chat actions in agent/grammar.py; these functions are not exposed to it directly.)
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from luciddrag.agent.context import AgentContext
from luciddrag.agent.serving.client import get_sampler
from luciddrag.engine.pipeline import DragEditor, EditResult, StepEvent, quality_guidance_terms
from luciddrag.engine.request import EditRequest, QualityGuidance
from luciddrag.engine.tracking import point_distances, track_points
from luciddrag.tools.schemas import DragPoints, Intention

_lock = threading.Lock()


@functools.lru_cache(maxsize=2)
def _editor(model: str, device: str | None, dtype: str | None) -> DragEditor:
    return DragEditor.from_pretrained(model, device=device, dtype=dtype, show_progress=False)


def get_editor(ctx: AgentContext) -> DragEditor:
    """One loaded model per (model, device, dtype), shared by every run in the process."""
    with _lock:
        return _editor(ctx.model, ctx.device, ctx.dtype)


def flat_points(drags: DragPoints) -> list[tuple[float, float]]:
    return [p for pair in drags.pairs for p in (pair.handle, pair.target)]


def sample_intentions(ctx: AgentContext, image: Image.Image, drags: DragPoints, mask: np.ndarray | None,
                      intentions: Sequence[Intention], progress: Callable[[StepEvent], None] | None = None,
                      regions: Sequence[np.ndarray | None] | None = None,
                      motion: str | None = None, scale_direction: str | None = None,
                      region_scale: float | None = None) -> EditResult:
    """The sampler: one edit per intention, all in one batch from one inversion per distinct source prompt.

    `regions`: per drag, the object mask that follows the handle (or None: a patch around the point), translated or
    scaled as `motion` says ("translate" / "scale" / "similarity" = resized by `region_scale` where one drag is on
    a region, and moved; None: a patch drag, which has no region). Which guidance terms
    apply (quality guidance for this kind of drag or not) is the engine's decision."""
    req = EditRequest.create(image=image, points=flat_points(drags), mask=mask, steps=ctx.steps,
                             handle_masks=list(regions) if regions is not None else None,
                             region_motion=motion or "translate", scale_direction=scale_direction,
                             region_scale=region_scale, fast=ctx.fast,
                             guidance_scale=ctx.guidance_scale, seed=ctx.seed, guidance=ctx.guidance,
                             quality=quality_request(ctx))
    pairs = [(i.source_prompt, i.target_prompt) for i in intentions]
    if (remote := get_sampler(ctx)) is not None:  # LUCIDDRAG_SAMPLER: on the Ray Serve deployment (agent/serving)
        return remote.edit(req, pairs, model=ctx.model)
    editor = get_editor(ctx)
    editor.show_progress = ctx.show_progress
    with _lock:  # one edit at a time per loaded model: the memory bank lives on the UNet's processors
        return editor.edit(req, intentions=pairs, callback=progress)


def quality_request(ctx: AgentContext) -> QualityGuidance | None:
    """The context's discriminator choice, handed to the engine (which applies it per kind of drag)."""
    if not ctx.discriminator:
        return None
    return QualityGuidance(discriminator=ctx.discriminator, weight=ctx.w_quality, steps=ctx.quality_steps,
                           motions=ctx.quality_motions)


def quality_terms_for(ctx: AgentContext, editor: DragEditor, motion: str | None = None) -> list:
    """The quality terms the engine adds for this context and kind of drag (translate / scale / patch; None: any)."""
    quality = quality_request(ctx)
    return [] if quality is None else quality_guidance_terms(quality, editor.c, motion)


def score_drag(ctx: AgentContext, original: Image.Image, edited: Image.Image, drags: DragPoints,
               prompt: str = "") -> dict[str, Any]:
    """The scorer: track each handle's content into the edited image (DIFT features of the base UNet) and measure
    how far it landed from its target, in pixels and as a fraction of the drag's length."""
    radii = None
    if ctx.critic_search is not None:
        floor = 0.05 * min(original.size)
        radii = [max(ctx.critic_search * p.length, floor) for p in drags.pairs]
    if (remote := get_sampler(ctx)) is not None:  # the deployment has the model: track there too
        found = remote.track(ctx, original, edited, [p.handle for p in drags.pairs], prompt=prompt, radii=radii)
    else:
        editor = get_editor(ctx)
        with _lock:
            found = track_points(editor.c, original, edited, [p.handle for p in drags.pairs], prompt=prompt,
                                 t=ctx.critic_timestep, up_block=ctx.critic_block, ensemble=ctx.critic_ensemble,
                                 seed=ctx.seed, radii=radii)
    dists = point_distances(found, [p.target for p in drags.pairs])
    fractions = [d / max(p.length, 1e-6) for d, p in zip(dists, drags.pairs)]
    return {"tracked": found, "md_px": float(np.mean(dists)), "md_fraction": float(np.mean(fractions))}
