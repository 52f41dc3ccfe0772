"""GScore (GoodDrag, ``evaluation/GScore.ipynb``): a vision LLM rates edited images for naturalness and artifacts.

GoodDrag's protocol: one request holds GoodDrag's instruction, the original image (Image 1, the baseline, not rated)
and the edited images of several methods labelled 'A', 'B', 'C' (Images 2-4); gemini-pro-vision at temperature 0.4
rates each 1-10 with an analysis; the whole benchmark is rated 10 times and the scores averaged. Here the model is
any OpenAI-compatible vision model through langchain-openai, the instruction is the ``gscore_rate`` template, and
the scores come back as structured output (``GScoreAnswer``), never parsed from prose. A repeat whose answer fails
the schema (or rates a label twice, or skips one) is dropped and counted in ``failed``; the score is the mean over
the repeats that succeeded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from luciddrag.prompts import load_template, parse_label
from luciddrag.tools.llm import LLM_SERVICE_ERRORS, StructuredMethod, describe_llm_error
from luciddrag.tools.locator import image_to_data_url

log = logging.getLogger(__name__)

GSCORE_TEMPERATURE = 0.4  # GoodDrag's generation_config
GSCORE_REPEATS = 10  # GoodDrag: for i in range(10)
LABELS = "ABCDEFGH"
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


class GScoreRating(BaseModel):
    label: str = Field(description="The image's label, e.g. 'A'.")
    analysis: str = Field(description="What in the image influenced the rating.")
    score: int = Field(ge=1, le=10, description="1 (significant, noticeable artifacts) to 10 (excellent, seamless).")


class GScoreAnswer(BaseModel):
    """What the vision LLM returns (its structured-output schema)."""

    ratings: list[GScoreRating] = Field(description="One rating per modified image.")


class GScoreResult(BaseModel):
    scores: dict[str, float | None]
    """Mean score per label over the successful repeats (None if every repeat failed)."""
    repeats: list[dict[str, int]]
    """Each successful repeat's scores."""
    failed: int = 0
    errors: list[str] = Field(default_factory=list)


def gscore_variables(n: int) -> dict[str, Any]:
    """The template's variables for n edited images (GoodDrag's wording for n = 3: "three modified images, labeled
    'A', 'B', and 'C'", "'A' (Image 2), 'B' (Image 3), and 'C' (Image 4)")."""
    if not 1 <= n <= len(LABELS):
        raise ValueError(f"GScore rates 1 to {len(LABELS)} edited images per request, not {n}")
    labels = [f"'{LABELS[i]}'" for i in range(n)]
    positions = [f"{labels[i]} (Image {i + 2})" for i in range(n)]

    def join(items: list[str]) -> str:
        return items[0] if len(items) == 1 else (" and ".join(items) if len(items) == 2
                                                 else ", ".join(items[:-1]) + ", and " + items[-1])

    return {"count_words": _NUMBER_WORDS[n], "image_noun": "image" if n == 1 else "images", "labels": join(labels),
            "label_positions": join(positions)}


def gscore_messages(original: Image.Image, edited: Sequence[Image.Image], prompt: str = "gscore_rate") -> list[Any]:
    """One user message: the instruction, then Image 1 (original) and the edited images in label order."""
    from langchain_core.messages import HumanMessage

    name, version = parse_label(prompt)
    template = load_template(name, version)
    rendered = template.render(**gscore_variables(len(edited)))
    text = "\n\n".join(m.content for m in rendered.messages)
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for im in (original, *edited):
        blocks.append({"type": "image_url", "image_url": {"url": image_to_data_url(im.convert("RGB"))}})
    return [HumanMessage(content=blocks)]


def _check(answer: GScoreAnswer, n: int) -> dict[str, int]:
    want = [LABELS[i] for i in range(n)]
    got: dict[str, int] = {}
    for r in answer.ratings:
        label = r.label.strip().strip("'\"").upper().removeprefix("IMAGE ").strip()
        if label in got:
            raise ValueError(f"label {label} rated twice")
        got[label] = r.score
    if sorted(got) != want:
        raise ValueError(f"expected ratings for {', '.join(want)}, got {', '.join(sorted(got)) or 'none'}")
    return got


def gscore(chat_model: Any, original: Image.Image, edited: Sequence[Image.Image], repeats: int = GSCORE_REPEATS,
           method: StructuredMethod = "json_schema", prompt: str = "gscore_rate") -> GScoreResult:
    """Rate the edited images ``repeats`` times and average per label (A = edited[0], ...).

    Service errors after the client's own retries count as failed repeats (the run goes on); the caller decides
    whether a result with failures is acceptable.
    """
    messages = gscore_messages(original, edited, prompt)
    structured = chat_model.with_structured_output(GScoreAnswer, method=method, include_raw=True)
    done: list[dict[str, int]] = []
    errors: list[str] = []
    for _ in range(repeats):
        try:
            out = structured.invoke(messages)
            parsed = out.get("parsed")
            if out.get("parsing_error") is not None or parsed is None:
                raise ValueError(f"no structured answer ({out.get('parsing_error')})")
            if isinstance(parsed, dict):
                parsed = GScoreAnswer.model_validate(parsed)
            done.append(_check(parsed, len(edited)))
        except LLM_SERVICE_ERRORS as exc:
            errors.append(describe_llm_error(exc))
        except (ValidationError, ValueError) as exc:
            errors.append(str(exc).splitlines()[0][:200])
    labels = [LABELS[i] for i in range(len(edited))]
    scores = {lab: (sum(r[lab] for r in done) / len(done) if done else None) for lab in labels}
    if errors:
        log.warning("GScore: %d of %d repeats failed (%s)", len(errors), repeats, errors[0])
    return GScoreResult(scores=scores, repeats=done, failed=len(errors), errors=errors)
