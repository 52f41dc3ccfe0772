"""ShapesWorld's side of the discriminator's data recipe: drag tasks as the source, the world's exact fidelity score
as the scorer, and deliberately broken edits for checking the critic.

The fidelity score (0-10, threshold 5, the same scale as the aesthetic predictor's) looks only at image fidelity,
not at drag accuracy: a shape that did not move is a faithful image, a smeared or recoloured one, a left-behind copy,
speckle blobs or a damaged background are not.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from luciddrag.agent.context import AgentContext, model_defaults
from luciddrag.agent.tools import score_drag
from luciddrag.engine.discriminator import load_discriminator, read_config, score_images, write_config
from luciddrag.engine.loading import load_components
from luciddrag.engine.metrics import roc_auc
from luciddrag.engine.pipeline import DragEditor
from luciddrag.engine.request import GuidanceConfig
from luciddrag.engine.training.data import SourceItem
from luciddrag.evals.shapesworld import MODEL_DIR, world
from luciddrag.evals.shapesworld.drag_eval import config_request
from luciddrag.evals.shapesworld.scoring import GHOST_THRESHOLD, TaskScore, score_task
from luciddrag.evals.shapesworld.tasks import DragTask, generate_tasks
from luciddrag.tools.schemas import DragPoints

SYNTH_SEED_BASE = 700_000_000  # disjoint from training scenes of seed 0, the drag suite (8e8) and quality (9e8)
CRITIC_SEED_BASE = 870_000_000  # held-out scenes for calibrating / checking the critic
PSNR_LOW, PSNR_HIGH = 18.0, 26.0  # background PSNR mapped to 0..1 (22 dB = the middle)


def fidelity_score(s: TaskScore) -> float:
    """10 x integrity x min(ghost term, background term).

    integrity: the edited shape is found with its class and colour, and nothing new appeared (extra objects);
    ghost term (moves only; for a resize a left-over is indistinguishable from 'did not shrink', an accuracy
    failure): 1 - ghost / (2 x GHOST_THRESHOLD), so the scorer's ghost threshold sits at 5;
    background term: preservation PSNR mapped linearly from PSNR_LOW..PSNR_HIGH to 0..1.
    """
    if not (s.found and s.identity_kept and s.extra_objects == 0):
        return 0.0
    g = 1.0 if s.family != "move" else float(np.clip(1 - s.ghost_fraction / (2 * GHOST_THRESHOLD), 0, 1))
    p = float(np.clip((s.preservation_psnr - PSNR_LOW) / (PSNR_HIGH - PSNR_LOW), 0, 1))
    return 10.0 * min(g, p)


class ShapesWorldScorer:
    """The world's exact fidelity score of an edit of a ShapesWorld task (the item's payload)."""

    name = "shapesworld-fidelity"
    threshold = 5.0

    def score(self, item: SourceItem, edited: Image.Image) -> tuple[float, dict]:
        task: DragTask = item.payload
        s = score_task(task, np.asarray(edited.convert("RGB")))
        return fidelity_score(s), {"psnr": s.preservation_psnr, "ghost": s.ghost_fraction,
                                   "identity": s.identity_kept, "extra": s.extra_objects, "md_px": s.md_px,
                                   "family": task.family}


def task_item(task: DragTask) -> SourceItem:
    sc = task.scene()
    return SourceItem(key=task.task_id, image=sc.image, caption=task.source_prompt,
                      drags=[(d.handle, d.target) for d in task.drags], mask=task.editable_mask(), payload=task)


def source(n: int, seed_base: int = SYNTH_SEED_BASE) -> Iterator[SourceItem]:
    """n items, alternating move and resize tasks (random handle on a shape, random direction and length)."""
    moves = generate_tasks("move", (n + 1) // 2, seed_base)
    resizes = generate_tasks("resize", n // 2, seed_base)
    for i in range(n):
        yield task_item(moves[i // 2] if i % 2 == 0 else resizes[i // 2])


def make(n: int, seed_base: int = SYNTH_SEED_BASE):
    """Plugin entry for `luciddrag discriminator synthesize --world shapesworld`: (items, scorer, name)."""
    return source(n, seed_base), ShapesWorldScorer(), "shapesworld"


# -- deliberately broken edits (for the critic check) -------------------------------------------------------------

BREAKS = ("ghost", "smear", "wrong_colour", "noise", "duplicate_blob")


def _paste(base: np.ndarray, src: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    out = base.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * src[mask].astype(np.float32)
    return out


def good_edit(task: DragTask) -> Image.Image:
    """The ideal result of the task (ground-truth rendering)."""
    return task.ground_truth_scene().image


def broken_edit(task: DragTask, kind: str, rng: np.random.Generator, base: Image.Image | None = None) -> Image.Image:
    """The ideal result (or `base`, e.g. a faithful engine edit of the task), damaged in one of the ways drag
    editors fail.

    ghost: a half-transparent copy of the shape left at its old place; smear: the moved shape blurred and stretched
    along the drag; wrong_colour: the moved shape recoloured off-palette (hue rotated between palette colours);
    noise: strong Gaussian noise over the edited region; duplicate_blob: an extra saturated blob near the target.
    """
    gt = np.asarray(good_edit(task) if base is None else base.convert("RGB"), dtype=np.float32)
    orig = np.asarray(task.scene().image, dtype=np.float32)
    new_m, old_m = task.target_mask(), task.source_mask()
    if kind == "ghost":
        out = _paste(gt, orig, old_m & ~new_m, float(rng.uniform(0.5, 0.8)))
    elif kind == "smear":
        im = Image.fromarray(gt.astype(np.uint8))
        d = task.drags[0]
        ang = math.degrees(math.atan2(d.target[1] - d.handle[1], d.target[0] - d.handle[0]))
        # motion blur along the drag: blur a rotated copy horizontally, rotate back, paste over the edit region
        rot = im.rotate(ang, resample=Image.Resampling.BILINEAR, center=task.expected_centroid)
        arr = np.asarray(rot, dtype=np.float32)
        k = int(rng.integers(5, 9))
        kern = np.ones(k) / k
        arr = np.apply_along_axis(lambda r: np.convolve(r, kern, mode="same"), 1, arr)
        back = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).rotate(
            -ang, resample=Image.Resampling.BILINEAR, center=task.expected_centroid)
        region = world.dilate(new_m | old_m, 3)
        out = _paste(gt, np.asarray(back.filter(ImageFilter.GaussianBlur(1.0))), region, 1.0)
    elif kind == "wrong_colour":
        import colorsys

        src = np.array(world.COLOURS[task.source.colour]) / 255.0
        h, s, v = colorsys.rgb_to_hsv(*src)
        # half-way between palette hues (e.g. orange, teal): a colour the world never draws
        h2 = (h + float(rng.choice([0.09, -0.09, 0.5]))) % 1.0
        rgb = np.array(colorsys.hsv_to_rgb(h2, s, v)) * 255
        out = gt.copy()
        out[new_m] = 0.85 * rgb + 0.15 * out[new_m]
    elif kind == "noise":
        region = world.dilate(new_m | old_m, 3)
        out = gt.copy()
        out[region] += rng.normal(0, float(rng.uniform(40, 70)), size=(int(region.sum()), 3))
    elif kind == "duplicate_blob":
        out = gt.copy()
        cx, cy = task.expected_centroid
        yy, xx = np.mgrid[0:gt.shape[0], 0:gt.shape[1]]
        r = float(rng.uniform(3, 5))
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = task.target.size / 2 + r + 1
        bx, by = cx + dist * math.cos(ang), cy + dist * math.sin(ang)
        blob = (xx - bx) ** 2 + (yy - by) ** 2 <= r * r
        out[blob] = np.array(world.COLOURS[task.source.colour], dtype=np.float32)
    else:
        raise ValueError(f"unknown break {kind!r}: one of {BREAKS}")
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


# -- critic calibration ------------------------------------------------------------------------------------------


def _best_threshold(good: np.ndarray, bad: np.ndarray) -> float:
    """The P(real) threshold maximising min(acceptance of good, rejection of broken); midpoint between scores."""
    cands = np.unique(np.concatenate([good, bad]))
    mids = np.concatenate([[cands[0] - 1e-6], (cands[1:] + cands[:-1]) / 2, [cands[-1] + 1e-6]])
    best = max(mids, key=lambda th: (min((good >= th).mean(), (bad < th).mean()), -abs(th - 0.5)))
    return float(best)


def tracking_fractions(images, tasks, prompts) -> tuple[np.ndarray, float]:
    """The critique node's other check on each image: how far from its target DIFT tracking finds each handle's
    content, as a fraction of the drag length (the model's own critic settings from luciddrag.json); and the
    fraction the node accepts."""
    ctx = AgentContext(model=str(MODEL_DIR), device="cpu", **model_defaults(MODEL_DIR))
    return np.array([score_drag(ctx, t.scene().image, im, DragPoints.from_flat(t.points), prompt=p)["md_fraction"]
                     for im, t, p in zip(images, tasks, prompts)]), ctx.accept_md_fraction


def faithful_engine_edits(n: int, seed_base: int, steps: int = 20, max_tries: int | None = None,
                          progress: bool = True, components=None) -> tuple[list[DragTask], list[Image.Image]]:
    """`n` held-out tasks (alternating move / resize) with the engine's result under the product's settings (editing +
    semantic guidance, the model's luciddrag.json) where that result is one a user keeps: the exact scorer calls it
    faithful and the shape arrived (MD <= 3 px). Tasks whose edit fails are skipped (at most `max_tries` edits).
    `components`: the ShapesWorld model already loaded (else it is loaded here)."""
    settings = model_defaults(MODEL_DIR)
    guidance, cfg_scale = settings.get("guidance", GuidanceConfig()), float(settings.get("guidance_scale", 1.0))
    editor = DragEditor(components or load_components(str(MODEL_DIR), "cpu"), show_progress=False)
    scorer = ShapesWorldScorer()
    max_tries = max_tries or 3 * n
    cands = [t for pair in zip(generate_tasks("move", max_tries, seed_base),
                               generate_tasks("resize", max_tries, seed_base)) for t in pair][:max_tries]
    tasks, ims = [], []
    bar = tqdm(cands, desc="faithful engine edits", disable=not progress, leave=False)
    for t in bar:
        im = editor.edit(config_request(t, "editing+semantic", steps, guidance, True,
                                        guidance_scale=cfg_scale)).image.convert("RGB")
        score, details = scorer.score(task_item(t), im)
        if score >= scorer.threshold and details["md_px"] is not None and details["md_px"] <= 3.0:
            tasks.append(t)
            ims.append(im)
            bar.set_postfix(kept=len(tasks))
            if len(tasks) == n:
                break
    return tasks, ims


def calibrate_critic(path, n: int = 60, write: bool = True, engine_edits: int = 0, steps: int = 20,
                     seed_base: int = CRITIC_SEED_BASE, log=print, tracking: bool = True,
                     good_from: str = "renders") -> dict:
    """Score good and deliberately broken edits of held-out tasks with the discriminator; pick the threshold on the
    even tasks, report acceptance / rejection on the odd ones, store the threshold.

    `good_from`: "renders" -- the good edits are ground-truth renderings and the broken ones are those, damaged;
    "engine" -- the good edits are faithful engine results under the product's settings (`faithful_engine_edits`),
    the broken ones are those results, damaged the same ways. "engine" is what the critique node sees in use: every
    result it judges has been through inversion and sampling, so a threshold fitted on pristine renders would mostly
    measure "was this regenerated".

    `tracking`: also report the whole critique node (handle tracked within the accepted fraction of the drag AND
    P(real) >= threshold) on the same images, plus the unedited input offered as a result (a faithful image that
    did not move: the tracking half must reject it).

    `engine_edits` > 0 also scores that many engine edits (editing guidance, `steps` steps) and reports how many of
    those the exact scorer calls faithful are accepted, and how many it calls low-fidelity are rejected.
    """
    comps = load_components(str(MODEL_DIR), "cpu")
    disc = load_discriminator(path, comps, use_cache=False)
    if good_from == "engine":
        tasks, good_ims = faithful_engine_edits(n, seed_base + 3_000_000, steps, components=comps)
        if len(tasks) < 4:
            from luciddrag.engine.errors import InputError

            raise InputError(f"only {len(tasks)} faithful engine edits in {3 * n} tries: too few to calibrate on")
        n = len(tasks)
    elif good_from == "renders":
        tasks = [t for pair in zip(generate_tasks("move", (n + 1) // 2, seed_base),
                                   generate_tasks("resize", (n + 1) // 2, seed_base)) for t in pair][:n]
        good_ims = [good_edit(t) for t in tasks]
    else:
        raise ValueError(f"good_from must be 'renders' or 'engine', not {good_from!r}")
    rng = np.random.default_rng(seed_base)
    kinds = [BREAKS[i % len(BREAKS)] for i in range(n)]
    bad_ims = [broken_edit(t, k, rng, base=g if good_from == "engine" else None)
               for t, k, g in zip(tasks, kinds, good_ims)]
    prompts = [t.target_prompt for t in tasks]
    pg = np.array(score_images(disc, comps, good_ims, prompts))
    pb = np.array(score_images(disc, comps, bad_ims, prompts))
    cal, test = np.arange(n) % 2 == 0, np.arange(n) % 2 == 1
    th = _best_threshold(pg[cal], pb[cal])
    report = {"n_tasks": n, "good_from": good_from, "threshold": th, "critic_timesteps": disc.config.critic_timesteps,
              "calibration": {"accept_good": float((pg[cal] >= th).mean()), "reject_broken": float((pb[cal] < th).mean())},
              "test": {"accept_good": float((pg[test] >= th).mean()), "reject_broken": float((pb[test] < th).mean()),
                       "n_good": int(test.sum()), "n_broken": int(test.sum())},
              "reject_by_kind_test": {k: float(np.mean([pb[i] < th for i in range(n) if test[i] and kinds[i] == k]))
                                      for k in BREAKS},
              "per_item": [{"task": t.task_id, "kind": k, "p_good": float(a), "p_broken": float(b)}
                           for t, k, a, b in zip(tasks, kinds, pg, pb)]}
    if tracking:
        fg, limit = tracking_fractions(good_ims, tasks, prompts)
        fb, _ = tracking_fractions(bad_ims, tasks, prompts)
        fu, _ = tracking_fractions([t.scene().image for t in tasks], tasks, prompts)
        pu = np.array(score_images(disc, comps, [t.scene().image for t in tasks], prompts))
        acc_g, acc_b, acc_u = (fg <= limit) & (pg >= th), (fb <= limit) & (pb >= th), (fu <= limit) & (pu >= th)
        report["critic_node_test"] = {
            "accept_md_fraction": limit,
            "accept_good": float(acc_g[test].mean()), "reject_broken": float((~acc_b[test]).mean()),
            "reject_unedited": float((~acc_u[test]).mean()),
            "tracking_only": {"accept_good": float((fg[test] <= limit).mean()),
                              "reject_broken": float((fb[test] > limit).mean()),
                              "reject_unedited": float((fu[test] > limit).mean())},
            "reject_by_kind": {k: float(np.mean([not acc_b[i] for i in range(n) if test[i] and kinds[i] == k]))
                               for k in BREAKS}}
    if engine_edits:
        from luciddrag.engine.pipeline import DragEditor
        from luciddrag.evals.shapesworld.drag_eval import config_request

        editor = DragEditor(comps, show_progress=False)
        scorer = ShapesWorldScorer()
        etasks = [t for pair in zip(generate_tasks("move", engine_edits, seed_base + 7_000_000),
                                    generate_tasks("resize", engine_edits, seed_base + 7_000_000)) for t in pair]
        etasks = etasks[:engine_edits]
        from luciddrag.engine.request import GuidanceConfig

        ims, fid = [], []
        for t in tqdm(etasks, desc="engine edits", leave=False):
            im = editor.edit(config_request(t, "editing", steps, GuidanceConfig(), True)).image.convert("RGB")
            ims.append(im)
            fid.append(scorer.score(task_item(t), im)[0])
        pe = np.array(score_images(disc, comps, ims, [t.target_prompt for t in etasks]))
        fid = np.array(fid)
        ok = fid >= scorer.threshold
        report["engine_edits"] = {"n": len(etasks), "n_faithful": int(ok.sum()),
                                  "accept_faithful": float((pe[ok] >= th).mean()) if ok.any() else None,
                                  "reject_low_fidelity": float((pe[~ok] < th).mean()) if (~ok).any() else None,
                                  "auc": _auc(pe, ok)}
        if tracking:
            fe, limit = tracking_fractions(ims, etasks, [t.target_prompt for t in etasks])
            mds = [scorer.score(task_item(t), im)[1]["md_px"] for t, im in zip(etasks, ims)]
            arrived = np.array([m is not None and m <= 3.0 for m in mds])
            good = ok & arrived  # what a user would keep: faithful and where it was asked to go
            acc = (fe <= limit) & (pe >= th)
            report["engine_edits"]["critic_node"] = {
                "n_good": int(good.sum()), "accept_good": float(acc[good].mean()) if good.any() else None,
                "reject_bad": float((~acc[~good]).mean()) if (~good).any() else None}
    log(f"critic threshold P(real) >= {th:.3f}: held-out good accepted {report['test']['accept_good']:.0%}, "
        f"broken rejected {report['test']['reject_broken']:.0%}")
    if tracking:
        c = report["critic_node_test"]
        log(f"critique node (tracking <= {c['accept_md_fraction']:.2f} x drag AND discriminator): good accepted "
            f"{c['accept_good']:.0%}, broken rejected {c['reject_broken']:.0%}, unedited rejected "
            f"{c['reject_unedited']:.0%}")
    if write:
        cfg = read_config(path)
        cfg.threshold = th
        # the threshold in force is the last one written; each kind of calibration keeps its own record
        key = "critic_calibration" if good_from == "renders" else "critic_calibration_engine"
        cfg.notes[key] = {k: v for k, v in report.items() if k != "per_item"}
        cfg.notes["threshold_from"] = good_from
        write_config(path, cfg)
    return report


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return roc_auc(scores, labels)
