"""Small engine inputs shared by the engine tests: a blocky random image and a two-point edit request on it."""

from __future__ import annotations

import numpy as np
from PIL import Image

from luciddrag.engine.request import EditRequest


def blocky_image(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """8x8-pixel blocks of random colour: structure the UNet features can track, at any size."""
    rng = np.random.RandomState(seed)
    base = np.kron(rng.rand(h // 8 + 1, w // 8 + 1, 3), np.ones((8, 8, 1)))[:h, :w]
    return Image.fromarray((base * 255).astype(np.uint8))


def small_request(steps: int = 8, **kw) -> EditRequest:
    """One drag (10, 10) -> (22, 16) on `blocky_image()`, 'a red circle' -> 'a big red circle'."""
    base = dict(image=blocky_image(), points=[(10, 10), (22, 16)], source_prompt="a red circle",
                target_prompt="a big red circle", steps=steps, seed=0)
    base.update(kw)
    return EditRequest.create(**base)
