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


def sample_at(feat: torch.Tensor, xy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly sample (B, C, h, w) features at pixel positions xy (N, 2) -> (B, C, N).

    Pixel centres sit at i + 0.5 of a W x H image, matching `align_corners=False` at any feature resolution.
    """
    w, h = image_size
    g = torch.empty_like(xy, dtype=feat.dtype)
    g[:, 0] = (xy[:, 0] + 0.5) / w * 2 - 1
    g[:, 1] = (xy[:, 1] + 0.5) / h * 2 - 1
    grid = g.view(1, 1, -1, 2).expand(feat.shape[0], 1, -1, 2)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0, :]


def drag_energy(cur: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                offsets: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Mean over drags of 1 / (1 + 4 s(cur at target patch, ref at handle patch)) -> (B,).

    Cells are compared one to one (target cell k against handle cell k), so the patch's layout moves too,
    not only its average colour.
    """
    k = offsets.shape[0]
    t_xy = (targets[:, None, :] + offsets[None]).reshape(-1, 2)
    h_xy = (handles[:, None, :] + offsets[None]).reshape(-1, 2)
    s = similarity(sample_at(cur, t_xy, image_size), sample_at(ref, h_xy, image_size))  # (B, P*K)
    s = s.view(s.shape[0], -1, k).mean(-1)  # (B, P)
    return (1.0 / (1.0 + 4.0 * s)).mean(-1)


def inpaint_energy(cur: torch.Tensor, ref: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                   offsets: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Mean similarity of the vacated handle patch to its old content -> (B,). High = a ghost stays behind.

    Cells of the handle patch that fall inside the target patch are left out: there the content *should* stay.
    """
    half = offsets.abs().max() if offsets.numel() else torch.tensor(0.0)
    h_xy = handles[:, None, :] + offsets[None]  # (P, K, 2)
    # distance of each handle cell to every target patch, in the max-norm (patches are squares)
    d = (h_xy[:, :, None, :] - targets[None, None, :, :]).abs().amax(-1)  # (P, K, P)
    keep = (d > half + 1e-3).all(-1).reshape(-1)  # (P*K,)
    if not bool(keep.any()):
        return cur.new_zeros(cur.shape[0])
    xy = h_xy.reshape(-1, 2)[keep]
    s = similarity(sample_at(cur, xy, image_size), sample_at(ref, xy, image_size))
    return s.mean(-1)


def content_energy(cur: torch.Tensor, ref: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 / (1 + 4 * weighted-mean s(cur, ref)) over the unrelated region -> (B,).

    `weight` (H, W) in [0, 1] is resized to the features' resolution by area averaging, so a feature cell counts by
    the fraction of its pixels that are unrelated.
    """
    wgt = F.adaptive_avg_pool2d(weight[None, None].to(cur.dtype), cur.shape[-2:])[0, 0]
    total = wgt.sum()
    if float(total) <= 0:
        return cur.new_zeros(cur.shape[0])
    s = similarity(cur, ref)  # (B, h, w)
    mean_s = (s * wgt).flatten(1).sum(-1) / total
    return 1.0 / (1.0 + 4.0 * mean_s)
