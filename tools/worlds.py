"""Worlds: synthetic test worlds that plug offline backends into the locator and the reasoner.

A *world* (ShapesWorld is the one that ships) is a family of images the project can read exactly without any model:
it knows how to recognise its own images, segment and name what lies under a handle, caption the whole image, and
write intentions whose prompts are in its own caption grammar. The tools layer never names a world; a world
registers itself:

* through the standard Python plugin mechanism, an entry point in the ``luciddrag.worlds`` group
  (``[project.entry-points."luciddrag.worlds"]`` in a pyproject), whose object is a zero-argument callable that
  registers the world and returns it; entry points are loaded once, on the first look-up;
* or explicitly, with ``register_world(World(...))`` (tests, a second world in a notebook).

A world's offline backends must only claim images they recognise: ``WorldLocator.recognise`` returns None for
anything else (a photo), and the locator and reasoner then use their generic, world-free paths.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image

from luciddrag.tools.schemas import HandleDescription, Point

if TYPE_CHECKING:  # the reasoner imports this module; its types are only needed for the protocol signatures
    from luciddrag.tools.reasoner import Candidate, DragGeometry

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "luciddrag.worlds"
WORLD_ATTRIBUTE = "world"
"""Key in ``HandleDescription.attributes`` naming the world that described the handle (the reasoner asks only that
world for intentions)."""
MODEL_SETTINGS_FILE = "luciddrag.json"
"""A model folder's settings file; its ``"world"`` key names the world the model was trained on."""


@runtime_checkable
class WorldLocator(Protocol):
    """A world's offline object finder and describer."""

    def recognise(self, image: Image.Image) -> Any | None:
        """The world's reading of ``image`` (opaque to the tools layer; e.g. its segmented objects), or None when
        the image is not one of this world's. Must be cheap to reject photos."""
        ...

    def describe(self, scene: Any, index: int, handle: Point) -> HandleDescription:
        """What lies under handle ``index`` of a recognised image (``scene`` is what ``recognise`` returned). The
        description's attributes should carry ``{"world": <name>}`` so the reasoner can find the world again."""
        ...

    def caption(self, scene: Any) -> str | None:
        """The whole image's description in the world's grammar, or None."""
        ...


@runtime_checkable
class WorldReasoner(Protocol):
    """A world's offline intention rules and caption editor."""

    def candidates(self, geometry: DragGeometry, description: HandleDescription, caption: str,
                   image_size: tuple[int, int]) -> list[Candidate] | None:
        """Scored candidate intentions for one drag on an object this world described, or None to let the generic
        rules answer."""
        ...

    def combine(self, caption: str, edits: Sequence[Any]) -> tuple[str, str] | None:
        """(source, target) prompts for several drags' edits at once (each a ``Candidate.edit`` this world wrote),
        or None when they cannot be combined."""
        ...


@dataclass(frozen=True)
class World:
    """One world: its name and the offline backends it plugs in (either may be absent)."""

    name: str
    locator: WorldLocator | None = None
    reasoner: WorldReasoner | None = None
    model_dir: Path | None = None
    """The world's own diffusion model folder, when it ships one (with its settings in ``luciddrag.json``)."""


_registry: dict[str, World] = {}
_lock = threading.RLock()
_entry_points_loaded = False


def register_world(world: World, *, replace: bool = False) -> World:
    """Add ``world`` to the registry. Registering the same object twice is a no-op; another world under a name
    already taken raises ``ValueError`` unless ``replace``."""
    if not world.name or not world.name.isidentifier():
        raise ValueError(f"a world needs a short identifier as its name, got {world.name!r}")
    with _lock:
        current = _registry.get(world.name)
        if current is not None and current is not world and not replace:
            raise ValueError(f"a world named {world.name!r} is already registered")
        _registry[world.name] = world
    return world


def unregister_world(name: str) -> World | None:
    """Remove a world (tests); returns what was registered under ``name``."""
    with _lock:
        return _registry.pop(name, None)


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Call every installed ``group`` entry point once; returns the names of the worlds they registered.

    A plugin that fails to import (e.g. its package was left out of a trimmed install) is skipped with a log line:
    a missing test world must not break the product."""
    loaded = []
    for ep in entry_points(group=group):
        try:
            result = ep.load()()
        except Exception as exc:  # noqa: BLE001 - third-party plugin code: any failure means "not available"
            log.info("world plugin %s (%s) not loaded: %s: %s", ep.name, ep.value, type(exc).__name__, exc)
            continue
        if isinstance(result, World):
            register_world(result)
            loaded.append(result.name)
    return loaded


def _ensure_loaded() -> None:
    global _entry_points_loaded
    with _lock:
        if not _entry_points_loaded:
            _entry_points_loaded = True  # first, so a plugin calling back into the registry does not recurse
            load_entry_points()


def registered_worlds() -> list[World]:
    """Every registered world, in registration order (entry points loaded on first use)."""
    _ensure_loaded()
    with _lock:
        return list(_registry.values())


def get_world(name: str | None) -> World | None:
    """The world registered under ``name`` (None for None or an unknown name)."""
    if not name:
        return None
    _ensure_loaded()
    with _lock:
        return _registry.get(name)


def recognise(image: Image.Image) -> tuple[World, Any] | None:
    """The first registered world that claims ``image``, with its reading of it; None for any other image."""
    for world in registered_worlds():
        if world.locator is None:
            continue
        scene = world.locator.recognise(image)
        if scene is not None:
            return world, scene
    return None


def model_world(model: str | Path | None) -> str | None:
    """The world a model folder says it belongs to (the ``"world"`` key of its ``luciddrag.json``), else None
    (hub ids, folders without the file, models of real photos)."""
    if not model:
        return None
    path = Path(model) / MODEL_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text()).get("world")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
