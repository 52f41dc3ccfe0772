"""Turn whatever image/mask/points a user has into the engine's working tensors, and map results back.

Pure functions over PIL/numpy. The working resolution keeps the aspect ratio, has about the model's native pixel
count, and is a multiple of what the VAE and UNet need (8 x 2^(downsamples) = 64 for SD, 16 for ShapesWorld).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from luciddrag.engine.errors import InputError
from luciddrag.engine.request import DragPair

MIN_SIDE = 16  # below this no drag is meaningful and the VAE has nothing to encode


def open_image(src: Any, what: str = "image") -> Image.Image:
    """Open a path / PIL image / array, with clear errors for missing or corrupt files."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        arr = src
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            raise InputError(f"{what} array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise InputError(f"{what} file not found: {path}")
        if path.is_dir():
            raise InputError(f"{what} path is a folder, not an image file: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except Image.DecompressionBombError as exc:  # PIL's guard against images that would fill the memory
            raise InputError(f"{what} {path} is too large to open safely ({_bomb_size(exc)}; the limit is "
                             f"{Image.MAX_IMAGE_PIXELS or 0:,} pixels): downscale it first") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"cannot read {what} {path}: not a readable image ({exc.__class__.__name__})") from None
    raise InputError(f"{what} must be a file path, a PIL image or a numpy array, got {type(src).__name__}")


def _bomb_size(exc: Exception) -> str:
    import re

    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)):,} pixels" if m else "too many pixels"


def to_rgb(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Any PIL mode -> (RGB image, alpha or None). Transparent pixels are composited on white, as viewers show them."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: stretch the used range to 8 bits instead of clipping it to white.
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
        mode = "L"
    alpha = None
    if mode == "P":
        # palette images carry transparency only when the file says so
        mode = "RGBA" if "transparency" in image.info else "RGB"
        image = image.convert(mode)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        alpha = image.getchannel("A")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB"), alpha


def working_size(width: int, height: int, native: int, multiple: int) -> tuple[int, int]:
    """Size with ~native^2 pixels, the input's aspect, each side a multiple of `multiple`."""
    scale = math.sqrt((native * native) / float(width * height))
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    return w, h


def scale_point(p: Sequence[float], src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float]:
    """Map a pixel coordinate between sizes, treating pixels as unit squares (centre of pixel i is i + 0.5)."""
    return ((p[0] + 0.5) * dst[0] / src[0] - 0.5, (p[1] + 0.5) * dst[1] / src[1] - 0.5)


def check_inside(drags: Sequence[DragPair], size: tuple[int, int]) -> None:
    """The one bounds rule for drag points: pixel centres, x in [0, w - 1] and y in [0, h - 1]."""
    w, h = size
    for i, d in enumerate(drags, 1):
        for name, (x, y) in (("handle", d.handle), ("target", d.target)):
            if not (0 <= x <= w - 1 and 0 <= y <= h - 1):
                raise InputError(
                    f"drag {i}: {name} point ({x:g}, {y:g}) is outside the {w}x{h} image "
                    f"(x must be in [0, {w - 1}], y in [0, {h - 1}])"
                )


def validate_drags(drags: Sequence[DragPair], size: tuple[int, int]) -> None:
    """Inside the image (`check_inside`) and of non-zero length."""
    check_inside(drags, size)
    for i, d in enumerate(drags, 1):
        if math.dist(d.handle, d.target) < 0.5:
            raise InputError(f"drag {i}: handle and target are the same point {d.handle}: a drag needs a length")


def load_mask(src: Any, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """Editable-region mask -> HxW bool at the image's size; nonzero (or opaque, for RGBA masks) = editable."""
    im = open_image(src, what=what)
    if im.size != tuple(size):
        raise InputError(f"{what} is {im.size[0]}x{im.size[1]} but the image is {size[0]}x{size[1]}: they must match")
    if im.mode in ("RGBA", "LA"):
        arr = np.asarray(im.getchannel("A")) > 127
        if arr.all():  # a fully opaque RGBA mask carries its meaning in the colour channels
            arr = np.asarray(im.convert("L")) > 127
    elif im.mode == "1":
        arr = np.asarray(im, dtype=bool)
    else:
        arr = np.asarray(im.convert("L")) > 127
    if not arr.any():
        raise InputError(f"{what} is empty: paint the region that may change (white = editable)")
    return arr


def resize_mask(mask: np.ndarray, size: tuple[int, int], wsize: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask; a mask of a few pixels that vanishes keeps its centre pixel."""
    if tuple(size) == tuple(wsize):
        return mask.copy()
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize(wsize, Image.Resampling.NEAREST)
    out = np.asarray(m) > 127
    if not out.any():
        ys, xs = np.nonzero(mask)
        cx, cy = scale_point((xs.mean(), ys.mean()), size, wsize)
        out = out.copy()
        out[min(int(cy), wsize[1] - 1), min(int(cx), wsize[0] - 1)] = True
    return out


@dataclass
class Prepared:
    """Working-resolution inputs plus what is needed to map results back."""

    image: Image.Image  # RGB at working size
    original_size: tuple[int, int]
    working_size: tuple[int, int]
    alpha: Image.Image | None  # original alpha, re-attached to results
    drags: list[DragPair]  # in working pixels
    mask: np.ndarray | None  # HxW bool at working size, or None (auto mask)
    handle_masks: list[np.ndarray | None] | None = None  # per drag: the region moving with the handle


def prepare(image: Any, drags: Sequence[DragPair], mask: Any | None, native: int, multiple: int,
            handle_masks: Sequence[Any | None] | None = None) -> Prepared:
    """Validate and resize everything consistently. Raises InputError with one clear line on bad input."""
    im = open_image(image)
    rgb, alpha = to_rgb(im)
    size = rgb.size
    if min(size) < MIN_SIDE:
        raise InputError(f"image is {size[0]}x{size[1]}: too small, each side must be at least {MIN_SIDE} px")
    validate_drags(drags, size)
    mask_arr = load_mask(mask, size) if mask is not None else None
    if handle_masks is not None and len(handle_masks) != len(drags):
        raise InputError(f"got {len(handle_masks)} handle masks for {len(drags)} drags: give one per drag (or None)")
    regions = None
    if handle_masks is not None:
        regions = [None if m is None else load_mask(m, size, what=f"handle mask {i + 1}")
                   for i, m in enumerate(handle_masks)]
    wsize = working_size(size[0], size[1], native, multiple)
    work = rgb if wsize == size else rgb.resize(wsize, Image.Resampling.LANCZOS)
    wdrags = [
        DragPair(handle=scale_point(d.handle, size, wsize), target=scale_point(d.target, size, wsize)) for d in drags
    ]
    wmask = resize_mask(mask_arr, size, wsize) if mask_arr is not None else None
    wregions = None if regions is None else [None if r is None else resize_mask(r, size, wsize) for r in regions]
    return Prepared(work, size, wsize, alpha, wdrags, wmask, wregions)


def restore(result: Image.Image, prepared: Prepared) -> Image.Image:
    """Working-size result -> the input's size (and its alpha channel, if it had one)."""
    out = result if result.size == prepared.original_size else result.resize(
        prepared.original_size, Image.Resampling.LANCZOS
    )
    if prepared.alpha is not None:
        out = out.convert("RGBA")
        out.putalpha(prepared.alpha)
    return out


def pil_to_tensor_array(image: Image.Image) -> np.ndarray:
    """RGB PIL -> float32 CHW in [-1, 1] (the VAE's range)."""
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


def tensor_array_to_pil(arr: np.ndarray) -> Image.Image:
    """float CHW in [-1, 1] -> RGB PIL."""
    img = np.clip((arr.transpose(1, 2, 0) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return Image.fromarray(img)
