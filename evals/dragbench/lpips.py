"""LPIPS (Zhang et al. 2018, "lpips" v0.1, net='alex') written out in torch, so no torchvision is needed.

Why not the ``lpips`` package: it imports torchvision for the AlexNet trunk, and PyPI's torchvision does not import
beside our torch CPU wheel. The network is small, so it is reimplemented here exactly as ``lpips.LPIPS(net='alex',
version='0.1')`` computes it (``lpips/pretrained_networks.py`` and ``lpips/lpips.py``):

1. scaling layer: ``(x - shift) / scale`` with shift (-.030, -.088, -.188), scale (.458, .448, .450), x in [-1, 1];
2. torchvision AlexNet ``features`` cut after each ReLU into five slices (conv1 | pool conv2 | pool conv3 | conv4 |
   conv5), channels 64, 192, 384, 256, 256;
3. per layer: features unit-normalised along channels (``x / (||x|| + 1e-10)``), squared difference, a 1x1 conv to
   one channel with the learned non-negative weights (``lin{k}.model.1.weight``; dropout is inactive in eval),
   spatial mean;
4. the sum over the five layers. DragDiffusion resizes both images to 224x224 (bilinear) first and reports 1 - LPIPS.

Weights (both needed, neither in any wheel we depend on): the AlexNet trunk is torchvision's
``alexnet-owt-7be5be79.pth`` in the torch hub cache (``<torch hub dir>/checkpoints/``); the linear heads are
``lpips/weights/v0.1/alex.pth`` from the lpips package / github richzhang/PerceptualSimilarity. Both are loaded with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from luciddrag.engine.errors import ModelLoadError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_FILE = "lpips_alex_v0.1.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
CHANNELS = (64, 192, 384, 256, 256)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class AlexFeatures(nn.Module):
    """torchvision's ``alexnet().features`` layer for layer (same indices, so its state dict loads as is)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=False),
        )
        # lpips' slices: features[0:2], [2:5], [5:8], [8:10], [10:12] -> outputs after ReLUs 1, 4, 7, 9, 11
        self.taps = (1, 4, 7, 9, 11)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                outs.append(x)
        return outs


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with the AlexNet trunk. ``forward(a, b)`` takes (N, 3, H, W) in [-1, 1] -> (N,) distances."""

    def __init__(self) -> None:
        super().__init__()
        self.net = AlexFeatures()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.requires_grad_(False).eval()

    @staticmethod
    def normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.net((a - self.shift) / self.scale)
        fb = self.net((b - self.shift) / self.scale)
        total = 0.0
        for lin, xa, xb in zip(self.lins, fa, fb):
            diff = (self.normalize(xa) - self.normalize(xb)) ** 2
            total = total + lin(diff).mean(dim=(2, 3))
        return total[:, 0]

    def load_official(self, alexnet: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> None:
        """Load torchvision's AlexNet state dict (``features.*`` used, ``classifier.*`` ignored) and lpips' heads
        (``lin{k}.model.1.weight``)."""
        trunk = {k: v for k, v in alexnet.items() if k.startswith("features.")}
        missing = set(self.net.state_dict()) - set(trunk)
        if missing:
            raise ModelLoadError(f"AlexNet weights lack {sorted(missing)[:3]}...: not torchvision's alexnet")
        self.net.load_state_dict(trunk)
        for k, lin in enumerate(self.lins):
            key = f"lin{k}.model.1.weight"
            if key not in heads:
                raise ModelLoadError(f"LPIPS head weights lack {key}: not lpips v0.1 alex.pth")
            lin.weight.copy_(heads[key].reshape(lin.weight.shape))


def hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _lpips_package_heads() -> Path | None:
    """The heads shipped inside an installed ``lpips`` package, if any (found without importing it: importing it
    would import torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"
    return path if path.is_file() else None


def weight_paths() -> tuple[Path | None, Path | None]:
    """(AlexNet trunk, LPIPS heads) where present: $LUCIDDRAG_LPIPS_ALEXNET / $LUCIDDRAG_LPIPS_HEADS, else the torch
    hub cache (``alexnet-owt-7be5be79.pth``, ``lpips_alex_v0.1.pth``), else the lpips package's own heads."""
    trunk = os.environ.get("LUCIDDRAG_LPIPS_ALEXNET")
    heads = os.environ.get("LUCIDDRAG_LPIPS_HEADS")
    t = Path(trunk) if trunk else hub_checkpoints() / ALEXNET_FILE
    h = Path(heads) if heads else hub_checkpoints() / LPIPS_FILE
    if not h.is_file() and not heads:
        h = _lpips_package_heads() or h
    return (t if t.is_file() else None), (h if h.is_file() else None)


def missing_weights_message() -> str:
    ckpt = hub_checkpoints()
    return ("LPIPS needs two weight files that are not here. On a machine with network:\n"
            f"  mkdir -p {ckpt}\n"
            f"  curl -L -o {ckpt / ALEXNET_FILE} {ALEXNET_URL}\n"
            f"  curl -L -o {ckpt / LPIPS_FILE} {LPIPS_URL}\n"
            "(or set LUCIDDRAG_LPIPS_ALEXNET / LUCIDDRAG_LPIPS_HEADS to those files; or leave lpips out of --metrics)")


def load_lpips(device: str = "cpu") -> LPIPSAlex:
    """The official LPIPS-Alex v0.1, or ModelLoadError with download instructions when its weights are absent."""
    trunk, heads = weight_paths()
    if trunk is None or heads is None:
        raise ModelLoadError(missing_weights_message())
    model = LPIPSAlex()
    try:
        model.load_official(torch.load(trunk, map_location="cpu", weights_only=True),
                            torch.load(heads, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, KeyError) as exc:  # a truncated download, a different file
        raise ModelLoadError(f"cannot read LPIPS weights ({trunk}, {heads}): {str(exc).splitlines()[0][:160]}") from None
    return model.to(device)


def to_lpips_input(image, size: int = 224) -> torch.Tensor:
    """A PIL image -> (1, 3, 224, 224) in [-1, 1], resized bilinearly as DragDiffusion does (F.interpolate,
    align_corners=False, on the [-1, 1] tensor)."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def one_minus_lpips(model: LPIPSAlex, source, edited) -> float:
    """DragDiffusion's image fidelity: the edited image resized to the source's size (bilinear), both to 224x224."""
    from PIL import Image

    if edited.size != source.size:
        edited = edited.resize(source.size, Image.Resampling.BILINEAR)
    device = model.shift.device
    return 1.0 - float(model(to_lpips_input(source).to(device), to_lpips_input(edited).to(device))[0])
