"""A point-prompted segmenter: SAM (transformers ``SamModel`` / ``SamProcessor``) turning each handle into a mask.

The paper's locator, Osprey, describes SAM masks; here SAM gives the locator the object under a handle as a mask,
either on its own (the ``sam`` locator backend) or under a namer (a vision LLM, Osprey, Florence-2) that names what
the mask covers. Any SAM checkpoint in transformers' format works, by hub id or local folder
(``facebook/sam-vit-base`` by default, ``-large`` / ``-huge`` for better masks).

The handle is the prompt (one foreground point); the drag's target is not, because it marks where the object should
go, which may lie on another object (a move) or on the same one (a stretch). SAM answers three masks per point
(part, object, whole); ``choose_mask`` keeps those that contain the handle and are small enough to be an object, and
picks the one SAM predicts best (highest IoU score).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from luciddrag.engine.errors import ModelLoadError
from luciddrag.tools.schemas import Point

DEFAULT_SAM_MODEL = "facebook/sam-vit-base"
MAX_OBJECT_FRACTION = 0.5
"""A mask over more than this fraction of the image is the background (or everything), not the dragged object."""


def local_only(flag: bool | None) -> bool:
    """Load from the local Hugging Face cache only: the flag when given, else ``HF_HUB_OFFLINE``."""
    if flag is not None:
        return flag
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def load_pretrained(loader: Callable[..., Any], model_id: str, local_files_only: bool, what: str) -> Any:
    """``loader(model_id)`` with a one-line ``ModelLoadError`` (and what to do) when the weights are missing."""
    try:
        return loader(model_id, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        hint = ("it is not in the local Hugging Face cache" if local_files_only
                else "it could not be downloaded (no network?)")
        raise ModelLoadError(
            f"cannot load {what} '{model_id}': {hint}. Download it once with "
            f"`hf download {model_id}` on a machine with network access, or use --locator offline"
        ) from exc


def choose_mask(masks: np.ndarray, scores: np.ndarray, handle: Point,
                max_fraction: float = MAX_OBJECT_FRACTION) -> int | None:
    """Index of the mask to use for a handle among SAM's candidates (``masks``: NxHxW bool, ``scores``: N
    predicted IoUs), or None when none contains the handle pixel at an object's size.

    A mask that misses the handle is about something else; one over ``max_fraction`` of the image is background.
    Among the rest, the highest predicted IoU wins (SAM's own advice for single-point prompts)."""
    n, height, width = masks.shape
    x = min(max(int(round(handle[0])), 0), width - 1)
    y = min(max(int(round(handle[1])), 0), height - 1)
    limit = max_fraction * height * width
    ok = [i for i in range(n) if masks[i, y, x] and 0 < masks[i].sum() <= limit]
    if not ok:
        return None
    return max(ok, key=lambda i: (float(scores[i]), -i))


class SamSegmenter:
    """SAM through transformers, loaded lazily with ``from_pretrained(model)`` (hub id or local folder)."""

    def __init__(self, model: str = DEFAULT_SAM_MODEL, device: str = "cpu", local_files_only: bool | None = None,
                 *, dtype: Any = None, max_fraction: float = MAX_OBJECT_FRACTION) -> None:
        self.model_id, self.device, self.local_files_only = model, device, local_only(local_files_only)
        self.dtype = dtype
        """torch dtype; None: float16 on CUDA, float32 elsewhere."""
        self.max_fraction = max_fraction
        self.name = f"sam:{model}"
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        """Load processor and model on first use; ``ModelLoadError`` if the weights are missing."""
        if self._model is not None:
            return
        import torch
        from transformers import SamModel, SamProcessor

        dtype = self.dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        self._processor = load_pretrained(SamProcessor.from_pretrained, self.model_id, self.local_files_only,
                                          "SAM processor")
        model = load_pretrained(SamModel.from_pretrained, self.model_id, self.local_files_only, "SAM")
        self._model = model.to(device=self.device, dtype=dtype).eval()

    def predict(self, image: Image.Image, handles: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
        """SAM's candidate masks for each handle (one foreground point each), in one pass over the image.

        Returns ``masks`` (handles x candidates x H x W, bool, at the image's size) and ``scores`` (handles x
        candidates, predicted IoU, float32)."""
        import torch

        self.load()
        image = image.convert("RGB")
        if not handles:
            return np.zeros((0, 0, image.height, image.width), bool), np.zeros((0, 0), np.float32)
        points = [[[[float(x), float(y)]] for x, y in handles]]  # image -> one prompt per handle -> its one point
        labels = [[[1] for _ in handles]]
        inputs = self._processor(images=image, input_points=points, input_labels=labels, return_tensors="pt")
        dtype = next(self._model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self._model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
                              input_labels=inputs["input_labels"], multimask_output=True)
        masks = self._processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(),
                                                   inputs["reshaped_input_sizes"].cpu())[0]
        return masks.numpy().astype(bool), out.iou_scores[0].float().cpu().numpy()

    def masks(self, image: Image.Image, handles: Sequence[Point]) -> list[np.ndarray | None]:
        """The object mask under each handle (HxW bool), or None where SAM found no object-sized mask there."""
        masks, scores = self.predict(image, handles)
        out: list[np.ndarray | None] = []
        for i, handle in enumerate(handles):
            k = choose_mask(masks[i], scores[i], handle, self.max_fraction)
            out.append(None if k is None else masks[i, k])
        return out

    def mask(self, image: Image.Image, point: Point) -> np.ndarray | None:
        """The object mask under one point (see ``masks``)."""
        return self.masks(image, [point])[0]
