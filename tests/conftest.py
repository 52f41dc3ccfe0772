"""Shared fixtures: a tiny random SD-architecture checkpoint written to disk once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from luciddrag.engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_editor(tiny_model_dir):
    import torch

    from luciddrag.engine.pipeline import DragEditor

    torch.manual_seed(0)
    return DragEditor.from_pretrained(str(tiny_model_dir), device="cpu", show_progress=False)
