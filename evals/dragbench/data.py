"""Loaders for DragBench and Drag100, with a restricted unpickler for DragBench's ``meta_data.pkl``.

DragBench (github Yujun-Shi/DragDiffusion, ``drag_bench_evaluation/``): ``<category>/<sample>/original_image.png``,
``user_drag.png`` (the drags drawn on the image, for people), ``meta_data.pkl`` = ``{"prompt": str, "points":
[[x, y], ...] alternating handle/target, "mask": HxW 0/1 array}``.

Drag100 (github zewei-Zhang/GoodDrag, ``dataset/``): ``<sample>/original.jpg``, ``mask.png``, ``points.json`` =
``{"points": [[x, y], ...]}`` alternating handle/target. It has no prompt and no categories (samples are grouped here
by their name's prefix before the last ``_``: ``cat_2`` -> ``cat``).

``meta_data.pkl`` files come from the internet and ``pickle.load`` runs whatever a pickle asks for, so they are read
with ``RestrictedUnpickler``: only plain containers, numbers, strings and numpy arrays can be built; anything else
(``os.system``, ``builtins.eval``, any other class) is refused with ``UnsafePickleError`` before it runs.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from luciddrag.engine.errors import InputError
from luciddrag.engine.preprocess import open_image

Format = Literal["dragbench", "drag100"]

# DragBench's ten categories, in the order of DragDiffusion's evaluation script and the paper's Tab. 4/5 columns.
DRAGBENCH_CATEGORIES: tuple[str, ...] = (
    "art_work", "land_scape", "building_city_view", "building_countryside_view", "animals", "human_head",
    "human_upper_body", "human_full_body", "interior_design", "other_objects",
)
CATEGORY_TITLES: dict[str, str] = {
    "art_work": "Artworks", "land_scape": "Landscape", "building_city_view": "City",
    "building_countryside_view": "Countryside", "animals": "Animals", "human_head": "Head",
    "human_upper_body": "Upper body", "human_full_body": "Full body", "interior_design": "Interior",
    "other_objects": "Other",
}


class UnsafePickleError(InputError):
    """A pickle asked to build something other than plain data (possibly code execution); nothing was run."""


# What a DragBench meta_data.pkl legitimately needs: numpy arrays (and their dtypes/scalars) are rebuilt through
# these callables. Each is a constructor of plain data that cannot run arbitrary code given pickle's arguments.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"),
    ("builtins", "str"), ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "bool"),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes (numpy array payloads) go through codecs.encode(str, 'latin1')
})


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that can only build plain data (containers, numbers, strings, numpy arrays)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused to load {module}.{name}: the pickle may only contain plain data "
                                "(lists, dicts, numbers, strings, numpy arrays)")


def restricted_loads(data: bytes, what: str = "pickle") -> Any:
    """Unpickle plain data; any other global is refused (``UnsafePickleError``), a corrupt file is an InputError."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{what}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(f"{what} is not a readable pickle ({type(exc).__name__}: {str(exc)[:120]})") from None


class Sample(BaseModel):
    """One benchmark sample, format-independent. Points are (x, y) pixels of the original image."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    sample_id: str = Field(description="'<category>/<name>': unique within the dataset, used as the run's key.")
    category: str
    name: str
    image_path: Path
    prompt: str = ""
    """DragBench's prompt (DIFT and GScore context); empty for Drag100, which has none."""
    points: list[tuple[float, float]]
    mask: Any = None
    """HxW bool array (editable region) or None."""
    format: Format

    @property
    def pairs(self) -> list[tuple[tuple[float, float], tuple[float, float]]]:
        return [(self.points[i], self.points[i + 1]) for i in range(0, len(self.points), 2)]

    @property
    def handles(self) -> list[tuple[float, float]]:
        return self.points[0::2]

    @property
    def targets(self) -> list[tuple[float, float]]:
        return self.points[1::2]

    def image(self) -> Image.Image:
        with Image.open(self.image_path) as im:
            return im.convert("RGB")


def _points(raw: Any, where: str) -> list[tuple[float, float]]:
    try:
        pts = [(float(p[0]), float(p[1])) for p in np.asarray(raw, dtype=np.float64).reshape(-1, 2)]
    except (TypeError, ValueError):
        raise InputError(f"{where}: points must be a list of [x, y] pairs") from None
    if not pts or len(pts) % 2:
        raise InputError(f"{where}: {len(pts)} points; they must alternate handle/target (an even, non-zero number)")
    if not np.isfinite(np.asarray(pts)).all():  # NaN / inf / null would be stored as null and break every resume
        raise InputError(f"{where}: a point has a missing, NaN or infinite coordinate")
    return pts


def _image_size(path: Path) -> tuple[int, int]:
    """The image's size, reading it fully: a corrupt or truncated file is one clear error here, not a PIL traceback
    in the middle of a run."""
    return open_image(path).size


def _mask_array(raw: Any, size: tuple[int, int], where: str) -> np.ndarray | None:
    if raw is None:
        return None
    arr = np.asarray(raw)
    if arr.dtype.kind not in "biuf" or arr.ndim not in (2, 3):
        raise InputError(f"{where}: mask must be an HxW array of numbers, got {type(raw).__name__} {arr.shape}")
    if arr.ndim == 3:  # an RGB(A)-like mask: any channel set
        arr = arr.max(axis=-1)
    w, h = size
    if arr.shape != (h, w):
        raise InputError(f"{where}: mask is {arr.shape[1] if arr.ndim > 1 else '?'}x{arr.shape[0]} "
                         f"but the image is {w}x{h}")
    return arr > (127 if arr.dtype == np.uint8 and arr.max() > 1 else 0)


def read_meta(path: Path) -> dict[str, Any]:
    """A DragBench ``meta_data.pkl`` through the restricted unpickler, checked to be a dict with points."""
    meta = restricted_loads(path.read_bytes(), what=str(path))
    if not isinstance(meta, dict) or "points" not in meta:
        raise InputError(f"{path}: expected a dict with 'points' (and 'prompt', 'mask'), got {type(meta).__name__}")
    return meta


def load_dragbench_sample(folder: Path, category: str) -> Sample:
    image = folder / "original_image.png"
    meta_path = folder / "meta_data.pkl"
    if not image.is_file() or not meta_path.is_file():
        raise InputError(f"{folder}: a DragBench sample needs original_image.png and meta_data.pkl")
    meta = read_meta(meta_path)
    size = _image_size(image)
    return Sample(sample_id=f"{category}/{folder.name}", category=category, name=folder.name, image_path=image,
                  prompt=str(meta.get("prompt") or ""), points=_points(meta["points"], str(meta_path)),
                  mask=_mask_array(meta.get("mask"), size, str(meta_path)), format="dragbench")


def drag100_category(name: str) -> str:
    """Drag100 names are '<kind>_<n>' (cat_2, furniture_0): group by kind; a name without a number is its own."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


def load_drag100_sample(folder: Path) -> Sample:
    image = next((folder / n for n in ("original.jpg", "original.png") if (folder / n).is_file()), None)
    pts_path = folder / "points.json"
    if image is None or not pts_path.is_file():
        raise InputError(f"{folder}: a Drag100 sample needs original.jpg and points.json")
    try:
        data = json.loads(pts_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{pts_path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or "points" not in data:
        raise InputError(f"{pts_path}: expected {{\"points\": [[x, y], ...]}}")
    size = _image_size(image)
    mask = None
    if (folder / "mask.png").is_file():
        m = open_image(folder / "mask.png", what="mask")
        mask = _mask_array(np.asarray(m.convert("L")), size, str(folder / "mask.png"))
    return Sample(sample_id=f"{drag100_category(folder.name)}/{folder.name}", category=drag100_category(folder.name),
                  name=folder.name, image_path=image, prompt=str(data.get("prompt") or ""),
                  points=_points(data["points"], str(pts_path)), mask=mask, format="drag100")


def detect_format(root: Path) -> Format:
    """Drag100 has samples directly under the root; DragBench has a category level in between."""
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    if any((d / "points.json").is_file() for d in root.iterdir() if d.is_dir()):
        return "drag100"
    if any((s / "meta_data.pkl").is_file() for d in root.iterdir() if d.is_dir() for s in d.iterdir() if s.is_dir()):
        return "dragbench"
    raise InputError(f"{root} is neither DragBench (<category>/<sample>/meta_data.pkl) nor Drag100 "
                     "(<sample>/points.json)")


def _category_order(name: str) -> tuple[int, str]:
    return (DRAGBENCH_CATEGORIES.index(name) if name in DRAGBENCH_CATEGORIES else len(DRAGBENCH_CATEGORIES), name)


def load_dataset(root: str | Path, fmt: Format | Literal["auto"] = "auto") -> list[Sample]:
    """Every sample, sorted by category (DragBench's order) then name. Hidden folders (.DS_Store etc.) are skipped."""
    root = Path(root).expanduser()
    fmt = detect_format(root) if fmt == "auto" else fmt
    visible = lambda p: p.is_dir() and not p.name.startswith((".", "_"))  # noqa: E731
    if fmt == "drag100":
        samples = [load_drag100_sample(d) for d in sorted(filter(visible, root.iterdir()))]
    else:
        samples = [load_dragbench_sample(s, c.name) for c in sorted(filter(visible, root.iterdir()))
                   for s in sorted(filter(visible, c.iterdir()))]
    if not samples:
        raise InputError(f"no samples found in {root}")
    return sorted(samples, key=lambda s: (_category_order(s.category), s.name))
