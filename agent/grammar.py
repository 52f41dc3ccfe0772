"""Chat actions, and the small deterministic command grammar that turns text into them when no LLM is configured.

The LLM path (agent/chat.py) offers the same actions as tools, so both paths end in one executor.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, Field

Pt = tuple[float, float]


class EditAction(BaseModel):
    """Drag-edit the current image. points alternate handle and target; omit to reuse the last drag."""

    kind: Literal["edit"] = "edit"
    points: list[Pt] | None = Field(None, description="[[hx, hy], [tx, ty], ...] in the current image's pixels")
    intention: str | None = Field(None, description="What the user means, if they said it (e.g. 'make it bigger')")


class OptionsAction(BaseModel):
    """Propose intentions for a drag and let the user choose before editing."""

    kind: Literal["options"] = "options"
    points: list[Pt] | None = None


class TryOptionAction(BaseModel):
    """Redo the last edit with another of the proposed intentions (1-based index)."""

    kind: Literal["try_option"] = "try_option"
    index: int = Field(ge=1)


class InsteadAction(BaseModel):
    """Undo the last edit and redo it with the intention the user names."""

    kind: Literal["instead"] = "instead"
    intention: str


class FurtherAction(BaseModel):
    """Redo the last edit with the drag scaled by factor (1.5 = further, 0.5 = half as far)."""

    kind: Literal["further"] = "further"
    factor: float = Field(1.5, gt=0, le=4)


class UndoAction(BaseModel):
    """Go back to the image before the last edit."""

    kind: Literal["undo"] = "undo"


class ReplyAction(BaseModel):
    """No action: just answer."""

    kind: Literal["reply"] = "reply"
    text: str


Action = Union[EditAction, OptionsAction, TryOptionAction, InsteadAction, FurtherAction, UndoAction, ReplyAction]
TOOL_ACTIONS = {"edit": EditAction, "options": OptionsAction, "try_option": TryOptionAction,
                "instead": InsteadAction, "further": FurtherAction, "undo": UndoAction}

HELP = ("Offline mode (no LLM configured): say 'drag X,Y to X,Y' (add 'and X,Y to X,Y' for more), "
        "'options for X,Y to X,Y', 'try the second idea', 'make it bigger instead', 'a bit further', 'undo'.")

# A whole number token: "1e5" is read as 100000 (then refused as outside the image), never as its tail "5"; "12a"
# or "1.5.5" are not numbers at all. The lookarounds keep a match from starting or ending inside a longer token.
_NUM = r"(?<![\w.])(-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w.])"
_PAIR = rf"\(?\s*{_NUM}\s*,\s*{_NUM}\s*\)?\s*(?:to|->|→)\s*\(?\s*{_NUM}\s*,\s*{_NUM}\s*\)?"
_ORD = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4, "last": -1}


def parse_points(text: str) -> list[Pt]:
    pts: list[Pt] = []
    for m in re.finditer(_PAIR, text):
        hx, hy, tx, ty = (float(v) for v in m.groups())
        pts += [(hx, hy), (tx, ty)]
    return pts


MAX_COMMAND_CHARS = 2000  # a command is a sentence; anything longer is not one (and bounds the regex work)


def parse_command(text: str) -> Action:
    """Deterministic: the same text always gives the same action."""
    t = text.strip().lower()
    if len(t) > MAX_COMMAND_CHARS:
        return ReplyAction(text=f"That message is {len(t):,} characters; offline I understand short commands "
                                f"(under {MAX_COMMAND_CHARS}). {HELP}")
    pts = parse_points(t)
    if re.search(r"\bundo\b|\bgo back\b|\brevert\b", t):
        return UndoAction()
    if re.search(r"\b(options|ideas|choices|interpretations)\b", t) and not re.search(r"\btry\b", t):
        return OptionsAction(points=pts or None)
    m = re.search(r"\btry\b.*?\b(first|1st|second|2nd|third|3rd|fourth|4th|last|\d+)\b", t)
    if m:
        word = m.group(1)
        index = int(word) if word.isdigit() else max(_ORD[word], 1)
        if index < 1 or t[m.start(1) - 1] == "-":
            return ReplyAction(text="Ideas are numbered from 1: say 'try the first idea' or 'try 2'.")
        return TryOptionAction(index=index)
    if re.search(r"\bfurther\b|\bfarther\b|\bmore\b", t) and not pts:
        return FurtherAction(factor=2.0 if re.search(r"\bmuch\b|\ba lot\b", t) else 1.5)
    if re.search(r"\bless\b|\bnot so far\b|\bhalf\b", t) and not pts:
        return FurtherAction(factor=0.5)
    m = re.search(r"(.*?)\s+instead\b", t)
    if m:
        wanted = re.sub(r"^(no|nope|not that)\b[\s,!.:;\u2014\u2013-]*", "", m.group(1).strip()).strip()
        if wanted:
            return InsteadAction(intention=wanted)
    if pts:
        rest = re.sub(_PAIR, " ", t)
        rest = re.sub(r"\b(drag|move|please|from|and|then|,)\b", " ", rest)
        words = " ".join(rest.split())
        return EditAction(points=pts, intention=words if len(words.split()) >= 2 else None)
    return ReplyAction(text=HELP)
