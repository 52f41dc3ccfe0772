"""The drag-edit graph end to end on a tiny model with the offline locator/reasoner."""

from __future__ import annotations

import sqlite3

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from PIL import Image

import luciddrag.agent.nodes as nodes
from luciddrag.agent.artifacts import ImageRef
from luciddrag.agent.context import AgentContext
from luciddrag.agent.graph import build_graph
from luciddrag.engine.errors import InputError
from luciddrag.evals.shapesworld.world import render_scene


@pytest.fixture()
def scene():
    sc = render_scene(5, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    return sc, [(cx, cy), (min(cx + 12, 60), cy)]


@pytest.fixture()
def ctx(tiny_model_dir, tmp_path):
    return AgentContext(model=str(tiny_model_dir), device="cpu", steps=4, max_attempts=3, locator="offline",
                        reasoner="offline", critic_ensemble=1, artifacts_dir=str(tmp_path / "art"))


def _cfg(thread="t"):
    return {"configurable": {"thread_id": thread}}


def _scores(monkeypatch, fractions):
    """Make the critic see these drag-accuracy fractions, in order (routing under test, not the tracker)."""
    seq = iter(fractions)

    def fake(ctx, original, edited, drags, prompt=""):
        f = next(seq)
        return {"tracked": [p.target for p in drags.pairs], "md_px": 10 * f, "md_fraction": f}

    monkeypatch.setattr(nodes, "score_drag", fake)


def test_plain_invoke_with_pil_image_and_points(scene, ctx):
    """Exactly the user's words: graph.invoke({"image": ..., "points": [...]}), real tracker as critic."""
    sc, pts = scene
    g = build_graph()
    ctx.accept_md_fraction = 10.0  # accept whatever the tiny random model makes
    out = g.invoke({"image": sc.image, "points": pts}, context=ctx)
    assert out["accepted"] is True and isinstance(out["result"], ImageRef)
    assert Image.open(out["result"].path).size == sc.image.size
    assert len(out["intentions"]) >= 2 and abs(sum(i.confidence for i in out["intentions"]) - 1) < 1e-6
    assert out["chosen"].md_fraction is not None and out["chosen"].verdict == "accepted"
    assert "offline" in out["located"].backend


def test_reject_then_next_intention(scene, ctx, monkeypatch):
    sc, pts = scene
    _scores(monkeypatch, [0.9, 0.1])
    g = build_graph(checkpointer=InMemorySaver(), artifacts_dir=ctx.artifacts_dir)
    trajectory = []
    for update in g.stream({"image": sc.image, "points": pts}, _cfg(), context=ctx, stream_mode="updates"):
        trajectory += list(update)
    assert trajectory == ["ingest", "locate", "reason", "choose", "sample", "critique", "sample", "critique"]
    out = g.get_state(_cfg()).values
    first, second = out["attempts"]
    assert first.verdict == "rejected" and second.verdict == "accepted"
    assert first.index != second.index  # without replacement
    assert out["accepted"] and out["chosen"].index == second.index


def test_all_rejected_returns_best_flagged(scene, ctx, monkeypatch):
    sc, pts = scene
    _scores(monkeypatch, [0.9, 0.7, 0.95])
    ctx.k, ctx.max_attempts = 3, 2
    out = build_graph().invoke({"image": sc.image, "points": pts}, context=ctx)
    assert out["accepted"] is False and len(out["attempts"]) == 2  # our budget, not LangGraph's recursion limit
    assert out["chosen"].md_fraction == 0.7 and "not accepted" in out["status"]


def test_interrupt_and_resume_with_choice(scene, ctx, monkeypatch):
    sc, pts = scene
    _scores(monkeypatch, [0.1])
    g = build_graph(checkpointer=InMemorySaver(), artifacts_dir=ctx.artifacts_dir)
    first = g.invoke({"image": sc.image, "points": pts, "confirm": True}, _cfg("hitl"), context=ctx)
    intr = first["__interrupt__"][0].value
    assert len(intr["intentions"]) >= 2
    assert g.get_state(_cfg("hitl")).next == ("choose",)  # paused before any sampling
    out = g.invoke(Command(resume=1), _cfg("hitl"), context=ctx)
    assert out["chosen"].index == 1 and out["chosen"].intention == intr["intentions"][1]["intention"]


def test_given_intention_skips_reasoning(scene, ctx, monkeypatch):
    sc, pts = scene
    _scores(monkeypatch, [0.1])
    it = {"intention": "make it bigger", "source_prompt": "a small red circle", "target_prompt": "a big red circle"}
    out = build_graph().invoke({"image": sc.image, "points": pts, "intention": it}, context=ctx)
    assert [i.intention for i in out["intentions"]] == ["make it bigger"]
    assert out["chosen"].target_prompt == "a big red circle"


@pytest.mark.parametrize("inp, msg", [
    ({"points": [(1, 1), (5, 5)]}, "no image"),
    ({"points": [(1, 1)]}, "odd"),
    ({"points": [(1, 1), (500, 5)]}, "outside"),
    ({"points": [(3, 3), (3, 3)]}, "same point"),
])
def test_bad_input_rejected_at_entry(scene, ctx, inp, msg):
    sc, _ = scene
    payload = {"image": sc.image, **inp} if msg != "no image" else inp
    with pytest.raises(InputError, match=msg):
        build_graph().invoke(payload, context=ctx)


def test_crash_resume_from_sqlite_and_db_stays_small(scene, ctx, monkeypatch, tmp_path):
    from langgraph.checkpoint.sqlite import SqliteSaver

    sc, pts = scene
    _scores(monkeypatch, [0.1])
    calls = {"locate": 0, "sample": 0}
    real_locate, real_sample = nodes.locate, nodes.sample_intentions

    def counting_locate(*a, **k):
        calls["locate"] += 1
        return real_locate(*a, **k)

    def crashing_sample(*a, **k):
        calls["sample"] += 1
        if calls["sample"] == 1:
            raise RuntimeError("simulated crash (power cut) during sampling")
        return real_sample(*a, **k)

    monkeypatch.setattr(nodes, "locate", counting_locate)
    monkeypatch.setattr(nodes, "sample_intentions", crashing_sample)
    db = tmp_path / "threads.sqlite"
    conn = sqlite3.connect(str(db), check_same_thread=False)
    g = build_graph(checkpointer=SqliteSaver(conn), artifacts_dir=ctx.artifacts_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        g.invoke({"image": sc.image, "points": pts}, _cfg("crash"), context=ctx)
    conn.close()
    # a new process: fresh connection, fresh graph, same thread -> resumes at `sample`, does not locate again
    conn = sqlite3.connect(str(db), check_same_thread=False)
    g = build_graph(checkpointer=SqliteSaver(conn), artifacts_dir=ctx.artifacts_dir)
    assert g.get_state(_cfg("crash")).next == ("sample",)
    out = g.invoke(None, _cfg("crash"), context=ctx)
    assert out["accepted"] and calls == {"locate": 1, "sample": 2}
    # no image bytes in the database: a 64x64 RGB image alone is 12 KB raw; PNG magic must not appear
    blob = b"".join(bytes(r[0]) for r in conn.execute("select checkpoint from checkpoints"))
    blob += b"".join(bytes(r[0]) for r in conn.execute("select value from writes") if r[0] is not None)
    assert b"\x89PNG" not in blob and sc.image.tobytes()[:64] not in blob
    conn.close()
    assert db.stat().st_size < 200_000


def test_move_intentions_drag_the_located_object_region():
    import numpy as np

    from luciddrag.agent.context import AgentContext
    from luciddrag.agent.nodes import handle_regions, moves_object, region_motion
    from luciddrag.tools.schemas import Intention, LocatorResult, mask_to_rle

    def it(text):
        return Intention(intention=text, source_prompt="a", target_prompt="b", confidence=0.5)

    auto = AgentContext(handle_regions="auto")
    assert moves_object(it("move the red circle to the right"), auto)
    assert moves_object(it("Shift the cup left"), auto)
    assert region_motion(it("make the red circle bigger"), auto) == "scale"
    assert region_motion(it("move the circle to the right"), auto) == "translate"
    assert not moves_object(it("raise the horse's head"), auto)
    assert moves_object(it("raise the head"), AgentContext(handle_regions="always"))
    assert not moves_object(it("move it"), AgentContext(handle_regions="never"))

    obj = np.zeros((20, 30), bool)
    obj[5:10, 5:12] = True
    located = LocatorResult.model_validate({
        "backend": "test", "image_size": [30, 20], "descriptions": [
            {"index": 0, "handle": [8, 7], "description": "a red square", "region": {
                "box": [5, 5, 12, 10], "source": "segmentation", "mask_rle": mask_to_rle(obj)}},
            {"index": 1, "handle": [25, 15], "description": "background", "region": {
                "box": [0, 0, 30, 20], "source": "region-grow", "mask_rle": mask_to_rle(np.ones((20, 30), bool))}},
        ]})
    regions = handle_regions(located, (30, 20))
    assert regions is not None and np.array_equal(regions[0], obj)
    assert regions[1] is None  # the whole image is not an object
    assert handle_regions(None, (30, 20)) is None


def test_sampler_asks_for_quality_guidance_by_kind_of_drag(monkeypatch):
    """The agent hands the engine its discriminator choice; the engine reads the kind of drag from the request: a
    patch drag (no object region) is 'patch', not 'translate', though its request translates."""
    from types import SimpleNamespace

    import numpy as np

    import luciddrag.agent.tools as tools
    from luciddrag.engine.pipeline import drag_kind
    from luciddrag.engine.request import QualityGuidance
    from luciddrag.tools.schemas import DragPoints, Intention

    sent = []
    editor = SimpleNamespace(show_progress=False, edit=lambda req, **kw: sent.append((req, kw)) or "done")
    monkeypatch.setattr(tools, "get_editor", lambda ctx: editor)
    image = Image.new("RGB", (32, 32))
    region = np.zeros((32, 32), bool)
    region[4:12, 4:12] = True
    drags = DragPoints.from_flat([(8, 8), (20, 8)])
    its = [Intention(intention="raise it", source_prompt="a", target_prompt="b", confidence=1.0)]
    ctx = AgentContext(discriminator="disc", w_quality=3.0)
    for motion in (None, "translate", "scale"):
        regions = None if motion is None else [region]
        assert tools.sample_intentions(ctx, image, drags, None, its, regions=regions, motion=motion) == "done"
    assert [drag_kind(req) for req, _ in sent] == ["patch", "translate", "scale"]
    assert [req.region_motion for req, _ in sent] == ["translate", "translate", "scale"]
    assert all(req.quality == QualityGuidance(discriminator="disc", weight=3.0) for req, _ in sent)
    assert all("extra_terms" not in kw for _, kw in sent)
