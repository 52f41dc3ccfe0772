"""The vision-LLM judge (tools/judge.py) through the real ChatOpenAI client against the local OpenAI-compatible
test server: what it sends (system message, marked original, edited image, schema), both structured-output
methods, and clear errors; and how the critique node's checks use it (agent/object_checks.py)."""

from __future__ import annotations

import json

import pytest

from luciddrag.agent.context import AgentContext
from luciddrag.agent.object_checks import judge_check, object_checks
from luciddrag.evals.shapesworld.world import render_scene
from luciddrag.tools.judge import JudgeConfig, JudgeError, judge_edit
from luciddrag.tools.llm import LLMSettings
from luciddrag.tools.schemas import DragPoints
from tests.openai_server import (FakeOpenAIServer, chat_completion, openai_server,  # noqa: F401 - fixture
                                 server_error, tool_call)

VERDICT = {"dragged": True, "intact": False, "score": 4, "reason": "the circle moved but a faint copy remains"}


def _case():
    sc = render_scene(3, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    drags = DragPoints.from_flat([[cx, cy], [min(cx + 10, 60), cy]])
    return sc.image, sc.image.rotate(5), drags


def _settings(server: FakeOpenAIServer, **kw) -> LLMSettings:
    return LLMSettings(base_url=server.url, model="gpt-4.1-mini", max_retries=0, timeout_s=5.0, **kw)


def test_judge_sends_both_images_and_reads_json_schema(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(json.dumps(VERDICT)))
    original, edited, drags = _case()
    v = judge_edit(original, edited, drags, "move the circle to the right", JudgeConfig(llm=_settings(openai_server)))
    assert (v.dragged, v.intact, v.score) == (True, False, 4)
    body = openai_server.chat_requests[0].body
    assert body["temperature"] == 0.0
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "JudgeAnswer"
    system, user = body["messages"]
    assert system["role"] == "system" and "drag-based image edits" in system["content"]
    images = [b for b in user["content"] if b["type"] == "image_url"]
    text = next(b["text"] for b in user["content"] if b["type"] == "text")
    assert len(images) == 2 and all(b["image_url"]["url"].startswith("data:image/png;base64,") for b in images)
    assert "move the circle to the right" in text and f"Drag 1: handle at [{round(drags.pairs[0].handle[0])}" in text


def test_judge_function_calling(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(tool_calls=[tool_call("JudgeAnswer", {**VERDICT, "intact": True,
                                                                              "score": 9})]))
    original, edited, drags = _case()
    v = judge_edit(original, edited, drags, "", JudgeConfig(llm=_settings(openai_server),
                                                           structured_output="function_calling"))
    assert v.intact and v.score == 9
    assert openai_server.chat_requests[0].body["tools"][0]["function"]["name"] == "JudgeAnswer"


@pytest.mark.parametrize("answer, match", [
    (chat_completion("I think it looks fine."), "no valid answer"),
    (chat_completion(json.dumps({**VERDICT, "score": 14})), "no valid answer|schema"),
    (server_error(503), "LLM failed"),
])
def test_judge_failures_are_one_line_errors(openai_server: FakeOpenAIServer, answer, match: str) -> None:
    openai_server.queue(answer)
    original, edited, drags = _case()
    with pytest.raises(JudgeError, match=match) as info:
        judge_edit(original, edited, drags, "x", JudgeConfig(llm=_settings(openai_server)))
    assert "\n" not in str(info.value)


def test_judge_needs_a_configured_llm() -> None:
    original, edited, drags = _case()
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        judge_edit(original, edited, drags, "x", JudgeConfig(llm=LLMSettings()))


def test_critique_checks_use_the_judge_as_configured(openai_server: FakeOpenAIServer) -> None:
    original, edited, drags = _case()
    tracking = [(True, "handle landed 1.0 px from target")]
    # off: no request at all
    off = AgentContext(judge="off", llm=_settings(openai_server), critic_regions=False)
    assert object_checks(off, tracking, original, edited, drags, None, None, "move") == tracking
    assert not openai_server.chat_requests
    # llm: the verdict is a check; a damaged object fails it
    openai_server.queue(chat_completion(json.dumps(VERDICT)))
    on = AgentContext(judge="llm", llm=_settings(openai_server), critic_regions=False)
    checks = object_checks(on, tracking, original, edited, drags, None, None, "move")
    assert checks[0] == tracking[0] and checks[1][0] is False and "damaged, score 4/10" in checks[1][1]
    # auto: a failing service is a warning, not a rejection; llm: it is a failed check
    openai_server.queue(server_error(503))
    auto = AgentContext(judge="auto", llm=_settings(openai_server), critic_regions=False)
    warnings: list[str] = []
    assert object_checks(auto, tracking, original, edited, drags, None, None, "move", warnings) == tracking
    assert warnings and warnings[0].startswith("judge skipped")
    openai_server.queue(server_error(503))
    check, note = judge_check(on, original, edited, drags, "move")
    assert check is not None and check[0] is False and note is None
    # auto without any LLM configured: silently off
    assert judge_check(AgentContext(judge="auto", llm=LLMSettings()), original, edited, drags, "m") == (None, None)
