"""ShapesWorld drag tasks and their scorer, on synthetic edits with known outcomes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from luciddrag.evals.shapesworld import world
from luciddrag.evals.shapesworld.scoring import (
    GHOST_THRESHOLD,
    aggregate,
    format_table,
    psnr_outside,
    score_task,
)
from luciddrag.evals.shapesworld.tasks import TASK_SEED_BASE, DragTask, TaskSuite, boundary_distance, generate_tasks


@pytest.fixture(scope="module")
def moves() -> list[DragTask]:
    return generate_tasks("move", 12)


@pytest.fixture(scope="module")
def resizes() -> list[DragTask]:
    return generate_tasks("resize", 12)


def edited_image(task: DragTask, spec: world.ShapeSpec, extra: list[tuple[world.ShapeSpec, tuple]] = ()) -> np.ndarray:
    """The task's scene with the edited shape replaced by ``spec``, plus extra (spec, rgb) blobs painted on top."""
    sc = task.scene()
    specs = [s.spec for s in sc.shapes]
    specs[task.edited_index] = spec
    img = np.asarray(world.compose(sc.background, specs)).copy()
    for s, rgb in extra:
        img[world.rasterize(s, 64, 64)] = rgb
    return img


def test_tasks_are_deterministic_and_held_out(moves: list[DragTask]) -> None:
    again = generate_tasks("move", 12)
    assert [t.model_dump() for t in again] == [t.model_dump() for t in moves]
    assert all(t.scene_seed >= TASK_SEED_BASE for t in moves)
    suite = TaskSuite(name="x", tasks=moves)
    assert TaskSuite.model_validate_json(suite.model_dump_json()) == suite


def test_move_tasks_geometry_and_prompts(moves: list[DragTask]) -> None:
    for t in moves:
        (d,) = t.drags
        hx, hy = d.handle
        assert t.source_mask()[int(hy), int(hx)]  # handle inside the shape
        dx, dy = d.target[0] - hx, d.target[1] - hy
        assert t.target.cx == pytest.approx(t.source.cx + dx) and t.target.cy == pytest.approx(t.source.cy + dy)
        src, dst = t.changed_words
        assert src and dst and src != dst and src in world.POSITION_PHRASES
        assert t.target_prompt == t.source_prompt.replace(
            t.scene().shapes[t.edited_index].description(),
            t.ground_truth_scene().shapes[t.edited_index].description())
        assert len(t.points) == 2 and t.editable_mask().sum() > t.source_mask().sum()


def test_resize_tasks_geometry_and_prompts(resizes: list[DragTask]) -> None:
    for t in resizes:
        (d,) = t.drags
        c = (t.source.cx, t.source.cy)
        scale = t.expected_size / t.original_size
        assert d.target[0] - c[0] == pytest.approx(scale * (d.handle[0] - c[0]))
        assert t.changed_words in (("small", "big"), ("big", "small"))
        assert t.target_prompt.split() != t.source_prompt.split()
        assert math.dist(t.expected_centroid, t.original_centroid) < 1.0


def test_boundary_distance_lies_on_the_outline() -> None:
    for shape in world.SHAPES:
        spec = world.ShapeSpec(shape, "red", 30.0, 0.0, 0.0)
        for a in np.linspace(0, 2 * np.pi, 13):
            r = boundary_distance(spec, a)
            inside = world.rasterize(world.ShapeSpec(shape, "red", 30.0, 50 - (r - 0.6) * np.cos(a),
                                                     50 - (r - 0.6) * np.sin(a)), 101, 101)
            outside = world.rasterize(world.ShapeSpec(shape, "red", 30.0, 50 - (r + 0.6) * np.cos(a),
                                                      50 - (r + 0.6) * np.sin(a)), 101, 101)
            assert inside[50, 50] and not outside[50, 50]


def test_ground_truth_scores_perfectly(moves: list[DragTask], resizes: list[DragTask]) -> None:
    scores = [score_task(t, t.ground_truth_scene().array()) for t in moves + resizes]
    assert all(s.success and s.md_px == 0 and s.ghost_fraction == 0 for s in scores)
    assert all(abs(s.size_error_px) < 1.0 for s in scores)
    table = aggregate(scores)
    assert table["move"]["success_rate"] == 1.0 and table["resize"]["success_rate"] == 1.0
    assert "| move |" in format_table(table)


def test_known_displacement_gives_exact_md(moves: list[DragTask]) -> None:
    for t in moves[:6]:
        s = score_task(t, edited_image(t, t.target.spec().moved(2, 1)))
        assert s.md_px == pytest.approx(math.hypot(2, 1), abs=1e-6)
        assert s.success  # within 3 px, identity kept, no ghost
        s = score_task(t, edited_image(t, t.target.spec().moved(4, 0)))
        assert s.md_px == pytest.approx(4.0, abs=1e-6) and not s.success


def test_unedited_image_fails_with_md_equal_to_drag(moves: list[DragTask]) -> None:
    for t in moves[:6]:
        s = score_task(t, t.image())
        assert s.md_px == pytest.approx(math.dist(t.original_centroid, t.expected_centroid), abs=1e-6)
        assert s.md_frac > 0.5 and not s.success


def test_known_size_change(resizes: list[DragTask]) -> None:
    for t in resizes[:6]:
        s = score_task(t, edited_image(t, t.target.spec().resized(t.expected_size + 1.0)))
        assert s.size_error_px == pytest.approx(1.0, abs=0.8) and s.success
        s = score_task(t, t.image())  # not resized at all
        assert abs(s.size_error_px) > 5 and not s.success
        if t.expected_size < t.original_size:  # a shape that failed to shrink is a ghost ring
            assert s.ghost_fraction >= GHOST_THRESHOLD


def test_planted_ghost_is_caught(moves: list[DragTask]) -> None:
    for t in moves[:6]:
        clean = score_task(t, t.ground_truth_scene().array())
        orange = score_task(t, edited_image(t, t.target.spec(), [(t.source.spec(), (245, 140, 20))]))
        same = score_task(t, edited_image(t, t.target.spec(), [(t.source.spec(), world.COLOURS[t.source.colour])]))
        faint = score_task(t, edited_image(t, t.target.spec(), [(t.source.spec().resized(t.source.size * 0.3), (245, 140, 20))]))
        assert clean.ghost_fraction == 0
        for s in (orange, same):
            assert s.ghost_fraction >= GHOST_THRESHOLD and not s.success
        assert 0 < faint.ghost_fraction < 0.3


def test_preservation_psnr() -> None:
    a = np.full((8, 8, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0] = 110
    protect = np.zeros((8, 8), bool)
    assert psnr_outside(a, a, protect) == 100.0
    expected = 10 * math.log10(255 ** 2 / (100 / 64))
    assert psnr_outside(a, b, protect) == pytest.approx(expected)
    protect[0, 0] = True
    assert psnr_outside(a, b, protect) == 100.0


def test_ablation_rows_keep_their_overrides() -> None:
    from luciddrag.evals.shapesworld.drag_eval import split_configs

    assert split_configs("reconstruct, editing+quality@w=10,n=10,all") == [
        "reconstruct", "editing+quality@w=10,n=10", "all"]
    assert split_configs("editing,editing+semantic,") == ["editing", "editing+semantic"]
    assert split_configs("all@w=3,region=edit,editing") == ["all@w=3,region=edit", "editing"]
    assert split_configs("editing+quality@w=10,d=/tmp/runs/d_2,editing") == [
        "editing+quality@w=10,d=/tmp/runs/d_2", "editing"]
