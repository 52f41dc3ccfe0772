"""Training data for the fidelity discriminator (paper §3.2 "Quality guidance"): simulated drags, edited with editing
guidance only, scored by a pluggable fidelity scorer.

Recipe: for each real image with a caption, simulate a drag (handle on salient content, random direction and
length), edit it with the engine's editing guidance only (DragonDiffusion's configuration: source caption for both
inversion and sampling, no semantic or quality guidance), score the edit; edits scoring below the scorer's threshold
are low-fidelity examples, the real images are high-fidelity examples. Every edit is kept on disk with its score, so
a different threshold (or using good edits as positives) needs no re-synthesis.

Layout of a data folder::

    meta.json                  base model, scorer, threshold, steps (checked when resuming)
    manifest[-<shard>].jsonl   one `SynthRecord` per line, appended as items finish (the resume point)
    real/<key>.png  edits/<key>.png

Scorers are plugged in by object (`FidelityScorer`); the LAION aesthetic predictor is one (weights needed), a world
with exact ground truth (ShapesWorld) provides another. Sources yield `SourceItem`s; a folder of captioned images is
one source, a synthetic world another.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from luciddrag.engine.errors import InputError, ModelLoadError
from luciddrag.engine.request import EditRequest, GuidanceConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- items, records, scorers ------------------------------------------------------------------------------------


@dataclass
class SourceItem:
    """One real image to edit. `drags` None: simulate them. `mask`: editable region (None: the engine's auto mask).
    `payload` carries whatever a scorer needs (e.g. a ShapesWorld task) and is not written anywhere."""

    key: str
    image: Image.Image
    caption: str
    drags: list[tuple[tuple[float, float], tuple[float, float]]] | None = None
    mask: np.ndarray | None = None
    payload: Any = None


class SynthRecord(BaseModel):
    """One manifest line: a real image and its simulated edit, scored."""

    key: str
    caption: str
    real: str = Field(description="Path of the real image, relative to the data folder.")
    edit: str = Field(description="Path of the edit, relative to the data folder.")
    drags: list[list[float]] = Field(description="[hx, hy, tx, ty] per drag, in the image's pixels.")
    score: float
    label: str = Field(description="'low' (score < threshold: a negative) or 'high'.")
    details: dict = Field(default_factory=dict)
    guidance: dict = Field(default_factory=dict)
    seconds: float = 0.0


class DataMeta(BaseModel):
    base: str
    scorer: str
    threshold: float
    steps: int
    source: str
    created: str = ""


@runtime_checkable
class FidelityScorer(Protocol):
    """Higher = more faithful. `threshold`: edits scoring below it are low-fidelity."""

    name: str
    threshold: float

    def score(self, item: SourceItem, edited: Image.Image) -> tuple[float, dict]: ...


class AestheticScorer:
    """LAION aesthetic predictor v2: CLIP ViT-L/14 image embedding (L2-normalised) -> MLP 768-1024-128-64-16-1.

    The paper labels edits with an aesthetic score below 5 as low-fidelity. Needs the CLIP weights (a hub id or a
    local folder for `CLIPVisionModelWithProjection`) and the MLP's weights (a .safetensors file with the keys
    `layers.{0,2,4,6,7}.{weight,bias}` of LAION's `improved-aesthetic-predictor`, converted from its .pth); neither
    ships in a wheel, so this raises ModelLoadError offline.
    """

    name = "laion-aesthetic-v2"

    def __init__(self, mlp_weights: str | os.PathLike, clip: str = "openai/clip-vit-large-patch14",
                 threshold: float = 5.0, device: str = "cpu") -> None:
        import torch
        from safetensors.torch import load_file

        self.threshold = threshold
        path = Path(mlp_weights)
        if not path.is_file():
            raise ModelLoadError(f"aesthetic MLP weights not found: {path} (convert LAION's sac+logos+ava1-l14-"
                                 "linearMSE.pth to safetensors; or use another --scorer)")
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            self.processor = CLIPImageProcessor.from_pretrained(clip)
            self.clip = CLIPVisionModelWithProjection.from_pretrained(clip).eval().to(device)
        except OSError as exc:
            raise ModelLoadError(f"cannot load CLIP {clip!r} for the aesthetic scorer: {str(exc).splitlines()[0]}") \
                from None
        dims = [768, 1024, 128, 64, 16, 1]
        # LAION's MLP: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear (indices 0, 2, 4, 6, 7).
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dims[0], dims[1]), torch.nn.Dropout(0.2), torch.nn.Linear(dims[1], dims[2]),
            torch.nn.Dropout(0.2), torch.nn.Linear(dims[2], dims[3]), torch.nn.Dropout(0.1),
            torch.nn.Linear(dims[3], dims[4]), torch.nn.Linear(dims[4], dims[5]))
        state = {k.removeprefix("layers."): v for k, v in load_file(str(path)).items()}
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{path} is not the LAION aesthetic MLP: {str(exc).splitlines()[0]}") from None
        self.mlp.eval().to(device)
        self.device = device

    def score(self, item: SourceItem, edited: Image.Image) -> tuple[float, dict]:
        import torch

        with torch.no_grad():
            px = self.processor(images=edited.convert("RGB"), return_tensors="pt").pixel_values.to(self.device)
            emb = self.clip(pixel_values=px).image_embeds
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return float(self.mlp(emb)[0, 0]), {}


# -- drag simulation ----------------------------------------------------------------------------------------------


def saliency(image: Image.Image) -> np.ndarray:
    """(H, W) weights for handle points: local gradient magnitude of the luminance (edges and texture), lightly
    smoothed -- a cheap stand-in for 'salient content' that needs no model."""
    g = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    gy, gx = np.gradient(g)
    mag = np.hypot(gx, gy)
    k = 5  # box blur so that points land inside textured regions, not only on one-pixel edges
    pad = np.pad(mag, k // 2, mode="edge")
    c = np.cumsum(np.cumsum(pad, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    box = (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)
    return box[: g.shape[0], : g.shape[1]]


def simulate_drag(image: Image.Image, rng: np.random.Generator, length_range: tuple[float, float] = (0.05, 0.25),
                  margin: float = 0.05) -> tuple[tuple[float, float], tuple[float, float]]:
    """One random drag: handle drawn with probability ~ saliency (away from the border), random direction, length a
    random fraction of the short side; the target is kept inside the image (direction re-drawn, then clipped)."""
    w, h = image.size
    sal = saliency(image)
    m = max(1, int(margin * min(w, h)))
    sal[:m], sal[-m:], sal[:, :m], sal[:, -m:] = 0, 0, 0, 0
    p = sal.ravel() + 1e-8
    idx = int(rng.choice(p.size, p=p / p.sum()))
    hy, hx = divmod(idx, w)
    for _ in range(20):
        length = rng.uniform(*length_range) * min(w, h)
        a = rng.uniform(0, 2 * math.pi)
        tx, ty = hx + length * math.cos(a), hy + length * math.sin(a)
        if m <= tx < w - m and m <= ty < h - m:
            break
    tx, ty = float(np.clip(tx, m, w - 1 - m)), float(np.clip(ty, m, h - 1 - m))
    return (float(hx), float(hy)), (tx, ty)


def random_guidance(rng: np.random.Generator, steps: int, base: GuidanceConfig | None = None) -> GuidanceConfig:
    """Editing guidance with randomised weights and schedule: one fixed setting makes one kind of failure; the
    paper's 'stochastic process' is meant to cover the editor's range of behaviour."""
    base = base or GuidanceConfig()
    return base.model_copy(update={
        "w_edit": float(base.w_edit * rng.uniform(0.5, 2.0)),
        "w_content": float(base.w_content * rng.uniform(0.5, 2.0)),
        "w_inpaint": float(base.w_inpaint * rng.uniform(0.0, 2.0)),
        "edit_steps": int(rng.integers(max(1, steps // 3), steps + 1)),
    })


# -- local corruptions (extra negatives) --------------------------------------------------------------------------

LOCAL_CORRUPTIONS = ("blur", "smear", "noise", "hue", "ghost", "blob")


def corruption_region(size: tuple[int, int], centre: tuple[float, float], drag_length: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """(H, W) bool disc around `centre` (radius 0.5-1 x the drag length, at least 6% of the short side) and its
    radius: where a drag edit puts new content and where it breaks."""
    w, h = size
    r = max(0.06 * min(w, h), float(rng.uniform(0.5, 1.0)) * drag_length)
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= r * r, r


def _blend(base: np.ndarray, other: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * other[mask]
    return out


def corrupt_locally(image: Image.Image, drag: Sequence[float], rng: np.random.Generator, kind: str | None = None,
                    at: str = "target") -> tuple[Image.Image, str]:
    """The image damaged around one end of the drag (`at`: "target" for an edit, whose content went there;
    "handle" for an unedited image, whose content is still there) in one of the ways drag editors fail
    (LOCAL_CORRUPTIONS): blur, smear along the drag, strong noise, hue rotation, a half-transparent copy of that
    content at the other end (ghost / duplicate), or an extra saturated blob beside it. Returns (image, kind).

    Why: trained only on real images vs. low-fidelity edits, a discriminator can separate the two by "has been
    regenerated by the editor" (every edit re-synthesises the whole image) instead of by damage. The same image
    with and without local damage leaves only the damage as a cue. The rest of the image is untouched.
    """
    from PIL import ImageFilter

    kind = kind or str(rng.choice(LOCAL_CORRUPTIONS))
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = arr.shape[:2]
    hx, hy, tx, ty = (float(v) for v in drag)
    (cx, cy), (ox, oy) = ((tx, ty), (hx, hy)) if at == "target" else ((hx, hy), (tx, ty))
    length = math.hypot(tx - hx, ty - hy)
    region, radius = corruption_region((w, h), (cx, cy), length, rng)
    if kind == "blur":
        soft = np.asarray(image.convert("RGB").filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 3.0) * w / 64)),
                          dtype=np.float32)
        out = _blend(arr, soft, region, 1.0)
    elif kind == "smear":
        # average of copies shifted along the drag direction: motion blur of the content there
        d = np.array([tx - hx, ty - hy]) / max(length, 1e-6)
        n = int(rng.integers(4, 8))
        acc = np.zeros_like(arr)
        for k in range(n):
            sx, sy = (int(round(v)) for v in d * k * w / 64)
            acc += np.roll(arr, (sy, sx), axis=(0, 1))
        out = _blend(arr, acc / n, region, 1.0)
    elif kind == "noise":
        out = arr + region[..., None] * rng.normal(0, rng.uniform(30, 60), size=arr.shape)
    elif kind == "hue":
        hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32)
        hsv[..., 0] = (hsv[..., 0] + 255 * rng.uniform(0.1, 0.5)) % 256
        rot = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
        out = _blend(arr, rot, region, 1.0)
    elif kind == "ghost":
        sx, sy = int(round(ox - cx)), int(round(oy - cy))
        copy = np.roll(arr, (sy, sx), axis=(0, 1))
        out = _blend(arr, copy, np.roll(region, (sy, sx), axis=(0, 1)), float(rng.uniform(0.4, 0.7)))
    elif kind == "blob":
        sat = arr.max(-1) - arr.min(-1)
        colour = arr[region][np.argmax(sat[region])] if region.any() else np.array([255.0, 0.0, 0.0])
        if sat[region].max(initial=0) < 40:  # nothing saturated there: a vivid colour of its own
            colour = np.array(Image.new("RGB", (1, 1), f"hsv({int(rng.integers(0, 360))},90%,90%)").getpixel((0, 0)),
                              dtype=np.float32)
        rb = rng.uniform(0.05, 0.09) * min(w, h)
        a = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(0.5, 1.0) * radius + rb
        bx, by = cx + dist * math.cos(a), cy + dist * math.sin(a)
        yy, xx = np.mgrid[0:h, 0:w]
        out = arr.copy()
        out[(xx - bx) ** 2 + (yy - by) ** 2 <= rb * rb] = colour
    else:
        raise ValueError(f"unknown corruption {kind!r}: one of {LOCAL_CORRUPTIONS}")
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), kind


# -- sources -------------------------------------------------------------------------------------------------------


def folder_source(folder: str | os.PathLike, captioner=None) -> Iterator[SourceItem]:
    """Captioned images in a folder: `<name>.png` with `<name>.txt`, or a `captions.json` {file name: caption}.
    Images without a caption get `captioner(image)` when given, else InputError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    table: dict[str, str] = {}
    if (folder / "captions.json").is_file():
        table = json.loads((folder / "captions.json").read_text())
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    for p in files:
        caption = table.get(p.name)
        if caption is None and p.with_suffix(".txt").is_file():
            caption = p.with_suffix(".txt").read_text().strip()
        image = Image.open(p).convert("RGB")
        if caption is None:
            if captioner is None:
                raise InputError(f"no caption for {p.name}: add {p.stem}.txt or captions.json, or pass a captioner")
            caption = captioner(image)
        yield SourceItem(key=p.stem, image=image, caption=caption)


# -- the synthesis loop --------------------------------------------------------------------------------------------


def read_manifest(data: str | os.PathLike) -> list[SynthRecord]:
    """Every record of every manifest shard in a data folder (sorted by key)."""
    data = Path(data)
    out: dict[str, SynthRecord] = {}
    for f in sorted(data.glob("manifest*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    r = SynthRecord.model_validate_json(line)
                except ValueError:
                    continue  # a line cut short by a crash: the item is simply redone
                out[r.key] = r
    return [out[k] for k in sorted(out)]


def _check_meta(data: Path, meta: DataMeta) -> None:
    path = data / "meta.json"
    if path.is_file():
        old = DataMeta.model_validate_json(path.read_text())
        for k in ("base", "scorer", "threshold", "steps", "source"):
            if getattr(old, k) != getattr(meta, k):
                raise InputError(f"{data} was synthesised with {k}={getattr(old, k)!r}, now {getattr(meta, k)!r}: "
                                 "use another --out folder (or the same settings to resume)")
    else:
        path.write_text(meta.model_dump_json(indent=1))


def synthesize(editor, items: Iterable[SourceItem], scorer: FidelityScorer, out: str | os.PathLike, *, steps: int = 20,
               seed: int = 0, source_name: str = "folder", shard: tuple[int, int] = (0, 1),
               total: int | None = None, minutes: float | None = None, guidance: GuidanceConfig | None = None,
               progress: bool = True) -> dict:
    """Edit and score every item (this shard's share: item i goes to shard i % n), appending to the manifest.

    Resumable: keys already in any manifest shard are skipped. `minutes` stops cleanly after that wall time.
    Returns counts of this call.
    """
    out = Path(out)
    (out / "real").mkdir(parents=True, exist_ok=True)
    (out / "edits").mkdir(parents=True, exist_ok=True)
    _check_meta(out, DataMeta(base=str(editor.c.name), scorer=scorer.name, threshold=scorer.threshold, steps=steps,
                              source=source_name, created=time.strftime("%Y-%m-%d %H:%M:%S")))
    done = {r.key for r in read_manifest(out)}
    k, n = shard
    manifest = out / ("manifest.jsonl" if n == 1 else f"manifest-{k}of{n}.jsonl")
    counts = {"edited": 0, "low": 0, "high": 0, "skipped": 0}
    t_end = time.monotonic() + 60 * minutes if minutes else math.inf
    bar = tqdm(total=None if total is None else len(range(k, total, n)), desc=f"synthesise {k}/{n}", disable=not progress)
    with manifest.open("a") as fh:
        for i, item in enumerate(items):
            if i % n != k:
                continue
            bar.update(1)
            if item.key in done:
                counts["skipped"] += 1
                continue
            if time.monotonic() > t_end:
                break
            rng = np.random.default_rng([seed, i])
            drags = item.drags or [simulate_drag(item.image, rng)]
            g = random_guidance(rng, steps, guidance)
            req = EditRequest.create(image=item.image, points=[p for d in drags for p in d], mask=item.mask,
                                     source_prompt=item.caption, target_prompt=item.caption, steps=steps,
                                     seed=seed, guidance=g)
            t0 = time.perf_counter()
            edited = editor.edit(req).image.convert("RGB")
            score, details = scorer.score(item, edited)
            item.image.save(out / "real" / f"{item.key}.png")
            edited.save(out / "edits" / f"{item.key}.png")
            label = "low" if score < scorer.threshold else "high"
            rec = SynthRecord(key=item.key, caption=item.caption, real=f"real/{item.key}.png",
                              edit=f"edits/{item.key}.png", drags=[[*h, *t] for h, t in drags], score=score,
                              label=label, details=details, guidance=g.model_dump(mode="json"),
                              seconds=time.perf_counter() - t0)
            fh.write(rec.model_dump_json() + "\n")
            fh.flush()  # the manifest line is the commit point of this item
            counts["edited"] += 1
            counts[label] += 1
            bar.set_postfix(low=counts["low"], high=counts["high"])
    bar.close()
    return counts


def summarize(records: Sequence[SynthRecord]) -> dict:
    """Counts and score statistics of a data folder's manifest."""
    scores = np.array([r.score for r in records]) if records else np.zeros(0)
    return {"items": len(records), "low": sum(r.label == "low" for r in records),
            "high": sum(r.label == "high" for r in records),
            "score_mean": float(scores.mean()) if len(scores) else None,
            "seconds_per_edit": float(np.mean([r.seconds for r in records])) if records else None}
