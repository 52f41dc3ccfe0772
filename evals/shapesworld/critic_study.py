"""The critic study behind docs/shapesworld/discriminator.md ("The critic bar: the last levers"): which signals
tell a faithful engine edit from the same edit deliberately broken?

Two sets of faithful engine edits (product settings; exact fidelity >= 5 and MD <= 3 px) with their broken copies
and the unedited inputs: **dev** (other scenes) fits every threshold, **test** (the calibrate command's own engine
set) reports, all of it -- the calibrate command's 30 / 30 split moves by 3 points per task.

Signals per image: the discriminator's P(real); the critique node's DIFT tracking (fraction of the drag); and three
appearance checks read from the same DIFT features -- how similar the handle's best match is, how similar a disc
around the handle is to the same disc around the tracked point, how much of the handle's content is still at the
handle (ghosts) -- plus the mean colour difference over that disc.

    python -m luciddrag.evals.shapesworld.critic_study --out /tmp/critic --discriminator evals/shapesworld/discriminator
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from luciddrag.agent.context import model_defaults
from luciddrag.engine.discriminator import load_discriminator, score_images
from luciddrag.engine.errors import LucidDragError
from luciddrag.engine.loading import load_components
from luciddrag.engine.metrics import roc_auc
from luciddrag.engine.tracking import dift_features, point_distances, within_radius
from luciddrag.evals.shapesworld import MODEL_DIR
from luciddrag.evals.shapesworld.discriminator_data import (
    BREAKS,
    CRITIC_SEED_BASE,
    _best_threshold,
    broken_edit,
    faithful_engine_edits,
)
from luciddrag.evals.shapesworld.tasks import DragTask

DEV_SEED_BASE = 880_000_000  # scenes disjoint from the critic's (8.7e8), the drag suite (8e8) and synthesis (7e8)
DISC_RADIUS = 3  # pixels: the disc compared around the handle / tracked point (a ShapesWorld shape is 8-20 px)


def build_set(folder: Path, n: int, seed_base: int, components=None) -> list[dict]:
    """`n` faithful engine edits with a broken copy each (the calibrate command's breaks and rng) and the unedited
    input, as PNGs in `folder`, plus index.json; reused when already there."""
    index = folder / "index.json"
    if index.is_file():
        return json.loads(index.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    tasks, goods = faithful_engine_edits(n, seed_base + 3_000_000, 20, components=components)
    rng = np.random.default_rng(seed_base)
    rows = []
    for i, (t, g) in enumerate(zip(tasks, goods)):
        kind = BREAKS[i % len(BREAKS)]
        for which, im in (("good", g), ("bad", broken_edit(t, kind, rng, base=g)), ("input", t.scene().image)):
            im.save(folder / f"{i:03d}_{which}.png")
        rows.append({"i": i, "task": t.model_dump(mode="json"), "kind": kind})
    index.write_text(json.dumps(rows))
    return rows


def _at(f: torch.Tensor, x: float, y: float) -> torch.Tensor:
    h, w = f.shape[1:]
    return f[:, int(round(np.clip(y, 0, h - 1))), int(round(np.clip(x, 0, w - 1)))]


def disc_offsets(radius: int) -> list[tuple[int, int]]:
    return [(ox, oy) for ox in range(-radius, radius + 1) for oy in range(-radius, radius + 1)
            if ox * ox + oy * oy <= radius * radius]


def appearance_signals(f_in: torch.Tensor, f_out: torch.Tensor, rgb_in: np.ndarray, rgb_out: np.ndarray,
                       handle: tuple[float, float], target: tuple[float, float], search: float) -> dict:
    """Tracking and appearance signals for one drag from unit-norm (C, H, W) features at image size.

    The handle's feature is matched within `search` px of the handle (the critic's window); `match`: its cosine
    similarity there; `disc`: mean similarity of the disc around the handle to the same disc around the match;
    `left`: similarity of the handle's feature to the result's at the handle (content left behind);
    `colour`: mean absolute RGB difference over those two discs."""
    h, w = f_out.shape[1:]
    (hx, hy), (tx, ty) = handle, target
    sims = torch.einsum("c,chw->hw", _at(f_in, hx, hy), f_out)
    sims = sims.masked_fill(~within_radius([handle], [search], (w, h)).view(h, w), -2.0)
    k = int(sims.argmax())
    fx, fy = k % w, k // w
    offs = disc_offsets(DISC_RADIUS)
    clip = lambda v, hi: int(np.clip(round(v), 0, hi - 1))
    colour = np.mean([np.abs(rgb_in[clip(hy + oy, h), clip(hx + ox, w)]
                             - rgb_out[clip(fy + oy, h), clip(fx + ox, w)]).mean() for ox, oy in offs])
    length = max(point_distances([handle], [target])[0], 1e-6)
    md = point_distances([(fx, fy)], [target])[0]
    return {"md_px": md, "md_frac": md / length, "length": length, "match": float(sims.max()),
            "disc": float(np.mean([float(_at(f_in, hx + ox, hy + oy) @ _at(f_out, fx + ox, fy + oy))
                                   for ox, oy in offs])),
            "left": float(_at(f_in, hx, hy) @ _at(f_out, hx, hy)), "colour": float(colour)}


def set_signals(folder: Path, rows: list[dict], components, disc, t: int, block: int, ensemble: int) -> list[dict]:
    """`appearance_signals` (DIFT features at timestep `t`, up block `block`) and P(real) of every good, broken and
    unedited image of a set, one row each."""
    from tqdm.auto import tqdm

    def feats(im: Image.Image, prompt: str) -> torch.Tensor:
        f = dift_features(components, im, prompt, t, block, ensemble, 42)
        return F.normalize(F.interpolate(f[None], size=im.size[::-1], mode="bilinear", align_corners=False)[0], dim=0)

    out = []
    for r in tqdm(rows, desc=f"signals ({folder.name})", leave=False):
        task = DragTask.model_validate(r["task"])
        d = task.drags[0]
        inp = Image.open(folder / f"{r['i']:03d}_input.png").convert("RGB")
        f_in = feats(inp, task.target_prompt)
        for which in ("good", "bad", "input"):
            im = Image.open(folder / f"{r['i']:03d}_{which}.png").convert("RGB")
            s = appearance_signals(f_in, feats(im, task.target_prompt), np.asarray(inp, np.float32),
                                   np.asarray(im, np.float32), d.handle, d.target,
                                   max(2.0 * float(np.hypot(*np.subtract(d.target, d.handle))), 0.05 * min(im.size)))
            s["p_real"] = score_images(disc, components, [im], [task.target_prompt])[0] if disc else None
            out.append({"i": r["i"], "kind": r["kind"], "family": task.family, "which": which, **s})
    return out


def _auc(pos, neg) -> float:
    return roc_auc(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))])


def report(dev: list[dict], test: list[dict], limit: float) -> str:
    """Each signal's AUC (good vs broken) on dev and test; the discriminator's threshold fitted on dev and the
    critique node (tracking <= `limit` x drag AND P(real) >= threshold) on test."""
    pick = lambda rows, w, k: np.array([r[k] for r in rows if r["which"] == w], dtype=float)
    kinds = np.array([r["kind"] for r in test if r["which"] == "bad"])
    lines = ["| signal | AUC dev | AUC test | test, by kind of break |", "|---|---|---|---|"]
    for key, sign in (("p_real", 1), ("md_frac", -1), ("match", 1), ("disc", 1), ("left", -1), ("colour", -1)):
        if dev[0][key] is None:
            continue
        good, bad = sign * pick(test, "good", key), sign * pick(test, "bad", key)
        by_kind = ", ".join(f"{k} {_auc(good, bad[kinds == k]):.2f}" for k in sorted(set(kinds)))
        lines.append(f"| {key} | {_auc(sign * pick(dev, 'good', key), sign * pick(dev, 'bad', key)):.2f} | "
                     f"{_auc(good, bad):.2f} | {by_kind} |")
    if dev[0]["p_real"] is not None:
        th = _best_threshold(pick(dev, "good", "p_real"), pick(dev, "bad", "p_real"))
        node = lambda w: (pick(test, w, "md_frac") <= limit) & (pick(test, w, "p_real") >= th)
        lines += ["", f"threshold P(real) >= {th:.3f} (fitted on dev); on test: discriminator alone accepts "
                      f"{np.mean(pick(test, 'good', 'p_real') >= th):.0%} of good, rejects "
                      f"{np.mean(pick(test, 'bad', 'p_real') < th):.0%} of broken; the node accepts "
                      f"{node('good').mean():.0%} of good, rejects {1 - node('bad').mean():.0%} of broken and "
                      f"{1 - node('input').mean():.0%} of unedited inputs"]
        lines.append("broken rejected by kind (discriminator alone, test): " + ", ".join(
            f"{k} {np.mean(pick(test, 'bad', 'p_real')[kinds == k] < th):.0%}" for k in sorted(set(kinds))))
        # the discriminator AND the colour check, both thresholds fitted on dev (a grid; max of min(accept, reject))
        both = lambda rows, a, b, w: (pick(rows, w, "p_real") >= a) & (pick(rows, w, "colour") <= b)
        grid = [(a, b) for a in np.linspace(0.05, 0.95, 91) for b in np.linspace(5, 60, 111)]
        a, b = max(grid, key=lambda ab: min(both(dev, *ab, "good").mean(), 1 - both(dev, *ab, "bad").mean()))
        lines.append(f"discriminator AND colour (P(real) >= {a:.2f}, colour <= {b:.1f}, fitted on dev): dev "
                     f"{both(dev, a, b, 'good').mean():.0%} / {1 - both(dev, a, b, 'bad').mean():.0%}, test "
                     f"{both(test, a, b, 'good').mean():.0%} / {1 - both(test, a, b, 'bad').mean():.0%} "
                     "(good accepted / broken rejected)")
    fam = np.array([r["family"] for r in test if r["which"] == "good"])
    for floor in (0.0, 4.0):  # 4 px: the tracker's feature stride on a 64 px ShapesWorld image
        ok = lambda w: pick(test, w, "md_px") <= np.maximum(limit * pick(test, w, "length"), floor)
        g = ok("good")
        lines.append(f"tracking alone on test (within {limit:.0%} of the drag or {floor:.0f} px): accepts "
                     f"{g.mean():.0%} of good (moves {g[fam == 'move'].mean():.0%}, resizes "
                     f"{g[fam == 'resize'].mean():.0%}), rejects {1 - ok('bad').mean():.0%} of broken and "
                     f"{1 - ok('input').mean():.0%} of unedited inputs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m luciddrag.evals.shapesworld.critic_study", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for the two image sets (reused when there) and signals_t<T>.json")
    ap.add_argument("--discriminator", type=Path, default=None, help="discriminator folder (omit: no P(real))")
    ap.add_argument("--n", type=int, default=60, help="tasks per set (default 60)")
    ap.add_argument("--timestep", type=int, default=None, help="DIFT timestep (default: the model's critic one)")
    args = ap.parse_args(argv)

    settings = model_defaults(MODEL_DIR)
    comps = load_components(str(MODEL_DIR), "cpu")
    try:
        disc = load_discriminator(args.discriminator, comps, use_cache=False) if args.discriminator else None
    except LucidDragError as exc:
        ap.exit(2, f"error: {exc}\n")
    t = args.timestep or int(settings.get("critic_timestep", 261))
    sets = {}
    for name, seed in (("dev", DEV_SEED_BASE), ("test", CRITIC_SEED_BASE)):
        rows = build_set(args.out / name, args.n, seed, comps)
        sets[name] = set_signals(args.out / name, rows, comps, disc, t, int(settings.get("critic_block", 1)), 4)
    (args.out / f"signals_t{t}.json").write_text(json.dumps(sets))
    print(report(sets["dev"], sets["test"], float(settings.get("accept_md_fraction", 0.5))))


if __name__ == "__main__":
    main()
