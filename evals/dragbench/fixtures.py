"""Small DragBench- and Drag100-format datasets generated from ShapesWorld tasks (for tests and the offline demo).

Each sample is a ShapesWorld drag task written in the benchmark's own file layout, so the loaders, the runner and
the metrics are exercised on exactly the files a real download contains. ``ground_truth`` additionally writes each
task's exact ideal result in DragDiffusion's results layout (``<category>/<sample>/dragged_image.png``), a "perfect
method" for checking metrics without running an editor.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from luciddrag.evals.shapesworld.tasks import DragTask, generate_tasks
from luciddrag.tools.drawing import draw_drags

# ShapesWorld families filed under two of DragBench's categories (any names work; these exercise the table layout).
FAMILY_CATEGORY = {"move": "other_objects", "resize": "art_work"}


def fixture_tasks(per_family: int = 1, families: tuple[str, ...] = ("move", "resize")) -> list[DragTask]:
    return [t for fam in families for t in generate_tasks(fam, per_family)]  # type: ignore[arg-type]


def _int_points(task: DragTask) -> list[list[int]]:
    # DragBench stores integer pixel coordinates (its labelling tool records clicks).
    return [[int(round(x)), int(round(y))] for x, y in task.points]


def write_dragbench(root: Path, tasks: list[DragTask], ground_truth: Path | None = None) -> Path:
    """``root/<category>/<task_id>/{original_image.png, user_drag.png, meta_data.pkl}``."""
    for t in tasks:
        folder = root / FAMILY_CATEGORY[t.family] / t.task_id
        folder.mkdir(parents=True, exist_ok=True)
        image = t.scene().image.convert("RGB")
        image.save(folder / "original_image.png")
        pts = _int_points(t)
        pairs = [(pts[i], pts[i + 1]) for i in range(0, len(pts), 2)]
        draw_drags(image, pairs, mask=t.editable_mask(), min_side=256).save(folder / "user_drag.png")
        meta = {"prompt": t.source_prompt, "points": pts, "mask": t.editable_mask().astype(np.uint8)}
        # protocol 4, like DragBench's files: plain dict, list and numpy array
        (folder / "meta_data.pkl").write_bytes(pickle.dumps(meta, protocol=4))
        if ground_truth is not None:
            out = ground_truth / FAMILY_CATEGORY[t.family] / t.task_id
            out.mkdir(parents=True, exist_ok=True)
            t.ground_truth_scene().image.convert("RGB").save(out / "dragged_image.png")
    return root


def write_drag100(root: Path, tasks: list[DragTask]) -> Path:
    """``root/<family>_<n>/{original.jpg, mask.png, points.json}`` (names like GoodDrag's ``cat_2``)."""
    counters: dict[str, int] = {}
    for t in tasks:
        n = counters.get(t.family, 0)
        counters[t.family] = n + 1
        folder = root / f"{t.family}_{n}"
        folder.mkdir(parents=True, exist_ok=True)
        t.scene().image.convert("RGB").save(folder / "original.jpg", quality=95)
        Image.fromarray(t.editable_mask().astype(np.uint8) * 255).save(folder / "mask.png")
        (folder / "points.json").write_text(json.dumps({"points": _int_points(t)}))
    return root
