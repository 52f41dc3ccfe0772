"""The DragBench/Drag100 runner: edit every sample with a method, score it, keep per-sample records (resumable).

Run folder layout (``--out runs/NAME``)::

    config.json                          the run's settings (a resumed run must match them)
    samples/<category>/<name>/result.png the edited image (or a copy of the given result, for --results)
    samples/<category>/<name>/record.json what was done and every metric of the sample
    tables.md, tables.json               per-category tables in the paper's layout (see report.py)
    report.html, report.png              input/arrows/result grids

Resuming: a sample whose ``result.png`` exists is not edited again; metrics asked for but missing from its record
(e.g. ``--metrics`` grew to include gscore) are computed from the saved result; finished samples are skipped.

Methods (all through the agent graph of agent/graph.py):

* ``agent``: LucidDrag's full loop (locate, reason K intentions, sample by confidence, critique, retry);
* ``fixed-intention``: reason once, take the most confident intention, one attempt, no critique-driven retry;
* ``no-intention``: the paper's "w/o Intention" ablation: no reasoning, source = target prompt = the sample's prompt;
* ``results``: no editing; score precomputed results (DragDiffusion's layout ``<category>/<name>/dragged_image.png``,
  or GoodDrag's ``<name>/output_image.png``) given with ``--results DIR`` -- how other methods' rows are filled.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from luciddrag.agent.artifacts import ArtifactStore
from luciddrag.agent.context import AgentContext, model_defaults
from luciddrag.agent.tools import get_editor
from luciddrag.engine.errors import InputError, LucidDragError
from luciddrag.evals.dragbench import metrics as M
from luciddrag.evals.dragbench.data import Format, Sample, load_dataset
from luciddrag.evals.dragbench.gscore import GSCORE_TEMPERATURE
from luciddrag.evals.dragbench.metrics import CLIP_MODEL, DAI_GAMMAS, DiftConfig
from luciddrag.tools.llm import LLMSettings, make_chat_model

Method = Literal["agent", "fixed-intention", "no-intention", "results"]
METRICS = ("md", "lpips", "clip", "dai", "gscore")


class RunConfig(BaseModel):
    """Everything that determines a run's numbers (saved as config.json; a resumed run must agree)."""

    data: str
    format: Format | Literal["auto"] = "auto"
    method: Method = "agent"
    results: str | None = None
    model: str | None = None
    """Editing model (hub id or folder); None: LUCIDDRAG_MODEL or the engine's default."""
    device: str | None = None
    steps: int = 50
    seed: int = 0
    k: int = 3
    attempts: int = 3
    locator: str = "auto"
    reasoner: str = "auto"
    metrics: list[str] = Field(default_factory=lambda: list(METRICS))
    dift: DiftConfig = Field(default_factory=DiftConfig)
    clip_model: str = CLIP_MODEL
    gscore_repeats: int = 10
    gscore_model: str | None = None
    limit: int | None = None


class SampleRecord(BaseModel):
    sample_id: str
    category: str
    name: str
    prompt: str
    points: list[tuple[float, float]]
    method: str
    result: str | None = None
    """result.png, relative to the run folder."""
    intention: str | None = None
    source_prompt: str | None = None
    target_prompt: str | None = None
    accepted: bool | None = None
    attempts: int | None = None
    seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    """md_points (list, px), md (mean over the sample's points), lpips_fidelity (1 - LPIPS), clip, dai_1 ... dai_20,
    gscore, gscore_failed."""
    tracked: list[tuple[float, float]] | None = None
    errors: list[str] = Field(default_factory=list)


def _metric_keys(name: str) -> list[str]:
    return {"md": ["md"], "lpips": ["lpips_fidelity"], "clip": ["clip"], "dai": [f"dai_{g}" for g in DAI_GAMMAS],
            "gscore": ["gscore"]}[name]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Scorers:
    """Metric models, loaded once and only for the metrics asked for (each failure is a clear ModelLoadError,
    raised before any sample is edited)."""

    def __init__(self, cfg: RunConfig, editing_components: Callable[[], Any] | None = None,
                 chat_model: Any = None) -> None:
        self.cfg = cfg
        self.dift_c = self.lpips = self.clip = self.chat = None
        if "md" in cfg.metrics:
            import torch

            from luciddrag.engine.loading import load_components

            same = editing_components is not None and cfg.model is not None and cfg.dift.model == cfg.model
            reuse = editing_components() if same else None
            if reuse is not None and reuse.dtype == torch.float32 and reuse.vae.dtype == torch.float32:
                self.dift_c = reuse
            else:  # DIFT in fp32, as the reference (the editing model runs fp16 on CUDA)
                self.dift_c = load_components(cfg.dift.model, cfg.device, dtype="fp32")
        if "lpips" in cfg.metrics:
            from luciddrag.evals.dragbench.lpips import load_lpips

            self.lpips = load_lpips()
        if "clip" in cfg.metrics:
            from luciddrag.evals.dragbench.metrics import load_clip

            self.clip = load_clip(cfg.clip_model)
        if "gscore" in cfg.metrics:
            self.chat = chat_model if chat_model is not None else _gscore_chat(cfg)

    def score(self, sample: Sample, source: Image.Image, edited: Image.Image, missing: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "md" in missing:
            found = M.dift_track(self.dift_c, source, edited, sample.handles, sample.prompt, self.cfg.dift)
            d = M.point_distances(found, sample.targets)
            out.update(md_points=d, md=float(np.mean(d)), tracked=found)
        if "lpips" in missing:
            from luciddrag.evals.dragbench.lpips import one_minus_lpips

            out["lpips_fidelity"] = one_minus_lpips(self.lpips, source, edited)
        if "clip" in missing:
            out["clip"] = M.clip_similarity(self.clip, source, edited)
        if "dai" in missing:
            e = edited.convert("RGB")
            if e.size != source.size:
                e = e.resize(source.size, Image.Resampling.BILINEAR)
            out.update(M.dai_all(np.asarray(source.convert("RGB")), np.asarray(e), sample.pairs))
        if "gscore" in missing:
            from luciddrag.evals.dragbench.gscore import gscore

            method = "json_schema"
            try:
                from luciddrag.tools.llm import LLMSettings

                method = LLMSettings.from_env().structured_output
            except Exception:  # noqa: BLE001 - a bad env value just keeps the default
                pass
            res = gscore(self.chat, source, [edited], repeats=self.cfg.gscore_repeats, method=method)
            out.update(gscore=res.scores["A"], gscore_failed=res.failed, gscore_repeats=res.repeats)
        return out


def _gscore_chat(cfg: RunConfig) -> Any:
    settings = LLMSettings.from_env(temperature=GSCORE_TEMPERATURE, model=cfg.gscore_model)
    if not settings.configured:
        raise InputError("GScore needs a vision LLM: set OPENAI_API_KEY (or OPENAI_BASE_URL for a local "
                         "OpenAI-compatible server) and optionally LUCIDDRAG_VISION_MODEL, or leave gscore out of "
                         "--metrics")
    return make_chat_model(settings, vision=True)


def find_result(results_dir: Path, sample: Sample) -> Path:
    """A precomputed result in DragDiffusion's or GoodDrag's layout."""
    candidates = [results_dir / sample.category / sample.name / "dragged_image.png",
                  results_dir / sample.name / "output_image.png", results_dir / f"{sample.name}.png",
                  results_dir / sample.category / sample.name / "output_image.png"]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"no result for {sample.sample_id} under {results_dir} (looked for "
                     f"{sample.category}/{sample.name}/dragged_image.png or {sample.name}/output_image.png)")


def _agent_context(cfg: RunConfig, artifacts: Path):
    # the model folder's recommended sampler and critic settings (ShapesWorld ships luciddrag.json)
    # what the run asked for wins over the model's recommendations (a family preset names `steps` too)
    ctx = AgentContext(**{**model_defaults(cfg.model),  # type: ignore[arg-type]
                          **dict(steps=cfg.steps, seed=cfg.seed, k=cfg.k, max_attempts=cfg.attempts,
                                 locator=cfg.locator, reasoner=cfg.reasoner, artifacts_dir=str(artifacts))})
    if cfg.model:
        ctx.model = cfg.model
    if cfg.device:
        ctx.device = cfg.device
    if cfg.method == "fixed-intention":
        ctx.selection, ctx.max_attempts = "argmax", 1
    elif cfg.method == "no-intention":
        ctx.max_attempts = 1
    return ctx


def edit_sample(sample: Sample, cfg: RunConfig, ctx: Any, graph: Any) -> tuple[Image.Image, dict[str, Any]]:
    """Run the agent graph on one sample with the method's settings -> (result, what was chosen)."""
    inp: dict[str, Any] = {"image": str(sample.image_path), "points": list(sample.points)}
    if sample.mask is not None and np.asarray(sample.mask).any():
        inp["mask"] = Image.fromarray(np.asarray(sample.mask, dtype=np.uint8) * 255)
    if sample.prompt:
        inp["prompt"] = sample.prompt
    if cfg.method == "no-intention":
        inp["intention"] = {"intention": "(no intention: the sample's prompt for both)",
                            "source_prompt": sample.prompt, "target_prompt": sample.prompt}
    state = graph.invoke(inp, context=ctx)
    chosen = state.get("chosen")
    info = {"intention": chosen.intention if chosen else None,
            "source_prompt": chosen.source_prompt if chosen else None,
            "target_prompt": chosen.target_prompt if chosen else None,
            "accepted": bool(state.get("accepted")), "attempts": len(state.get("attempts") or [])}
    return ArtifactStore.get_image(state["result"]), info


def check_config(out: Path, cfg: RunConfig) -> None:
    """A resumed run must have been started with the same settings (metrics and limit may differ)."""
    path = out / "config.json"
    if path.is_file():
        old = RunConfig.model_validate_json(path.read_text())
        mine = cfg.model_dump(exclude={"metrics", "limit", "gscore_repeats"})
        theirs = old.model_dump(exclude={"metrics", "limit", "gscore_repeats"})
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise InputError(f"{out} holds a run made with different settings ({', '.join(diff)}): resume with the "
                             "same settings or pick a new --out")
    _atomic_write(path, cfg.model_dump_json(indent=1))


def run(cfg: RunConfig, out: Path, *, progress: bool = True, chat_model: Any = None,
        log: Callable[[str], None] = print) -> list[SampleRecord]:
    """Edit and score every sample (skipping finished ones); returns all records in dataset order."""
    from tqdm.auto import tqdm

    unknown = [m for m in cfg.metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    if cfg.method == "results" and not cfg.results:
        raise InputError("--method results needs --results DIR (precomputed results to score)")
    samples = load_dataset(cfg.data, cfg.format)[: cfg.limit]
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)

    ctx = graph = None
    if cfg.method != "results":
        from luciddrag.agent.graph import build_graph

        ctx = _agent_context(cfg, out / "artifacts")
        graph = build_graph()

    def editing_components():
        return get_editor(ctx).c

    scorers = Scorers(cfg, editing_components if ctx is not None else None, chat_model)
    records: list[SampleRecord] = []
    bar = tqdm(samples, desc=f"dragbench:{cfg.method}", disable=not progress, unit="sample")
    for sample in bar:
        folder = out / "samples" / sample.category / sample.name
        rec_path, res_path = folder / "record.json", folder / "result.png"
        rec = (SampleRecord.model_validate_json(rec_path.read_text()) if rec_path.is_file()
               else SampleRecord(sample_id=sample.sample_id, category=sample.category, name=sample.name,
                                 prompt=sample.prompt, points=sample.points, method=cfg.method))
        source = sample.image()
        if not res_path.is_file():
            t0 = time.perf_counter()
            try:
                if cfg.method == "results":
                    folder.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(find_result(Path(cfg.results), sample), res_path)
                else:
                    result, info = edit_sample(sample, cfg, ctx, graph)
                    folder.mkdir(parents=True, exist_ok=True)
                    result.save(res_path)
                    rec = rec.model_copy(update=info)
            except LucidDragError as exc:  # a bad sample is recorded and skipped, the run goes on
                rec.errors.append(f"edit: {exc}")
                _atomic_write(rec_path, rec.model_dump_json(indent=1))
                log(f"{sample.sample_id}: {exc}")
                records.append(rec)
                continue
            rec.seconds = time.perf_counter() - t0
            rec.result = str(res_path.relative_to(out))
        missing = [m for m in cfg.metrics if any(k not in rec.metrics for k in _metric_keys(m))]
        if missing:
            with Image.open(res_path) as im:
                edited = im.convert("RGB")
            scores = scorers.score(sample, source, edited, missing)
            tracked = scores.pop("tracked", None)
            if tracked is not None:
                rec.tracked = tracked
            rec.metrics.update(scores)
        _atomic_write(rec_path, rec.model_dump_json(indent=1))
        records.append(rec)
        mds = [r.metrics["md"] for r in records if "md" in r.metrics]
        if mds:
            bar.set_postfix(md=f"{np.mean(mds):.2f}")
    return records


def load_records(out: Path) -> list[SampleRecord]:
    return [SampleRecord.model_validate_json(p.read_text()) for p in sorted((out / "samples").glob("*/*/record.json"))]
