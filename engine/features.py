"""Decoder features for editing guidance, captured with forward hooks on `unet.up_blocks[i]`.

DragonDiffusion and DIFT read the outputs of the UNet's up blocks: they carry semantic correspondence. We hook them
(no forward copying) and hand the captured tensors to the energies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class FeatureTap:
    """Captures outputs of selected up blocks while `active`.

    `prune_tail`: when capturing under autograd, the UNet blocks after the last tapped one run without recording a
    graph (their output, the noise prediction, is never differentiated): the same numbers, less graph memory and
    time. On SD the untapped tail is up_blocks[3], the full-resolution block, the largest activations of all.
    """

    def __init__(self, unet, blocks: Sequence[int], prune_tail: bool = True) -> None:
        n = len(unet.up_blocks)
        bad = [b for b in blocks if not 0 <= b < n]
        if bad:
            raise ValueError(f"feature_blocks {list(bad)} out of range: this UNet has up_blocks 0..{n - 1}")
        self.blocks = tuple(blocks)
        self.active = False
        self.prune_tail = prune_tail
        self.features: dict[int, torch.Tensor] = {}
        self._grad_was: bool | None = None  # grad mode to restore when the UNet's forward ends
        self._handles = [unet.up_blocks[b].register_forward_hook(self._hook(b)) for b in self.blocks]
        if self.blocks:
            self._handles.append(unet.register_forward_hook(self._restore_grad))

    def _hook(self, idx: int):
        def hook(_module, _inputs, output):
            if self.active:
                self.features[idx] = output[0] if isinstance(output, tuple) else output
                if (self.prune_tail and torch.is_grad_enabled() and self._grad_was is None
                        and set(self.features) >= set(self.blocks)):
                    self._grad_was = True
                    torch.set_grad_enabled(False)
        return hook

    def _restore_grad(self, *_args) -> None:
        if self._grad_was is not None:
            torch.set_grad_enabled(self._grad_was)
            self._grad_was = None

    @contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        self.features = {}
        self.active = True
        try:
            yield self.features
        finally:
            self.active = False
            self._restore_grad()  # a forward that raised never reached the UNet's own hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
