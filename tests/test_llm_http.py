"""The real ChatOpenAI client over HTTP against a local OpenAI-compatible server serving recorded answers: the
vision message, json_schema and function_calling structured output, 429 then success, 5xx, timeouts, junk JSON."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from luciddrag.evals.shapesworld.world import render_scene
from tests.openai_server import (
    RECORDED_INTENTIONS,
    RECORDED_LOCATOR_REPLY,
    Answer,
    FakeOpenAIServer,
    chat_completion,
    openai_server,  # noqa: F401 - pytest fixture
    rate_limited,
    server_error,
    tool_call,
)
from luciddrag.tools.drawing import pair_colour
from luciddrag.tools.llm import LLMSettings, make_chat_model
from luciddrag.tools.locator import LocatorConfig, OpenAIVisionLocator, describe_image, locate
from luciddrag.tools.reasoner import ReasonerConfig, ReasonRequest, reason
from luciddrag.tools.schemas import DragPoints, HandleDescription, LocatorResult


def settings_for(server: FakeOpenAIServer, **kw) -> LLMSettings:
    return LLMSettings(base_url=server.url, model=kw.pop("model", "gpt-4.1-mini"), max_retries=kw.pop("max_retries", 2),
                       timeout_s=kw.pop("timeout_s", 5.0), **kw)


def _request() -> ReasonRequest:
    located = LocatorResult(descriptions=[HandleDescription(index=0, handle=(297, 270),
                                                            description="the nose of a raccoon")],
                            backend="test", image_size=(512, 512))
    return ReasonRequest(drags=DragPoints.from_flat([[297, 270], [347, 248]]), located=located,
                         caption="a photo of a raccoon.")


def _decode(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


# ------------------------------------------------------------------------------------------------ settings


def test_chat_model_factory_targets_chat_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("LUCIDDRAG_LLM_MODEL", "qwen2.5-vl")
    monkeypatch.setenv("LUCIDDRAG_STRUCTURED_OUTPUT", "function_calling")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = LLMSettings.from_env(max_retries=1)
    assert settings.configured and settings.model == "qwen2.5-vl" and settings.structured_output == "function_calling"
    assert settings.max_retries == 1 and settings.api_key is None
    model = make_chat_model(settings)
    assert model.use_responses_api is False and model.max_retries == 1
    assert model.openai_api_base == "http://127.0.0.1:1/v1"
    assert model.openai_api_key.get_secret_value() == "not-needed"  # local servers need no key
    assert LLMSettings.from_env(model="override").model == "override"
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert not LLMSettings.from_env().configured
    with pytest.raises(ValueError):
        make_chat_model(LLMSettings())


# ------------------------------------------------------------------------------------------------ vision locator


def test_vision_locator_sends_the_marked_image_crops_and_coordinates(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(RECORDED_LOCATOR_REPLY))
    scene = render_scene(1)
    a, b = scene.shapes[0].centroid, scene.shapes[1].centroid
    drags = DragPoints.from_pairs([(a, (a[0], 5.0)), (b, (b[0], 60.0))])
    locator = OpenAIVisionLocator(settings_for(openai_server, model="qwen2.5-vl-7b"))
    result = locate(scene.image, drags, locator=locator)

    assert [d.description for d in result.descriptions] == ["the nose of a raccoon", "the left ear of the raccoon"]
    assert result.backend == f"openai:qwen2.5-vl-7b@{openai_server.url}" and result.warnings == []
    assert all(d.region.source == "window" for d in result.descriptions)

    body = openai_server.chat_requests[0].body
    assert body["model"] == "qwen2.5-vl-7b"
    system, user = body["messages"]
    assert system["role"] == "system" and "numbered handle dot" in system["content"]
    blocks = user["content"]
    texts = "\n".join(b["text"] for b in blocks if b["type"] == "text")
    images = [_decode(b["image_url"]["url"]) for b in blocks if b["type"] == "image_url"]
    assert f"Handle 1: at ({round(a[0])}, {round(a[1])}), dragged to ({round(a[0])}, 5)." in texts
    assert "64 pixels wide and 64 pixels high" in texts and "shown at 512x512 pixels" in texts
    assert len(images) == 3  # the whole image + one close-up per handle
    full = np.asarray(images[0])
    assert images[0].size == (512, 512)
    for i, (x, y) in enumerate([a, b]):
        # The numbered dot of pair i sits at the enlarged handle position, in pair i's colour (off its label).
        px, py = int(x * 8 + 3.5), int(y * 8 + 3.5)
        patch = full[py - 8:py + 9, px - 8:px + 9].reshape(-1, 3).astype(int)
        assert (np.abs(patch - np.array(pair_colour(i))).sum(-1) < 60).sum() > 20
    assert images[1].size == images[2].size == (384, 384)


def test_vision_locator_with_a_missing_line_and_a_dead_server(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion("1: the red square"))
    img = Image.new("RGB", (600, 400), "white")
    drags = DragPoints.from_flat([[100, 100], [150, 100], [300, 200], [300, 300]])
    locator = OpenAIVisionLocator(settings_for(openai_server))
    result = locate(img, drags, locator=locator)
    assert [d.description for d in result.descriptions] == ["the red square", "the region around (300, 200)"]
    assert "handle(s) 2" in result.warnings[0]
    openai_server.queue(server_error(500), server_error(500))
    dead = OpenAIVisionLocator(settings_for(openai_server, max_retries=1))
    fallback = locate(img, drags, locator=dead)
    assert fallback.backend == "offline" and "(HTTP 500)" in fallback.warnings[0]


def test_vlm_caption(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion('"a red motorcycle."'))
    text, source = describe_image(Image.new("RGB", (640, 480)), None,
                                  config=LocatorConfig(backend="openai", llm=settings_for(openai_server)))
    assert text == "a red motorcycle." and source.startswith("openai:")
    body = openai_server.chat_requests[0].body
    assert body["messages"][-1]["content"][1]["type"] == "image_url"


# ------------------------------------------------------------------------------------------------ structured output


def test_json_schema_structured_output(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(json.dumps(RECORDED_INTENTIONS)))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server)))
    assert result.backend == f"llm:gpt-4.1-mini@{openai_server.url}" and result.warnings == []
    assert [i.intention for i in result.intentions] == [i["intention"] for i in RECORDED_INTENTIONS["intentions"]]
    assert [round(i.confidence, 6) for i in result.intentions] == [0.6, 0.25, 0.15]
    body = openai_server.chat_requests[0].body
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "IntentionSet"
    assert fmt["json_schema"]["strict"] is True
    assert set(fmt["json_schema"]["schema"]["$defs"]["Intention"]["required"]) == {
        "intention", "source_prompt", "target_prompt", "confidence"}
    assert "tools" not in body
    assert body["messages"][0]["role"] == "system" and "Direction is [[297, 270], [347, 248]]." in body["messages"][1]["content"]


def test_function_calling_structured_output(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(None, tool_calls=[tool_call("IntentionSet", RECORDED_INTENTIONS)]))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server), structured_output="function_calling"))
    assert len(result.intentions) == 3 and result.warnings == []
    body = openai_server.chat_requests[0].body
    assert "response_format" not in body
    assert body["tools"][0]["function"]["name"] == "IntentionSet"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "IntentionSet"}}


def test_429_then_success_is_retried_by_the_client(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(rate_limited(retry_after_ms=10), chat_completion(json.dumps(RECORDED_INTENTIONS)))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server)))
    assert len(openai_server.chat_requests) == 2
    assert result.backend.startswith("llm") and result.warnings == []


def test_5xx_beyond_the_retry_budget_falls_back(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(server_error(503), server_error(503), chat_completion(json.dumps(RECORDED_INTENTIONS)))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server, max_retries=1)))
    assert len(openai_server.chat_requests) == 2  # one try + one retry, then it stops (bounded)
    assert result.backend == "offline" and "HTTP 503" in result.warnings[0]


def test_timeout_falls_back(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(Answer(chat_completion(json.dumps(RECORDED_INTENTIONS)), delay_s=1.0))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server, max_retries=0, timeout_s=0.2)))
    assert result.backend == "offline" and "TimeoutError" in result.warnings[0]


def test_junk_json_gets_one_repair_then_succeeds(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion('{"intentions": [{"intention": "move it"'),
                        chat_completion(json.dumps(RECORDED_INTENTIONS)))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server)))
    assert len(openai_server.chat_requests) == 2
    repair = openai_server.chat_requests[1].body["messages"][-1]
    assert repair["role"] == "user" and "could not be used" in repair["content"]
    assert '{"intentions": [{"intention": "move it"' in repair["content"]  # the model sees its own broken answer
    assert result.backend.startswith("llm") and any("repaired" in w for w in result.warnings)


def test_junk_json_twice_falls_back_to_offline(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion("Sure! Here are some intentions: 1. move"),
                        chat_completion(None, tool_calls=[tool_call("IntentionSet", "{junk")]))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server)))
    assert len(openai_server.chat_requests) == 2
    assert result.backend == "offline" and any("failed the schema twice" in w for w in result.warnings)
    assert result.intentions and abs(sum(i.confidence for i in result.intentions) - 1) < 1e-9


def test_function_calling_junk_arguments_are_repaired(openai_server: FakeOpenAIServer) -> None:
    openai_server.queue(chat_completion(None, tool_calls=[tool_call("IntentionSet", "{junk")]),
                        chat_completion(None, tool_calls=[tool_call("IntentionSet", RECORDED_INTENTIONS)]))
    result = reason(_request(), ReasonerConfig(llm=settings_for(openai_server), structured_output="function_calling"))
    repair = openai_server.chat_requests[1].body["messages"][-1]["content"]
    assert "are not valid JSON" in repair and "{junk" in repair
    assert result.backend.startswith("llm") and len(result.intentions) == 3
