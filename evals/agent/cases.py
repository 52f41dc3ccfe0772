"""The agent-eval case set (``cases/cases.yaml`` + ``cases/images/``) and the script that rebuilt its images.

``python -m luciddrag.evals.agent.cases`` re-derives the photo images from scikit-image (optional extra ``evals``) and the
ShapesWorld scenes from their task seeds.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from luciddrag.engine.errors import InputError
from luciddrag.evals.shapesworld.tasks import generate_tasks

CASES_DIR = Path(__file__).resolve().parent / "cases"


class CaseExpect(BaseModel):
    families: list[str] = Field(min_length=1)
    mentions: list[str] = Field(min_length=1)
    k: int = Field(default=3, ge=1, le=8)
    max_changed_words: int = 4
    critic_accepts: list[str] = Field(default_factory=list)


class AgentCase(BaseModel):
    id: str
    source: str
    image: str
    caption: str
    points: list[tuple[float, float]]
    handle_descriptions: list[str] | None = None
    expect: CaseExpect

    @property
    def image_path(self) -> Path:
        return CASES_DIR / self.image


def load_cases(path: Path | None = None, only: list[str] | None = None) -> list[AgentCase]:
    path = path or CASES_DIR / "cases.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read cases {path}: {exc}") from None
    cases = [AgentCase.model_validate(c) for c in raw]
    if only:
        unknown = set(only) - {c.id for c in cases}
        if unknown:
            raise InputError(f"unknown case(s) {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c.id in only]
    return cases


def build_images(out: Path = CASES_DIR / "images") -> None:  # pragma: no cover - a maintenance script
    import skimage.data as data
    from PIL import Image


    photos = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
              "motorcycle": lambda: data.stereo_motorcycle()[0]}
    for name, fn in photos.items():
        im = Image.fromarray(fn()).convert("RGB")
        s = 256 / max(im.size)
        im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS).save(out / f"{name}.png")
    for fam in ("move", "resize"):
        generate_tasks(fam, 1, seed_base=810_000_000)[0].scene().image.convert("RGB").save(out / f"shapes_{fam}.png")


if __name__ == "__main__":  # pragma: no cover
    build_images()
