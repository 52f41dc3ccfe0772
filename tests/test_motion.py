"""Rigid region motion only where it is right: the object-moving mode, and resizes that go the way the word says."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import luciddrag.agent.nodes as nodes
import luciddrag.agent.tools as agent_tools
from luciddrag.agent.context import AgentContext
from luciddrag.agent.graph import build_graph
from luciddrag.engine.pipeline import directed_factor, drag_kind, region_scales
from luciddrag.engine.request import EditRequest
from luciddrag.tools.schemas import Intention, LocatorResult, mask_to_rle


def _it(text: str) -> Intention:
    return Intention(intention=text, source_prompt="a", target_prompt="a", confidence=1.0)


def test_directed_factor_keeps_magnitude_and_takes_the_words_direction():
    assert directed_factor(2.0, "grow") == 2.0 and directed_factor(0.5, "shrink") == 0.5
    assert directed_factor(0.5, "grow") == pytest.approx(2.0)  # geometry says shrink, word says grow: reciprocal
    assert directed_factor(1.6, "shrink") == pytest.approx(0.625)
    assert directed_factor(0.5, None) == 0.5 and directed_factor(1.0, "grow") == 1.0


def test_region_scales_follow_the_word_whatever_the_drag():
    region = np.zeros((32, 32), bool)
    region[12:20, 12:20] = True  # centre (15.5, 15.5)
    h = np.array([[19.5, 15.5]], np.float32)
    outward, inward = np.array([[23.5, 15.5]], np.float32), np.array([[17.5, 15.5]], np.float32)
    for target in (outward, inward):
        (_, grow), = region_scales([region], h, target, "grow")
        (_, shrink), = region_scales([region], h, target, "shrink")
        assert grow >= 1.0 and shrink <= 1.0 and grow == pytest.approx(1.0 / shrink)
    (_, plain), = region_scales([region], h, inward)
    assert plain == pytest.approx(0.5)  # no word: the geometry alone (unchanged behaviour)


def test_scale_direction_words():
    assert nodes.scale_direction(_it("make the cup bigger")) == "grow"
    assert nodes.scale_direction(_it("Enlarge the moon")) == "grow"
    assert nodes.scale_direction(_it("make the circle smaller")) == "shrink"
    assert nodes.scale_direction(_it("shrink the tree")) == "shrink"
    assert nodes.scale_direction(_it("resize the box")) is None


def _square_scene(size=64):
    rng = np.random.RandomState(0)
    arr = (rng.rand(size, size, 3) * 60 + 90).astype(np.uint8)
    obj = np.zeros((size, size), bool)
    obj[20:36, 14:30] = True
    arr[obj] = (200, 40, 40)
    return Image.fromarray(arr), obj


def _run(monkeypatch, tmp_path, image, points, intention, located=None, mask=None):
    """Run the graph with a given intention; capture the EditRequest the engine receives."""
    sent = []

    def edit(req, intentions=None, callback=None):
        sent.append(req)
        return SimpleNamespace(images=[image.convert("RGB") for _ in intentions])

    monkeypatch.setattr(agent_tools, "get_editor", lambda ctx: SimpleNamespace(show_progress=False, edit=edit))
    monkeypatch.setattr(nodes, "score_drag", lambda ctx, o, e, d, prompt="": {
        "tracked": [p.target for p in d.pairs], "md_px": 0.0, "md_fraction": 0.0})
    if located is not None:
        monkeypatch.setattr(nodes, "locate", lambda *a, **k: located)
    ctx = AgentContext(model="unused", device="cpu", steps=4, locator="offline", reasoner="offline",
                       artifacts_dir=str(tmp_path / "art"))
    it = {"intention": intention, "source_prompt": "a photo", "target_prompt": "a photo"}
    inputs = {"image": image, "points": points, "intention": it}
    if mask is not None:
        inputs["mask"] = mask
    build_graph().invoke(inputs, context=ctx)
    assert len(sent) == 1
    return sent[0]


def _segmenter_result(obj, handle, size):
    return LocatorResult.model_validate({
        "backend": "sam (facebook/sam-vit-base)", "image_size": list(size), "descriptions": [
            {"index": 0, "handle": list(handle), "description": "a red square", "region": {
                "box": [14, 20, 30, 36], "source": "segmentation", "mask_rle": mask_to_rle(obj)}}]})


def test_segmenter_mask_plus_move_translates_exactly_that_mask(monkeypatch, tmp_path):
    image, obj = _square_scene()
    pts = [(22, 28), (44, 28)]
    req = _run(monkeypatch, tmp_path, image, pts, "move the red square to the right",
               _segmenter_result(obj, pts[0], image.size))
    assert req.region_motion == "translate" and drag_kind(req) == "translate"
    assert len(req.handle_masks) == 1 and np.array_equal(np.asarray(req.handle_masks[0], bool), obj)


@pytest.mark.parametrize("word, direction", [("bigger", "grow"), ("smaller", "shrink")])
def test_segmenter_mask_plus_size_word_scales_the_way_the_word_says(monkeypatch, tmp_path, word, direction):
    image, obj = _square_scene()
    pts = [(28, 28), (32, 28)]  # an outward drag: by geometry alone "smaller" would enlarge
    req = _run(monkeypatch, tmp_path, image, pts, f"make the red square {word}",
               _segmenter_result(obj, pts[0], image.size))
    assert req.region_motion == "scale" and req.scale_direction == direction
    (_, factor), = region_scales(req.handle_masks, np.array([pts[0]], np.float32), np.array([pts[1]], np.float32),
                                 req.scale_direction)
    assert (factor > 1.0) if direction == "grow" else (factor < 1.0)


def test_offline_on_a_photo_no_rigid_motion(monkeypatch, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.coffee()).resize((200, 150))
    req = _run(monkeypatch, tmp_path, photo, [(100, 60), (130, 60)], "move the cup to the right")
    assert req.handle_masks is None and drag_kind(req) == "patch" and req.scale_direction is None


def _painted(size, box):
    x0, y0, x1, y1 = box
    m = np.zeros((size[1], size[0]), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_painted_mask_plus_move_translates_exactly_that_mask_and_frees_the_destination(monkeypatch, tmp_path):
    """Offline on a photo there is no segmenter region; the user's painted mask is the object to move."""
    skimage_data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skimage_data.coffee()).resize((200, 150))
    painted = _painted(photo.size, (80, 40, 120, 80))
    mask_image = Image.fromarray(painted.astype(np.uint8) * 255)

    def run(intention):
        return _run(monkeypatch, tmp_path, photo, [(100, 60), (150, 60)], intention, mask=mask_image)

    req = run("move the cup to the right")
    assert req.region_motion == "translate" and drag_kind(req) == "translate"
    assert np.array_equal(np.asarray(req.handle_masks[0], bool), painted)
    assert req.mask is None  # the mask was the object, not the editable area (the target lies outside it)
    req = run("raise the rim of the cup")  # not an object move: a patch drag inside the user's editable mask
    assert req.handle_masks is None and drag_kind(req) == "patch"
    assert np.array_equal(np.asarray(req.mask, bool), painted)



# ------------------------------------------------------------------------------------------------ resize and move


def _square_region(size=32, box=(12, 12, 20, 20)):
    x0, y0, x1, y1 = box
    region = np.zeros((size, size), bool)
    region[y0:y1, x0:x1] = True  # centre ((x0 + x1 - 1) / 2, ...)
    return region


def test_similarity_fits_scale_and_shift_from_two_drags_exactly():
    from luciddrag.engine.pipeline import region_similarities

    region = _square_region()  # centre (15.5, 15.5)
    c, s, d = np.array([15.5, 15.5]), 1.5, np.array([4.0, -3.0])
    handles = np.array([[19.5, 15.5], [11.5, 15.5]])  # opposite edges
    targets = c + d + s * (handles - c)
    (c1, s1, d1), (c2, s2, d2) = region_similarities([region, region.copy()], handles, targets)
    assert s1 == pytest.approx(s) and s2 == pytest.approx(s) and np.allclose(d1, d) and np.allclose(c1, c)
    # the word can only turn the fitted factor the other way round, never cancel it
    (_, shrink, _), _ = region_similarities([region, region], handles, targets, "shrink")
    assert shrink == pytest.approx(1 / s)


@pytest.mark.parametrize("factor, direction", [(1.9, "grow"), (1 / 1.9, "shrink"), (None, None)])
def test_similarity_with_one_drag_takes_the_factor_and_still_lands_the_handle(factor, direction):
    from luciddrag.engine.pipeline import region_similarities

    region = _square_region()
    h, t = np.array([[19.5, 15.5]]), np.array([[27.0, 20.0]])
    ((cx, cy), s, (dx, dy)), = region_similarities([region], h, t, direction, factor)
    assert s == pytest.approx(1.0 if factor is None else factor)
    landed = np.array([cx + dx + s * (h[0, 0] - cx), cy + dy + s * (h[0, 1] - cy)])
    assert np.allclose(landed, t[0])  # the shift carries the handle exactly onto its target
    if factor is None:
        assert (dx, dy) == pytest.approx((7.5, 4.5))  # no factor: a plain move by the drag vector


def test_similarity_copy_writes_the_moved_and_resized_footprint_only():
    from luciddrag.engine.pipeline import copy_patches, latent_cells, scaled_region

    region = _square_region(box=(4, 4, 20, 20))  # 16 x 16 about (11.5, 11.5)
    z = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    sc = ((11.5, 11.5), 0.5, (12.0, 12.0))  # half the size, centred on (23.5, 23.5)
    out = copy_patches(z, torch.tensor([[19.0, 11.0]]), torch.tensor([[27.5, 23.5]]), scale=4, radius=1,
                       regions=[region], scales=[sc])
    moved = latent_cells(scaled_region(region, *sc), 4)
    assert moved.any() and not (moved & latent_cells(region, 4)).any()  # the shrunk copy sits away from the original
    changed = (out != z)[0, 0].numpy()
    assert changed[moved].all() and not changed[~moved].any()
    y, x = np.argwhere(moved)[0]  # each new cell reads the cell its centre came from
    src = ((x + 0.5) * 4 - 11.5 - 12.0) / 0.5 + 11.5, ((y + 0.5) * 4 - 11.5 - 12.0) / 0.5 + 11.5
    assert out[0, 0, y, x] == z[0, 0, int(src[1] // 4), int(src[0] // 4)]


def test_similarity_edit_on_the_tiny_model_lands_region_cells_where_the_motion_puts_them(tiny_editor):
    from luciddrag.engine.pipeline import prepare
    from tests.engine_inputs import blocky_image

    image = blocky_image()
    region = np.zeros((40, 48), bool)
    region[8:24, 8:24] = True  # centre (15.5, 15.5)
    req = EditRequest.create(image=image, points=[(23, 15), (35, 20)], handle_masks=[region], steps=4,
                             region_motion="similarity", region_scale=1.5, scale_direction="grow",
                             source_prompt="a red circle", target_prompt="a big red circle")
    prep = prepare(req.image, req.drags, req.mask, tiny_editor.c.native_size, tiny_editor.c.size_multiple,
                   req.handle_masks)
    g = tiny_editor._geometry(prep, req.guidance, req.region_motion, req.scale_direction, req.region_scale)
    cells = g.handles[0] + g.offsets[0][g.weights[0] > 0]
    landed = g.targets[0] + g.dst_offsets[0][g.weights[0] > 0]
    ratio = prep.working_size[0] / image.size[0]
    c = torch.tensor([15.5, 15.5]) * ratio
    s = 1.5
    shift = g.targets[0] - c - s * (g.handles[0] - c)
    assert torch.allclose(landed, c + shift + s * (cells - c), atol=1e-4)
    res = tiny_editor.edit(req)
    assert res.image.size == image.size and torch.isfinite(res.latents).all()


def test_resize_and_move_intention_is_the_similarity_motion_with_the_words_factor(monkeypatch, tmp_path):
    image, obj = _square_scene()
    pts = [(29, 28), (44, 36)]
    req = _run(monkeypatch, tmp_path, image, pts, "make the red square bigger and move it to the right",
               _segmenter_result(obj, pts[0], image.size))
    assert req.region_motion == "similarity" and req.scale_direction == "grow"
    assert req.region_scale == pytest.approx(AgentContext().size_change)
    assert nodes.region_motion(_it("make the cup smaller and move it left"), AgentContext()) == "similarity"
    assert nodes.region_motion(_it("make the cup smaller"), AgentContext()) == "scale"
    assert nodes.region_motion(_it("move the cup left"), AgentContext()) == "translate"
    assert nodes.size_factor(AgentContext(size_change=2.0), "shrink") == pytest.approx(0.5)
    with pytest.raises(Exception, match="size_change must be in"):
        nodes.size_factor(AgentContext(size_change=0.5), "grow")


def test_resize_features_apply_to_resizes_only():
    from luciddrag.engine.pipeline import request_schedule
    from luciddrag.engine.request import GuidanceConfig
    from tests.engine_inputs import small_request

    region = np.zeros((40, 48), bool)
    region[4:16, 4:16] = True
    g = GuidanceConfig(resize_feature_blocks=(2,))
    for motion, blocks in (("translate", (1, 2)), ("scale", (2,)), ("similarity", (2,))):
        _, cfg = request_schedule(small_request(guidance=g, handle_masks=[region], region_motion=motion))
        assert cfg.feature_blocks == blocks, motion
    _, cfg = request_schedule(small_request(guidance=g, region_motion="scale"))  # no region: a patch drag
    assert cfg.feature_blocks == (1, 2)
    _, cfg = request_schedule(small_request(guidance=g, handle_masks=[region], region_motion="scale", fast=True,
                                            steps=50))
    assert cfg.feature_blocks == (2,) and cfg.edit_steps == 15  # and the fast schedule on top
