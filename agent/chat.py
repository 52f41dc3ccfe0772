"""Conversational drag editing: a chat graph around the drag-edit graph.

    understand --reply--> END
        |--options--> propose -> ask (interrupt: the user picks) -> act -> END
        +--edit / try_option / instead / further / undo--> act -> END

`understand` asks a tool-calling chat model (ChatOpenAI `bind_tools`) for one action, or -- with no LLM configured --
parses a small deterministic command grammar (agent/grammar.py). `act` runs the drag-edit graph (agent/graph.py) on
the session's image; the session (current image, undo history, last drag and its intentions) lives in the thread's
checkpointed state, so follow-ups like "try your second idea" or "undo" work across turns and restarts.
"""

from __future__ import annotations

import json
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.runtime import Runtime
from langgraph.types import interrupt
from pydantic import ValidationError
from typing_extensions import Annotated, TypedDict

from luciddrag.agent.artifacts import ArtifactStore, ImageRef
from luciddrag.agent.context import AgentContext, check_image_kind, resolve_context
from luciddrag.agent.grammar import HELP, TOOL_ACTIONS, EditAction, ReplyAction, parse_command
from luciddrag.agent.graph import build_graph
from luciddrag.agent.nodes import _image
from luciddrag.agent.serde import with_artifact_serde
from luciddrag.engine.errors import LucidDragError
from luciddrag.prompts import load_template
from luciddrag.tools.llm import LLM_SERVICE_ERRORS, LLMSettings, describe_llm_error, make_chat_model
from luciddrag.tools.locator import describe_image, locate
from luciddrag.tools.reasoner import ReasonerConfig, ReasonRequest, reason
from luciddrag.tools.schemas import DragPoints, Intention


class ChatState(TypedDict, total=False):
    messages: Annotated[list, add_messages]
    image: Any  # current image: ImageRef (a path or PIL image on the first turn)
    history: list[ImageRef]  # images before each edit, for undo
    mask: Any  # editable region of the current image (ImageRef / path / PIL, white = may change), or None
    last: dict | None  # last edit: points, base image, intentions, chosen index
    action: dict | None
    options: list[Intention] | None
    result: ImageRef | None
    offline: bool


# -- understanding ---------------------------------------------------------------------------------------------------

def _chat_model(ctx: AgentContext):
    if ctx.chat_model is not None:
        return ctx.chat_model
    settings = ctx.llm or LLMSettings.from_env()
    if ctx.reasoner == "offline" or not settings.configured:
        return None
    return make_chat_model(settings)


def chat_prompt_variables(state: ChatState) -> dict[str, str]:
    """What the chat system template is rendered with: the image and the last edit, as short text."""
    img = state.get("image")
    last = state.get("last") or {}
    its = last.get("intentions") or []
    return {
        "image_size": f"{img.width}x{img.height}" if isinstance(img, ImageRef) else "no image yet",
        "image_state": img.path if isinstance(img, ImageRef) else "none",
        "last_points": json.dumps(last.get("points")) if last.get("points") else "none",
        "last_intentions": "; ".join(f"{k + 1}) {i.intention}" for k, i in enumerate(its)) or "none",
    }


def _system_prompt(state: ChatState) -> str:
    return load_template("chat_system").render(**chat_prompt_variables(state)).messages[0].content


def understand(state: ChatState, runtime: Runtime[AgentContext]) -> dict:
    """Turn the user's last message into one action (LLM tool call, or the offline grammar).

    A new image that cannot be used (unreadable, not of a kind the model draws) is answered with one line and not
    kept as the session's image; an LLM that does not answer falls back to the offline grammar with a note."""
    ctx = resolve_context(runtime.context)
    update: dict[str, Any] = {}
    img = state.get("image")
    if img is not None and not isinstance(img, (ImageRef, dict)):
        from luciddrag.agent.nodes import _image

        try:
            im = _image(img)
            check_image_kind(ctx.model, im.size)
        except LucidDragError as exc:
            return {"image": None, "messages": [AIMessage(content=f"I can't use that image: {exc}")],
                    "action": None, "offline": True}
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")  # alpha kept: the edit re-attaches it
        update["image"] = ArtifactStore(ctx.artifacts_dir).put_image(im)
    elif isinstance(img, dict):
        update["image"] = ImageRef.model_validate(img)
    text = next((m.content for m in reversed(state["messages"]) if isinstance(m, HumanMessage)), "")
    model = _chat_model(ctx)
    if model is None:
        action = parse_command(str(text))
        return {**update, "action": action.model_dump(), "offline": True}
    bound = model.bind_tools(list(TOOL_ACTIONS.values()))
    try:
        reply = bound.invoke([SystemMessage(_system_prompt({**state, **update})), *state["messages"]])
    except LLM_SERVICE_ERRORS as exc:
        note = AIMessage(content=f"(the LLM did not answer -- {describe_llm_error(exc)}; using the offline command "
                                 "grammar for this message)")
        return {**update, "messages": [note], "action": parse_command(str(text)).model_dump(), "offline": True}
    calls = getattr(reply, "tool_calls", None) or []
    if not calls:
        return {**update, "messages": [reply], "action": ReplyAction(text=str(reply.content)).model_dump(),
                "offline": False}
    call = calls[0]
    kind = next((k for k, cls in TOOL_ACTIONS.items() if cls.__name__ == call["name"] or k == call["name"]), None)
    if kind is None:
        return {**update, "messages": [reply], "action": ReplyAction(text=f"(unknown tool {call['name']})").model_dump()}
    try:
        action = TOOL_ACTIONS[kind].model_validate({**call["args"], "kind": kind})
    except ValidationError as exc:  # e.g. try_option with index 0: say so instead of failing the turn
        first = exc.errors()[0]
        text = f"I can't do that: {kind} {'.'.join(map(str, first['loc']))}: {first['msg']}"
        return {**update, "messages": [reply, ToolMessage(content=text, tool_call_id=call["id"]),
                                       AIMessage(content=text)], "action": None, "offline": False}
    return {**update, "messages": [reply], "action": {**action.model_dump(), "tool_call_id": call["id"]},
            "offline": False}


def route(state: ChatState) -> str:
    if state.get("action") is None:  # understand already answered (an unusable image, a refused tool call)
        return "reply"
    kind = (state.get("action") or {}).get("kind")
    return {"reply": "reply", "options": "propose"}.get(kind, "act")


# -- doing ------------------------------------------------------------------------------------------------------------

def _say(state: ChatState, text: str, **extra: Any) -> dict:
    action = state.get("action") or {}
    msgs: list = []
    if action.get("tool_call_id"):
        msgs.append(ToolMessage(content=text, tool_call_id=action["tool_call_id"]))
    msgs.append(AIMessage(content=text))
    return {"messages": msgs, "action": None, **extra}


def reply(state: ChatState) -> dict:
    if state.get("action") is None:
        return {}
    action = state.get("action") or {}
    if state.get("offline"):
        return {"messages": [AIMessage(content=action.get("text") or HELP)], "action": None}
    return {"action": None}  # the model's own answer is already in the messages


def propose(state: ChatState, runtime: Runtime[AgentContext]) -> dict:
    """Locate and reason only (no GPU work), so the user can choose."""
    ctx = resolve_context(runtime.context)
    pts = (state.get("action") or {}).get("points") or (state.get("last") or {}).get("points")
    if state.get("image") is None or not pts:
        return _say(state, "Give me an image and a drag first, e.g. 'options for 30,30 to 45,30'.")
    try:
        image = _image(state["image"])
        drags = DragPoints.from_flat([tuple(p) for p in pts])
        cfg = ctx.locator_config()
        located = locate(image, drags, None, cfg)
        caption, _ = describe_image(image, None, located=located, config=cfg)
        res = reason(ReasonRequest(drags=drags, located=located, caption=caption, k=ctx.k),
                     ReasonerConfig(backend=ctx.reasoner, llm=ctx.llm))
    except LucidDragError as exc:
        return _say(state, f"I can't do that: {exc}")
    return {"options": res.intentions, "action": {**state["action"], "points": [list(p) for p in pts]}}


def ask(state: ChatState) -> dict:
    """Human in the loop: pause with the options; resume with Command(resume=<1-based index or intention text>)."""
    opts = state.get("options") or []
    if not opts:
        return {}
    answer = interrupt({"question": "Which one did you mean?",
                        "intentions": [{"index": k + 1, **o.model_dump()} for k, o in enumerate(opts)]})
    action = dict(state["action"])
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        k = int(answer) - 1
        if not 0 <= k < len(opts):
            k = 0
        action.update(kind="edit", intention=opts[k].model_dump())
    else:
        action.update(kind="edit", intention=str(answer))
    return {"action": action, "options": None}


def _run_edit(state: ChatState, runtime: Runtime[AgentContext], base: ImageRef, points: list, intention: Any,
              mask: Any = None):
    inp: dict[str, Any] = {"image": base, "points": [tuple(p) for p in points]}
    if intention is not None:
        inp["intention"] = intention
    if mask is not None:
        inp["mask"] = mask
    return build_graph().invoke(inp, context=resolve_context(runtime.context))


def act(state: ChatState, runtime: Runtime[AgentContext]) -> dict:
    """Execute the action on the session's image."""
    action = state.get("action") or {}
    kind = action.get("kind")
    last = state.get("last") or {}
    history = list(state.get("history") or [])
    image = state.get("image")
    if kind == "undo":
        if not history:
            return _say(state, "Nothing to undo.")
        prev = history.pop()
        return _say(state, f"Undone. Current image: {prev.path}", image=prev, history=history, result=prev,
                    last=None, mask=None)
    if image is None:
        return _say(state, "Send an image first (luciddrag chat --image IMG, or attach one).")
    if kind == "edit":
        points = action.get("points") or last.get("points")
        base, intention, mask = image, action.get("intention"), state.get("mask")
        if not points:
            return _say(state, "Which drag? Say e.g. 'drag 30,30 to 45,30'.")
        history.append(image)
    elif kind in ("try_option", "instead", "further"):
        if not last:
            return _say(state, "There is no previous edit to change yet.")
        base, points = ImageRef.model_validate(last["base"]), last["points"]
        intention, mask = last.get("intention"), last.get("mask")  # redone on the same base, with its region
        if kind == "try_option":
            its = last.get("intentions") or []
            k = action["index"] - 1
            if not 0 <= k < len(its):
                return _say(state, f"I only had {len(its)} idea(s) last time.")
            intention = its[k].model_dump()
        elif kind == "instead":
            intention = action["intention"]
        else:
            f = action["factor"]
            points = [p if i % 2 == 0 else _scaled(points[i - 1], p, f, base) for i, p in enumerate(points)]
    else:
        return _say(state, HELP)
    try:
        ref = ImageRef.model_validate(base) if isinstance(base, dict) else base
        DragPoints.parse(points, (ref.width, ref.height))  # refuse a bad drag before any work
        out = _run_edit(state, runtime, base, points, intention, mask)
    except LucidDragError as exc:
        return _say(state, f"I can't do that: {exc}")
    chosen = out["chosen"]
    verdict = "done" if out["accepted"] else "best effort (not accepted by my own check)"
    others = [f"{k + 1}) {i.intention}" for k, i in enumerate(out["intentions"])]
    text = (f"{verdict}: {chosen.intention} -- the handle landed {chosen.md_px:.1f} px from its target. "
            f"Result: {out['result'].path}. Ideas: {'; '.join(others)}.")
    new_last = {"points": [list(p) for p in points], "base": base, "intentions": out["intentions"],
                "intention": chosen.model_dump(include={"intention", "source_prompt", "target_prompt"}),
                "mask": mask}
    # the region was painted on the image before this edit; the new image starts without one
    return _say(state, text, image=out["result"], history=history, last=new_last, result=out["result"], mask=None)


def _scaled(h, t, f, base: ImageRef):
    x = h[0] + f * (t[0] - h[0])
    y = h[1] + f * (t[1] - h[1])
    return [min(max(x, 0.0), base.width - 1.0), min(max(y, 0.0), base.height - 1.0)]


def build_chat_graph(checkpointer=None, artifacts_dir: str | None = None):
    g = StateGraph(ChatState, context_schema=AgentContext)
    g.add_node("understand", understand)
    g.add_node("reply", reply)
    g.add_node("propose", propose)
    g.add_node("ask", ask)
    g.add_node("act", act)
    g.add_edge(START, "understand")
    g.add_conditional_edges("understand", route, {"reply": "reply", "propose": "propose", "act": "act"})
    g.add_conditional_edges("propose", lambda s: "ask" if s.get("options") else END, {"ask": "ask", END: END})
    g.add_edge("ask", "act")
    g.add_edge("reply", END)
    g.add_edge("act", END)
    if checkpointer is not None:
        with_artifact_serde(checkpointer, artifacts_dir)
    return g.compile(checkpointer=checkpointer, name="luciddrag-chat")


graph = build_chat_graph()
