"""Conversational editing: the offline grammar, follow-ups in one thread, human in the loop, the tool-calling path."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

import luciddrag.agent.nodes as nodes
from luciddrag.agent.chat import build_chat_graph
from luciddrag.agent.context import AgentContext
from luciddrag.agent.grammar import (EditAction, FurtherAction, InsteadAction, OptionsAction, ReplyAction, TryOptionAction,
                           UndoAction, parse_command)
from luciddrag.evals.shapesworld.world import render_scene
from tests.fakes import ScriptedChatModel


@pytest.mark.parametrize("text, expected", [
    ("drag 10,20 to 30,40", EditAction(points=[(10, 20), (30, 40)])),
    ("drag (1,2)->(3,4) and 5,6 to 7,8", EditAction(points=[(1, 2), (3, 4), (5, 6), (7, 8)])),
    ("show me the options for 10,10 to 20,10", OptionsAction(points=[(10, 10), (20, 10)])),
    ("try your second idea", TryOptionAction(index=2)),
    ("try option 3", TryOptionAction(index=3)),
    ("no — make the neck longer instead", InsteadAction(intention="make the neck longer")),
    ("drag it a bit further", FurtherAction(factor=1.5)),
    ("undo", UndoAction()),
    ("hello there", ReplyAction(text=parse_command("?").text)),
])
def test_grammar(text, expected):
    assert parse_command(text) == expected


@pytest.fixture()
def session(tiny_model_dir, tmp_path, monkeypatch):
    def accept(ctx, original, edited, drags, prompt=""):
        return {"tracked": [p.target for p in drags.pairs], "md_px": 1.0, "md_fraction": 0.05}

    monkeypatch.setattr(nodes, "score_drag", accept)
    sc = render_scene(5, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    ctx = AgentContext(model=str(tiny_model_dir), device="cpu", steps=3, locator="offline", reasoner="offline",
                       artifacts_dir=str(tmp_path / "art"))
    g = build_chat_graph(checkpointer=InMemorySaver(), artifacts_dir=ctx.artifacts_dir)
    return g, ctx, sc, (round(cx), round(cy))


def _say(g, ctx, text, thread="c", **extra):
    return g.invoke({"messages": [("user", text)], **extra}, {"configurable": {"thread_id": thread}}, context=ctx)


def test_offline_followups_in_one_thread(session):
    g, ctx, sc, (cx, cy) = session
    first = _say(g, ctx, f"drag {cx},{cy} to {cx - 12},{cy}", image=sc.image)
    assert first["result"] is not None and "Result:" in first["messages"][-1].content
    original = first["history"][0]
    edited = first["image"]
    assert edited.sha256 != original.sha256 and len(first["last"]["intentions"]) >= 2
    second = _say(g, ctx, "try your second idea")
    assert second["last"]["intention"]["intention"] == first["last"]["intentions"][1].intention
    assert second["last"]["base"].sha256 == original.sha256  # redone from the same starting image
    further = _say(g, ctx, "a bit further")
    h, t = further["last"]["points"]
    assert abs((t[0] - h[0]) - 1.5 * (-12)) < 1e-6
    undone = _say(g, ctx, "undo")
    assert undone["image"].sha256 == original.sha256 and undone["history"] == []
    assert "Nothing to undo" in _say(g, ctx, "undo")["messages"][-1].content


def test_painted_region_reaches_the_edit_and_its_redo(session, monkeypatch):
    """The chat edits with the region painted on the current image; "try your second idea" redoes the edit with
    the same region; the edited image starts without one."""
    import numpy as np
    from PIL import Image

    import luciddrag.agent.chat as chat

    seen = []
    real = chat.build_graph

    class Recorder:
        def invoke(self, inp, **kw):
            seen.append(inp.get("mask"))
            return real().invoke(inp, **kw)

    monkeypatch.setattr(chat, "build_graph", lambda: Recorder())
    g, ctx, sc, (cx, cy) = session
    region = np.zeros((sc.image.height, sc.image.width), np.uint8)
    region[:, : cx + 4] = 255
    mask = Image.fromarray(region)
    first = _say(g, ctx, f"drag {cx},{cy} to {cx - 12},{cy}", thread="m", image=sc.image, mask=mask)
    assert seen[0] is mask and first["mask"] is None and first["last"]["mask"] is mask
    _say(g, ctx, "try your second idea", thread="m")
    from luciddrag.agent.artifacts import ArtifactStore

    # stored in the thread's checkpoint as an artifact reference: same pixels
    assert np.array_equal(np.asarray(ArtifactStore.get_image(seen[1])), region)
    _say(g, ctx, f"drag {cx - 12},{cy} to {cx - 20},{cy}", thread="m")
    assert seen[2] is None


def test_options_interrupt_then_choice(session):
    g, ctx, sc, (cx, cy) = session
    paused = _say(g, ctx, f"show me the options for {cx},{cy} to {cx - 12},{cy}", thread="hitl", image=sc.image)
    options = paused["__interrupt__"][0].value["intentions"]
    assert len(options) >= 2
    done = g.invoke(Command(resume=2), {"configurable": {"thread_id": "hitl"}}, context=ctx)
    assert done["last"]["intention"]["intention"] == options[1]["intention"]


def test_tool_calling_model_drives_the_same_actions(session):
    g, ctx, sc, (cx, cy) = session
    call = AIMessage(content="", tool_calls=[{"name": "EditAction", "id": "call_1", "type": "tool_call",
                                              "args": {"points": [[cx, cy], [cx - 12, cy]]}}])
    ctx.chat_model = ScriptedChatModel(script=[call, "Sure - anything else?"])
    out = _say(g, ctx, "please move the shape left", thread="llm", image=sc.image)
    bound = [t["function"]["name"] for t in ctx.chat_model.call_kwargs[0]["tools"]]
    assert {"EditAction", "UndoAction", "TryOptionAction", "OptionsAction"} <= set(bound)
    assert any(isinstance(m, ToolMessage) and m.tool_call_id == "call_1" for m in out["messages"])
    assert out["result"] is not None
    # the model saw our system prompt with the image's size
    assert "64x64" in ctx.chat_model.calls[0][0].content
    reply = _say(g, ctx, "thanks", thread="llm")
    assert reply["messages"][-1].content == "Sure - anything else?"
