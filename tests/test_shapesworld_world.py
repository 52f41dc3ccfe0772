"""ShapesWorld generator, caption grammar and segmenter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from luciddrag.evals.shapesworld import world
from luciddrag.evals.shapesworld.segment import (
    background_mask,
    classify_shape,
    colour_of_hue,
    connected_components,
    hsv,
    segment_objects,
)


def test_render_scene_is_deterministic_and_seed_dependent() -> None:
    a, b, c = world.render_scene(7), world.render_scene(7), world.render_scene(8)
    assert np.array_equal(a.array(), b.array()) and a.caption == b.caption
    assert not np.array_equal(a.array(), c.array())
    assert a.image.size == (64, 64) and a.image.mode == "RGB"


def test_scene_contents_and_captions() -> None:
    for seed in range(60):
        sc = world.render_scene(seed)
        assert 1 <= len(sc.shapes) <= world.MAX_SHAPES
        assert set(sc.caption.split()) <= set(world.VOCABULARY)
        assert sc.caption == " and ".join(s.description() for s in sc.shapes)
        for s in sc.shapes:
            assert s.mask.dtype == bool and s.mask.any()
            assert s.position == world.position_phrase(*s.centroid, 64, 64)
            assert s.size_word == world.size_word(s.size, 64)
        for i, s in enumerate(sc.shapes):  # shapes never touch: each is its own connected component
            others = [o.mask for j, o in enumerate(sc.shapes) if j != i]
            assert not world.overlaps(s.mask, others, 1)
    assert len(world.render_scene(3, n_shapes=1).shapes) == 1


def test_backgrounds_are_pastel() -> None:
    for seed in range(20):
        sc = world.render_scene(seed)
        _, sat, _ = hsv(sc.background)
        assert sat.max() <= world.MAX_BACKGROUND_SATURATION


def test_grammar() -> None:
    assert world.describe_shape("circle", "red", "small", "on the left") == "a small red circle on the left"
    assert world.describe_shape("square", "blue") == "a blue square"
    assert world.join_descriptions(["a red circle", "a big blue square"]) == "a red circle and a big blue square"
    assert world.position_phrase(0, 0, 64, 64) == "at the top left"
    assert world.position_phrase(32, 32, 64, 64) == "in the center"
    assert world.position_phrase(63, 40, 64, 64) == "on the right"
    assert world.position_phrase(10, 60, 64, 64) == "at the bottom left"
    assert world.size_word(12, 64) == "small" and world.size_word(24, 64) == "big"
    assert world.size_word(0.35, 1) == "big"
    assert len(world.POSITION_PHRASES) == 9 and world.cell_of_phrase("at the bottom") == (2, 1)
    with pytest.raises(ValueError):
        world.describe_shape("hexagon", "red")
    words = {"a", "and", "small", "big", "red", "circle", "at", "the", "top", "left", "center", "in", "on"}
    assert words <= set(world.VOCABULARY)


def test_segmentation_is_exact_on_rendered_scenes() -> None:
    for seed in range(80):
        sc = world.render_scene(seed)
        objs = segment_objects(sc.image)
        assert len(objs) == len(sc.shapes)
        for s in sc.shapes:
            o = min(objs, key=lambda o: np.hypot(o.centroid[0] - s.centroid[0], o.centroid[1] - s.centroid[1]))
            assert (o.shape, o.colour) == (s.shape, s.colour)
            assert np.hypot(o.centroid[0] - s.centroid[0], o.centroid[1] - s.centroid[1]) <= 0.5
            assert np.array_equal(o.mask, s.mask) and o.area == s.area
            x0, y0, x1, y1 = o.bbox
            assert o.mask[y0:y1, x0:x1].sum() == o.area
        fg = ~background_mask(sc.image)
        assert np.array_equal(fg, np.any([s.mask for s in sc.shapes], axis=0))


def test_segmentation_works_at_other_sizes() -> None:
    sc = world.render_scene(11, size=160)
    objs = segment_objects(sc.image)
    assert sorted((o.shape, o.colour) for o in objs) == sorted((s.shape, s.colour) for s in sc.shapes)


def test_segmentation_is_robust_to_blur_and_noise() -> None:
    for seed in range(40):
        sc = world.render_scene(seed)
        a = np.asarray(sc.image.filter(ImageFilter.GaussianBlur(1.0))).astype(float)
        a = np.clip(a + np.random.default_rng(seed).normal(0, 6, a.shape), 0, 255).astype(np.uint8)
        objs = segment_objects(a)
        assert len(objs) == len(sc.shapes)
        for s in sc.shapes:
            o = min(objs, key=lambda o: np.hypot(o.centroid[0] - s.centroid[0], o.centroid[1] - s.centroid[1]))
            assert (o.shape, o.colour) == (s.shape, s.colour)
            assert np.hypot(o.centroid[0] - s.centroid[0], o.centroid[1] - s.centroid[1]) <= 1.0


def test_off_colour_ghost_is_a_separate_unknown_colour_object() -> None:
    bg = np.full((64, 64, 3), 225, np.float32)
    img = np.asarray(world.compose(bg, [world.ShapeSpec("circle", "red", 16, 20, 32)])).copy()
    img[world.rasterize(world.ShapeSpec("circle", "red", 12, 46, 32), 64, 64)] = (245, 140, 20)  # orange
    objs = segment_objects(img)
    assert sorted(o.colour for o in objs) == ["red", "unknown"]
    assert colour_of_hue(30.0) == "unknown" and colour_of_hue(2.0) == "red" and colour_of_hue(355.0) == "red"


def test_touching_shapes_of_different_colours_are_split() -> None:
    bg = np.full((64, 64, 3), 225, np.float32)
    img = world.compose(bg, [world.ShapeSpec("square", "blue", 16, 20, 32), world.ShapeSpec("square", "yellow", 16, 36, 32)])
    objs = segment_objects(Image.fromarray(np.asarray(img)))
    assert sorted((o.shape, o.colour) for o in objs) == [("square", "blue"), ("square", "yellow")]


def test_connected_components_and_unknown_shapes() -> None:
    m = np.zeros((10, 10), bool)
    m[1:3, 1:3] = True
    m[5:9, 5:9] = True
    m[3, 3] = True  # diagonal neighbour joins the first blob (8-connectivity)
    lab, n = connected_components(m)
    assert n == 2 and len(np.unique(lab[m])) == 2 and lab[3, 3] == lab[1, 1]
    bar = np.zeros((20, 20), bool)
    bar[8:11, 2:18] = True
    assert classify_shape(bar) == "unknown"


def test_off_hue_rim_stays_part_of_its_shape() -> None:
    bg = np.full((64, 64, 3), 225, np.float32)
    spec = world.ShapeSpec("square", "green", 14, 30, 30)
    img = np.asarray(world.compose(bg, [spec])).copy()
    inner = world.rasterize(spec, 64, 64)
    rim = world.dilate(inner, 1) & ~inner
    img[rim] = (45, 150, 110)  # teal edge, hue ~155 deg, as the VAE draws around green shapes
    objs = segment_objects(img)
    assert [(o.shape, o.colour) for o in objs] == [("square", "green")]
    assert objs[0].area == int((inner | rim).sum())
