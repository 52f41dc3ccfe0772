"""Bundled example images: ShapesWorld scenes (what the shipped model was trained on) and scikit-image's photos
(for real Stable Diffusion checkpoints). Nothing is downloaded; scikit-image is optional."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from luciddrag.agent.context import model_draws
from luciddrag.agent.web.session import enlarge
from luciddrag.evals.shapesworld.world import render_scene


@dataclass(frozen=True)
class Example:
    name: str
    caption: str  # offered as the optional description
    load: Callable[[], Image.Image]


def _scene(seed: int, n: int | None) -> Example:
    sc = render_scene(seed, n_shapes=n)
    return Example(name=f"ShapesWorld #{seed}", caption=sc.caption, load=lambda: render_scene(seed, n_shapes=n).image)


def _photo(name: str, caption: str) -> Example | None:
    try:
        from skimage import data
    except ImportError:  # optional: the app works with ShapesWorld alone
        return None
    fn = getattr(data, name, None)
    if fn is None:
        return None
    return Example(name=f"{name} (scikit-image)", caption=caption, load=lambda: Image.fromarray(fn()).convert("RGB"))


SHAPES_SCENES = [(7, 1), (5, 1), (11, 2), (3, 2), (21, 3)]
PHOTOS = [("astronaut", "a photo of an astronaut"), ("chelsea", "a photo of a cat"),
          ("coffee", "a photo of a cup of coffee")]


def bundled_examples(model: str | None = None) -> list[Example]:
    """The examples to offer with `model`: a world model (its folder's luciddrag.json says what it draws, e.g.
    ShapesWorld's 64x64 world) gets only images of its kind -- a photo would come back as noise."""
    out = [_scene(seed, n) for seed, n in SHAPES_SCENES]
    draws = model_draws(model) if model else None
    if draws and "size" in draws:
        return [e for e in out if e.load().size == tuple(int(v) for v in draws["size"])]
    out += [e for e in (_photo(n, c) for n, c in PHOTOS) if e is not None]
    return out


def thumbnails(examples: list[Example], folder: Path, side: int = 128) -> list[tuple[str, str]]:
    """(path, label) pairs for the examples gallery, written once per app start."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, ex in enumerate(examples):
        path = folder / f"example-{i}.png"
        im = enlarge(ex.load())
        im.thumbnail((side * 2, side * 2))
        im.save(path)
        out.append((str(path), ex.name))
    return out
