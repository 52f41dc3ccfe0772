"""`langgraph dev` (the in-memory Agent Server) serves both graphs from langgraph.json; the SDK client runs one."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cli = Path(sys.executable).parent / "langgraph"
    if not cli.exists():
        pytest.fail("langgraph CLI missing: install the dev extra (langgraph-cli[inmem])")
    port = _free_port()
    home = tmp_path_factory.mktemp("lg-home")
    from luciddrag.evals.shapesworld import MODEL_DIR

    env = {**os.environ, "LUCIDDRAG_HOME": str(home), "HF_HUB_OFFLINE": "1", "LANGGRAPH_NO_ANALYTICS": "1",
           "LANGSMITH_TRACING": "false",
           # the defaults of a run sent without a context (the explicit context of the first test overrides them)
           "LUCIDDRAG_MODEL": str(MODEL_DIR), "LUCIDDRAG_DEVICE": "cpu", "LUCIDDRAG_STEPS": "4"}
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE"):
        env.pop(name, None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(cli), "dev", "--host", "127.0.0.1", "--port", str(port), "--no-browser",
                             "--no-reload"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"langgraph dev exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("langgraph dev did not come up in 120 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(ROOT / ".langgraph_api", ignore_errors=True)


def test_both_graphs_are_served_and_a_drag_edit_runs(server, tmp_path):
    import asyncio

    from langgraph_sdk import get_client

    from luciddrag.evals.shapesworld import MODEL_DIR
    from luciddrag.evals.shapesworld.world import render_scene

    scene = render_scene(7, n_shapes=1)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    cx, cy = scene.shapes[0].centroid

    async def go():
        client = get_client(url=server)
        graphs = {a["graph_id"] for a in await client.assistants.search(limit=10)}
        assert {"luciddrag", "chat"} <= graphs
        thread = await client.threads.create()
        return await client.runs.wait(
            thread["thread_id"], "luciddrag",
            input={"image": str(path), "points": [[round(cx), round(cy)], [round(cx) + 14, round(cy)]],
                   "prompt": scene.caption},
            context={"model": str(MODEL_DIR), "device": "cpu", "steps": 6, "k": 2, "max_attempts": 1,
                     "locator": "offline", "reasoner": "offline", "selection": "argmax"},
        )

    out = asyncio.run(go())
    assert out.get("result") is not None, out
    assert Path(out["result"]["path"]).is_file()
    assert len(out["attempts"]) == 1 and out["intentions"]


def test_a_run_without_context_uses_the_environment(server, tmp_path):
    """The SDK with no context at all: the server's environment (LUCIDDRAG_MODEL, ...) decides, as for
    graph.invoke, and a bad input comes back as the project's one-line error."""
    import asyncio

    from langgraph_sdk import get_client

    from luciddrag.evals.shapesworld.world import render_scene

    scene = render_scene(5, n_shapes=1)
    path = tmp_path / "scene.png"
    scene.image.save(path)
    cx, cy = scene.shapes[0].centroid

    async def go(points):
        client = get_client(url=server)
        thread = await client.threads.create()
        return await client.runs.wait(thread["thread_id"], "luciddrag",
                                      input={"image": str(path), "points": points}, raise_error=False)

    out = asyncio.run(go([[round(cx), round(cy)], [round(cx) + 12, round(cy)]]))
    assert out.get("result") is not None and Path(out["result"]["path"]).is_file(), out
    bad = asyncio.run(go(["24,30", "40,30"]))
    assert "string" in str(bad), bad
