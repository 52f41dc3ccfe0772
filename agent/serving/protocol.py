"""The sampler service's wire format and the work a replica does with a batch of requests.

Everything that crosses the service boundary is a pydantic model sent as JSON text: images and masks as base64 PNG
(lossless, so a remote edit is pixel-identical to an in-process one), numbers as numbers. No pickled tensors or
objects: a replica validates what it receives like any other input, and so does the client.

Batching: the replica hands `run_sample_batch` every request that arrived within its batch window. Requests that
share the image, drags, masks and settings (one edit's intentions sent separately, the same user retrying) are merged
into one engine call, so their intentions share one inversion and one UNet batch; the others run one after another.
The engine samples one image per call, so requests on different images cannot share a UNet batch.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from luciddrag.engine import errors
from luciddrag.engine.errors import InputError, LucidDragError
from luciddrag.engine.pipeline import DragEditor, EditResult
from luciddrag.engine.preprocess import load_mask, open_image
from luciddrag.engine.request import EditRequest

WIRE_VERSION = 1
Point = tuple[float, float]


class ServiceError(LucidDragError, RuntimeError):
    """The sampler service could not answer: unreachable, a replica died and retries ran out, or it timed out."""


# -- images on the wire --------------------------------------------------------------------------------------------

def png_b64(image: Image.Image) -> str:
    """A PIL image as base64 PNG text (lossless; keeps the mode)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        im.load()
    except Exception as exc:  # noqa: BLE001 - any decoding failure is bad input from the other side
        raise InputError(f"an image on the wire is not a valid base64 PNG ({type(exc).__name__})") from None
    if im.format != "PNG":
        raise InputError(f"an image on the wire is {im.format}, not PNG")
    return im


def mask_b64(mask: np.ndarray) -> str:
    """A boolean (or nonzero = on) HxW mask as a 1-channel PNG (0 / 255)."""
    return png_b64(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L"))


def mask_from_b64(text: str) -> np.ndarray:
    return np.asarray(image_from_b64(text).convert("L")) > 0


def jsonable(value: Any) -> Any:
    """Diagnostics and stats as plain JSON values (tensors and arrays as lists, numpy scalars as numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# -- messages ------------------------------------------------------------------------------------------------------

class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleJob(_Wire):
    """One edit: an image, its masks, the rest of its EditRequest (drags, steps, guidance, quality, ...) as JSON, and
    the intentions (source, target prompt pairs) to sample."""

    version: int = WIRE_VERSION
    model: str | None = Field(None, description="The base model the caller expects; None: whatever is served.")
    image_png: str
    mask_png: str | None = None
    handle_masks_png: list[str | None] | None = None
    request: dict[str, Any] = Field(description="EditRequest fields but image and masks, as JSON values.")
    intentions: list[tuple[str, str]] = Field(min_length=1)

    def share_key(self) -> str:
        """Equal for jobs that can run as one engine call (everything but the intentions agrees)."""
        return hashlib.sha256(self.model_dump_json(exclude={"intentions"}).encode()).hexdigest()


class Failure(_Wire):
    """A job the replica could not do, with the project's error type so the client raises the same one."""

    error_type: str
    message: str

    def exception(self) -> LucidDragError:
        cls = getattr(errors, self.error_type, None)
        if isinstance(cls, type) and issubclass(cls, LucidDragError):
            return cls(self.message)
        return ServiceError(f"the sampler replica failed: {self.message}")


class SampleReply(_Wire):
    images_png: list[str] = Field(default_factory=list)
    working_png: list[str] = Field(default_factory=list)
    prompts: list[tuple[str, str]] = Field(default_factory=list)
    diagnostics: list[dict[str, Any]] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = 1
    """Requests in the replica's batch that carried this one (what @serve.batch formed)."""
    shared_with: int = 1
    """Requests merged into this one engine call: one inversion, one UNet batch for all their intentions."""
    replica: str = ""
    """pid@host of the replica that answered."""
    failure: Failure | None = None


class TrackJob(_Wire):
    """Where each handle of `original_png` is found in `edited_png` (the critic's DIFT check)."""

    version: int = WIRE_VERSION
    model: str | None = None
    original_png: str
    edited_png: str
    handles: list[Point] = Field(min_length=1)
    prompt: str = ""
    t: int = 261
    up_block: int = 1
    ensemble: int = 4
    seed: int = 0
    radii: list[float] | None = None


class TrackReply(_Wire):
    points: list[Point] = Field(default_factory=list)
    replica: str = ""
    failure: Failure | None = None


# -- the replica's side ------------------------------------------------------------------------------------------

def replica_name() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


def same_model(asked: str | None, served: str) -> bool:
    """A job may name the model it expects; local folders compare by real path, hub ids by name."""
    if not asked:
        return True
    if os.path.isdir(asked) and os.path.isdir(served):
        return os.path.realpath(asked) == os.path.realpath(served)
    return asked.rstrip("/") == served.rstrip("/")


def failure_of(exc: BaseException) -> Failure:
    if isinstance(exc, LucidDragError):
        return Failure(error_type=type(exc).__name__, message=str(exc))
    # anything else is a bug or an environment problem on the replica: say what, in one line
    first = (str(exc).strip().splitlines() or [""])[0]
    return Failure(error_type="internal", message=f"{type(exc).__name__}: {first}"[:500])


def edit_request(job: SampleJob) -> EditRequest:
    return EditRequest.create(
        **job.request, image=image_from_b64(job.image_png),
        mask=mask_from_b64(job.mask_png) if job.mask_png else None,
        handle_masks=[mask_from_b64(m) if m else None for m in job.handle_masks_png] if job.handle_masks_png else None)


def group_jobs(jobs: Sequence[SampleJob]) -> list[list[int]]:
    """Indices of `jobs` grouped by share key, in order of first arrival."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.share_key(), []).append(i)
    return list(groups.values())


def run_sample_batch(editor: DragEditor, served_model: str, jobs: Sequence[SampleJob]) -> list[SampleReply]:
    """Answer a batch: one engine call per group of shareable jobs; a failing group fails only its own jobs."""
    replies: list[SampleReply | None] = [None] * len(jobs)
    me = replica_name()
    for group in group_jobs(jobs):
        first = jobs[group[0]]
        try:
            if first.version != WIRE_VERSION:
                raise InputError(f"wire version {first.version} is not this replica's {WIRE_VERSION}: upgrade "
                                 "the client and the deployment together")
            if not same_model(first.model, served_model):
                raise InputError(f"the sampler deployment serves {served_model!r}, this run asked for "
                                 f"{first.model!r}: point LUCIDDRAG_SAMPLER at a deployment of that model")
            pairs = [p for i in group for p in jobs[i].intentions]
            # the engine decides the guidance terms (editing; quality when the request names a discriminator)
            result = editor.edit(edit_request(first), intentions=pairs)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the replica stays up
            for i in group:
                replies[i] = SampleReply(failure=failure_of(exc), batch_size=len(jobs), shared_with=len(group),
                                         replica=me)
            continue
        start = 0
        stats = jsonable(result.stats)
        for i in group:
            n = len(jobs[i].intentions)
            rows = slice(start, start + n)
            start += n
            replies[i] = SampleReply(
                images_png=[png_b64(im) for im in result.images[rows]],
                working_png=[png_b64(im) for im in result.working_images[rows]],
                prompts=result.prompts[rows],
                diagnostics=[jsonable(_rows_of(d, rows)) for d in result.diagnostics],
                stats=stats, batch_size=len(jobs), shared_with=len(group), replica=me)
    return [r for r in replies if r is not None]


def _rows_of(record: dict, rows: slice) -> dict:
    """A diagnostics record cut to one job's intentions (per-intention lists are sliced, scalars kept)."""
    return {k: (v[rows] if isinstance(v, list) else v) for k, v in record.items()}


def run_track(editor: DragEditor, served_model: str, job: TrackJob) -> TrackReply:
    from luciddrag.engine.tracking import track_points

    try:
        if not same_model(job.model, served_model):
            raise InputError(f"the sampler deployment serves {served_model!r}, this run asked for {job.model!r}")
        found = track_points(editor.c, image_from_b64(job.original_png), image_from_b64(job.edited_png),
                             list(job.handles), prompt=job.prompt, t=job.t, up_block=job.up_block,
                             ensemble=job.ensemble, seed=job.seed, radii=job.radii)
    except Exception as exc:  # noqa: BLE001 - reported to the caller
        return TrackReply(failure=failure_of(exc), replica=replica_name())
    return TrackReply(points=[(float(x), float(y)) for x, y in found], replica=replica_name())


# -- the client's side -------------------------------------------------------------------------------------------

MASK_FIELDS = {"image", "mask", "handle_masks"}


def sample_job(request: EditRequest, intentions: Sequence[tuple[str, str]], model: str | None = None) -> SampleJob:
    """The job for `editor.edit(request, intentions)`: the image as PNG, masks resolved by the engine's own rule
    (`load_mask`) and sent as 1-bit PNGs, every other field as JSON."""
    image = open_image(request.image)
    size = image.size
    return SampleJob(
        model=model, image_png=png_b64(image),
        mask_png=mask_b64(load_mask(request.mask, size)) if request.mask is not None else None,
        handle_masks_png=None if request.handle_masks is None else [
            None if m is None else mask_b64(load_mask(m, size, what=f"handle mask {i + 1}"))
            for i, m in enumerate(request.handle_masks)],
        request=request.model_dump(mode="json", exclude=MASK_FIELDS),
        intentions=[(s, t) for s, t in (intentions or [(request.source_prompt, request.target_prompt)])])


def edit_result(reply: SampleReply) -> EditResult:
    """A reply as the engine's EditResult (latents stay on the replica: they are not part of the wire format)."""
    if reply.failure is not None:
        raise reply.failure.exception()
    stats = {**reply.stats, "replica": reply.replica, "batch_size": reply.batch_size,
             "shared_with": reply.shared_with}
    return EditResult(images=[image_from_b64(s) for s in reply.images_png],
                      working_images=[image_from_b64(s) for s in reply.working_png],
                      prompts=[tuple(p) for p in reply.prompts], diagnostics=list(reply.diagnostics), stats=stats)
