"""The region critic (tools/critic.py) on drawn scenes with known answers: it recovers the object's scale and
translation, accepts a faithful move and resize, and rejects an unedited image, a ghost, a spill and a wrong size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from luciddrag.tools.critic import (RegionCriticConfig, apply, fit_region, region_check, requested_scale,
                                    transformed_mask)

BG, RED, BLUE = (0.85, 0.8, 0.7), (0.8, 0.1, 0.1), (0.1, 0.2, 0.8)


def disc(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def square(cx: float, cy: float, half: float, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (np.abs(xx - cx) <= half) & (np.abs(yy - cy) <= half)


def scene(*shapes: tuple[np.ndarray, tuple[float, float, float]], size: int = 64) -> np.ndarray:
    img = np.empty((size, size, 3), np.float32)
    img[:] = BG
    for mask, colour in shapes:
        img[mask] = colour
    return img


def test_fit_recovers_translation_and_scale() -> None:
    obj = disc(20, 30, 5)
    other = (square(50, 12, 4), BLUE)  # a second object that stays put
    before = scene((obj, RED), other)
    fit = fit_region(before, scene((disc(34, 24, 5), RED), other), obj)
    assert fit.scale == pytest.approx(1.0, abs=0.06)
    assert fit.centre_to == pytest.approx((34, 24), abs=1.0)
    grown = fit_region(before, scene((disc(20, 30, 9), RED), other), obj)
    assert grown.scale == pytest.approx(1.8, rel=0.08) and grown.centre_to == pytest.approx((20, 30), abs=1.0)
    assert apply(grown, (25, 30))[0] == pytest.approx(20 + 5 * grown.scale, abs=1.0)
    assert transformed_mask(obj, grown).sum() > 2.5 * obj.sum()


def test_requested_scale_is_the_drags_ratio_about_the_centre() -> None:
    assert requested_scale((10, 10), [(15, 10)], [(20, 10)]) == pytest.approx(2.0)
    assert requested_scale((10, 10), [(15, 10), (5, 10)], [(12.5, 10), (7.5, 10)]) == pytest.approx(0.5)
    assert requested_scale((10, 10), [(10, 10)], [(20, 10)]) is None  # handle at the centre: no scale asked


def test_faithful_move_accepted_unedited_and_ghost_rejected() -> None:
    obj = disc(20, 30, 5)
    before = scene((obj, RED))
    moved = scene((disc(36, 30, 5), RED))
    h, t = [(20.0, 30.0)], [(36.0, 30.0)]
    ok = region_check(before, moved, obj, h, t, motion="translate")
    assert ok.ok and ok.md_px < 1.5 and ok.left is not None and ok.left < 0.2, ok.reasons
    still = region_check(before, before, obj, h, t, motion="translate")
    assert not still.ok and still.md_fraction > 0.8 and "carried the handle" in still.reasons[0]
    ghost = moved.copy()
    ghost[obj] = 0.3 * ghost[obj] + 0.7 * np.array(RED, np.float32)  # 70% of the object left at its old place
    g = region_check(before, ghost, obj, h, t, motion="translate")
    assert not g.ok and g.left is not None and g.left > 0.5 and "left at its old place" in g.reasons[0]


def test_resize_judged_by_extent_not_by_the_handle_point() -> None:
    obj = disc(32, 32, 5)
    before = scene((obj, RED))
    h, t = [(37.0, 32.0)], [(40.0, 32.0)]  # a 3 px drag outward: grow x1.6 (under DIFT's 4 px stride)
    grown = region_check(before, scene((disc(32, 32, 8), RED)), obj, h, t, motion="scale")
    assert grown.ok and grown.requested_scale == pytest.approx(1.6), grown.reasons
    # the same drag read as a move: the handle arrives, but the shape did not change size
    slid = region_check(before, scene((disc(35, 32, 5), RED)), obj, h, t, motion="scale")
    assert not slid.ok and any("scale x1.0" in r for r in slid.reasons[:2])
    unedited = region_check(before, before, obj, h, t, motion="scale")
    assert not unedited.ok


def test_spill_and_damage_rejected() -> None:
    obj = disc(20, 30, 5)
    before = scene((obj, RED))
    moved = scene((disc(36, 30, 5), RED))
    h, t = [(20.0, 30.0)], [(36.0, 30.0)]
    blob = moved.copy()
    blob[disc(50, 52, 6)] = RED  # a duplicate far from both footprints
    s = region_check(before, blob, obj, h, t, motion="translate")
    assert not s.ok and s.spill > RegionCriticConfig().max_spill and "changed away from the object" in s.reasons[0]
    noisy = moved.copy()
    rng = np.random.default_rng(0)
    m = disc(36, 30, 6)
    noisy[m] = np.clip(noisy[m] + rng.normal(0, 0.3, size=(int(m.sum()), 3)), 0, 1)
    n = region_check(before, noisy, obj, h, t, motion="translate")
    assert not n.ok and n.fit.mismatch > RegionCriticConfig().max_mismatch


def test_large_images_are_matched_downscaled_with_the_same_answer() -> None:
    obj = disc(80, 120, 20, size=256)
    before = scene((obj, RED), size=256)
    after = scene((disc(140, 100, 20, size=256), RED), size=256)
    v = region_check(before, after, obj, [(80.0, 120.0)], [(140.0, 100.0)], motion="translate")
    assert v.ok, v.reasons
    assert math.hypot(v.fit.centre_to[0] - 140, v.fit.centre_to[1] - 100) < 4


def test_bad_input_is_a_clear_error() -> None:
    before = scene((disc(20, 30, 5), RED))
    with pytest.raises(ValueError, match="empty"):
        region_check(before, before, np.zeros((64, 64), bool), [(1.0, 1.0)], [(5.0, 5.0)])
    with pytest.raises(ValueError, match="differ in size"):
        region_check(before, before[:32], disc(20, 30, 5), [(20.0, 30.0)], [(30.0, 30.0)])


def test_critique_uses_the_region_critic_for_whole_object_intentions() -> None:
    """In the critique node's checks the region critic replaces handle tracking as the arrival check for a move or
    resize of a located object (tracking's reading kept as information), not for a patch drag; two handles on one
    object are judged together."""
    from PIL import Image

    from luciddrag.agent.context import AgentContext
    from luciddrag.agent.object_checks import object_checks
    from luciddrag.tools.schemas import DragPoints

    obj = disc(32, 32, 5)
    before = Image.fromarray((scene((obj, RED)) * 255).astype(np.uint8))
    grown = Image.fromarray((scene((disc(32, 32, 8), RED)) * 255).astype(np.uint8))
    drags = DragPoints.from_flat([[37, 32], [40, 32], [27, 32], [24, 32]])
    tracking = [(False, "handle landed 2.9 px from target (97% of the drag > 60%)")]
    ctx = AgentContext(judge="off", critic_regions=True)
    checks = object_checks(ctx, tracking, before, grown, drags, [obj, obj], "scale", "make it bigger")
    assert len(checks) == 2 and all(ok for ok, _ in checks), checks
    assert checks[0][1].startswith("region: ") and "tracking (not used" in checks[1][1]
    assert object_checks(ctx, tracking, before, grown, drags, [obj, obj], None, "raise it") == tracking
    off = AgentContext(judge="off")  # the default: off until calibrated on photos
    assert object_checks(off, tracking, before, grown, drags, [obj, obj], "scale", "bigger") == tracking
    unedited = object_checks(ctx, tracking, before, before, drags, [obj, obj], "scale", "make it bigger")
    assert unedited[0][0] is False


def test_study_fits_thresholds_on_dev_good_edits_and_reports_rates() -> None:
    """region_critic_study: thresholds are quantiles of the dev good edits' signals; rates count what they accept."""
    from luciddrag.evals.shapesworld.region_critic_study import accepts, fit, rates, report

    def row(which: str, i: int, **kw) -> dict:
        base = {"i": i, "kind": "ghost", "family": "move", "which": which, "md_px": 1.0, "md_fraction": 0.1,
                "length": 10.0, "scale_error": 0.05, "mismatch": 0.2, "left": 0.0, "spill": 0.0,
                "colour_shift": 0.05, "ring_mismatch": 0.2}
        return {**base, **kw}

    dev = ([row("good", i, mismatch=0.1 + 0.02 * i) for i in range(10)]
           + [row("bad", i, left=0.6) for i in range(10)] + [row("input", i, md_px=10.0) for i in range(10)])
    cfg = fit(dev, 1.0)
    assert cfg.max_mismatch == pytest.approx(0.28) and cfg.max_left == 0.1 and cfg.min_md_px == 3.0
    assert rates(dev, cfg) == {"good_accepted": 1.0, "broken_rejected": 1.0, "unedited_rejected": 1.0}
    assert not accepts(row("good", 0, mismatch=0.3), cfg)
    assert rates(dev, fit(dev, 0.5))["good_accepted"] == pytest.approx(0.5)
    text, shipped = report(dev, dev)
    assert shipped == cfg and "| 1.0 | test | 100% | 100% | 100% |" in text
