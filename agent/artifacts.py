"""A small content-addressed store for images, so graph state holds references, not bytes.

Checkpointed LangGraph state is serialised at every step; base64 images there have grown other projects' databases
past 100 GB. Here an image is written once as a PNG named by its SHA-256 and the state keeps an `ImageRef`.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image
from pydantic import BaseModel


class ImageRef(BaseModel):
    """A stored image: its hash, where it lies, and its size (for display without opening it)."""

    sha256: str
    path: str
    width: int
    height: int
    mode: str


def default_root() -> Path:
    """LUCIDDRAG_HOME/artifacts, else the user's data dir (platformdirs)."""
    home = os.environ.get("LUCIDDRAG_HOME")
    if home:
        return Path(home).expanduser() / "artifacts"
    from platformdirs import user_data_dir

    return Path(user_data_dir("luciddrag")) / "artifacts"


class ArtifactStore:
    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root else default_root()

    def put_image(self, image: Image.Image) -> ImageRef:
        """Store losslessly (PNG); the same pixels always give the same reference, and are written once."""
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        buf = io.BytesIO()
        # PNG metadata would make identical pixels hash differently; hash the pixels and size instead
        digest = hashlib.sha256(f"{image.mode}:{image.size}".encode() + image.tobytes()).hexdigest()
        path = self.root / digest[:2] / f"{digest}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(buf, format="PNG")
            # unique temp name + atomic rename: concurrent writers of the same image (the checkpointer's thread and a
            # node) cannot collide, and a crash never leaves a half-written file under the real name
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(buf.getvalue())
            tmp.replace(path)
        return ImageRef(sha256=digest, path=str(path), width=image.width, height=image.height, mode=image.mode)

    @staticmethod
    def get_image(ref: ImageRef | dict) -> Image.Image:
        ref = ref if isinstance(ref, ImageRef) else ImageRef.model_validate(ref)
        with Image.open(ref.path) as im:
            im.load()
            return im.copy()
