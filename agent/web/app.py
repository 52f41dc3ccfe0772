"""The LucidDrag web app (Gradio): click handle/target points, reason intentions, edit, chat -- one session per tab.

Layout: the image to click on (left) with examples, undo/clear and an optional editable-region painter; the
description, intentions, Edit, a gallery of attempts and the result (right); a chat bound to the same session below;
settings in a collapsed panel.

Session model: each browser tab gets a `Session` (gr.State) with its own artifact folder and LangGraph thread ids.
The chat thread (agent/chat.py) is the session's conversation and current image; panel actions are written into it
with `update_state`, so "undo" or "try your second idea" in the chat act on edits made with the mouse, and chat edits
move the image panel and gallery. Drag edits from the panel run the drag graph (agent/graph.py) on their own thread
(it has a different state schema) with the same checkpointer; "Reason" pauses it at its `choose` interrupt and
"Edit" resumes it with the user's pick.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from langchain_core.messages import AIMessage, HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command
from PIL import Image

from luciddrag.agent.artifacts import ArtifactStore, ImageRef
from luciddrag.agent.web.examples import bundled_examples, thumbnails
from luciddrag.agent.web.session import (GalleryItem, Pending, Session, WebSettings, attempt_caption, check_points, enlarge,
                               display_size, framed, points_from_text, render_canvas, to_image_px)
from luciddrag.engine.errors import InputError, LucidDragError

log = logging.getLogger("luciddrag.web")

SETTINGS_FIELDS = ("model", "steps", "guidance_scale", "w_edit", "w_content", "w_inpaint", "k", "max_attempts", "seed",
                   "llm_base_url", "llm_model", "llm_api_key")
AUTO = "auto"
CHAT_HINT = "drag 20,30 to 40,30 · show me the options for 20,30 to 40,30 · try your second idea · undo"

CSS = """
#ld-canvas img, #ld-result img { image-rendering: pixelated; cursor: crosshair; }
#ld-result img { cursor: default; }
#ld-attempts .thumbnail-item img { image-rendering: pixelated; }
.ld-hint { opacity: 0.8; font-size: 0.9em; }
"""


def default_settings(model: str | None = None, device: str | None = None, **overrides: Any) -> WebSettings:
    """The app's defaults: the shipped ShapesWorld model (works offline on a CPU) unless a model is named, with the
    model's recommended settings (luciddrag.json) in the panel; explicit overrides win."""
    from luciddrag.evals.shapesworld import MODEL_DIR

    return WebSettings.for_model(model or str(MODEL_DIR), device=device or None, **overrides)


class WebApp:
    """Handlers and wiring. One instance per server; per-user data lives only in the `Session`s."""

    def __init__(self, defaults: WebSettings, root: Path | None = None, checkpointer: Any = None) -> None:
        from luciddrag.agent.chat import build_chat_graph
        from luciddrag.agent.graph import build_graph

        self.defaults = defaults
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="luciddrag-web-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpointer = checkpointer if checkpointer is not None else InMemorySaver()
        store = str(self.root / "store")  # where the checkpointer puts any stray PIL image; nodes use session dirs
        self.drag = build_graph(checkpointer=self.checkpointer, artifacts_dir=store)
        self.chat = build_chat_graph(checkpointer=self.checkpointer, artifacts_dir=store)
        self.examples = bundled_examples(defaults.model)  # only images of a kind the model can draw

    # -- plumbing -------------------------------------------------------------------------------------------------

    def session(self, sess: Session | None) -> Session:
        return sess if sess is not None else Session.new(self.root)

    def drop_session(self, sess: Session | None) -> None:
        """Tab closed or session expired: delete its images and its threads' checkpoints (memory, or the db)."""
        if sess is None:
            return
        sess.close()
        threads = [sess.chat_thread] + [f"web-{sess.id}-edit-{n}" for n in range(1, sess.runs + 1)]
        for tid in threads:
            try:
                self.checkpointer.delete_thread(tid)
            except Exception:  # noqa: BLE001 -- cleanup is best effort; a saver without delete keeps its rows
                log.debug("could not delete thread %s", tid, exc_info=True)

    def settings(self, values: tuple) -> WebSettings:
        raw = dict(zip(SETTINGS_FIELDS, values))
        key = raw.pop("llm_api_key", None)
        base = self.defaults.model_dump(exclude={"llm_api_key"})
        merged = {**base, **{k: v for k, v in raw.items() if v not in (None, "")}}
        s = WebSettings.parse(**merged)
        if key:  # typed in the page: kept server-side only
            s.llm_api_key = _secret(key)
        elif self.defaults.llm_api_key is not None:
            s.llm_api_key = self.defaults.llm_api_key
        return s

    def context(self, sess: Session, s: WebSettings):
        return s.context(sess.dir / "artifacts")

    def _chat_cfg(self, sess: Session) -> dict:
        return {"configurable": {"thread_id": sess.chat_thread}}

    def _record(self, sess: Session, note: str | None = None, **values: Any) -> None:
        """Write a panel action into the session's chat thread (as if the chat's `act` node had done it)."""
        if note:
            values["messages"] = [AIMessage(content=note)]
        self.chat.update_state(self._chat_cfg(sess), values, as_node="act")

    def _chat_values(self, sess: Session) -> dict:
        return self.chat.get_state(self._chat_cfg(sess)).values or {}

    def transcript(self, sess: Session) -> list[dict]:
        """The chat panel shows the thread's own messages (plus a pending question), so it cannot drift from it."""
        out: list[dict] = []
        for m in self._chat_values(sess).get("messages") or []:
            if isinstance(m, HumanMessage):
                out.append({"role": "user", "content": str(m.content)})
            elif isinstance(m, AIMessage) and str(m.content).strip():
                # the chat graph names result files for terminal users; in the page the image is shown instead
                text = _SERVER_PATH.sub("(shown in the image panel)", str(m.content))
                out.append({"role": "assistant", "content": text})
        snap = self.chat.get_state(self._chat_cfg(sess))
        for intr in snap.interrupts or ():
            out.append({"role": "assistant", "content": _question_text(intr.value)})
        return out

    def _canvas(self, sess: Session) -> Image.Image | None:
        return None if sess.image is None else render_canvas(sess.image, sess.points, sess.mask)

    def _points_text(self, sess: Session) -> str:
        if sess.image is None:
            return "Upload an image or pick an example."
        pairs = [f"**{i + 1}**: ({h[0]}, {h[1]}) → ({t[0]}, {t[1]})" for i, (h, t) in enumerate(sess.pairs())]
        n = len(sess.pairs()) + 1
        nxt = f"next click: **target** of drag {n}" if len(sess.points) % 2 else f"next click: **handle** of drag {n}"
        mask = " · editable region set" if sess.mask is not None else ""
        w, h = sess.image.size
        return f"{w}×{h} px · " + (" · ".join(pairs) + " · " if pairs else "") + nxt + mask

    def _gallery(self, sess: Session) -> list[tuple[str, str]]:
        return [(g.path, g.label) for g in sess.gallery]

    # -- image and points -------------------------------------------------------------------------------------------

    def _load(self, sess: Session, image: Image.Image, caption: str | None, note: str) -> dict:
        from luciddrag.engine.preprocess import MIN_SIDE, to_rgb

        rgb, _ = to_rgb(image)
        if min(rgb.size) < MIN_SIDE:
            raise InputError(f"image is {rgb.width}x{rgb.height}: too small, each side must be at least {MIN_SIDE} px")
        ref = ArtifactStore(sess.dir / "artifacts").put_image(rgb)
        sess.set_image(rgb, ref)
        # the chat's current image follows the panel; a new image starts a new undo history
        self._record(sess, note=note, image=ref, history=[], last=None, result=None, mask=None)
        return self.ui(sess, prompt=caption or "", editor=self._editor_value(sess),
                       intent=gr.Radio(choices=[_AUTO_CHOICE], value=AUTO))

    def _editor_value(self, sess: Session) -> dict | None:
        if sess.image is None:
            return None
        return {"background": enlarge(sess.image), "layers": [], "composite": None}

    def ui(self, sess: Session, **extra: Any) -> dict:
        """The common outputs after any panel action."""
        out = {self.c["state"]: sess, self.c["canvas"]: self._canvas(sess),
               self.c["points"]: self._points_text(sess), self.c["chatbot"]: self.transcript(sess)}
        out.update({self.c[k]: v for k, v in extra.items()})
        return out

    def on_upload(self, sess: Session | None, image: Image.Image | None) -> dict:
        sess = self.session(sess)
        if image is None:
            raise InputError("no image received: upload a PNG/JPEG/WebP file")
        return self._load(sess, image, None, f"New image uploaded ({image.width}x{image.height}).")

    def on_example(self, sess: Session | None, evt: gr.SelectData) -> dict:
        sess = self.session(sess)
        ex = self.examples[evt.index if isinstance(evt.index, int) else evt.index[0]]
        image = ex.load()
        return self._load(sess, image, ex.caption, f"Example loaded: {ex.name} ({image.width}x{image.height}).")

    def on_click(self, sess: Session | None, evt: gr.SelectData) -> dict:
        sess = self.session(sess)
        if sess.image is None:
            raise InputError("upload an image or pick an example first")
        shown = display_size(sess.image.size)  # what the page shows; the click is in its pixels
        sess.points.append(to_image_px((float(evt.index[0]), float(evt.index[1])), sess.image.size, shown))
        sess.pending = None
        return self.ui(sess)

    def on_clear_image(self, sess: Session | None) -> dict:
        """The canvas's own x button: forget the image (the chat keeps its history; a new image resets it)."""
        sess = self.session(sess)
        sess.image, sess.image_ref, sess.points, sess.mask, sess.pending = None, None, [], None, None
        return self.ui(sess, editor=None)

    def on_undo_point(self, sess: Session | None) -> dict:
        sess = self.session(sess)
        if sess.points:
            sess.points.pop()
            sess.pending = None
        return self.ui(sess)

    def on_clear_points(self, sess: Session | None) -> dict:
        sess = self.session(sess)
        sess.points, sess.pending = [], None
        return self.ui(sess)

    def on_set_points(self, sess: Session | None, text: str) -> dict:
        """API twin of clicking: '[[hx, hy], [tx, ty], ...]' in the image's own pixels."""
        sess = self.session(sess)
        if sess.image is None:
            raise InputError("load an image first (the load_image endpoint, or an example)")
        pts = points_from_text(text)
        w, h = sess.image.size
        for x, y in pts:
            if not (0 <= x < w and 0 <= y < h):
                raise InputError(f"point ({x}, {y}) is outside the {w}x{h} image")
        sess.points, sess.pending = pts, None
        return self.ui(sess)

    def on_mask(self, sess: Session | None, value: dict | None) -> dict:
        sess = self.session(sess)
        if sess.image is None:
            raise InputError("load an image first, then paint the region that may change")
        mask = _painted(value, sess.image.size)
        if mask is None or not mask.any():
            raise InputError("nothing painted: brush over the region that may change, then press 'Use region'")
        sess.mask, sess.pending = mask, None
        # the chat edits the same image, so it uses the same region ("drag 10,10 to 20,10" in the chat box)
        self._record(sess, mask=ArtifactStore(sess.dir / "artifacts").put_image(
            Image.fromarray(mask.astype(np.uint8) * 255)))
        return self.ui(sess)

    def on_clear_mask(self, sess: Session | None) -> dict:
        sess = self.session(sess)
        sess.mask, sess.pending = None, None
        self._record(sess, mask=None)
        return self.ui(sess, editor=self._editor_value(sess))

    def on_use_result(self, sess: Session | None) -> dict:
        sess = self.session(sess)
        if sess.result is None:
            raise InputError("no result yet: run an edit first")
        return self._load_keep_history(sess, sess.result)

    def _load_keep_history(self, sess: Session, image: Image.Image) -> dict:
        ref = ArtifactStore(sess.dir / "artifacts").put_image(image.convert("RGB"))
        sess.set_image(image.convert("RGB"), ref)
        return self.ui(sess, editor=self._editor_value(sess), intent=gr.Radio(choices=[_AUTO_CHOICE], value=AUTO))

    # -- reason and edit ------------------------------------------------------------------------------------------

    def _inputs(self, sess: Session, prompt: str | None) -> dict:
        if sess.image is None or sess.image_ref is None:
            raise InputError("upload an image or pick an example first")
        check_points(sess.points, sess.image.size)
        inp: dict[str, Any] = {"image": sess.image_ref, "points": [tuple(p) for p in sess.points]}
        if sess.mask is not None:
            inp["mask"] = ArtifactStore(sess.dir / "artifacts").put_image(
                Image.fromarray(sess.mask.astype(np.uint8) * 255))
        if prompt and prompt.strip():
            inp["prompt"] = prompt.strip()
        return inp

    def on_reason(self, sess: Session | None, prompt: str, *settings: Any, progress=gr.Progress()) -> dict:
        sess = self.session(sess)
        s = self.settings(settings)
        inp = {**self._inputs(sess, prompt), "confirm": True}
        thread = sess.next_edit_thread()
        cfg = {"configurable": {"thread_id": thread}}
        progress(0.1, desc="locating what you dragged")
        notes = []
        for mode, chunk in self.drag.stream(inp, cfg, context=self.context(sess, s), stream_mode=["updates", "custom"]):
            if mode == "custom" and "message" in chunk:
                notes.append(f"[{chunk.get('node')}] {chunk['message']}")
                progress(0.5, desc=chunk["message"][:80])
        snap = self.drag.get_state(cfg)
        if not snap.interrupts:
            raise InputError("the agent did not stop for a choice (no intentions?)")
        options = snap.interrupts[0].value["intentions"]
        sess.pending = Pending(thread_id=thread, signature=sess.signature(prompt), intentions=options)
        choices = [_AUTO_CHOICE] + [(f"{o['index'] + 1}. {o['intention']} — {o['confidence']:.0%}", str(o["index"]))
                                    for o in options]
        status = "**Intentions** (pick one, or Auto to let the agent sample and critique):\n\n" + "\n".join(
            f"- {o['intention']} — confidence {o['confidence']:.0%}" for o in options)
        return {self.c["state"]: sess, self.c["intent"]: gr.Radio(choices=choices, value=AUTO),
                self.c["status"]: status}

    def on_edit(self, sess: Session | None, prompt: str, choice: str | None, *settings: Any,
                progress=gr.Progress()) -> Iterator[dict]:
        sess = self.session(sess)
        s = self.settings(settings)
        ctx = self.context(sess, s)
        sig = sess.signature(prompt)
        warnings: list[str] = []
        pick: Any = AUTO if choice in (None, "", AUTO) else int(choice)
        pending = sess.pending if sess.pending is not None and sess.pending.signature == sig else None
        if pending is not None and not pending.used:  # Reason paused the agent at its choice: resume it
            thread, inp = pending.thread_id, Command(resume=pick)
            pending.used = True
        else:
            inp = self._inputs(sess, prompt)
            if pick != AUTO and pending is not None and 0 <= pick < len(pending.intentions):
                # the same drag edited again with a reasoned intention: use it (with its prompts) directly
                o = pending.intentions[pick]
                inp["intention"] = {k: o[k] for k in ("intention", "source_prompt", "target_prompt")}
            elif pick != AUTO:
                warnings.append("the drag changed since Reason: the agent reasoned again and chose by itself")
            thread = sess.next_edit_thread()
        cfg = {"configurable": {"thread_id": thread}}
        base_ref = sess.image_ref
        run = sess.runs
        sess.gallery = []
        log_lines: list[str] = []
        progress(0, desc="starting (the first edit also loads the model)")
        yield {self.c["state"]: sess, self.c["gallery"]: [], self.c["status"]: "Editing…"}
        for mode, chunk in self.drag.stream(inp, cfg, context=ctx, stream_mode=["updates", "custom"]):
            if mode == "custom":
                if chunk.get("node") == "sample" and chunk.get("total"):
                    what = "inverting" if chunk.get("phase") == "invert" else "sampling"
                    progress((chunk["step"], chunk["total"]), desc=f"{what}: {chunk.get('intention', '')}"[:90],
                             unit="steps")
                elif "message" in chunk:
                    log_lines.append(f"- [{chunk.get('node')}] {chunk['message']}")
                continue
            for node, update in chunk.items():
                if node in ("sample", "critique") and isinstance(update, dict) and update.get("attempts"):
                    self._gallery_from(sess, run, update["attempts"], update.get("accepted"))
                    yield {self.c["state"]: sess, self.c["gallery"]: self._gallery(sess),
                           self.c["status"]: "\n".join(log_lines[-6:]) or "Editing…"}
        final = self.drag.get_state(cfg).values
        if final.get("result") is None:
            raise InputError("the edit produced no result")
        yield self._finish(sess, run, final, base_ref, warnings, log_lines)

    def _gallery_from(self, sess: Session, run: int, attempts: list, accepted: bool | None,
                      chosen_sha: str | None = None) -> None:
        items = []
        for n, a in enumerate(attempts, 1):
            role = a.verdict if a.verdict in ("accepted", "rejected") else "pending"
            if chosen_sha is not None and accepted is False and a.image.sha256 == chosen_sha:
                role = "best"
            path = sess.dir / f"attempt-{run}-{n}-{role}.png"
            if not path.exists():
                framed(ArtifactStore.get_image(a.image), role).save(path)
            items.append(GalleryItem(path=str(path), label=attempt_caption(n, a, role)))
        sess.gallery = items

    def _finish(self, sess: Session, run: int, final: dict, base_ref: ImageRef | None, warnings: list[str],
                log_lines: list[str]) -> dict:
        chosen = final["chosen"]
        accepted = bool(final.get("accepted"))
        self._gallery_from(sess, run, final.get("attempts") or [], accepted, chosen.image.sha256)
        result = ArtifactStore.get_image(final["result"])
        sess.result = result
        sess.result_path = sess.dir / f"luciddrag-result-{run}.png"
        result.save(sess.result_path)
        selected = next((i for i, a in enumerate(final.get("attempts") or [])
                         if a.image.sha256 == chosen.image.sha256), None)
        verdict = "✓ accepted" if accepted else "⚠ not accepted by the critic — best attempt shown"
        lines = [f"**{verdict}**: {chosen.intention}"]
        if chosen.md_px is not None:
            lines.append(f"handle landed {chosen.md_px:.1f} px from its target")
        lines += [f"note: {w}" for w in [*warnings, *(final.get("warnings") or [])]]
        # the conversation learns about this edit, so "undo" / "try your second idea" work on it
        values = self._chat_values(sess)
        history = list(values.get("history") or [])
        if base_ref is not None:
            history.append(base_ref)
        last = {"points": [list(p) for p in sess.points], "base": base_ref, "intentions": final.get("intentions"),
                "intention": chosen.model_dump(include={"intention", "source_prompt", "target_prompt"}),
                "mask": values.get("mask")}
        ideas = "; ".join(f"{k + 1}) {i.intention}" for k, i in enumerate(final.get("intentions") or []))
        self._record(sess, note=f"(image panel) {verdict.split(' ', 1)[1]}: {chosen.intention}. Ideas: {ideas}.",
                     image=final["result"], history=history, last=last, result=final["result"], mask=None)
        return {self.c["state"]: sess,
                self.c["gallery"]: gr.Gallery(value=self._gallery(sess), selected_index=selected),
                self.c["result"]: enlarge(result),
                self.c["download"]: gr.DownloadButton(value=str(sess.result_path), interactive=True),
                self.c["status"]: "  \n".join(lines) + ("\n\n" + "\n".join(log_lines[-6:]) if log_lines else ""),
                self.c["chatbot"]: self.transcript(sess)}

    # -- chat -----------------------------------------------------------------------------------------------------

    def on_chat(self, sess: Session | None, text: str, *settings: Any, progress=gr.Progress()) -> Iterator[dict]:
        sess = self.session(sess)
        text = (text or "").strip()
        if not text:
            yield {self.c["state"]: sess}
            return
        s = self.settings(settings)
        ctx = self.context(sess, s)
        cfg = self._chat_cfg(sess)
        before = self._chat_values(sess)
        before_image = _sha(before.get("image"))
        shown = self.transcript(sess) + [{"role": "user", "content": text}]
        pending = self.chat.get_state(cfg).interrupts
        if pending:
            # the answer to "which one did you mean?": put the question and the answer into the thread (so the
            # conversation reads in order, now and after a reload), then resume the paused `ask` node with it
            question = shown[-2]["content"] if len(shown) > 1 else _question_text(pending[0].value)
            self.chat.update_state(cfg, {"messages": [AIMessage(content=question), HumanMessage(content=text)]})
            inp: Any = Command(resume=text)
        else:
            inp = {"messages": [HumanMessage(content=text)]}
        yield {self.c["state"]: sess, self.c["chatbot"]: shown, self.c["chat_in"]: ""}
        run = sess.runs = sess.runs + 1
        attempts: list = []
        accepted: bool | None = None
        for ns, mode, chunk in self.chat.stream(inp, cfg, context=ctx, stream_mode=["updates", "custom"],
                                                subgraphs=True):
            if mode == "custom" and chunk.get("node") == "sample" and chunk.get("total"):
                what = "inverting" if chunk.get("phase") == "invert" else "sampling"
                progress((chunk["step"], chunk["total"]), desc=f"{what}: {chunk.get('intention', '')}"[:90],
                         unit="steps")
            elif mode == "updates" and ns:  # inside the drag graph the chat runs
                for node, update in chunk.items():
                    if node in ("sample", "critique") and isinstance(update, dict) and update.get("attempts"):
                        attempts = update["attempts"]
                        accepted = update.get("accepted", accepted)
                        self._gallery_from(sess, run, attempts, update.get("accepted"))
                        yield {self.c["state"]: sess, self.c["gallery"]: self._gallery(sess)}
        after = self._chat_values(sess)
        out = {self.c["state"]: sess, self.c["chatbot"]: self.transcript(sess)}
        if _sha(after.get("image")) != before_image and after.get("image") is not None:
            ref = ImageRef.model_validate(after["image"]) if isinstance(after["image"], dict) else after["image"]
            image = ArtifactStore.get_image(ref).convert("RGB")
            sess.set_image(image, ref)  # the panel follows the conversation (edits and undo)
            last = after.get("last") or {}
            if last.get("points") and attempts:
                sess.points = [(int(round(x)), int(round(y))) for x, y in last["points"]]
                base = ImageRef.model_validate(last["base"]) if isinstance(last["base"], dict) else last["base"]
                sess.image, sess.image_ref = ArtifactStore.get_image(base).convert("RGB"), base
            out.update(self.ui(sess, editor=self._editor_value(sess)))
            if attempts:
                chosen_sha = _sha(after.get("result"))
                self._gallery_from(sess, run, attempts, accepted, chosen_sha)
                result = ArtifactStore.get_image(after["result"])
                sess.result = result
                sess.result_path = sess.dir / f"luciddrag-result-{run}.png"
                result.save(sess.result_path)
                out.update({self.c["gallery"]: self._gallery(sess), self.c["result"]: enlarge(result),
                            self.c["download"]: gr.DownloadButton(value=str(sess.result_path), interactive=True)})
        yield out

    # -- layout -----------------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        c: dict[str, Any] = {}
        self.c = c
        thumbs = thumbnails(self.examples, self.root / "examples")
        d = self.defaults
        # analytics off: a local editing tool should not report usage to a third party
        with gr.Blocks(title="LucidDrag", fill_width=True, analytics_enabled=False) as demo:
            gr.Markdown("## LucidDrag — drag to edit, it works out what you mean\n"
                        "<span class='ld-hint'>Click a **handle** on the image, then its **target** (repeat for more "
                        "drags) · optional: paint the region that may change, describe the image, **Reason** to see "
                        "what the drag could mean · **Edit**. Or just tell the chat.</span>")
            c["state"] = gr.State(None, time_to_live=6 * 3600, delete_callback=self.drop_session)
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=360):
                    c["canvas"] = gr.Image(label="Image — click a handle, then its target", type="pil", format="png",
                                           sources=["upload", "clipboard"], interactive=True, height=420,
                                           elem_id="ld-canvas", buttons=["fullscreen"])
                    c["points"] = gr.Markdown("Upload an image or pick an example.", elem_id="ld-points")
                    with gr.Row():
                        undo = gr.Button("↶ Undo point", size="sm", elem_id="ld-undo")
                        clear = gr.Button("Clear points", size="sm", elem_id="ld-clear")
                        use_result = gr.Button("Continue from result", size="sm", elem_id="ld-continue")
                    c["examples"] = gr.Gallery(value=thumbs, label="Examples (click one)", columns=8, height=150,
                                               allow_preview=False, elem_id="ld-examples", object_fit="contain",
                                               buttons=[])
                    with gr.Accordion("Editable region (optional)", open=False):
                        gr.Markdown("Paint the part of the image that may change; the rest is kept and shown dimmed.",
                                    elem_classes=["ld-hint"])
                        c["editor"] = gr.ImageEditor(type="numpy", image_mode="RGBA", sources=(), transforms=(),
                                                     layers=False, label="Paint the editable region",
                                                     brush=gr.Brush(colors=[("#1e90ff", 0.7)], color_mode="fixed", default_size=24),
                                                     eraser=gr.Eraser(), height=360, elem_id="ld-mask")
                        with gr.Row():
                            use_mask = gr.Button("Use region", size="sm")
                            clear_mask = gr.Button("Clear region", size="sm")
                with gr.Column(scale=2, min_width=320):
                    c["prompt"] = gr.Textbox(label="What the image shows (optional)", lines=1,
                                             placeholder="e.g. a photo of a horse — else the agent describes it")
                    with gr.Row():
                        reason = gr.Button("Reason", elem_id="ld-reason")
                        edit = gr.Button("Edit", variant="primary", elem_id="ld-edit")
                    c["intent"] = gr.Radio(choices=[_AUTO_CHOICE], value=AUTO, label="Intention",
                                           elem_id="ld-intent")
                    c["status"] = gr.Markdown("", elem_id="ld-status")
                    c["result"] = gr.Image(label="Result", type="pil", format="png", interactive=False, height=300,
                                           elem_id="ld-result")
                    c["download"] = gr.DownloadButton("Download result", value=None, interactive=False,
                                                      elem_id="ld-download")
                    c["gallery"] = gr.Gallery(label="Attempts (green frame: accepted)", columns=3, height=260,
                                              elem_id="ld-attempts", object_fit="contain")
            with gr.Row():
                with gr.Column():
                    c["chatbot"] = gr.Chatbot(label="Chat (same session as the image panel)", height=260,
                                              elem_id="ld-chat", feedback_options=None,
                                              placeholder="Try: " + CHAT_HINT)
                    c["chat_in"] = gr.Textbox(show_label=False, placeholder=CHAT_HINT, elem_id="ld-chat-in",
                                              submit_btn=True)
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    model = gr.Textbox(d.model, label="Model (hub id or folder)", scale=3)
                    seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0)
                with gr.Row():
                    steps = gr.Slider(2, 100, value=d.steps, step=1, label="Steps")
                    cfg_scale = gr.Slider(0, 15, value=d.guidance_scale, step=0.5, label="Classifier-free guidance")
                    k = gr.Slider(1, 8, value=d.k, step=1, label="Intentions (K)")
                    attempts = gr.Slider(1, 8, value=d.max_attempts, step=1, label="Attempts")
                with gr.Row():
                    w_edit = gr.Number(d.w_edit, label="w_edit (drag)", minimum=0)
                    w_content = gr.Number(d.w_content, label="w_content (keep)", minimum=0)
                    w_inpaint = gr.Number(d.w_inpaint, label="w_inpaint (vacated region)", minimum=0)
                with gr.Row():
                    llm_url = gr.Textbox(d.llm_base_url or "", label="LLM endpoint (OpenAI-compatible; blank: offline)",
                                         placeholder="http://localhost:8000/v1")
                    llm_model = gr.Textbox(d.llm_model or "", label="LLM model")
                    # value always starts empty: a key from the server's environment is never sent to the page
                    llm_key = gr.Textbox("", label="API key (kept on the server)", type="password")
            settings = [model, steps, cfg_scale, w_edit, w_content, w_inpaint, k, attempts, seed, llm_url, llm_model,
                        llm_key]
            c["points_api"] = gr.Textbox(visible=False)
            points_btn = gr.Button(visible=False)

            ui = [c[n] for n in ("state", "canvas", "points", "chatbot")]
            load_out = ui + [c["prompt"], c["editor"], c["intent"]]
            edit_out = [c["state"], c["gallery"], c["result"], c["download"], c["status"], c["chatbot"]]
            chat_out = edit_out + [c["canvas"], c["points"], c["chat_in"], c["editor"]]
            quick = dict(show_progress="hidden", concurrency_limit=None)
            g = self._guard
            c["canvas"].upload(g(self.on_upload), [c["state"], c["canvas"]], load_out, api_name="load_image")
            c["examples"].select(g(self.on_example), [c["state"]], load_out, api_name="load_example", **quick)
            c["canvas"].select(g(self.on_click), [c["state"]], ui, api_visibility="private", trigger_mode="multiple", **quick)
            c["canvas"].clear(g(self.on_clear_image), [c["state"]], ui + [c["editor"]], api_visibility="private",
                              **quick)
            undo.click(g(self.on_undo_point), [c["state"]], ui, api_name="undo_point", **quick)
            clear.click(g(self.on_clear_points), [c["state"]], ui, api_name="clear_points", **quick)
            points_btn.click(g(self.on_set_points), [c["state"], c["points_api"]], ui, api_name="set_points", **quick)
            use_mask.click(g(self.on_mask), [c["state"], c["editor"]], ui, api_visibility="private")
            clear_mask.click(g(self.on_clear_mask), [c["state"]], ui + [c["editor"]], api_visibility="private", **quick)
            use_result.click(g(self.on_use_result), [c["state"]], ui + [c["editor"], c["intent"]],
                             api_name="continue_from_result", **quick)
            # one model, one edit at a time across all sessions (the engine serialises anyway; this keeps the queue
            # honest about waiting)
            reason.click(g(self.on_reason), [c["state"], c["prompt"], *settings],
                         [c["state"], c["intent"], c["status"]], api_name="reason", concurrency_id="engine",
                         concurrency_limit=1, show_progress_on=[c["intent"]])
            edit.click(g(self.on_edit), [c["state"], c["prompt"], c["intent"], *settings], edit_out,
                       api_name="edit", concurrency_id="engine", concurrency_limit=1, show_progress_on=[c["result"]])
            c["chat_in"].submit(g(self.on_chat), [c["state"], c["chat_in"], *settings], chat_out, api_name="chat",
                                concurrency_id="engine", concurrency_limit=1, show_progress_on=[c["chatbot"]])
        return demo

    def _guard(self, fn: Callable) -> Callable:
        """Errors become a message in the page (gr.Error) and the session carries on; nothing leaks a key."""

        def to_gr(exc: Exception) -> gr.Error:
            if isinstance(exc, gr.Error):
                return exc
            if isinstance(exc, LucidDragError):  # the user's to fix: a message, no server traceback
                return gr.Error(self._scrub(str(exc)), title="Can't do that", print_exception=False)
            log.exception("unexpected error in %s", fn.__name__)
            return gr.Error(self._scrub(f"unexpected {type(exc).__name__}: {exc}"), title="Something broke")

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 -- every failure must reach the page, not kill the session
                    raise to_gr(exc) from exc
        else:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any):
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    raise to_gr(exc) from exc
        wrapper.__signature__ = _named_settings(inspect.signature(fn))  # type: ignore[attr-defined]
        return wrapper

    def _scrub(self, text: str) -> str:
        """Messages are rendered as HTML in the page: escape them, and never include the server's API key."""
        key = self.defaults.llm_api_key.get_secret_value() if self.defaults.llm_api_key else None
        return html.escape(text.replace(key, "***") if key else text, quote=False)


_SERVER_PATH = re.compile(r"(?<![\w/])/[^\s]+\.(?:png|jpg|jpeg|webp)")
_AUTO_CHOICE = ("Auto — let the agent sample and critique", AUTO)


def _question_text(value: dict) -> str:
    """The chat's "which one did you mean?" interrupt as a message."""
    lines = [value.get("question", "Which one did you mean?")]
    lines += [f"{o['index']}) {o['intention']} ({o['confidence']:.0%})" for o in value.get("intentions", [])]
    return "\n".join(lines) + "\n\nReply with a number, or say what you meant."


def _named_settings(sig: inspect.Signature) -> inspect.Signature:
    """`*settings` -> one named parameter per setting, so API clients see `model=`, `steps=` ... not `param_5`."""
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in SETTINGS_FIELDS]
        else:
            params.append(p)
    return sig.replace(parameters=params)


def _secret(value: str):
    from pydantic import SecretStr

    return SecretStr(value)


def _sha(value: Any) -> str | None:
    if isinstance(value, ImageRef):
        return value.sha256
    if isinstance(value, dict):
        return value.get("sha256")
    return None


def _painted(value: dict | None, size: tuple[int, int]) -> np.ndarray | None:
    """The editor's painted strokes -> HxW bool mask at the image's size (any non-transparent layer pixel)."""
    if not value:
        return None
    layers = [np.asarray(x) for x in (value.get("layers") or []) if x is not None]
    if not layers:
        return None
    alpha = np.zeros(layers[0].shape[:2], dtype=bool)
    for layer in layers:
        a = layer[..., 3] if layer.ndim == 3 and layer.shape[2] == 4 else layer.reshape(layer.shape[0], -1) > 0
        alpha |= np.asarray(a) > 0
    return np.asarray(Image.fromarray(alpha.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127


def build_app(defaults: WebSettings | None = None, root: Path | None = None, checkpointer: Any = None) -> gr.Blocks:
    """The Gradio app. `defaults` are the Settings panel's initial values (ShapesWorld model, offline reasoner)."""
    app = WebApp(defaults or default_settings(), root, checkpointer)
    demo = app.build()
    demo.luciddrag = app  # type: ignore[attr-defined]  # for tests and embedding
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, **kwargs: Any):
    """Start serving (loopback by default); returns what `Blocks.launch` returns."""
    app: WebApp = demo.luciddrag  # type: ignore[attr-defined]
    demo.queue(default_concurrency_limit=4)
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, allowed_paths=[str(app.root)],
                       show_error=True, **kwargs)
