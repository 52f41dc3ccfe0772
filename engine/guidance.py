"""Guidance terms: each maps the sampler's state at one step to a per-sample energy.

The sampler takes a *list* of terms and knows nothing about what they compute: editing guidance (drag, inpaint,
content) lives here; the quality discriminator (a later module) is one more term. A term declares which region its
gradient may touch: "edit" (inside the editable mask), "content" (outside it) or "all".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

from luciddrag.engine import energies as E

Region = Literal["edit", "content", "all"]


@dataclass(frozen=True)
class CellGrids:
    """Where the energies sample the features, as `grid_sample` coordinates: fixed for a whole edit."""

    target: torch.Tensor  # (P, K, 2) target cells (where each handle cell should land)
    handle: torch.Tensor  # (P, K, 2) handle cells
    vacated: torch.Tensor  # (N, 2) handle cells no moved cell covers (the inpaint term's)
    unrelated: torch.Tensor  # (H, W) 1 - editable: the content term's weight
    has_unrelated: bool  # False when the whole image is editable (the content term has nothing to keep)
    unrelated_at: dict = field(default_factory=dict)  # (h, w, dtype) -> `unrelated` at a feature resolution

    def unrelated_weight(self, feat: torch.Tensor) -> torch.Tensor:
        key = (*feat.shape[-2:], feat.dtype)
        if key not in self.unrelated_at:
            self.unrelated_at[key] = E.area_weight(self.unrelated, feat.shape[-2:], feat.dtype)
        return self.unrelated_at[key]


@dataclass
class Geometry:
    """Drag geometry at working resolution, shared by all terms of one edit."""

    handles: torch.Tensor  # (P, 2) pixels
    targets: torch.Tensor  # (P, 2) pixels
    editable: torch.Tensor  # (H, W) float 0/1: where the edit may act
    image_size: tuple[int, int]  # (W, H) working pixels
    offsets: torch.Tensor  # (K, 2) patch offsets, or (P, K, 2) per-drag region offsets, in pixels
    cell: float = 1.0  # spacing of the patch/region grid in pixels
    weights: torch.Tensor | None = None  # (P, K) validity of region cells (regions are padded to one K)
    dst_offsets: torch.Tensor | None = None  # (P, K, 2) where each cell lands relative to the target, if not `offsets`
    # per drag: how its region is resized ((centre, factor[, shift]), see pipeline.region_transforms), or None
    transforms: list | None = None
    _grids: CellGrids | None = field(default=None, init=False, repr=False, compare=False)

    def grids(self) -> CellGrids:
        """The sampling positions, computed on first use and kept: every guided step of the edit reads the same ones,
        and recomputing them (boolean indexing, a host sync on GPU) on each step and block is pure overhead."""
        if self._grids is None:
            t_xy, h_xy = E.drag_cells(self.handles, self.targets, self.offsets, self.dst_offsets)
            vac = E.vacated_cells(self.handles, self.targets, self.offsets, self.cell, self.weights, self.dst_offsets)
            size = self.image_size
            unrelated = 1.0 - self.editable
            self._grids = CellGrids(
                target=E.pixel_grid(t_xy.reshape(-1, 2), size).view(t_xy.shape),
                handle=E.pixel_grid(h_xy.reshape(-1, 2), size).view(h_xy.shape),
                vacated=E.pixel_grid(vac, size), unrelated=unrelated, has_unrelated=bool(unrelated.sum() > 0),
            )
        return self._grids


@dataclass
class GuidanceContext:
    """Everything a term may read at one guided step. `latents` requires grad; `features` carry the graph."""

    step: int
    num_steps: int
    timestep: int
    alpha_bar: float
    latents: torch.Tensor
    features: dict[int, torch.Tensor]
    ref_features: dict[int, torch.Tensor]
    text_embeddings: torch.Tensor
    geometry: Geometry
    extras: dict = field(default_factory=dict)


@runtime_checkable
class GuidanceTerm(Protocol):
    name: str
    region: Region

    def active(self, step: int, num_steps: int) -> bool: ...

    def energy(self, ctx: GuidanceContext) -> torch.Tensor:
        """Weighted energy per sample, shape (B,)."""
        ...


def _over_blocks(ctx: GuidanceContext, fn) -> torch.Tensor:
    """Average an energy over the hooked feature blocks (the paper normalises by layers)."""
    vals = [fn(ctx.features[b].float(), ctx.ref_features[b].float()) for b in sorted(ctx.features)]
    return torch.stack(vals, 0).mean(0)


@dataclass
class DragTerm:
    """Pull target-region features toward the handle region's reference features (paper Eq. 9)."""

    weight: float
    steps: int  # n1
    name: str = "drag"
    region: Region = "edit"

    def active(self, step: int, num_steps: int) -> bool:
        return self.weight > 0 and step < self.steps

    def energy(self, ctx: GuidanceContext) -> torch.Tensor:
        g, w = ctx.geometry.grids(), ctx.geometry.weights
        return self.weight * _over_blocks(ctx, lambda c, r: E.drag_energy_at(c, r, g.target, g.handle, w))


@dataclass
class InpaintTerm:
    """Penalise the vacated handle region for still looking like the handle (against ghosts)."""

    weight: float
    steps: int
    name: str = "inpaint"
    region: Region = "edit"

    def active(self, step: int, num_steps: int) -> bool:
        return self.weight > 0 and step < self.steps

    def energy(self, ctx: GuidanceContext) -> torch.Tensor:
        g = ctx.geometry.grids()
        return self.weight * _over_blocks(ctx, lambda c, r: E.inpaint_energy_at(c, r, g.vacated))


@dataclass
class ContentTerm:
    """Keep the unrelated region's features like the reference (paper Eq. 10)."""

    weight: float
    steps: int
    name: str = "content"
    region: Region = "content"

    def active(self, step: int, num_steps: int) -> bool:
        return self.weight > 0 and step < self.steps

    def energy(self, ctx: GuidanceContext) -> torch.Tensor:
        g = ctx.geometry.grids()
        if not g.has_unrelated:  # the whole image is editable: no energy, and no gradient to compute
            return ctx.latents.new_zeros(ctx.latents.shape[0], dtype=torch.float32)
        return self.weight * _over_blocks(ctx, lambda c, r: E.content_energy_at(c, r, g.unrelated_weight(c)))


def editing_terms(w_edit: float, w_inpaint: float, w_content: float, steps: int) -> list[GuidanceTerm]:
    """The paper's editing guidance (Eq. 11) as three terms."""
    return [DragTerm(w_edit, steps), InpaintTerm(w_inpaint, steps), ContentTerm(w_content, steps)]
