"""Scripted answers for the committed cassettes: written by hand, NOT produced by an LLM.

No LLM key exists where this project is developed, so the cassettes under ``cassettes/`` were recorded through the
real client stack against this scripted upstream (``python -m luciddrag.evals.agent.scripted``), and their metadata says so
(``synthetic: true``). The answers are written the way a capable model answers the ``reason_intentions`` prompt
(three ranked intentions, prompts differing in the edited words), including a few realistic imperfections, so the
metrics have something to measure. Anyone with a key replaces them with a real model's answers:
``luciddrag eval agent --record`` (OPENAI_API_KEY, optionally OPENAI_BASE_URL / LUCIDDRAG_LLM_MODEL).
"""

from __future__ import annotations

import json
import re
from typing import Any

from luciddrag.evals.agent.cases import load_cases
from luciddrag.evals.agent.runner import format_table, run_agent_eval

SCRIPTED_NOTE = ("hand-written answers served by evals/agent/scripted.py through the real ChatOpenAI client; NOT a "
                 "real LLM's output. Re-record with a key: luciddrag eval agent --record")


def _i(intention: str, source: str, target: str, confidence: float) -> dict[str, Any]:
    return {"intention": intention, "source_prompt": source, "target_prompt": target, "confidence": confidence}


# keyed by the case's original description (what the rendered request contains)
ANSWERS: dict[str, list[dict[str, Any]]] = {
    "a red motorcycle.": [
        _i("make the motorcycle longer", "a short red motorcycle.", "a long red motorcycle.", 0.7),
        _i("move the motorcycle to the left", "a red motorcycle.", "a red motorcycle on the left.", 0.2),
        _i("stretch the rear of the motorcycle", "a red motorcycle with a short rear.",
           "a red motorcycle with a long rear.", 0.1),
    ],
    "a photo of a raccoon.": [
        _i("make the raccoon look sideways", "a photo of a raccoon looking forward.",
           "a photo of a raccoon looking sideways.", 0.6),
        _i("move the raccoon's head up and to the right", "a photo of a raccoon.",
           "a photo of a raccoon with its head raised.", 0.25),
        _i("make the raccoon's nose longer", "a photo of a raccoon with a short nose.",
           "a photo of a raccoon with a long nose.", 0.15),
    ],
    "a portrait of a smiling astronaut in an orange spacesuit.": [
        _i("make the astronaut look to the right", "a portrait of a smiling astronaut looking at the camera.",
           "a portrait of a smiling astronaut looking to the right.", 0.65),
        _i("turn the astronaut's head sideways", "a portrait of a smiling astronaut facing forward.",
           "a portrait of a smiling astronaut facing sideways.", 0.25),
        _i("move the astronaut's face to the right", "a portrait of a smiling astronaut in an orange spacesuit.",
           "a portrait of a smiling astronaut in an orange spacesuit, shifted to the right.", 0.1),
    ],
    "a cup of coffee on a saucer on a wooden table.": [
        _i("make the cup wider", "a narrow cup of coffee on a saucer on a wooden table.",
           "a wide cup of coffee on a saucer on a wooden table.", 0.55),
        _i("make the cup bigger", "a small cup of coffee on a saucer on a wooden table.",
           "a large cup of coffee on a saucer on a wooden table.", 0.3),
        _i("move the cup to the right", "a cup of coffee in the middle of a saucer on a wooden table.",
           "a cup of coffee on the right of a saucer on a wooden table.", 0.15),
    ],
    "a rocket on a launch pad at night.": [
        # a realistic slip: the top answer forgets to name the rocket in its intention (prompts still do)
        _i("make it taller", "a short rocket on a launch pad at night.", "a tall rocket on a launch pad at night.",
           0.6),
        _i("lift the rocket off the launch pad", "a rocket on a launch pad at night.",
           "a rocket lifting off from a launch pad at night.", 0.3),
        _i("make the rocket's nose longer", "a rocket with a short nose on a launch pad at night.",
           "a rocket with a long nose on a launch pad at night.", 0.1),
    ],
    "a close-up photo of a tabby cat.": [
        _i("make the cat look up", "a close-up photo of a tabby cat looking forward.",
           "a close-up photo of a tabby cat looking up.", 0.5),
        _i("raise the cat's head", "a close-up photo of a tabby cat with its head lowered.",
           "a close-up photo of a tabby cat with its head raised.", 0.35),
        _i("make the cat's ears taller", "a close-up photo of a tabby cat with short ears.",
           "a close-up photo of a tabby cat with tall ears.", 0.15),
    ],
    "a small purple triangle in the center and a small green triangle on the right": [
        _i("move the green triangle up and to the left",
           "a small purple triangle in the center and a small green triangle on the right",
           "a small purple triangle in the center and a small green triangle at the top right", 0.75),
        _i("make the green triangle bigger",
           "a small purple triangle in the center and a small green triangle on the right",
           "a small purple triangle in the center and a big green triangle on the right", 0.15),
        _i("move the green triangle toward the purple triangle",
           "a small purple triangle in the center and a small green triangle on the right",
           "a small purple triangle in the center and a small green triangle next to it", 0.1),
    ],
    "a big red triangle at the bottom right": [
        # a realistic misreading first: the drag pulls the edge inward, yet the top answer grows the shape
        _i("make the red triangle bigger", "a big red triangle at the bottom right",
           "a huge red triangle at the bottom right", 0.45),
        _i("make the red triangle smaller", "a big red triangle at the bottom right",
           "a small red triangle at the bottom right", 0.4),
        _i("move the red triangle to the right", "a big red triangle at the bottom right",
           "a big red triangle at the far bottom right", 0.15),
    ],
}


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(b.get("text", "") for b in c if isinstance(b, dict))
    return ""


def scripted_forward(body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat-completions answer for a reasoner request, from ``ANSWERS`` (json_schema or tool call)."""
    m = re.search(r"Original description: (.*)", _last_user_text(body))
    caption = m.group(1).strip() if m else ""
    if caption not in ANSWERS:
        raise KeyError(f"no scripted answer for description {caption!r}")
    args = {"intentions": ANSWERS[caption]}
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        message["tool_calls"] = [{"id": "call_scripted", "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(args)}}]
        finish = "tool_calls"
    else:
        message["content"] = json.dumps(args)
        finish = "stop"
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1764288000,
            "model": "scripted-answers", "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


def record_scripted(version: int | None = None) -> None:  # pragma: no cover - maintenance
    report = run_agent_eval(load_cases(), version=version, mode="record", model="scripted-answers",
                            upstream="scripted://evals/agent/scripted.py", synthetic=True, note=SCRIPTED_NOTE,
                            forward=scripted_forward)
    print(format_table(report))


if __name__ == "__main__":  # pragma: no cover
    record_scripted()
