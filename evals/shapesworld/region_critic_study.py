"""The region critic's study: fit its thresholds on a dev set, report on a separate test set.

The sets are the critic study's (``critic_study.build_set``): faithful engine edits (product settings, exact
fidelity >= 5 and MD <= 3 px; alternating moves and resizes), each with a deliberately broken copy (ghost, smear,
wrong colour, noise, duplicate blob) and the unedited input. The object's region is what the agent's critic gets:
the offline locator's mask under the handle. Signals per image (``tools.critic.region_check``): arrival (T(handle)
vs target), scale error against the task's motion, mismatch, left behind, spill.

Fitting: each threshold at a quantile q of its signal over the dev set's good edits (the arrival check stays the
exact scorer's 3 px or half the drag); the trade-off is reported for several q on dev and test, and q = 1 (accept
every dev good edit) is shipped: in the agent a good edit rejected costs more than a broken one accepted.

    python -m luciddrag.evals.shapesworld.region_critic_study --out /tmp/critic
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from luciddrag.evals.shapesworld.critic_study import DEV_SEED_BASE, build_set
from luciddrag.evals.shapesworld.discriminator_data import CRITIC_SEED_BASE
from luciddrag.evals.shapesworld.tasks import DragTask
from luciddrag.tools.critic import RegionCriticConfig, region_check

# every check passes: region_check then only measures
LOOSE = RegionCriticConfig(max_md_fraction=1e9, min_md_px=1e9, max_scale_error=1e9, max_mismatch=1e9, max_left=1.0,
                           max_spill=1.0, max_colour_shift=1e9, max_ring_mismatch=1e9)


def locator_region(image: Image.Image, task: DragTask) -> np.ndarray:
    """The offline locator's object mask under the first handle (what the critique node receives)."""
    from luciddrag.agent.nodes import handle_regions
    from luciddrag.tools.locator import LocatorConfig, locate
    from luciddrag.tools.schemas import DragPoints

    located = locate(image, DragPoints.from_flat(task.points), None, LocatorConfig(backend="offline"))
    regions = handle_regions(located, image.size)
    return regions[0] if regions and regions[0] is not None else task.source_mask()


def signals(folder: Path, rows: list[dict]) -> list[dict]:
    """One row of region-critic measurements per good / broken / unedited image."""
    out = []
    for r in rows:
        task = DragTask.model_validate(r["task"])
        inp = Image.open(folder / f"{r['i']:03d}_input.png").convert("RGB")
        region = locator_region(inp, task)
        motion = "scale" if task.family == "resize" else "translate"
        for which in ("good", "bad", "input"):
            im = Image.open(folder / f"{r['i']:03d}_{which}.png").convert("RGB")
            v = region_check(inp, im, region, [d.handle for d in task.drags], [d.target for d in task.drags],
                             motion=motion, config=LOOSE)
            lengths = [d.length for d in task.drags]
            scale_err = abs(math.log(v.fit.scale / v.requested_scale)) if v.requested_scale else math.inf
            out.append({"i": r["i"], "kind": r["kind"], "family": task.family, "which": which,
                        "md_px": v.md_px, "md_fraction": v.md_fraction, "length": float(np.mean(lengths)),
                        "scale_error": scale_err, "mismatch": v.fit.mismatch,
                        "left": v.left if v.left is not None else 0.0, "spill": v.spill,
                        "colour_shift": v.fit.colour_shift, "ring_mismatch": v.fit.ring_mismatch})
    return out


SIGNALS = ("scale_error", "mismatch", "left", "spill", "colour_shift", "ring_mismatch")
FIELD = {"scale_error": "max_scale_error", "mismatch": "max_mismatch", "left": "max_left", "spill": "max_spill",
         "colour_shift": "max_colour_shift", "ring_mismatch": "max_ring_mismatch"}


def accepts(r: dict, c: RegionCriticConfig) -> bool:
    arrived = r["md_px"] <= max(c.max_md_fraction * r["length"], c.min_md_px)
    return arrived and all(r[k] <= getattr(c, FIELD[k]) for k in SIGNALS)


def rates(rows: list[dict], c: RegionCriticConfig) -> dict[str, float]:
    pick = lambda w: [r for r in rows if r["which"] == w]  # noqa: E731
    return {"good_accepted": float(np.mean([accepts(r, c) for r in pick("good")])),
            "broken_rejected": float(np.mean([not accepts(r, c) for r in pick("bad")])),
            "unedited_rejected": float(np.mean([not accepts(r, c) for r in pick("input")]))}


ARRIVAL = dict(max_md_fraction=0.5, min_md_px=3.0)  # the exact scorer's success radius (3 px) or half the drag
QUANTILES = (0.9, 0.95, 0.975, 1.0)
SHIPPED_Q = 1.0  # a good edit rejected sends the agent to a less likely reading: accept every dev good edit


def fit(dev: list[dict], q: float = SHIPPED_Q) -> RegionCriticConfig:
    """Each threshold at the q-quantile of its signal over the dev set's good edits (q = 1: the largest), the
    ghost threshold at least 0.1 (a tenth of the object's contrast left behind is rim blur, not a ghost)."""
    good = [r for r in dev if r["which"] == "good"]
    upd = {FIELD[k]: float(np.quantile([r[k] for r in good], q)) for k in SIGNALS}
    upd["max_left"] = max(upd["max_left"], 0.1)
    return RegionCriticConfig(**ARRIVAL, **upd)


def report(dev: list[dict], test: list[dict]) -> tuple[str, RegionCriticConfig]:
    """The trade-off at several dev quantiles (dev and test rates), then the shipped thresholds' details."""
    lines = ["| dev quantile | set | good accepted | broken rejected | unedited rejected | moves accepted | "
             "resizes accepted |", "|---|---|---|---|---|---|---|"]
    for q in QUANTILES:
        cfg = fit(dev, q)
        for name, rows in (("dev", dev), ("test", test)):
            r = rates(rows, cfg)
            fam = lambda f: np.mean([accepts(x, cfg) for x in rows  # noqa: E731
                                     if x["which"] == "good" and x["family"] == f])
            lines.append(f"| {q} | {name} | {r['good_accepted']:.0%} | {r['broken_rejected']:.0%} | "
                         f"{r['unedited_rejected']:.0%} | {fam('move'):.0%} | {fam('resize'):.0%} |")
    cfg = fit(dev)
    lines.append(f"\nshipped (dev quantile {SHIPPED_Q}): " + ", ".join(
        f"{k} {v:.3g}" for k, v in cfg.model_dump().items()))
    kinds = sorted({r["kind"] for r in test})
    lines.append("broken rejected on test, by kind: " + ", ".join(
        f"{k} {np.mean([not accepts(r, cfg) for r in test if r['which'] == 'bad' and r['kind'] == k]):.0%} "
        f"(n={sum(1 for r in test if r['which'] == 'bad' and r['kind'] == k)})" for k in kinds))
    return "\n".join(lines), cfg


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m luciddrag.evals.shapesworld.region_critic_study",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the dev/test image sets (reused when there)")
    ap.add_argument("--n", type=int, default=60, help="tasks per set (default 60)")
    args = ap.parse_args(argv)
    from luciddrag.engine.loading import load_components
    from luciddrag.evals.shapesworld import MODEL_DIR

    comps = None
    sets = {}
    for name, seed in (("dev", DEV_SEED_BASE), ("test", CRITIC_SEED_BASE)):
        folder = args.out / name
        if not (folder / "index.json").is_file() and comps is None:
            comps = load_components(str(MODEL_DIR), "cpu")
        sets[name] = signals(folder, build_set(folder, args.n, seed, comps))
    (args.out / "region_signals.json").write_text(json.dumps(sets))
    text, cfg = report(sets["dev"], sets["test"])
    (args.out / "region_critic.json").write_text(cfg.model_dump_json(indent=1))
    print(text)


if __name__ == "__main__":
    main()
