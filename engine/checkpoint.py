"""Resume checkpoints as safetensors: nested dicts/lists of tensors and plain values (weights, optimizer state, RNG
states, progress) in one file. Loading one can never run code, unlike ``torch.load`` of a pickle, so a work dir is
safe to resume from whoever wrote it. Used by the ShapesWorld trainer and the discriminator trainer."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _pack(obj: object, tensors: dict[str, torch.Tensor]) -> object:
    """JSON-able tree of ``obj`` with every tensor moved into ``tensors`` (and replaced by a reference to it)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state), which JSON objects would turn into strings
        return {"__items__": [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unpack(tree: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        return {k: _unpack(v, tensors) for k, v in tree["__items__"]}
    if isinstance(tree, list):
        return [_unpack(v, tensors) for v in tree]
    return tree


def atomic_save(obj: object, path: Path) -> None:
    """Write a resume checkpoint (nested dicts/lists of tensors and plain values) as one safetensors file.

    Safetensors rather than ``torch.save``: loading it can never run code, so a work dir is safe to resume from
    whoever wrote it. The non-tensor structure rides in the header's metadata as JSON. A crash mid-write keeps the
    previous checkpoint (write to a temporary file, then rename)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _pack(obj, tensors)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"tree": json.dumps(tree)})
    tmp.replace(path)


def load_checkpoint(path: Path) -> object:
    """Inverse of ``atomic_save``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tree = json.loads(f.metadata()["tree"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unpack(tree, tensors)
