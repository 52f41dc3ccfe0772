"""The optional vision-LLM judge of one drag edit (GScore-like, per attempt): did the drag happen, is the object
intact, a score 0-10.

One request: the ``judge_edit`` template's instruction, the original with the drags drawn on it, the edited image.
The answer is structured output (``JudgeAnswer``) through ``json_schema`` or ``function_calling``, whichever the
settings name. Service failures after the client's retries and answers that fail the schema raise ``JudgeError``
(one line); the critique node decides whether that rejects the attempt or only warns. Never needed offline.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from luciddrag.engine.errors import LucidDragError
from luciddrag.prompts import load_template, parse_label
from luciddrag.tools.drawing import draw_drags
from luciddrag.tools.llm import LLM_SERVICE_ERRORS, LLMSettings, StructuredMethod, describe_llm_error, make_chat_model
from luciddrag.tools.locator import image_to_data_url
from luciddrag.tools.schemas import DragPoints

JUDGE_TEMPERATURE = 0.0  # a verdict, not a proposal: the same edit should get the same answer
MIN_DISPLAY_SIDE = 256  # small images (ShapesWorld's 64 px) are enlarged so the drawn drags stay readable


class JudgeAnswer(BaseModel):
    """What the vision LLM returns (its structured-output schema)."""

    dragged: bool = Field(description="Did the content under each handle reach its target?")
    intact: bool = Field(description="Is the edited object whole, with no ghost, smear, duplicate or wrong colour?")
    score: int = Field(ge=0, le=10, description="0 (failed or broken) to 10 (exactly the requested drag, seamless).")
    reason: str = Field(description="One sentence: what decided the score.")


class JudgeConfig(BaseModel):
    llm: LLMSettings | None = None
    """None reads the environment (``LLMSettings.from_env``)."""
    prompt: str = "judge_edit"
    structured_output: StructuredMethod | None = None
    """Overrides ``llm.structured_output``."""


class JudgeError(LucidDragError):
    """The judge could not give a verdict (service unavailable, or no valid structured answer)."""


def drag_lines(drags: DragPoints) -> str:
    return "\n".join(f"Drag {i + 1}: handle at [{round(p.handle[0])}, {round(p.handle[1])}], target at "
                     f"[{round(p.target[0])}, {round(p.target[1])}]." for i, p in enumerate(drags.pairs))


def judge_variables(size: tuple[int, int], drags: DragPoints, intention: str) -> dict[str, Any]:
    """Exactly the variables the code gives a ``judge_edit`` template."""
    return {"image_width": size[0], "image_height": size[1], "drags": drag_lines(drags),
            "intention": intention.strip() or "(not stated)"}


def judge_messages(original: Image.Image, edited: Image.Image, drags: DragPoints, intention: str,
                   prompt: str = "judge_edit") -> list[Any]:
    """The system message and one user message: the instruction, the marked original, the edited image."""
    from langchain_core.messages import HumanMessage, SystemMessage

    name, version = parse_label(prompt)
    rendered = load_template(name, version).render(**judge_variables(original.size, drags, intention))
    marked = draw_drags(original.convert("RGB"), [(p.handle, p.target) for p in drags.pairs],
                        min_side=MIN_DISPLAY_SIDE)
    shown = edited.convert("RGB")
    if min(shown.size) < MIN_DISPLAY_SIDE:
        k = -(-MIN_DISPLAY_SIDE // min(shown.size))
        shown = shown.resize((shown.width * k, shown.height * k), Image.Resampling.NEAREST)
    out: list[Any] = []
    user_text = []
    for m in rendered.messages:
        if m.role == "system":
            out.append(SystemMessage(content=m.content))
        else:
            user_text.append(m.content)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": "\n\n".join(user_text)}]
    blocks += [{"type": "image_url", "image_url": {"url": image_to_data_url(im)}} for im in (marked, shown)]
    return [*out, HumanMessage(content=blocks)]


def judge_edit(original: Image.Image, edited: Image.Image, drags: DragPoints, intention: str = "",
               config: JudgeConfig | None = None, *, chat_model: Any = None) -> JudgeAnswer:
    """The judge's verdict on one edit. ``chat_model``: a LangChain chat model to use instead of the settings'."""
    config = config or JudgeConfig()
    settings = config.llm or LLMSettings.from_env()
    method = config.structured_output or settings.structured_output
    if chat_model is None:
        if not settings.configured:
            raise JudgeError("the judge needs an LLM: set OPENAI_API_KEY or OPENAI_BASE_URL")
        chat_model = make_chat_model(settings.model_copy(update={"temperature": JUDGE_TEMPERATURE}), vision=True)
    structured = chat_model.with_structured_output(JudgeAnswer, method=method, include_raw=True)
    try:
        out = structured.invoke(judge_messages(original, edited, drags, intention, config.prompt))
    except LLM_SERVICE_ERRORS as exc:
        raise JudgeError(f"the judge's LLM failed: {describe_llm_error(exc)}") from None
    except (ValidationError, ValueError) as exc:  # json_schema mode: the client itself parses, strictly
        raise JudgeError(f"the judge gave no valid answer ({str(exc).splitlines()[0][:160]})") from None
    parsed = out.get("parsed")
    if out.get("parsing_error") is not None or parsed is None:
        raise JudgeError(f"the judge gave no valid answer ({str(out.get('parsing_error')).splitlines()[0][:160]})")
    try:
        return parsed if isinstance(parsed, JudgeAnswer) else JudgeAnswer.model_validate(parsed)
    except ValidationError as exc:
        raise JudgeError(f"the judge's answer does not fit the schema: {str(exc).splitlines()[0][:160]}") from None
