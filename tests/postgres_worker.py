"""One worker process of tests/test_postgres_threads.py: runs part of a drag run and of a chat on threads kept in
Postgres, then prints what it saw as one JSON line. Run as `python tests/postgres_worker.py ROLE SPEC_JSON`.

ROLE "first": start the drag run with the sampler service down, so it stops at `sample`; say the first chat turn
(a drag, sampled in-process). ROLE "second": continue that drag run from its checkpoint; say "try your second idea"
in the chat.
"""

from __future__ import annotations

import json
import os
import sys


def main(role: str, spec: dict) -> dict:
    from luciddrag.agent.chat import build_chat_graph
    from luciddrag.agent.context import AgentContext
    from luciddrag.agent.graph import build_graph
    from luciddrag.agent.persistence import close_checkpointer, make_checkpointer
    from luciddrag.engine.errors import LucidDragError

    art = spec["artifacts"]
    ctx = AgentContext(model=spec["model"], device="cpu", steps=3, locator="offline", reasoner="offline",
                       critic_ensemble=1, accept_md_fraction=10.0, max_attempts=1, artifacts_dir=art)
    saver = make_checkpointer(spec["url"])
    drag = build_graph(checkpointer=saver, artifacts_dir=art)
    chat = build_chat_graph(checkpointer=saver, artifacts_dir=art)
    run = {"configurable": {"thread_id": spec["drag_thread"]}}
    talk = {"configurable": {"thread_id": spec["chat_thread"]}}
    out: dict = {"pid": os.getpid()}
    if role == "first":
        # this worker's sampler is down (nothing listens at that address): the run stops at `sample`, its earlier
        # steps safe in the database
        os.environ["LUCIDDRAG_SAMPLER"] = spec["dead_sampler"]
        try:
            drag.invoke({"image": spec["image"], "points": spec["points"]}, run, context=ctx)
            out["error"] = None
        except LucidDragError as exc:
            out["error"] = str(exc)
        del os.environ["LUCIDDRAG_SAMPLER"]
        state = drag.get_state(run)
        out["next"] = list(state.next)
        out["intentions"] = [i.intention for i in state.values["intentions"]]
        (hx, hy), (tx, ty) = spec["points"]
        said = chat.invoke({"messages": [("user", f"drag {hx},{hy} to {tx},{ty}")], "image": spec["image"]}, talk,
                           context=ctx)
        out["chat_intentions"] = [i.intention for i in said["last"]["intentions"]]
        out["chat_first"] = said["last"]["intention"]["intention"]
    else:
        before = drag.get_state(run)
        out["next_before"] = list(before.next)
        out["intentions_before"] = [i.intention for i in before.values["intentions"]]
        done = drag.invoke(None, run, context=ctx)  # None: continue the thread from its last checkpoint
        out["attempts"] = len(done["attempts"])
        out["result"] = done["result"].path
        out["steps"] = [s.metadata.get("step") for s in drag.get_state_history(run)]
        said = chat.invoke({"messages": [("user", "try your second idea")]}, talk, context=ctx)
        out["chat_second"] = said["last"]["intention"]["intention"]
        out["chat_messages"] = len(said["messages"])
    close_checkpointer(saver)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1], json.loads(sys.argv[2]))))
