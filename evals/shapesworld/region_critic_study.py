"""The region critic's study: fit its thresholds on a dev set, report on a separate test set.

The sets are the critic study's (``critic_study.build_set``): faithful engine edits (product settings, exact
fidelity >= 5 and MD <= 3 px; alternating moves and resizes), each with a deliberately broken copy (ghost, smear,
wrong colour, noise, duplicate blob) and the unedited input. The object's region is what the agent's critic gets:
the offline locator's mask under the handle. Signals per image (``tools.critic.region_check``): arrival (T(handle)
vs target), scale error against the task's motion, mismatch, left behind, spill.

Fitting: every threshold is the dev set's good-edit quantile q of its signal (q shared, so one number trades
acceptance for rejection), with q chosen on dev to maximise min(accept good, reject broken + unedited).

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

LOOSE = RegionCriticConfig(max_md_fraction=1e9, min_md_px=1e9, max_scale_error=1e9, max_mismatch=1e9, max_left=1.0,
                           max_spill=1.0)  # every check passes: region_check then only measures
QUANTILES = (0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)


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
                        "left": v.left if v.left is not None else 0.0, "spill": v.spill})
    return out


def config_at(dev: list[dict], q: float) -> RegionCriticConfig:
    """Thresholds at the dev good edits' q-quantile of each signal (arrival: of the md fraction, floor kept)."""
    good = [r for r in dev if r["which"] == "good"]
    qt = lambda k: float(np.quantile([r[k] for r in good], q))  # noqa: E731
    return RegionCriticConfig(max_md_fraction=max(qt("md_fraction"), 0.2), min_md_px=2.5,
                              max_scale_error=qt("scale_error"), max_mismatch=qt("mismatch"),
                              max_left=max(qt("left"), 0.05), max_spill=qt("spill"))


def accepts(r: dict, c: RegionCriticConfig) -> bool:
    arrived = r["md_px"] <= max(c.max_md_fraction * r["length"], c.min_md_px)
    return (arrived and r["scale_error"] <= c.max_scale_error and r["mismatch"] <= c.max_mismatch
            and r["left"] <= c.max_left and r["spill"] <= c.max_spill)


def rates(rows: list[dict], c: RegionCriticConfig) -> dict[str, float]:
    pick = lambda w: [r for r in rows if r["which"] == w]  # noqa: E731
    return {"good_accepted": float(np.mean([accepts(r, c) for r in pick("good")])),
            "broken_rejected": float(np.mean([not accepts(r, c) for r in pick("bad")])),
            "unedited_rejected": float(np.mean([not accepts(r, c) for r in pick("input")]))}


def fit(dev: list[dict]) -> tuple[float, RegionCriticConfig]:
    def worst(q: float) -> float:
        r = rates(dev, config_at(dev, q))
        return min(r["good_accepted"], r["broken_rejected"], r["unedited_rejected"])

    q = max(QUANTILES, key=lambda q: (worst(q), q))
    return q, config_at(dev, q)


def report(dev: list[dict], test: list[dict]) -> tuple[str, RegionCriticConfig]:
    q, cfg = fit(dev)
    lines = [f"thresholds (dev good-edit quantile {q}): " + ", ".join(f"{k} {v:.3g}" for k, v in cfg.model_dump().items()),
             "", "| set | good accepted | broken rejected | unedited rejected | moves accepted | resizes accepted |",
             "|---|---|---|---|---|---|"]
    for name, rows in (("dev", dev), ("test", test)):
        r = rates(rows, cfg)
        fam = lambda f: np.mean([accepts(x, cfg) for x in rows if x["which"] == "good" and x["family"] == f])  # noqa: E731
        lines.append(f"| {name} | {r['good_accepted']:.0%} | {r['broken_rejected']:.0%} | {r['unedited_rejected']:.0%} "
                     f"| {fam('move'):.0%} | {fam('resize'):.0%} |")
    kinds = sorted({r["kind"] for r in test})
    lines.append("\nbroken rejected on test, by kind: " + ", ".join(
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
