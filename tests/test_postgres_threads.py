"""Threads in a real PostgreSQL server (started here: initdb + pg_ctl on loopback, a temp folder, fsync off), shared
by worker processes: a drag run started by one continues in another, and a chat goes on where the other left it."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from luciddrag.agent.persistence import make_checkpointer, postgres_checkpointer, redact
from luciddrag.engine.errors import ResourceError

ROOT = Path(__file__).resolve().parents[1]
SKIP_HINT = "(apt-get install postgresql; .ci/run installs it)"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("langgraph.checkpoint.postgres", reason="the postgres extra is not installed: pip install "
                                                                "'luciddrag[postgres]' (.ci/run installs it)")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(f"PostgreSQL server binaries (initdb, pg_ctl) not found {SKIP_HINT}")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="luciddrag-pg-"))  # not under pytest's 0700 tmp: postgres must reach it
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user, in a folder it owns
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(f"running as root and there is no 'postgres' user to run the server {SKIP_HINT}")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "luciddrag", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    opts = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")
    started = subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
                              "-o", opts, "start"], capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {started.stderr[-1000:]} {log[-1000:]}")
    try:
        yield f"postgresql://luciddrag@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _worker(role: str, spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LUCIDDRAG_"))}  # offline, no defaults
    env["HF_HUB_OFFLINE"] = "1"
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "postgres_worker.py"), role, json.dumps(spec)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
@pytest.mark.services
def test_two_workers_share_threads(postgres_url, tiny_model_dir, tmp_path):
    from luciddrag.evals.shapesworld.world import render_scene

    sc = render_scene(5, n_shapes=1)
    cx, cy = (round(c) for c in sc.shapes[0].centroid)
    image = tmp_path / "scene.png"
    sc.image.save(image)
    spec = {"url": postgres_url, "model": str(tiny_model_dir), "image": str(image),
            "points": [[cx, cy], [cx - 12, cy]], "artifacts": str(tmp_path / "shared-artifacts"),
            "drag_thread": "drag-1", "chat_thread": "chat-1", "dead_sampler": f"http://127.0.0.1:{_free_port()}/x"}
    first = _worker("first", spec)
    second = _worker("second", spec)
    assert first["pid"] != second["pid"]
    # the drag run: the first worker's sampler was down, so it stopped at `sample` with one clear line; the second
    # found the run there, with the same intentions, and finished it without redoing locate / reason / choose
    assert "could not be reached" in first["error"] and "resume from its last checkpoint" in first["error"]
    assert first["next"] == ["sample"] and len(first["intentions"]) >= 2
    assert second["next_before"] == ["sample"] and second["intentions_before"] == first["intentions"]
    assert second["attempts"] == 1 and Path(second["result"]).is_file()
    assert sorted(s for s in second["steps"] if s is not None) == list(range(-1, max(second["steps"]) + 1))
    # the chat: "try your second idea" on the second worker means the second idea of the first worker's turn
    assert second["chat_second"] == first["chat_intentions"][1] != first["chat_first"]
    assert second["chat_messages"] == 4  # both turns, user and assistant, in one thread


@pytest.mark.services
def test_an_unreachable_database_is_one_clear_error(postgres_url):
    port = _free_port()  # nothing listens there
    with pytest.raises(ResourceError, match=r"cannot connect to the thread database postgresql://u:\*\*\*@"):
        postgres_checkpointer(f"postgresql://u:secret@127.0.0.1:{port}/db", timeout_s=2)
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"


@pytest.mark.services
def test_checkpointer_round_trip_in_this_process(postgres_url):
    """The saver itself, against the server: tables made, a checkpoint written and read back by a second saver."""
    from langgraph.checkpoint.base import empty_checkpoint

    a, b = make_checkpointer(postgres_url), make_checkpointer(postgres_url)
    cfg = {"configurable": {"thread_id": "direct", "checkpoint_ns": ""}}
    cp = empty_checkpoint()
    a.put(cfg, cp, {"source": "input", "step": -1}, {})
    got = b.get_tuple({"configurable": {"thread_id": "direct"}})
    assert got is not None and got.checkpoint["id"] == cp["id"]
    for s in (a, b):
        s.conn.close()
