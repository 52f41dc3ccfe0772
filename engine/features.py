"""Decoder features for editing guidance, captured with forward hooks on `unet.up_blocks[i]`.

DragonDiffusion and DIFT read the outputs of the UNet's up blocks: they carry semantic correspondence. We hook them
(no forward copying) and hand the captured tensors to the energies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class FeatureTap:
    """Captures outputs of selected up blocks while `active`."""

    def __init__(self, unet, blocks: Sequence[int]) -> None:
        n = len(unet.up_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"feature_blocks {list(bad)} out of range: this UNet has up_blocks 0..{n - 1}")
        self.blocks = tuple(blocks)
        self.active = False
        self.features: dict[int, torch.Tensor] = {}
        self._handles = [unet.up_blocks[b].register_forward_hook(self._hook(b)) for b in self.blocks]

    def _hook(self, idx: int):
        def hook(_module, _inputs, output):
            if self.active:
                self.features[idx] = output[0] if isinstance(output, tuple) else output
        return hook

    @contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        self.features = {}
        self.active = True
        try:
            yield self.features
        finally:
            self.active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
