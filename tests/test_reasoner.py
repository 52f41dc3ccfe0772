"""The reasoner: offline rules on ShapesWorld and generic drags, cleaning of LLM answers, Eq. 6 selection, and the
LLM path's failure handling with a scripted structured-output chat model."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import openai
import pytest
from langchain_core.messages import AIMessage

from luciddrag.evals.shapesworld.plugin import edit_shapes_caption
from luciddrag.evals.shapesworld.world import position_phrase, render_scene
from tests.fakes import ScriptedChatModel
from luciddrag.tools.locator import OfflineLocator
from luciddrag.tools.reasoner import (
    ReasonerConfig,
    ReasonRequest,
    clean_intentions,
    direction_word,
    drag_geometry,
    format_drag_information,
    normalise_confidences,
    offline_reason,
    reason,
    select_intention,
)
from luciddrag.tools.schemas import (
    DragPair,
    DragPoints,
    HandleDescription,
    Intention,
    IntentionSet,
    LocatorResult,
    Region,
    ReasonerResult,
    mask_to_rle,
)


@pytest.fixture(autouse=True)
def _no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(var, raising=False)


def I(intention: str, source: str, target: str, confidence: float) -> Intention:  # noqa: E743, N802
    return Intention(intention=intention, source_prompt=source, target_prompt=target, confidence=confidence)


def shapes_request(scene, handle, target, k: int = 3) -> ReasonRequest:
    drags = DragPoints.from_pairs([(handle, target)])
    located = OfflineLocator().locate(scene.image, drags)
    return ReasonRequest(drags=drags, located=located, caption=scene.caption, k=k)


def _empty_point(scene, away_from, min_dist: float) -> tuple[float, float]:
    """A background pixel at least ``min_dist`` from every shape, as far as possible in the drag's direction."""
    occupied = np.any([s.mask for s in scene.shapes], axis=0)
    ys, xs = np.nonzero(~occupied)
    best, best_d = None, -1.0
    for x, y in zip(xs[::3], ys[::3]):
        d = min(float(np.min(np.hypot(*np.nonzero(s.mask)[::-1] - np.array([[x], [y]])))) for s in scene.shapes)
        if d >= min_dist:
            far = math.hypot(x - away_from[0], y - away_from[1])
            if far > best_d:
                best, best_d = (float(x), float(y)), far
    assert best is not None
    return best


# ------------------------------------------------------------------------------------------------ offline, ShapesWorld


@pytest.mark.parametrize("seed", [0, 1, 2, 4, 5])
def test_shapesworld_drag_from_inside_to_empty_space_is_move_first(seed: int) -> None:
    scene = render_scene(seed)
    shape = scene.shapes[0]
    target = _empty_point(scene, shape.centroid, min_dist=3)
    result = offline_reason(shapes_request(scene, shape.centroid, target))
    assert result.backend == "offline"
    first = result.intentions[0]
    assert first.intention.startswith("move the " + shape.description().removeprefix("a "))
    # Source: the caption itself; target: the same caption with only this shape's position phrase changed.
    assert first.source_prompt == scene.caption
    new_phrase = position_phrase(shape.centroid[0] + target[0] - shape.centroid[0],
                                 shape.centroid[1] + target[1] - shape.centroid[1], 64, 64)
    expected = scene.caption.replace(shape.description(), shape.description(with_position=False) + " " + new_phrase, 1)
    assert first.target_prompt == expected
    assert abs(sum(i.confidence for i in result.intentions) - 1) < 1e-9


def _edge_drag(shape, outward: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """A drag from the rightmost pixel of the shape's centre row, ``outward`` px to the right (negative: inward)."""
    row = int(round(shape.centroid[1]))
    xs = np.nonzero(shape.mask[row])[0]
    x = float(xs.max())
    return (x, float(row)), (min(63.0, max(0.0, x + outward)), float(row))


@pytest.mark.parametrize("seed", [0, 1, 3, 6])
def test_shapesworld_drag_from_an_edge_outward_proposes_bigger(seed: int) -> None:
    scene = render_scene(seed)
    shape = min(scene.shapes, key=lambda s: s.centroid[0])  # room to the right
    handle, target = _edge_drag(shape, outward=+8)
    result = offline_reason(shapes_request(scene, handle, target))
    texts = [i.intention for i in result.intentions]
    assert any("bigger" in t or "longer" in t for t in texts), texts
    bigger = next(i for i in result.intentions if i.intention.endswith("bigger"))
    if shape.size_word == "small":
        assert result.intentions[0] is bigger
        assert bigger.target_prompt == bigger.source_prompt.replace(shape.description(),
                                                                    shape.description().replace("small", "big"))
        assert bigger.source_prompt == scene.caption


def test_shapesworld_drag_from_an_edge_inward_on_a_big_shape_is_smaller_first() -> None:
    scene = next(s for s in (render_scene(i) for i in range(40)) if any(x.size_word == "big" for x in s.shapes))
    shape = next(s for s in scene.shapes if s.size_word == "big")
    handle, target = _edge_drag(shape, outward=-6)
    result = offline_reason(shapes_request(scene, handle, target))
    first = result.intentions[0]
    assert first.intention.endswith("smaller")
    assert "small " + shape.colour + " " + shape.shape in first.target_prompt
    assert first.source_prompt == scene.caption


def test_shapesworld_combined_reading_that_cannot_change_size_leaves_the_move_in_place() -> None:
    """A big shape dragged outward from its edge cannot get bigger in the world's words: "bigger and move it" would
    carry the move's exact prompts (with a resize motion) and push the move out as a duplicate. The move stays."""
    found = 0
    for seed in range(60):
        scene = render_scene(seed)
        for shape in (s for s in scene.shapes if s.size_word == "big"):
            handle, target = _edge_drag(shape, outward=+8)
            if target[0] - handle[0] < 6:
                continue
            texts = [i.intention for i in offline_reason(shapes_request(scene, handle, target)).intentions]
            assert any(t.startswith("move ") for t in texts), texts
            assert not any("bigger and move" in t for t in texts), texts
            found += 1
    assert found >= 5


def test_edit_shapes_caption_fills_in_words_the_caption_left_out() -> None:
    attrs = {"shape": "circle", "colour": "red", "size": "small", "position": "on the left"}
    src, tgt = edit_shapes_caption("a red circle and a big blue square", attrs, size="big")
    assert src == "a small red circle on the left and a big blue square"
    assert tgt == "a big red circle on the left and a big blue square"
    assert edit_shapes_caption("a photo of a cat", attrs, size="big") is None
    assert edit_shapes_caption("a green circle", attrs, size="big") is None


def test_shapesworld_shape_under_a_free_form_caption_uses_generic_prompts() -> None:
    scene = render_scene(1)
    shape = scene.shapes[0]
    drags = DragPoints.from_pairs([(shape.centroid, (shape.centroid[0], 2.0))])
    located = OfflineLocator().locate(scene.image, drags)
    result = offline_reason(ReasonRequest(drags=drags, located=located, caption="some shapes"))
    assert result.intentions and all(i.source_prompt.startswith("some shapes") for i in result.intentions)
    assert not any("small big" in i.target_prompt for i in result.intentions)


# ------------------------------------------------------------------------------------------------ offline, generic


def _located(description: str, handle: tuple[float, float], region: Region | None = None,
             size: tuple[int, int] = (512, 512)) -> LocatorResult:
    return LocatorResult(descriptions=[HandleDescription(index=0, handle=handle, description=description,
                                                         region=region)], backend="test", image_size=size)


def test_generic_face_part_proposes_looking_in_the_drag_direction() -> None:
    drags = DragPoints.from_flat([[297, 270], [347, 268]])
    result = offline_reason(ReasonRequest(drags=drags, located=_located("the nose of a raccoon", (297, 270)),
                                          caption="a photo of a raccoon."))
    look = next(i for i in result.intentions if "look" in i.intention)
    assert look.intention == "make the raccoon look to the right"
    assert (look.source_prompt, look.target_prompt) == ("a photo of a raccoon, looking forward",
                                                        "a photo of a raccoon, looking right")


def test_generic_region_without_semantics_keeps_the_prompts_identical() -> None:
    """On a photo where nothing names the dragged thing, the reasoner does not invent a whole-image change ("a
    landscape" -> "a landscape, larger"): both prompts are the caption and the drag alone carries the edit. With no
    object mask every reading would then steer identically (a patch drag), so one intention is left."""
    drags = DragPoints.from_flat([[100, 100], [100, 40]])
    result = offline_reason(ReasonRequest(drags=drags, located=_located("the region around (100, 100)", (100, 100)),
                                          caption="a landscape", k=3))
    assert [i.intention for i in result.intentions] == ["move the region around (100, 100) up"]
    assert all(i.source_prompt == i.target_prompt == "a landscape" for i in result.intentions)


def test_unnamed_object_with_a_segmenter_mask_keeps_distinct_readings_with_identical_prompts() -> None:
    """A SAM mask without a name: prompts stay identical, but moving vs resizing that mask differ, so the readings
    are all kept (most likely first)."""
    mask = np.zeros((200, 200), bool)
    mask[80:120, 80:120] = True
    region = Region(box=(80, 80, 120, 120), source="sam", area=int(mask.sum()), mask_rle=mask_to_rle(mask))
    drags = DragPoints.from_flat([[100, 100], [100, 40]])
    located = _located("the region around (100, 100)", (100, 100), region, (200, 200))
    result = offline_reason(ReasonRequest(drags=drags, located=located, caption="a photo.", k=3))
    assert len(result.intentions) == 3
    assert result.intentions[0].intention == "move the region around (100, 100) up"
    assert all(i.source_prompt == i.target_prompt == "a photo" for i in result.intentions)


def test_generic_object_edge_outward_with_a_mask_is_bigger_or_longer_first() -> None:
    mask = np.zeros((200, 300), bool)
    mask[80:120, 50:250] = True  # a long horizontal object
    region = Region(box=(50, 80, 250, 120), source="sam", area=int(mask.sum()), mask_rle=mask_to_rle(mask))
    drags = DragPoints.from_flat([[248, 100], [290, 100]])
    result = offline_reason(ReasonRequest(drags=drags, located=_located("the back of a motorcycle", (248, 100),
                                                                          region, (300, 200)),
                                          caption="a red motorcycle."))
    top_two = {i.intention for i in result.intentions[:2]}
    assert top_two == {"make the back of a motorcycle bigger", "make the back of a motorcycle longer"}
    longer = next(i for i in result.intentions if i.intention.endswith("longer"))
    assert (longer.source_prompt, longer.target_prompt) == ("a red motorcycle, with a short back",
                                                            "a red motorcycle, with a long back")


# ------------------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("dx, dy, word", [(1, 0, "right"), (1, -1, "up-right"), (0, -1, "up"), (-1, -1, "up-left"),
                                          (-1, 0, "left"), (-1, 1, "down-left"), (0, 1, "down"), (1, 1, "down-right"),
                                          (10, -3, "right"), (3, -10, "up"), (0, 0, "nowhere")])
def test_direction_word(dx: float, dy: float, word: str) -> None:
    assert direction_word(dx, dy) == word


def test_drag_geometry_against_a_mask() -> None:
    mask = np.zeros((100, 100), bool)
    mask[40:60, 30:70] = True  # 40 wide, 20 high, centroid (49.5, 49.5)
    region = Region(box=(30, 40, 70, 60), source="segmentation", area=800, mask_rle=mask_to_rle(mask))
    desc = HandleDescription(index=0, handle=(50, 50), description="the box", region=region)
    inside_out = drag_geometry(DragPair(handle=(50, 50), target=(90, 50)), desc, (100, 100))
    assert inside_out.zone == "interior" and inside_out.target_inside is False
    assert inside_out.object_extent == pytest.approx(40, abs=1.5) and inside_out.relative_length == pytest.approx(1, abs=0.05)
    edge_out = drag_geometry(DragPair(handle=(69, 50), target=(80, 50)), desc, (100, 100))
    assert edge_out.zone == "edge" and edge_out.radial == pytest.approx(1, abs=0.05)
    edge_in = drag_geometry(DragPair(handle=(50, 40), target=(50, 50)), desc, (100, 100))
    assert edge_in.zone == "edge" and edge_in.radial < -0.9 and edge_in.target_inside is True
    window = desc.model_copy(update={"region": Region(box=(0, 0, 100, 100), source="window")})
    unknown = drag_geometry(DragPair(handle=(50, 50), target=(90, 50)), window, (100, 100))
    assert unknown.zone is None and unknown.relative_length is None and unknown.direction == "right"


def test_drag_information_text_has_the_papers_lines_and_more() -> None:
    mask = np.zeros((100, 100), bool)
    mask[40:60, 30:70] = True
    region = Region(box=(30, 40, 70, 60), source="segmentation", mask_rle=mask_to_rle(mask))
    request = ReasonRequest(drags=DragPoints.from_flat([[50, 50], [90, 30]]),
                            located=_located("the box", (50, 50), region, (100, 100)), caption="a box")
    text = format_drag_information(request)
    assert "Drag information 1:\nThe start point is the box.\nDirection is [[50, 50], [90, 30]]." in text
    assert "The drag goes up-right, 45 pixels, about 1.0 times the size of that object in this direction." in text
    assert "The end point lies outside that object." in text
    assert "The start point is well inside the object." in text


# ------------------------------------------------------------------------------------------------ cleaning


def test_normalise_confidences() -> None:
    assert normalise_confidences([2, 1, 1]) == [0.5, 0.25, 0.25]
    assert normalise_confidences([60, 30, 10]) == pytest.approx([0.6, 0.3, 0.1])
    assert normalise_confidences([0, 0]) == [0.5, 0.5]
    assert normalise_confidences([float("nan"), -1, 3]) == [0.0, 0.0, 1.0]
    assert normalise_confidences([float("inf"), 0]) == [0.5, 0.5]
    assert normalise_confidences([]) == []
    assert sum(normalise_confidences([0.1] * 7)) == 1.0


def test_clean_intentions_drops_duplicates_and_blanks_and_keeps_k() -> None:
    raw = [
        I("Move the cat left", "a cat", "a cat on the left", 0.2),
        I("move the cat left.", "a cat", "a cat on the left", 0.5),  # same wording, more confident: this one stays
        I("shift the cat", "a cat", "a cat on the left", 0.4),  # steers identically: dropped
        I("", "a cat", "a big cat", 0.9),
        I("make the cat bigger", "a cat", "a big cat", 0.1),
        I("make the cat look left", "a cat looking forward", "a cat looking left", 0.3),
        I("make the cat taller", "a short cat", "a tall cat", 0.05),
    ]
    kept, notes = clean_intentions(raw, k=3)
    assert [i.intention for i in kept] == ["move the cat left.", "make the cat look left", "make the cat bigger"]
    assert sum(i.confidence for i in kept) == pytest.approx(1)
    assert kept[0].confidence == pytest.approx(0.5 / 0.9)
    assert sum("duplicate" in n for n in notes) == 2 and any("empty field" in n for n in notes)
    assert any("kept the 3 most confident of 4" in n for n in notes)


def test_clean_intentions_handles_identical_prompts_and_useless_confidences() -> None:
    kept, notes = clean_intentions([I("a", "x", "x", 0), I("b", "y", "z", float("nan"))], k=3)
    assert [i.confidence for i in kept] == [0.5, 0.5]
    assert any("identical source and target" in n for n in notes)
    assert any("equally likely" in n for n in notes)
    assert clean_intentions([], k=3) == ([], [])


def test_reasoner_result_rejects_unnormalised_confidences() -> None:
    with pytest.raises(ValueError):
        ReasonerResult(intentions=[I("a", "x", "y", 0.7)], backend="x")


# ------------------------------------------------------------------------------------------------ selection (Eq. 6)

THREE = [I("a", "s", "t1", 0.7), I("b", "s", "t2", 0.2), I("c", "s", "t3", 0.1)]


def test_select_argmax_and_exhaustion() -> None:
    assert select_intention(THREE, set(), "argmax") == 0
    assert select_intention(THREE, {0}, "argmax") == 1
    assert select_intention(THREE, {0, 1, 2}, "argmax") is None
    assert select_intention([], set()) is None
    with pytest.raises(ValueError):
        select_intention(THREE, set(), "greedy")  # type: ignore[arg-type]


def test_select_samples_proportionally_to_confidence() -> None:
    counts = Counter(select_intention(THREE, set(), "sample", seed) for seed in range(3000))
    assert counts[0] / 3000 == pytest.approx(0.7, abs=0.04)
    assert counts[1] / 3000 == pytest.approx(0.2, abs=0.04)
    assert counts[2] / 3000 == pytest.approx(0.1, abs=0.03)
    # Without replacement: with the first intention tried, the rest share its mass in proportion (2:1).
    counts = Counter(select_intention(THREE, {0}, "sample", seed) for seed in range(3000))
    assert 0 not in counts and counts[1] / 3000 == pytest.approx(2 / 3, abs=0.04)


def test_select_is_seeded_and_retries_never_repeat() -> None:
    assert [select_intention(THREE, set(), "sample", 7) for _ in range(5)] == [select_intention(THREE, set(), "sample", 7)] * 5
    for seed in range(50):
        tried: set[int] = set()
        while (pick := select_intention(THREE, tried, "sample", seed)) is not None:
            assert pick not in tried
            tried.add(pick)
        assert tried == {0, 1, 2}
    zeros = [I("a", "s", "t1", 0.0), I("b", "s", "t2", 0.0)]
    assert {select_intention(zeros, set(), "sample", s) for s in range(40)} == {0, 1}


# ------------------------------------------------------------------------------------------------ LLM path (fake model)


def _request() -> ReasonRequest:
    return ReasonRequest(drags=DragPoints.from_flat([[297, 270], [347, 248]]),
                         located=_located("the nose of a raccoon", (297, 270)), caption="a photo of a raccoon.")


GOOD = IntentionSet(intentions=[
    I("make the raccoon look sideways", "a photo of a raccoon looking forward", "a photo of a raccoon looking sideways", 0.6),
    I("raise the raccoon's head", "a photo of a raccoon", "a photo of a raccoon with its head raised", 0.3),
    I("make the nose longer", "a raccoon with a short nose", "a raccoon with a long nose", 0.1),
])


def test_llm_reasoner_with_a_structured_fake() -> None:
    model = ScriptedChatModel(script=[GOOD])
    result = reason(_request(), chat_model=model)
    assert result.backend.startswith("llm") and result.prompt == "reason_intentions.v1" and result.warnings == []
    assert [i.intention for i in result.intentions] == [i.intention for i in GOOD.intentions]
    assert model.call_kwargs[0]["tools"][0]["function"]["name"] == "IntentionSet"
    system, user = model.calls[0][0].content, model.calls[0][-1].content
    assert "You are a helpful assistant." in system and "Give 3 different possible intentions" in system
    assert "The start point is the nose of a raccoon." in user and "The drag goes up-right" in user


def test_llm_answer_failing_the_schema_gets_one_repair() -> None:
    junk = AIMessage(content="", invalid_tool_calls=[{"name": "IntentionSet", "args": "{junk", "id": "1",
                                                       "error": "not valid JSON", "type": "invalid_tool_call"}])
    model = ScriptedChatModel(script=[junk, GOOD])
    result = reason(_request(), chat_model=model)
    assert len(model.calls) == 2
    repair = model.calls[1][-1].content
    assert "could not be used: not valid JSON" in repair and "{junk" in repair
    assert result.backend.startswith("llm") and len(result.intentions) == 3
    assert any("repaired answer was used" in w for w in result.warnings)


def test_llm_failing_the_schema_twice_falls_back_to_offline() -> None:
    model = ScriptedChatModel(script=[{"intentions": [{"intention": "x"}]}, "not even json"])
    result = reason(_request(), chat_model=model)
    assert len(model.calls) == 2
    assert result.backend == "offline" and result.intentions
    assert any("failed the schema twice" in w for w in result.warnings)


def test_llm_zero_intentions_falls_back_to_offline() -> None:
    result = reason(_request(), chat_model=ScriptedChatModel(script=[IntentionSet(intentions=[])]))
    assert result.backend == "offline"
    assert any("no usable intentions" in w for w in result.warnings)


def test_llm_duplicates_and_missing_confidences_are_cleaned_and_topped_up() -> None:
    answer = IntentionSet(intentions=[
        I("make the raccoon look sideways", "a raccoon looking forward", "a raccoon looking sideways", 0),
        I("make the raccoon look sideways", "a raccoon looking forward", "a raccoon looking sideways", 0),
    ])
    result = reason(_request(), chat_model=ScriptedChatModel(script=[answer]))
    assert result.backend.startswith("llm")
    assert len(result.intentions) == 3 and len({i.intention for i in result.intentions}) == 3
    assert result.intentions[0].intention == "make the raccoon look sideways"
    assert result.intentions[0].confidence > 0.8  # the LLM's own intention keeps most of the mass
    assert sum(i.confidence for i in result.intentions) == pytest.approx(1)
    assert any("duplicate" in w for w in result.warnings) and any("added 2 from the offline" in w for w in result.warnings)


def test_llm_service_errors_fall_back_to_offline_with_a_warning() -> None:
    error = openai.APIConnectionError(request=__import__("httpx2").Request("POST", "http://x"))
    result = reason(_request(), chat_model=ScriptedChatModel(script=[error]))
    assert result.backend == "offline"
    assert result.warnings[0].startswith("the LLM could not be used (APIConnectionError")


def test_no_key_means_offline_with_a_one_line_notice() -> None:
    result = reason(_request())
    assert result.backend == "offline"
    assert len(result.warnings) == 1 and "OPENAI_API_KEY" in result.warnings[0]
    assert reason(_request(), ReasonerConfig(backend="offline")).warnings == []
    assert reason(_request(), ReasonerConfig(backend="llm")).backend == "offline"


def test_shapesworld_two_drags_on_two_shapes_edit_both_in_one_caption() -> None:
    scene = next(s for s in (render_scene(i, n_shapes=2) for i in range(50))
                 if s.shapes[0].position != s.shapes[1].position
                 and s.shapes[0].description() != s.shapes[1].description())
    a, b = scene.shapes
    ta = _empty_point(scene, a.centroid, min_dist=3)
    tb = _empty_point(scene, b.centroid, min_dist=3)
    drags = DragPoints.from_pairs([(a.centroid, ta), (b.centroid, tb)])
    located = OfflineLocator().locate(scene.image, drags)
    result = offline_reason(ReasonRequest(drags=drags, located=located, caption=scene.caption))
    move = result.intentions[0]
    assert move.intention.startswith("move the " + a.description().removeprefix("a "))
    assert " and move the " + b.description().removeprefix("a ") in move.intention
    parts = scene.caption.split(" and ")  # one part per shape, in scene order
    expected = " and ".join(s.description(with_position=False) + " " + position_phrase(t[0], t[1], 64, 64)
                            for s, t in ((a, ta), (b, tb)))
    assert parts == [a.description(), b.description()]
    assert move.source_prompt == scene.caption and move.target_prompt == expected
