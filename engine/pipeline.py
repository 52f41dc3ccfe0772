"""Collaborative guidance sampling: one call that reads top to bottom.

check inputs -> encode prompts -> encode image -> DDIM-invert with the source prompt(s) into the memory bank ->
prepare z_T -> sample with the target prompt(s), CFG, K/V injection and the guidance terms -> decode -> map back.

Several intentions (source/target prompt pairs) run as one batch: each distinct source prompt is inverted once (one
batched pass), and all target prompts are sampled together.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from luciddrag.engine.energies import drag_scale, patch_offsets, region_offsets, scale_about
from luciddrag.engine.discriminator import load_discriminator, quality_terms
from luciddrag.engine.errors import InputError, ResourceError
from luciddrag.engine.features import FeatureTap
from luciddrag.engine.guidance import Geometry, GuidanceTerm, editing_terms
from luciddrag.engine.loading import Components, load_components
from luciddrag.engine.memory import AttentionControl, MemoryBank, install_memory, uninstall_memory
from luciddrag.engine.preprocess import Prepared, pil_to_tensor_array, prepare, restore, tensor_array_to_pil
from luciddrag.engine.request import FAST_STEPS, EditRequest, GuidanceConfig, QualityGuidance
from luciddrag.engine.sampling import (SamplingPlan, StepEvent, UNetCall, collaborative_guidance_sample,
                                       to_epsilon)


@dataclass
class EditResult:
    images: list[Image.Image]  # one per intention, at the input's size
    working_images: list[Image.Image]
    prompts: list[tuple[str, str]]
    diagnostics: list[dict]  # per sampling step: timestep and each term's energy per intention
    stats: dict  # timings, UNet forward/backward counts, memory bank size, working size
    latents: torch.Tensor | None = None  # final latents (B, 4, h, w) on CPU, for verification and tests

    @property
    def image(self) -> Image.Image:
        return self.images[0]


# -- small pure helpers -------------------------------------------------------------------------------------------

ALPHA_BAR_FLOOR = 1e-6


def floor_alpha_bar(alphas_cumprod: torch.Tensor, floor: float = ALPHA_BAR_FLOOR) -> torch.Tensor:
    """Zero-terminal-SNR checkpoints have alpha_bar = 0 at t = 999, where the epsilon form our guidance works in
    cannot give x0 (DDIM divides by sqrt(alpha_bar)). A floor of 1e-6 keeps every step defined; at that step x_t is
    pure noise either way, and x0 moves by ~sqrt(floor) = 0.001 of the noise."""
    return alphas_cumprod.clamp(min=floor)


def capsule_mask(size: tuple[int, int], handles: np.ndarray, targets: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels within `radius[i]` of the segment handle_i -> target_i, for any i."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), dtype=bool)
    for a, b, r in zip(handles, targets, radius):
        ab = b - a
        t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6)
        t = np.clip(t, 0.0, 1.0)
        d2 = (xx - (a[0] + t * ab[0])) ** 2 + (yy - (a[1] + t * ab[1])) ** 2
        out |= d2 <= r * r
    return out


def directed_factor(factor: float, direction: str | None) -> float:
    """A scale factor made to go the way the intention's word says: 'grow' -> >= 1, 'shrink' -> <= 1, None -> as is.

    The magnitude stays the geometry's; when the geometry points the other way (a "bigger" intention whose target lies
    inside the region) the reciprocal is taken, i.e. the same relative change in the asked direction, rather than
    clamping to 1 (which would turn a resize the user asked for into no resize at all)."""
    if direction == "grow" and factor < 1.0:
        return 1.0 / factor
    if direction == "shrink" and factor > 1.0:
        return 1.0 / factor
    return factor


def region_scales(regions: Sequence[np.ndarray | None], handles: np.ndarray, targets: np.ndarray,
                  direction: str | None = None) -> list[tuple[tuple[float, float], float] | None]:
    """Per drag with a region: (centre, factor) of the scaling about the region's centroid that best carries the
    handle to its target, turned the way `direction` says (see `directed_factor`)."""
    out: list[tuple[tuple[float, float], float] | None] = []
    for region, h, t in zip(regions, handles, targets):
        if region is None:
            out.append(None)
            continue
        ys, xs = np.nonzero(region)
        centre = (float(xs.mean()), float(ys.mean()))
        c = torch.tensor(centre)
        factor = drag_scale(torch.tensor(h, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), c)
        out.append((centre, directed_factor(factor, direction)))
    return out


def region_similarities(regions: Sequence[np.ndarray | None], handles: np.ndarray, targets: np.ndarray,
                        direction: str | None = None, factor: float | None = None
                        ) -> list[tuple[tuple[float, float], float, tuple[float, float]] | None]:
    """Per drag with a region: (centre, factor, shift) of the move-and-resize p -> centre + shift + factor (p - centre)
    that carries the region's handles to their targets (the "similarity" motion: a resize and a move at once).

    Drags on the same region are fitted together. Two or more give the factor by least squares (centred handles
    onto centred targets), turned the way `direction` says; a single drag cannot tell a resize from a move, so its
    factor is `factor` (e.g. from the intention's size word), else 1. The shift then carries the handles' mean onto
    the targets' mean exactly."""
    out: list[tuple[tuple[float, float], float, tuple[float, float]] | None] = [None] * len(handles)
    groups: list[tuple[np.ndarray, list[int]]] = []
    for i, region in enumerate(regions):
        if region is None:
            continue
        for r, idx in groups:
            if r is region or (r.shape == region.shape and np.array_equal(r, region)):
                idx.append(i)
                break
        else:
            groups.append((region, [i]))
    for region, idx in groups:
        ys, xs = np.nonzero(region)
        centre = np.array([xs.mean(), ys.mean()], dtype=np.float64)
        h = np.asarray(handles, dtype=np.float64)[idx]
        t = np.asarray(targets, dtype=np.float64)[idx]
        hc, tc = h - h.mean(0), t - t.mean(0)
        spread = float((hc * hc).sum())
        if len(idx) > 1 and spread >= 1.0:
            s = float(min(max(float((hc * tc).sum()) / spread, 0.25), 4.0))
        else:
            s = 1.0 if factor is None else float(factor)
        s = directed_factor(s, direction)
        shift = t.mean(0) - centre - s * (h.mean(0) - centre)
        for i in idx:
            out[i] = ((float(centre[0]), float(centre[1])), s, (float(shift[0]), float(shift[1])))
    return out


def region_transforms(motion: str, regions: Sequence[np.ndarray | None], handles: np.ndarray, targets: np.ndarray,
                      direction: str | None = None, factor: float | None = None) -> list[tuple | None]:
    """Per drag: how its region is resized -- (centre, factor) for "scale", (centre, factor, shift) for
    "similarity" -- or None (a translated region, a patch drag)."""
    if motion == "scale":
        return list(region_scales(regions, handles, targets, direction))
    if motion == "similarity":
        return list(region_similarities(regions, handles, targets, direction, factor))
    return [None] * len(handles)


def scaled_region(region: np.ndarray, centre: tuple[float, float], factor: float,
                  shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The region scaled by `factor` about `centre`, then moved by `shift` (inverse-mapped, so it has no holes)."""
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    sx = np.round(centre[0] + (xx - centre[0] - shift[0]) / factor).astype(int)
    sy = np.round(centre[1] + (yy - centre[1] - shift[1]) / factor).astype(int)
    ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.zeros_like(region)
    out[ok] = region[sy[ok], sx[ok]]
    return out


def region_footprint(region: np.ndarray, shift: np.ndarray, margin: int, moved: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: the region, where it goes (moved by `shift`, or `moved` when given), and `margin` px around."""
    h, w = region.shape
    if moved is None:
        moved = np.zeros_like(region)
        dx, dy = int(round(float(shift[0]))), int(round(float(shift[1])))
        ys, xs = np.nonzero(region)
        ok = (ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        moved[ys[ok] + dy, xs[ok] + dx] = True
    both = torch.from_numpy((region | moved).astype(np.float32))[None, None]
    grown = F.max_pool2d(both, 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0
    return grown.numpy()


def latent_cells(region: np.ndarray, scale: int) -> np.ndarray:
    """(h, w) bool at latent resolution: latent cells at least half covered by the pixel region."""
    t = torch.from_numpy(region.astype(np.float32))[None, None]
    return (F.avg_pool2d(t, scale, stride=scale)[0, 0] >= 0.5).numpy()


def copy_patches(latents: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor, scale: int, radius: int,
                 regions: Sequence[np.ndarray | None] | None = None, vacate: float = 0.0,
                 generator: torch.Generator | None = None,
                 scales: Sequence[tuple | None] | None = None) -> torch.Tensor:
    """Copy each handle's latent patch (or its whole region) onto its target: DragonDiffusion's z_T initialisation.

    `scales` (per drag, or None): (centre, factor) or (centre, factor, shift) of a region that is resized (and moved)
    rather than translated by the drag. Always reads from the original `latents`, so overlapping drags don't copy
    already-copied content. `vacate` in
    [0, 1] mixes fresh noise into the cells a moved *region* left (variance-preserving), because the inverted z_T
    there still encodes the object and regrows it as a ghost (measured on ShapesWorld moves: ghost rate 50% -> 17%).
    """
    out = latents.clone()
    written = torch.zeros(latents.shape[-2:], dtype=torch.bool)
    left = torch.zeros(latents.shape[-2:], dtype=torch.bool)
    _, _, h, w = latents.shape
    regions = regions or [None] * len(handles)
    scales = scales or [None] * len(handles)
    for hp, tp, region, sc in zip(handles.tolist(), targets.tolist(), regions, scales):
        hx, hy = int(hp[0] // scale), int(hp[1] // scale)
        tx, ty = int(tp[0] // scale), int(tp[1] // scale)
        if region is not None and sc is not None:
            # scaled (and moved) region: every latent cell of the new footprint reads the cell it came from
            (cx, cy), factor = sc[0], sc[1]
            ox, oy = sc[2] if len(sc) > 2 else (0.0, 0.0)
            for y, x in np.argwhere(latent_cells(scaled_region(region, (cx, cy), factor, (ox, oy)), scale)):
                px, py = (x + 0.5) * scale, (y + 0.5) * scale
                sx = int((cx + (px - cx - ox) / factor) // scale)
                sy = int((cy + (py - cy - oy) / factor) // scale)
                if 0 <= sy < h and 0 <= sx < w:
                    out[:, :, y, x] = latents[:, :, sy, sx]
                    written[y, x] = True
            left |= torch.from_numpy(latent_cells(region, scale))
            continue
        if region is not None:
            cells = np.argwhere(latent_cells(region, scale))
            if len(cells) == 0:
                cells = np.array([[hy, hx]])
            # shift rounded on the latent grid, from the exact drag vector (not from rounded end points)
            dy, dx = round((tp[1] - hp[1]) / scale), round((tp[0] - hp[0]) / scale)
            src = [(int(y), int(x)) for y, x in cells]
        else:
            dy, dx = ty - hy, tx - hx
            src = [(hy + oy, hx + ox) for oy in range(-radius, radius + 1) for ox in range(-radius, radius + 1)]
        for sy, sx in src:
            ty2, tx2 = sy + dy, sx + dx
            if 0 <= sy < h and 0 <= sx < w and 0 <= ty2 < h and 0 <= tx2 < w:
                out[:, :, ty2, tx2] = latents[:, :, sy, sx]
                written[ty2, tx2] = True
                left[sy, sx] = region is not None  # a patch drag deforms: its old place keeps the object's body
    if vacate > 0:
        cells = (left & ~written).to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
        mixed = math.sqrt(1.0 - vacate) * out + math.sqrt(vacate) * noise
        out = torch.where(cells[None, None], mixed, out)
    return out


def scale_schedule(cfg: GuidanceConfig, from_steps: int, to_steps: int) -> GuidanceConfig:
    """The guidance schedule (edit_steps, kv_start_step) moved from `from_steps` to `to_steps` sampling steps, in
    proportion (half up), so a shorter run guides the same fraction of the trajectory."""
    def scaled(n: int) -> int:
        return int(math.floor(n * to_steps / from_steps + 0.5))
    return cfg.model_copy(update={"edit_steps": scaled(cfg.edit_steps), "kv_start_step": scaled(cfg.kv_start_step)})


DRAGON_STEPS = 50  # DragonDiffusion's schedule is stated for 50 DDIM steps
DRAGON_REPEATED = (22, 24, 26, 28)  # its repeated steps (0-based sampling step indices of 50)
DRAGON_PASSES = 3  # passes at each repeated step (re-noised back to the step's level in between)


def dragon_repeats(steps: int) -> dict[int, int]:
    """DragonDiffusion's repeated steps moved to `steps` sampling steps in proportion (half up, as `scale_schedule`);
    steps that coincide after scaling are repeated once, not twice."""
    at = {int(math.floor(k * steps / DRAGON_STEPS + 0.5)) for k in DRAGON_REPEATED}
    return {i: DRAGON_PASSES for i in sorted(at) if i < steps}


def request_schedule(request: EditRequest) -> tuple[int, GuidanceConfig]:
    """Sampling steps and guidance config of a request: as given (with the resize features for a resize), or the
    fast preset's."""
    cfg = request.guidance
    if cfg.resize_feature_blocks is not None and drag_kind(request) in ("scale", "similarity"):
        cfg = cfg.model_copy(update={"feature_blocks": cfg.resize_feature_blocks})
    if not request.fast or request.steps <= FAST_STEPS:
        return request.steps, cfg
    return FAST_STEPS, scale_schedule(cfg, request.steps, FAST_STEPS)


def drag_kind(request: EditRequest) -> str:
    """The kind of drag, as quality guidance is recommended per kind: an object region translated or scaled, or a
    patch around the point (no region)."""
    has_region = bool(request.handle_masks) and any(m is not None for m in request.handle_masks)
    return request.region_motion if has_region else "patch"


def guidance_terms(request: EditRequest, cfg: GuidanceConfig, components: Components,
                   extra_terms: Sequence[GuidanceTerm] = ()) -> list[GuidanceTerm]:
    """The terms of one edit: editing guidance (paper Eq. 11), then quality guidance (Eq. 8) when the request names a
    discriminator and it applies to this kind of drag, then any caller-supplied terms."""
    terms: list[GuidanceTerm] = [*editing_terms(cfg.w_edit, cfg.w_inpaint, cfg.w_content, cfg.edit_steps)]
    if request.quality is not None:
        terms += quality_guidance_terms(request.quality, components, drag_kind(request))
    return [*terms, *extra_terms]


def quality_guidance_terms(quality: QualityGuidance, components: Components, kind: str | None) -> list[GuidanceTerm]:
    """[the discriminator's term] when quality guidance applies to this kind of drag (None: any kind), else []."""
    if quality.weight == 0:
        return []
    return quality_terms(load_discriminator(quality.discriminator, components), quality.weight, quality.steps,
                         motion=kind, motions=quality.motions)


log = logging.getLogger("luciddrag.engine")


def _is_oom(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in msg or "can't allocate" in msg


class EngineOptions(BaseModel):
    """Speed and memory switches of an editor. The defaults give exactly the reference numbers; each switch's effect
    on time and peak memory is measured by `luciddrag bench engine` (docs/performance.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gradient_checkpointing: bool = Field(
        False, description="Recompute the UNet blocks' activations in the guidance backward instead of keeping them "
                           "(diffusers' gradient checkpointing): less memory, about one more forward per guided step.")
    prune_tail: bool = Field(
        True, description="Run the UNet blocks after the last feature block without an autograd graph (exact).")
    channels_last: bool = Field(False, description="UNet weights and latents in channels_last memory format.")
    compile: bool = Field(False, description="torch.compile the UNet (first edits pay the compilation).")
    max_batch: int | None = Field(
        None, ge=1, description="At most this many intentions per sampling batch (None: all at once, halved "
                                "automatically when the device runs out of memory).")


# -- the editor ---------------------------------------------------------------------------------------------------

def apply_options(unet, options: EngineOptions) -> None:
    """Switch the UNet's memory/speed features on as the options say (the editor owns its components)."""
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
    if options.compile and not getattr(unet, "_luciddrag_compiled", False):
        # forward hooks and attention processors stay Python: compile the blocks' arithmetic, not our control flow
        unet.compile()
        unet._luciddrag_compiled = True  # noqa: SLF001 - our own attribute


def merge_diagnostics(per_batch: list[list[dict]]) -> list[dict]:
    """Per-step records of several intention batches as one: energies concatenated in intention order."""
    if len(per_batch) == 1:
        return per_batch[0]
    merged = []
    for records in zip(*per_batch):
        step = dict(records[0])
        for rec in records[1:]:
            for k, v in rec.items():
                if isinstance(v, list):
                    step[k] = step.get(k, []) + v
        merged.append(step)
    return merged


def batch_chunks(n: int, size: int) -> list[range]:
    """Consecutive chunks of at most `size` of range(n)."""
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class DragEditor:
    """Drag editing on an SD-architecture model. Thread-unsafe: one edit at a time per editor."""

    def __init__(self, components: Components, show_progress: bool = True,
                 options: EngineOptions | None = None) -> None:
        self.c = components
        self.show_progress = show_progress
        self.options = options or EngineOptions()
        apply_options(self.c.unet, self.options)

    @classmethod
    def from_pretrained(cls, model: str | None = None, device: str | None = None, dtype: str | None = None,
                        show_progress: bool = True, options: EngineOptions | None = None) -> "DragEditor":
        return cls(load_components(model, device, dtype), show_progress=show_progress, options=options)

    # public API ------------------------------------------------------------------------------------------------
    def edit(self, request: EditRequest, intentions: Sequence[tuple[str, str]] | None = None,
             extra_terms: Sequence[GuidanceTerm] = (), callback: Callable[[StepEvent], None] | None = None) -> EditResult:
        """Edit the image. `intentions`: (source, target) prompt pairs sampled as one batch; default: the request's."""
        try:
            with torch.inference_mode(False):
                return self._edit(request, intentions, extra_terms, callback)
        except (InputError, ResourceError):
            raise
        except RuntimeError as exc:
            if _is_oom(exc):
                if self.c.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise ResourceError(
                    f"out of memory on {self.c.device}: lower the resolution, the number of intentions per batch, "
                    "or kv_injection/edit_steps; or run on a bigger GPU"
                ) from None
            raise

    # implementation -------------------------------------------------------------------------------------------
    def _edit(self, request: EditRequest, intentions, extra_terms, callback) -> EditResult:
        c = self.c
        steps, cfg = request_schedule(request)
        t_start = time.perf_counter()
        pairs = list(intentions) if intentions else [(request.source_prompt, request.target_prompt)]
        if not pairs:
            raise InputError("no intentions to sample: give at least one (source, target) prompt pair")

        # 1. check inputs
        prep = prepare(request.image, request.drags, request.mask, c.native_size, c.size_multiple, request.handle_masks)
        geometry = self._geometry(prep, cfg, request.region_motion, request.scale_direction, request.region_scale)
        sources = list(dict.fromkeys(s for s, _ in pairs))
        rows = torch.tensor([sources.index(s) for s, _ in pairs], device=c.device)

        # 2. encode prompts
        src_emb = self._encode(sources)
        tgt_emb = self._encode([t for _, t in pairs])
        null_emb = self._encode([""]).expand(len(pairs), -1, -1)

        # 3. encode the image
        z0 = self._encode_image(prep.image).expand(len(sources), -1, -1, -1)

        # schedulers: guidance and inversion act on epsilon, whatever the checkpoint predicts
        from diffusers import DDIMInverseScheduler, DDIMScheduler
        pred_type = c.scheduler_config.get("prediction_type", "epsilon")
        sched_cfg = {**c.scheduler_config, "prediction_type": "epsilon", "clip_sample": False}
        scheduler = DDIMScheduler.from_config(sched_cfg)
        inverse = DDIMInverseScheduler.from_config(sched_cfg)
        scheduler.set_timesteps(steps, device=c.device)
        inverse.set_timesteps(steps, device=c.device)
        for s in (scheduler, inverse):
            s.alphas_cumprod = floor_alpha_bar(s.alphas_cumprod)
        timesteps = [int(t) for t in scheduler.timesteps]
        alphas = scheduler.alphas_cumprod

        # the engine decides which guidance terms apply: editing guidance, and quality guidance when asked for
        terms = guidance_terms(request, cfg, c, extra_terms)
        guided_ts = {t for i, t in enumerate(timesteps) if any(term.active(i, steps) for term in terms)}
        kv_ts = {t for i, t in enumerate(timesteps) if i >= cfg.kv_start_step} if cfg.kv_injection else set()

        control = AttentionControl(bank=MemoryBank(), kv_mode=cfg.kv_mode, record_timesteps=kv_ts)
        counter = {"forward": 0}
        count_hook = c.unet.register_forward_pre_hook(lambda *_: counter.__setitem__("forward", counter["forward"] + 1))
        install_memory(c.unet, control)
        tap = FeatureTap(c.unet, cfg.feature_blocks, prune_tail=self.options.prune_tail)
        try:
            # 4. invert with the source prompt(s), filling the memory bank and the reference features
            t0 = time.perf_counter()
            # "matched" reference features are computed while sampling, from the inverted latents: none captured here
            capture_ts = guided_ts if cfg.reference_features == "inversion" else set()
            ref_feats, trajectory = self._invert(z0, src_emb, inverse, alphas, pred_type, control, tap, capture_ts,
                                                 kv_ts, callback)
            zT = trajectory[-1]
            t_invert = time.perf_counter() - t0

            # 5. z_T for each intention, optionally with the handle patch copied to the target
            latents = zT.index_select(0, rows)
            if cfg.init_copy:
                radius = max(1, round((cfg.patch_radius + 0.5) * self._stride() / c.vae_scale))
                gen = torch.Generator().manual_seed(request.seed)
                scales = geometry.transforms if request.region_motion != "translate" and prep.handle_masks else None
                latents = copy_patches(latents, geometry.handles, geometry.targets, c.vae_scale, radius,
                                       regions=prep.handle_masks, vacate=cfg.vacate_noise, generator=gen,
                                       scales=scales)

            # 6. sample with the target prompt(s): Algorithm 1, in batches of intentions that fit in memory
            edit_mask = F.adaptive_max_pool2d(geometry.editable[None, None], latents.shape[-2:])[0, 0]
            # inversion step k lands on the noise level of sampling step n - 1 - k: z_t for each sampling timestep
            inverted = dict(zip(reversed(timesteps), trajectory[1:]))
            repeats = {i: p for i, p in dragon_repeats(steps).items() if timesteps[i] in guided_ts} \
                if cfg.schedule == "dragon" else {}
            t0 = time.perf_counter()
            size = min(self.options.max_batch or len(pairs), len(pairs))
            done: list[tuple[range, object]] = []
            todo = batch_chunks(len(pairs), size)
            while todo:
                chunk = todo.pop(0)
                idx = torch.tensor(list(chunk), device=c.device)
                plan = SamplingPlan(
                    timesteps=tuple(timesteps), scheduler=scheduler, alphas_cumprod=alphas, prediction_type=pred_type,
                    text_embeddings=tgt_emb[idx], null_embeddings=null_emb[idx], guidance_scale=request.guidance_scale,
                    rows=rows[idx], ref_features=ref_feats, kv_timesteps=frozenset(kv_ts), geometry=geometry,
                    edit_mask=edit_mask,
                    trajectory=tuple(z.index_select(0, rows[idx]) for z in trajectory) if cfg.blend_outside else None,
                    reference_latents={t: inverted[t].index_select(0, rows[idx]) for t in guided_ts}
                    if cfg.reference_features == "matched" else None,
                    repeats=repeats, noise=torch.Generator().manual_seed(request.seed + 1),
                )
                try:
                    out = collaborative_guidance_sample(self._unet_call(control, tap, plan.rows), latents[idx], plan,
                                                        terms, callback, progress=self.show_progress)
                except RuntimeError as exc:
                    if not _is_oom(exc) or len(chunk) == 1:
                        raise
                    del plan
                    control.kv_cache.clear()
                    if c.device.type == "cuda":
                        torch.cuda.empty_cache()
                    half = (len(chunk) + 1) // 2
                    log.warning("out of memory sampling %d intentions at once on %s: splitting into batches of %d",
                                len(chunk), c.device, half)
                    todo = [range(chunk.start, chunk.start + half), range(chunk.start + half, chunk.stop), *todo]
                    continue
                control.kv_cache.clear()
                done.append((chunk, out))
            latents = torch.cat([o.latents for _, o in done])
            diagnostics = merge_diagnostics([o.diagnostics for _, o in done])
            backwards = sum(o.backward_passes for _, o in done)
            t_sample = time.perf_counter() - t0
            bank_bytes = control.bank.nbytes()
        finally:
            tap.remove()
            uninstall_memory(c.unet)
            count_hook.remove()
            control.bank.clear()
            control.kv_cache.clear()

        # 7. decode and map back to the input's size
        working = self._decode(latents)
        images = [restore(im, prep) for im in working]
        stats = {
            "invert_s": t_invert, "sample_s": t_sample, "total_s": time.perf_counter() - t_start,
            "unet_forward": counter["forward"], "unet_backward": backwards, "steps": steps,
            "sample_batches": [len(ch) for ch, _ in done],
            "memory_bank_mb": bank_bytes / 2**20, "working_size": prep.working_size,
            "intentions": len(pairs), "inversions": len(sources),
        }
        return EditResult(images, working, pairs, diagnostics, stats, latents.detach().float().cpu())

    # steps ----------------------------------------------------------------------------------------------------
    def _stride(self) -> float:
        """Pixel spacing of patch cells: DragonDiffusion's 1/4-resolution grid (half a latent cell)."""
        return self.c.vae_scale / 2.0

    def _geometry(self, prep: Prepared, cfg, motion: str = "translate", direction: str | None = None,
                  factor: float | None = None) -> Geometry:
        handles = np.array([d.handle for d in prep.drags], dtype=np.float32)
        targets = np.array([d.target for d in prep.drags], dtype=np.float32)
        regions = prep.handle_masks or [None] * len(prep.drags)
        transforms = region_transforms(motion, regions, handles, targets, direction, factor)
        if prep.mask is not None:
            editable = prep.mask
        else:
            lengths = np.linalg.norm(targets - handles, axis=1)
            radius = np.maximum(cfg.auto_mask_radius * lengths, cfg.auto_mask_min * min(prep.working_size))
            editable = capsule_mask(prep.working_size, handles, targets, radius)
            # a moving region must be free to leave its place and to arrive at the target, whatever its size
            for region, h, t, sc in zip(regions, handles, targets, transforms):
                if region is not None:
                    grown = scaled_region(region, *sc) if sc is not None else None
                    editable = editable | region_footprint(region, t - h, self.c.vae_scale, grown)
        dev, cell = self.c.device, self._stride()
        h_t, t_t = torch.from_numpy(handles).to(dev), torch.from_numpy(targets).to(dev)
        patch = patch_offsets(cfg.patch_radius, cell, device=dev)
        offsets, weights, dst_offsets = patch, None, None
        if any(r is not None for r in regions):
            per = [patch if r is None else region_offsets(torch.from_numpy(r).to(dev), h_t[i], cell,
                                                            cfg.max_region_cells)
                   for i, r in enumerate(regions)]
            k = max(o.shape[0] for o in per)
            offsets = torch.zeros(len(per), k, 2, device=dev)
            weights = torch.zeros(len(per), k, device=dev)
            for i, o in enumerate(per):
                offsets[i, : o.shape[0]], weights[i, : o.shape[0]] = o, 1.0
            if motion != "translate":
                # each region cell lands where scaling the region about its centre (and moving it) puts it
                dst_offsets = offsets.clone()
                for i, (region, tf) in enumerate(zip(regions, transforms)):
                    if region is not None and tf is not None:
                        c_t = torch.tensor(tf[0], device=dev, dtype=torch.float32)
                        moved = scale_about(h_t[i] + offsets[i], c_t, tf[1])
                        if len(tf) > 2:
                            moved = moved + torch.tensor(tf[2], device=dev, dtype=torch.float32)
                        dst_offsets[i] = moved - t_t[i]
        return Geometry(
            handles=h_t, targets=t_t,
            editable=torch.from_numpy(editable.astype(np.float32)).to(dev), image_size=prep.working_size,
            offsets=offsets, cell=cell, weights=weights, dst_offsets=dst_offsets, transforms=transforms,
        )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.c.tokenizer
        max_len = tok.model_max_length if tok.model_max_length and tok.model_max_length < 10_000 else 77
        ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
        return self.c.text_encoder(ids.to(self.c.device))[0].to(self.c.dtype)

    @torch.no_grad()
    def _encode_image(self, image: Image.Image) -> torch.Tensor:
        vae = self.c.vae
        x = torch.from_numpy(pil_to_tensor_array(image))[None].to(self.c.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        return z.to(self.c.dtype)

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.c.vae
        x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return [tensor_array_to_pil(a) for a in x.float().cpu().numpy()]

    def _unet(self, latents, t, emb, control: AttentionControl, mode: str, rows=None) -> torch.Tensor:
        control.mode = mode
        control.timestep = t
        control.rows = rows
        return self.c.unet(latents, t, encoder_hidden_states=emb).sample

    def _unet_call(self, control: AttentionControl, tap: FeatureTap, rows: torch.Tensor) -> UNetCall:
        """The sampler's view of the UNet: K/V mode per call, decoder features captured on request."""
        def call(latents, t, emb, kv, capture=False):
            if not capture:
                return self._unet(latents, t, emb, control, kv, rows), {}
            with tap.capture() as feats:
                out = self._unet(latents, t, emb, control, kv, rows)
            return out, feats
        return call

    @torch.no_grad()
    def _invert(self, z0, src_emb, inverse, alphas, pred_type, control, tap, guided_ts, kv_ts, callback):
        latents = z0
        trajectory = [z0]  # z_0 ... z_T: what the unedited region is pinned to while sampling
        ref_feats: dict[int, dict[int, torch.Tensor]] = {}
        ts = [int(t) for t in inverse.timesteps]
        for i, t in enumerate(tqdm(ts, desc="invert", disable=not self.show_progress, leave=False)):
            with tap.capture() as feats:
                tap.active = t in guided_ts
                out = self._unet(latents, t, src_emb, control, "record" if t in kv_ts else "off")
            if t in guided_ts:
                ref_feats[t] = {b: f.detach() for b, f in feats.items()}
            # the inverse step evaluates eps at the current (less noisy) latent: the standard DDIM-inversion approximation
            prev = max(t - inverse.config.num_train_timesteps // inverse.num_inference_steps, 0)
            # fp32 for the step: near zero terminal SNR it divides by sqrt(alpha_bar) ~ 1e-3 (fp16 would amplify
            # its rounding 1000x)
            eps = to_epsilon(out.float(), latents.float(), float(alphas[prev]), pred_type)
            latents = inverse.step(eps, t, latents.float()).prev_sample.to(latents.dtype)
            trajectory.append(latents)
            if callback:
                callback(StepEvent("invert", i + 1, len(ts)))
        return ref_feats, trajectory
