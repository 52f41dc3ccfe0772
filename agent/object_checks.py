"""The critique node's object-level checks: the region critic and the optional vision-LLM judge.

Kept beside the node (agent/nodes.py calls ``object_checks``) so the node stays one read: each check is a pair
(passed, what it measured), and a rejection names the checks that failed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from luciddrag.agent.context import AgentContext
from luciddrag.tools.schemas import DragPoints

Check = tuple[bool, str]


def _groups(regions: Sequence[np.ndarray | None], n: int) -> list[tuple[np.ndarray, list[int]]]:
    """Drags grouped by the object under their handle (two handles on one object are judged together)."""
    out: list[tuple[np.ndarray, list[int]]] = []
    for i in range(n):
        m = regions[i] if i < len(regions) else None
        if m is None:
            continue
        for region, idx in out:
            if region.shape == m.shape and np.array_equal(region, m):
                idx.append(i)
                break
        else:
            out.append((m, [i]))
    return out


def region_checks(ctx: AgentContext, original: Image.Image, edited: Image.Image, drags: DragPoints,
                  regions: Sequence[np.ndarray | None] | None, motion: str | None) -> list[Check] | None:
    """The region critic for an intention that moves or resizes whole objects; None where it does not apply (a
    patch drag, no located object, or switched off), so the handle-tracking check stays the arrival check."""
    if not ctx.critic_regions or motion is None or not regions:
        return None
    from luciddrag.tools.critic import RegionCriticConfig, region_check

    groups = _groups(regions, len(drags.pairs))
    if not groups:
        return None
    cfg = ctx.region_critic or RegionCriticConfig()
    if isinstance(cfg, dict):  # a server's JSON context
        cfg = RegionCriticConfig(**cfg)
    checks: list[Check] = []
    for region, idx in groups:
        pairs = [drags.pairs[i] for i in idx]
        kind = motion if motion in ("translate", "scale") else None
        v = region_check(original, edited, region, [p.handle for p in pairs], [p.target for p in pairs],
                         motion=kind, config=cfg, search=ctx.critic_search)  # type: ignore[arg-type]
        checks.append((v.ok, "region: " + ", ".join(v.reasons)))
    return checks


def judge_check(ctx: AgentContext, original: Image.Image, edited: Image.Image, drags: DragPoints,
                intention: str) -> tuple[Check | None, str | None]:
    """The vision-LLM judge's check when ``ctx.judge`` asks for it: ('auto': when an LLM is configured). Returns
    (check or None, warning or None); a service failure is a warning in 'auto' and a failed check in 'llm'."""
    if ctx.judge == "off":
        return None, None
    from luciddrag.tools.judge import JudgeConfig, JudgeError, judge_edit
    from luciddrag.tools.llm import LLMSettings

    settings = ctx.llm or LLMSettings.from_env()
    if not settings.configured:
        if ctx.judge == "llm":
            return (False, "judge: no LLM configured (OPENAI_API_KEY / OPENAI_BASE_URL)"), None
        return None, None
    try:
        v = judge_edit(original, edited, drags, intention, JudgeConfig(llm=settings))
    except JudgeError as exc:
        if ctx.judge == "llm":
            return (False, f"judge failed: {exc}"), None
        return None, f"judge skipped: {exc}"
    ok = v.dragged and v.intact and v.score >= ctx.min_judge_score
    return (ok, f"judge: {'moved' if v.dragged else 'not moved'}, {'intact' if v.intact else 'damaged'}, "
                f"score {v.score}/10"), None


def object_checks(ctx: AgentContext, checks: list[Check], original: Image.Image, edited: Image.Image,
                  drags: DragPoints, regions: Sequence[np.ndarray | None] | None, motion: str | None,
                  intention: str, warnings: list[str] | None = None) -> list[Check]:
    """``checks`` (the node's: handle tracking first, then fidelity) with the object-level checks folded in: where
    the region critic applies it replaces handle tracking as the arrival check (tracking cannot see a 2-4 px resize,
    under its 4 px feature stride) and tracking's reading is kept as information; the judge is added when on."""
    out = list(checks)
    region = region_checks(ctx, original, edited, drags, regions, motion)
    if region is not None and out:
        _, tracking_text = out[0]
        out = region + [(True, f"tracking (not used for a whole-object {motion}): {tracking_text}")] + out[1:]
    judged, note = judge_check(ctx, original, edited, drags, intention)
    if judged is not None:
        out.append(judged)
    if note and warnings is not None:
        warnings.append(note)
    return out

