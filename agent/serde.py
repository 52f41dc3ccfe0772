"""Checkpoint serialisation that never writes image bytes.

LangGraph checkpoints the caller's input before the first node runs, so a PIL image passed to `graph.invoke` would
reach the serializer (and fail, or bloat the database). This wrapper stores any PIL image -- and any large array, such
as a mask -- in the artifact store and serialises the `ImageRef` instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from luciddrag.agent.artifacts import ArtifactStore

_LARGE = 4096  # arrays bigger than this many elements go to the store


class ArtifactSerde:
    def __init__(self, inner: Any, store: ArtifactStore) -> None:
        self.inner = inner
        self.store = store

    def _swap(self, obj: Any) -> Any:
        if isinstance(obj, Image.Image):
            return self.store.put_image(obj)
        if isinstance(obj, np.ndarray) and obj.size > _LARGE and obj.ndim in (2, 3):
            arr = obj.astype(np.uint8) * 255 if obj.dtype == bool else obj
            if arr.dtype == np.uint8:
                return self.store.put_image(Image.fromarray(arr))
        if isinstance(obj, dict):
            return {k: self._swap(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._swap(v) for v in obj)
        return obj

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return self.inner.dumps_typed(self._swap(obj))

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self.inner.loads_typed(data)

    def __getattr__(self, name: str) -> Any:  # dumps/loads and anything else the saver may use
        return getattr(self.inner, name)


# Our types that may appear in checkpoints. Deserialisation is restricted to these (plus LangGraph's built-in safe
# types): a checkpoint database is data, and must not be able to name arbitrary classes to construct.
_OUR_TYPES = [
    ("agent.artifacts", "ImageRef"), ("agent.state", "Attempt"), ("tools.schemas", "DragPoints"),
    ("engine.request", "DragPair"), ("tools.schemas", "DragPair"),  # the latter: checkpoints written before the merge
    ("tools.schemas", "LocatorResult"), ("tools.schemas", "HandleDescription"),
    ("tools.schemas", "Region"), ("tools.schemas", "Intention"), ("tools.schemas", "ReasonerResult"),
]
# Modules are named under the `luciddrag.` namespace; checkpoints written before the namespace existed name them
# bare ("agent.state"), and still load.
ALLOWED_TYPES = [*((f"luciddrag.{m}", n) for m, n in _OUR_TYPES), *_OUR_TYPES]


def with_artifact_serde(checkpointer: Any, artifacts_dir: str | None = None) -> Any:
    """Give `checkpointer` our serializer: images by reference, and an allowlist of types to load."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    if not isinstance(checkpointer.serde, ArtifactSerde):
        inner = checkpointer.serde
        if type(inner) is JsonPlusSerializer:
            inner = JsonPlusSerializer(allowed_msgpack_modules=ALLOWED_TYPES)
        checkpointer.serde = ArtifactSerde(inner, ArtifactStore(artifacts_dir))
    return checkpointer
