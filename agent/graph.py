"""The drag-edit agent, wired in one screen.

    ingest -> locate -> reason -> choose -> sample -> critique --accept / budget spent--> END
                                              ^            |
                                              +--reject----+   (next intention, by confidence, without replacement)

Usage: `from luciddrag.agent.graph import graph; graph.invoke({"image": "photo.png", "points": [(hx, hy), (tx, ty)]})`.
`build_graph(checkpointer=...)` adds persistence; the run's settings go in `context=AgentContext(...)`.
"""

from __future__ import annotations

from langgraph.graph import END, START, StateGraph

from luciddrag.agent.context import AgentContext
from luciddrag.agent.nodes import after_critique, choose_node, critique_node, ingest, locate_node, reason_node, sample_node
from luciddrag.agent.serde import with_artifact_serde
from luciddrag.agent.state import AgentState, InputState, OutputState


def build_graph(checkpointer=None, artifacts_dir: str | None = None):
    g = StateGraph(AgentState, context_schema=AgentContext, input_schema=InputState, output_schema=OutputState)
    g.add_node("ingest", ingest)
    g.add_node("locate", locate_node)
    g.add_node("reason", reason_node)
    g.add_node("choose", choose_node)
    g.add_node("sample", sample_node)
    g.add_node("critique", critique_node)
    g.add_edge(START, "ingest")
    g.add_edge("ingest", "locate")
    g.add_edge("locate", "reason")
    g.add_edge("reason", "choose")
    g.add_edge("choose", "sample")
    g.add_edge("sample", "critique")
    g.add_conditional_edges("critique", after_critique, {"sample": "sample", "__end__": END})
    if checkpointer is not None:
        with_artifact_serde(checkpointer, artifacts_dir)
    return g.compile(checkpointer=checkpointer, name="luciddrag")


graph = build_graph()
