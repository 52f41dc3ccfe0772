"""The hidden-intent agent suite: ShapesWorld drags whose meaning the agent is *not* told.

The drag suite (drag_eval) tells the engine the family and gives it the task's mask, so it measures the sampler.
Here the agent sees only the image, the points and (for half the tasks) a user mask, and is scored by the exact
scorer against the hidden ground truth. Families: ``move``, ``resize`` (grow and shrink about the centre) and
``move+resize`` (the shape moves and changes size), each with one or two drag points, with and without a mask
(alternating, so every family has all four variants).

Rows (the issue's (a)-(d)):
- ``plain``: one edit, empty prompts, a patch drag around each point (DragonDiffusion-style baseline, no reasoning);
- ``top1``: the reasoner's most confident intention, one attempt (the agent graph's first attempt);
- ``agent``: the full agent graph, up to ``attempts`` attempts with its critic (DIFT tracking + the region critic);
- ``oracle``: told the family (the drag suite's setting: the task's prompts, the shape's mask, the right motion).
``top1`` is the agent's first attempt (argmax selection is deterministic), so it costs nothing extra.

    luciddrag eval agent-shapes --n 60 --out runs/agent-shapes
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel

from luciddrag.agent.nodes import word_factor
from luciddrag.engine.request import DragPair, EditRequest, GuidanceConfig
from luciddrag.evals.shapesworld import world
from luciddrag.evals.shapesworld.scoring import TaskScore, score_task
from luciddrag.evals.shapesworld.tasks import (MOVE_LENGTH_RANGE, DragTask, SpecModel, _changed, _placeable,
                                               edge_drags, make_move_task, make_resize_task)

AGENT_SEED_BASE = 890_000_000  # held out: the drag suite uses 8e8 (+5e7), the critic 8.7e8 / 8.8e8, synthesis 7e8
FAMILY_OFFSET = {"move": 0, "resize": 1_000_000, "move+resize": 2_000_000}
Family = Literal["move", "resize", "move+resize"]
FAMILIES: tuple[Family, ...] = ("move", "resize", "move+resize")
ROWS = ("plain", "top1", "agent", "oracle")


class AgentTask(BaseModel):
    """A drag task plus how it is posed: how many points, whether a user mask is given. ``task.family`` is the
    scorer's ("resize" checks the size, so move+resize tasks are scored as resizes with a moved centroid)."""

    family: Family
    intent: Literal["move", "grow", "shrink", "move+grow", "move+shrink"]
    n_points: int
    use_mask: bool
    task: DragTask


# --------------------------------------------------------------------------------------------------- tasks


def second_move_drag(task: DragTask, rng: np.random.Generator) -> DragTask:
    """The same move with a second handle inside the shape (the same displacement), as far from the first as the
    shape allows: two points say "move the whole thing" more clearly than one."""
    inner = np.argwhere(world.erode(task.source_mask(), 1))
    d = task.drags[0]
    dx, dy = d.target[0] - d.handle[0], d.target[1] - d.handle[1]
    far = np.hypot(inner[:, 1] - d.handle[0], inner[:, 0] - d.handle[1])
    pick = inner[rng.choice(np.argsort(far)[-max(1, len(far) // 4):])]
    hy, hx = float(pick[0]), float(pick[1])
    return task.model_copy(update={"drags": [d, DragPair(handle=(hx, hy), target=(hx + dx, hy + dy))]})


def make_move_resize_task(scene: world.Scene, rng: np.random.Generator, task_id: str, n_shapes: int,
                          n_points: int = 1, tries: int = 200) -> DragTask | None:
    """The shape moves by d and changes size class (small <-> big); handles on its edge along rays from the
    centroid, targets where those edge points land: c + d + s (p - c)."""
    size = scene.size
    k = int(rng.integers(len(scene.shapes)))
    shp = scene.shapes[k]
    others = [s.spec for i, s in enumerate(scene.shapes) if i != k]
    new_word = "big" if shp.size_word == "small" else "small"
    lo_s, hi_s = world.SIZE_RANGES[new_word]
    lo, hi = (v * size / 64 for v in MOVE_LENGTH_RANGE)
    for _ in range(tries):
        length, angle = rng.uniform(lo, hi), rng.uniform(0, 2 * math.pi)
        dx, dy = round(length * math.cos(angle)), round(length * math.sin(angle))
        new = shp.spec.resized(float(rng.uniform(lo_s, hi_s)) * size).moved(dx, dy)
        if not _placeable(new, others, size):
            continue
        gt = world.scene_shape(new, size, size)
        drags = edge_drags(shp.spec, new, rng.uniform(0, 2 * math.pi), n_points)
        tgt_caption = world.join_descriptions(
            [gt.description() if i == k else s.description() for i, s in enumerate(scene.shapes)])
        src_words = f"{shp.size_word} {shp.position}"
        return DragTask(
            task_id=task_id, family="resize", scene_seed=int(scene.seed), image_size=size, n_shapes=n_shapes,
            edited_index=k, drags=drags, source=SpecModel.of(shp.spec), target=SpecModel.of(new),
            expected_centroid=gt.centroid, original_centroid=shp.centroid, expected_size=new.size,
            original_size=shp.size, source_prompt=scene.caption, target_prompt=tgt_caption,
            changed_words=_changed(src_words, f"{gt.size_word} {gt.position}"))
    return None


def _intent(family: Family, task: DragTask) -> str:
    if family == "move":
        return "move"
    grow = "grow" if task.expected_size > task.original_size else "shrink"
    return grow if family == "resize" else f"move+{grow}"


def generate_agent_tasks(n_per_family: int, seed_base: int = AGENT_SEED_BASE,
                         families: Sequence[Family] = FAMILIES, size: int = 64) -> list[AgentTask]:
    """``n_per_family`` tasks per family from consecutive scene seeds; task i of a family has 1 + (i // 2) % 2 drag
    points and a user mask when i is odd, so the four variants are balanced."""
    out: list[AgentTask] = []
    for fam in families:
        seed, made = seed_base + FAMILY_OFFSET[fam], 0
        while made < n_per_family:
            n_points, use_mask = 1 + (made // 2) % 2, made % 2 == 1
            rng = np.random.default_rng(seed)
            n_shapes = int(rng.integers(1, world.MAX_SHAPES + 1))
            scene = world.render_scene(seed, size, n_shapes)
            task_rng = np.random.default_rng([seed, 1])
            tid = f"{fam}-{made:03d}"
            if fam == "move":
                task = make_move_task(scene, task_rng, tid, n_shapes)
                if task is not None and n_points == 2:
                    task = second_move_drag(task, task_rng)
            elif fam == "resize":
                task = make_resize_task(scene, task_rng, tid, n_shapes, n_points)
            else:
                task = make_move_resize_task(scene, task_rng, tid, n_shapes, n_points)
            seed += 1
            if task is None:
                continue
            out.append(AgentTask(family=fam, intent=_intent(fam, task), n_points=n_points, use_mask=use_mask,
                                 task=task))
            made += 1
    return out


# --------------------------------------------------------------------------------------------------- rows


def plain_request(at: AgentTask, steps: int, guidance: GuidanceConfig, guidance_scale: float,
                  seed: int = 0) -> EditRequest:
    """Row (a): empty prompts, a patch drag around each point, the user mask if any."""
    t = at.task
    return EditRequest.create(image=t.scene().image, points=t.points, mask=t.editable_mask() if at.use_mask else None,
                              source_prompt="", target_prompt="", steps=steps, seed=seed,
                              guidance_scale=guidance_scale, guidance=guidance)


def oracle_request(at: AgentTask, steps: int, guidance: GuidanceConfig, guidance_scale: float,
                   seed: int = 0, size_change: float = 1.9) -> EditRequest:
    """Row (d): told the family -- the task's own prompts, the shape's mask carried by the drags: translated for a
    move, scaled for a resize, resized and moved for a move+resize (the "similarity" motion: one drag takes its
    factor from the size word, `size_change` or its reciprocal, as the agent does; two fit their own)."""
    t = at.task
    motion = {"move": "translate", "resize": "scale", "move+resize": "similarity"}[at.family]
    direction = None if at.family == "move" else "grow" if at.intent.endswith("grow") else "shrink"
    factor = word_factor(size_change, direction) if motion == "similarity" else None
    # a resize's drags on the edge already say which way it goes; a one-point move+resize needs the word
    return EditRequest.create(image=t.scene().image, points=t.points, mask=t.editable_mask() if at.use_mask else None,
                              handle_masks=[t.source_mask()] * len(t.drags), region_motion=motion,
                              scale_direction=direction if motion == "similarity" else None, region_scale=factor,
                              source_prompt=t.source_prompt, target_prompt=t.target_prompt, steps=steps, seed=seed,
                              guidance_scale=guidance_scale, guidance=guidance)


def run_agent(graph: Any, ctx: Any, at: AgentTask) -> dict[str, Any]:
    """The agent graph on one task: the first attempt's image (row b), the returned result (row c), and the trail."""
    from luciddrag.agent.artifacts import ArtifactStore

    t = at.task
    inp: dict[str, Any] = {"image": t.scene().image, "points": t.points}
    if at.use_mask:
        inp["mask"] = Image.fromarray(t.editable_mask().astype(np.uint8) * 255)
    state = graph.invoke(inp, context=ctx)
    attempts = state["attempts"]
    return {"first": ArtifactStore.get_image(attempts[0].image), "result": ArtifactStore.get_image(state["result"]),
            "attempts": len(attempts), "accepted": bool(state.get("accepted")),
            "trail": [{"intention": a.intention, "verdict": a.verdict, "reason": a.reason} for a in attempts],
            "intentions": [i.intention for i in state["intentions"]]}


class TaskRecord(BaseModel):
    task_id: str
    family: Family
    intent: str
    n_points: int
    use_mask: bool
    scores: dict[str, TaskScore]
    attempts: int
    accepted: bool
    trail: list[dict[str, str]]
    intentions: list[str]
    seconds: float


def _rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def run_suite(tasks: Sequence[AgentTask], editor: Any, ctx: Any, rows: Sequence[str] = ROWS,
              keep_images: int = 0, progress: bool = True,
              on_record: Callable[[TaskRecord], None] | None = None) -> tuple[list[TaskRecord], list[dict]]:
    """Every row on every task; records and the first ``keep_images`` tasks' images (per row)."""
    from tqdm.auto import tqdm

    from luciddrag.agent.graph import build_graph

    graph = build_graph()
    guidance, cfg = ctx.guidance, ctx.guidance_scale
    records, kept = [], []
    for at in tqdm(tasks, desc="agent suite", disable=not progress):
        t0 = time.perf_counter()
        ims: dict[str, Image.Image] = {}
        if "plain" in rows:
            ims["plain"] = editor.edit(plain_request(at, ctx.steps, guidance, cfg, ctx.seed)).image
        run = None
        if "top1" in rows or "agent" in rows:
            run = run_agent(graph, ctx, at)
            ims["top1"], ims["agent"] = run["first"], run["result"]
        if "oracle" in rows:
            ims["oracle"] = editor.edit(oracle_request(at, ctx.steps, guidance, cfg, ctx.seed, ctx.size_change)).image
        ims = {r: ims[r] for r in rows if r in ims}
        rec = TaskRecord(task_id=at.task.task_id, family=at.family, intent=at.intent, n_points=at.n_points,
                         use_mask=at.use_mask, scores={r: score_task(at.task, _rgb(im)) for r, im in ims.items()},
                         attempts=run["attempts"] if run else 0, accepted=run["accepted"] if run else False,
                         trail=run["trail"] if run else [], intentions=run["intentions"] if run else [],
                         seconds=time.perf_counter() - t0)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        if len(kept) < keep_images:
            kept.append({"task": at, "images": ims})
    return records, kept


# --------------------------------------------------------------------------------------------------- tables


def row_stats(records: Sequence[TaskRecord], row: str) -> dict[str, float | int | None]:
    """Success, MD, preservation, ghosts, identity (and, for the agent, attempts used) of one row."""
    sc = [r.scores[row] for r in records if row in r.scores]
    if not sc:
        return {"n": 0}
    md = [s.md_px for s in sc if s.md_px is not None]
    mdf = [s.md_frac for s in sc if s.md_frac is not None]
    se = [abs(s.size_error_px) for s in sc if s.size_error_px is not None]
    out: dict[str, float | int | None] = {
        "n": len(sc), "success": float(np.mean([s.success for s in sc])),
        "md_px": float(np.mean(md)) if md else None, "md_frac": float(np.mean(mdf)) if mdf else None,
        "size_err_px": float(np.mean(se)) if se else None,
        "preservation": float(np.mean([s.preservation_psnr for s in sc])),
        "ghost_rate": float(np.mean([s.ghost_fraction >= 0.10 for s in sc])),
        "identity": float(np.mean([s.identity_kept for s in sc]))}
    if row == "agent":
        out["attempts"] = float(np.mean([r.attempts for r in records]))
        out["accepted"] = float(np.mean([r.accepted for r in records]))
    elif row == "top1":
        out["attempts"] = 1.0
    return out


def table(records: Sequence[TaskRecord], rows: Sequence[str] = ROWS) -> str:
    """Markdown: one line per row and family, then every family together."""
    label = {"plain": "(a) plain drag", "top1": "(b) reasoner top-1", "agent": "(c) agent, <=3 attempts",
             "oracle": "(d) oracle (told the family)"}
    lines = ["| row | family | n | success | MD px | MD / drag | size err px | preservation dB | ghost rate | "
             "identity | attempts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p="{:.3g}": "-" if v is None else p.format(v)  # noqa: E731
    fams = [fam for fam in FAMILIES if any(r.family == fam for r in records)] + ["all"]
    for row in rows:
        for fam in fams:
            s = row_stats([r for r in records if fam == "all" or r.family == fam], row)
            if not s.get("n"):
                continue
            lines.append(f"| {label.get(row, row)} | {fam} | {s['n']} | {f(s['success'], '{:.0%}')} | "
                         f"{f(s['md_px'])} | {f(s['md_frac'], '{:.0%}')} | {f(s['size_err_px'])} | "
                         f"{f(s['preservation'], '{:.1f}')} | {f(s['ghost_rate'], '{:.0%}')} | "
                         f"{f(s['identity'], '{:.0%}')} | {f(s.get('attempts'), '{:.2f}')} |")
    return "\n".join(lines)


def breakdown(records: Sequence[TaskRecord], rows: Sequence[str] = ROWS) -> str:
    """Success by intent, by number of points and with / without a user mask."""
    groups: list[tuple[str, Callable[[TaskRecord], bool]]] = []
    for intent in ("move", "grow", "shrink", "move+grow", "move+shrink"):
        groups.append((intent, lambda r, i=intent: r.intent == i))
    groups += [("1 point", lambda r: r.n_points == 1), ("2 points", lambda r: r.n_points == 2),
               ("user mask", lambda r: r.use_mask), ("no mask", lambda r: not r.use_mask)]
    lines = ["| tasks | n | " + " | ".join(rows) + " |", "|---|---|" + "---|" * len(rows)]
    for name, pick in groups:
        sub = [r for r in records if pick(r)]
        if sub:
            lines.append(f"| {name} | {len(sub)} | " + " | ".join(
                f"{np.mean([r.scores[row].success for r in sub if row in r.scores]):.0%}" for row in rows) + " |")
    return "\n".join(lines)


def sheet(kept: Sequence[dict]) -> Image.Image:
    """Rows: tasks; columns: the input with its drags (and mask), then each row's result with its score."""
    from luciddrag.tools.drawing import draw_drags
    from luciddrag.tools.sheet import contact_sheet

    tiles: list[tuple[str, Image.Image]] = []
    cols = 1
    for item in kept:
        at: AgentTask = item["task"]
        t = at.task
        pairs = [(d.handle, d.target) for d in t.drags]
        mask = t.editable_mask() if at.use_mask else None
        tiles.append((f"{t.task_id} {at.intent}{' +mask' if at.use_mask else ''}",
                      draw_drags(t.scene().image, pairs, mask=mask, min_side=256)))
        for row, im in item["images"].items():
            s = score_task(t, _rgb(im))
            tiles.append((f"{row}: {'ok' if s.success else 'fail'}"
                          + (f", MD {s.md_px:.1f}" if s.md_px is not None else ", lost"), im))
        cols = 1 + len(item["images"])
    return contact_sheet(tiles, tile_height=160, columns=cols)


def load_records(paths: Sequence[Path]) -> list[TaskRecord]:
    """Records from one or more ``agent_shapes.json`` files (e.g. runs split over processes)."""
    out: list[TaskRecord] = []
    for p in paths:
        out += [TaskRecord.model_validate(r) for r in json.loads(Path(p).read_text())["records"]]
    return out


def write_report(out: Path, records: Sequence[TaskRecord], meta: dict[str, Any], kept: Sequence[dict] = ()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_shapes.json").write_text(json.dumps({**meta, "records": [r.model_dump() for r in records]}))
    rows = [r for r in ROWS if any(r in rec.scores for rec in records)]
    (out / "agent_shapes.md").write_text(table(records, rows) + "\n\n" + breakdown(records, rows) + "\n")
    if kept:
        sheet(kept).save(out / "agent_shapes_sheet.png")
