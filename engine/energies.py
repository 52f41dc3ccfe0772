"""Editing energies as small pure functions over feature tensors (the paper's Eq. 9-11, DragonDiffusion's form).

Conventions: features are (B, C, h, w) at any resolution; points are (P, 2) tensors of (x, y) in *working-image
pixels*; masks are (H, W) float tensors in [0, 1] at working-image resolution. Sampling features at pixel positions
with bilinear `grid_sample` makes every energy independent of each block's own resolution.

Similarity s = (cos + 1) / 2 lies in [0, 1]; energies of the form 1 / (1 + 4 s) (the paper's 1 / (alpha + beta S))
lie in [0.2, 1] and fall as correspondence rises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """(cos + 1) / 2 along `dim`."""
    return (F.cosine_similarity(a, b, dim=dim, eps=1e-6) + 1.0) / 2.0


def patch_offsets(radius: int, stride: float, device=None) -> torch.Tensor:
    """(K, 2) pixel offsets of a (2r+1)^2 patch with cells `stride` pixels apart."""
    r = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32) * stride
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


def pixel_grid(xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Pixel positions xy (N, 2) -> (N, 2) `grid_sample` coordinates in [-1, 1].

    Pixel centres sit at i + 0.5 of a W x H image, matching `align_corners=False` at any feature resolution.
    """
    w, h = image_size
    g = torch.empty_like(xy)
    g[:, 0] = (xy[:, 0] + 0.5) / w * 2 - 1
    g[:, 1] = (xy[:, 1] + 0.5) / h * 2 - 1
    return g


def sample_grid(feat: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample (B, C, h, w) features at `pixel_grid` coordinates (N, 2) -> (B, C, N)."""
    g = grid.to(feat.dtype).view(1, 1, -1, 2).expand(feat.shape[0], 1, -1, 2)
    out = F.grid_sample(feat, g, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0, :]


def sample_at(feat: torch.Tensor, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly sample (B, C, h, w) features at pixel positions xy (N, 2) -> (B, C, N)."""
    return sample_grid(feat, pixel_grid(xy, image_size))


def _per_drag(offsets: torch.Tensor, n_drags: int) -> torch.Tensor:
    """(K, 2) shared patch offsets or (P, K, 2) per-drag region offsets -> (P, K, 2)."""
    return offsets[None].expand(n_drags, -1, -1) if offsets.dim() == 2 else offsets


def _weighted_mean(s: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, P, K) over K, counting only cells with weight > 0 (regions are padded to a common K)."""
    if weights is None:
        return s.mean(-1)
    w = weights.to(s.dtype)[None]
    return (s * w).sum(-1) / w.sum(-1).clamp_min(1e-6)


def drag_cells(handles: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor,
               dst_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells the drag energy compares: (target cells, handle cells), each (P, K, 2) pixels; target cell k is
    where handle cell k should land (`dst_offsets` when the region is transformed, else the same offsets)."""
    off = _per_drag(offsets, handles.shape[0])
    dst = off if dst_offsets is None else dst_offsets
    return targets[:, None, :] + dst, handles[:, None, :] + off


def drag_energy_at(cur: torch.Tensor, ref: torch.Tensor, target_grid: torch.Tensor, handle_grid: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """`drag_energy` on precomputed `pixel_grid`s of the (P, K) cells, shaped (P, K, 2): the guided sampler computes
    them once per edit, since the geometry does not change between steps."""
    p, k = target_grid.shape[:2]
    s = similarity(sample_grid(cur, target_grid.reshape(-1, 2)), sample_grid(ref, handle_grid.reshape(-1, 2)))
    s = _weighted_mean(s.view(s.shape[0], p, k), weights)  # (B, P)
    return (1.0 / (1.0 + 4.0 * s)).mean(-1)


def drag_energy(cur: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                offsets: torch.Tensor, image_size: tuple[int, int], weights: torch.Tensor | None = None,
                dst_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over drags of 1 / (1 + 4 s(cur at target cells, ref at handle cells)) -> (B,).

    `offsets` are the cells around each handle: a square patch (K, 2) shared by all drags, or a whole region per drag
    (P, K, 2) with validity `weights` (P, K). Cells are compared one to one (target cell k against handle cell k), so
    the layout moves too, not only the average colour. `dst_offsets` (P, K, 2), when the region is not translated
    but transformed (scaled): where cell k should land, relative to the target.
    """
    t_xy, h_xy = drag_cells(handles, targets, offsets, dst_offsets)
    return drag_energy_at(cur, ref, pixel_grid(t_xy.reshape(-1, 2), image_size).view(t_xy.shape),
                          pixel_grid(h_xy.reshape(-1, 2), image_size).view(h_xy.shape), weights)


def vacated_cells(handles: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor, cell: float,
                  weights: torch.Tensor | None = None, dst_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 2) handle cells that no moved cell covers: where the dragged content was and should no longer be.

    A handle cell is covered when a moved cell (target + offset) lies within half a cell of it (max-norm): there
    the content *should* stay.
    """
    off = _per_drag(offsets, handles.shape[0])
    valid = torch.ones(off.shape[:2], dtype=torch.bool, device=off.device) if weights is None else weights > 0
    h_xy = (handles[:, None, :] + off)[valid]  # (N, 2)
    moved = (targets[:, None, :] + (off if dst_offsets is None else dst_offsets))[valid]  # (M, 2)
    if h_xy.numel() == 0:
        return h_xy
    d = (h_xy[:, None, :] - moved[None, :, :]).abs().amax(-1)  # (N, M)
    return h_xy[(d > cell / 2 + 1e-3).all(-1)]


def patch_cell(offsets: torch.Tensor) -> float:
    """A patch's own cell spacing: its smallest non-zero offset (1 for a single cell)."""
    nz = offsets.abs()[offsets.abs() > 0]
    return float(nz.min()) if nz.numel() else 1.0


def inpaint_energy_at(cur: torch.Tensor, ref: torch.Tensor, vacated_grid: torch.Tensor) -> torch.Tensor:
    """`inpaint_energy` on the precomputed `pixel_grid` (N, 2) of the vacated cells."""
    if vacated_grid.shape[0] == 0:
        return cur.new_zeros(cur.shape[0])
    return similarity(sample_grid(cur, vacated_grid), sample_grid(ref, vacated_grid)).mean(-1)


def inpaint_energy(cur: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                   offsets: torch.Tensor, image_size: tuple[int, int], cell: float | None = None,
                   weights: torch.Tensor | None = None, dst_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean similarity of the vacated handle cells to their old content -> (B,). High = a ghost stays behind."""
    cell = patch_cell(offsets) if cell is None else cell
    xy = vacated_cells(handles, targets, offsets, cell, weights, dst_offsets)
    return inpaint_energy_at(cur, ref, pixel_grid(xy, image_size))


def region_offsets(region: torch.Tensor, handle: torch.Tensor, cell: float, max_cells: int) -> torch.Tensor:
    """(K, 2) offsets from `handle` to the centres of the `cell`-pixel grid cells inside `region` (H, W bool).

    At most `max_cells`, taken evenly over the region (row-major), so the cost stays bounded for big objects.
    """
    h, w = region.shape
    ys = torch.arange(cell / 2 - 0.5, h, cell, device=region.device)
    xs = torch.arange(cell / 2 - 0.5, w, cell, device=region.device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    iy = gy.round().long().clamp(0, h - 1)
    ix = gx.round().long().clamp(0, w - 1)
    inside = region[iy, ix]
    pts = torch.stack([gx[inside], gy[inside]], -1)
    if pts.shape[0] == 0:  # region thinner than a cell: the handle itself
        return torch.zeros(1, 2, device=region.device)
    if pts.shape[0] > max_cells:
        pts = pts[torch.linspace(0, pts.shape[0] - 1, max_cells, device=region.device).round().long()]
    return pts - handle[None]


def area_weight(weight: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (H, W) weight in [0, 1] at a feature resolution `size` (h, w), by area averaging: a feature cell counts by
    the fraction of its pixels that carry weight."""
    return F.adaptive_avg_pool2d(weight[None, None].to(dtype), tuple(size))[0, 0]


def content_energy_at(cur: torch.Tensor, ref: torch.Tensor, wgt: torch.Tensor) -> torch.Tensor:
    """`content_energy` with the weight already at the features' resolution (`area_weight`)."""
    total = wgt.sum()
    s = similarity(cur, ref)  # (B, h, w)
    mean_s = (s * wgt).flatten(1).sum(-1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    # no host sync: the empty-region case is a `where`, not an `if`
    return torch.where(total > 0, 1.0 / (1.0 + 4.0 * mean_s), torch.zeros_like(mean_s))


def content_energy(cur: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 / (1 + 4 * weighted-mean s(cur, ref)) over the unrelated region `weight` (H, W) -> (B,); 0 when it is
    empty. The weight is resized to the features' resolution by `area_weight`."""
    return content_energy_at(cur, ref, area_weight(weight, cur.shape[-2:], cur.dtype))


def scale_about(points: torch.Tensor, centre: torch.Tensor, factor: float) -> torch.Tensor:
    """Points (..., 2) scaled by `factor` about `centre` (2,)."""
    return centre + factor * (points - centre)


def drag_scale(handle: torch.Tensor, target: torch.Tensor, centre: torch.Tensor, lo: float = 0.25,
               hi: float = 4.0) -> float:
    """The scale about `centre` that carries `handle` closest to `target` (projection on the handle's ray)."""
    r = handle - centre
    n2 = float(r @ r)
    if n2 < 1.0:  # handle on the centre: no ray to scale along
        return 1.0
    return float(min(max(float((target - centre) @ r) / n2, lo), hi))
