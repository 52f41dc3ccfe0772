"""Start the web app in this process on a free loopback port (for the gradio_client and browser tests)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Few steps, one attempt, a cheap critic: the tests check the app's plumbing, not the model's quality.
FAST = dict(steps=3, k=2, max_attempts=1, critic_ensemble=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(root: Path, **overrides) -> Iterator[tuple[str, object]]:
    """Yields (url, WebApp); the server is closed afterwards."""
    from luciddrag.agent.web.app import build_app, default_settings, launch

    demo = build_app(default_settings(**{**FAST, **overrides}), root=root)
    port = free_port()
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo.luciddrag
    finally:
        demo.close()
