"""DragBench at scale: edit the unfinished samples with many concurrent agent runs whose sampling goes to the Ray
Serve deployment, then let the runner score them.

    edit_fanned_out(cfg, out, workers=16, sampler="serve:luciddrag-sampler")   # the edits, on the deployment
    runner.run(cfg, out)                                                        # scores; edits nothing finished

Each worker thread runs the same agent graph as `runner.run` (locate, reason, choose on this machine: light), and
every sample tool call goes to the deployment, where Serve spreads requests over the replicas (one per GPU) and
batches concurrent ones. Results land in the runner's layout (result.png + record.json per sample), so the run is
resumable exactly as before: a stopped run, rerun, edits only the samples with no result.png.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from luciddrag.agent.graph import build_graph
from luciddrag.agent.serving.client import get_sampler, parse_endpoint
from luciddrag.engine.errors import InputError, LucidDragError
from luciddrag.evals.dragbench.data import Sample, load_dataset
from luciddrag.evals.dragbench.runner import (RunConfig, SampleRecord, _agent_context, _atomic_write, check_config,
                                              edit_sample)


def pending(cfg: RunConfig, out: Path) -> list[Sample]:
    """The samples of the run that have no result yet (what a resumed run still has to edit)."""
    samples = load_dataset(cfg.data, cfg.format)[: cfg.limit]
    return [s for s in samples if not (out / "samples" / s.category / s.name / "result.png").is_file()]


def edit_fanned_out(cfg: RunConfig, out: Path, *, workers: int = 8, sampler: str | None = None,
                    log: Callable[[str], None] = print) -> list[SampleRecord]:
    """Edit every unfinished sample, `workers` at a time, sampling on the deployment named by `sampler` (a
    LUCIDDRAG_SAMPLER value; None: the environment's). Returns the records written now; a sample that fails is
    recorded with its error and left without a result, so a rerun tries it again."""
    if cfg.method == "results":
        raise InputError("--method results scores given results: there is nothing to fan out")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    ctx = _agent_context(cfg, out / "artifacts")
    if sampler is not None:
        parse_endpoint(sampler)  # a bad value is an InputError now, not one per sample
        ctx.sampler = sampler
    if get_sampler(ctx) is None:
        raise InputError("fanning DragBench out needs the sampler deployment: pass --sampler serve:APP (or set "
                         "LUCIDDRAG_SAMPLER); without it run `eval dragbench` as usual")
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)
    graph = build_graph()

    def one(sample: Sample) -> SampleRecord:
        folder = out / "samples" / sample.category / sample.name
        rec = SampleRecord(sample_id=sample.sample_id, category=sample.category, name=sample.name,
                           prompt=sample.prompt, points=sample.points, method=cfg.method)
        t0 = time.perf_counter()
        try:
            result, info = edit_sample(sample, cfg, ctx, graph)
        except LucidDragError as exc:
            rec.errors.append(f"edit: {exc}")
            _atomic_write(folder / "record.json", rec.model_dump_json(indent=1))
            log(f"{sample.sample_id}: {exc}")
            return rec
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "result.tmp.png"
        result.save(tmp)
        rec = rec.model_copy(update={**info, "seconds": time.perf_counter() - t0,
                                     "result": str((folder / "result.png").relative_to(out))})
        _atomic_write(folder / "record.json", rec.model_dump_json(indent=1))
        tmp.replace(folder / "result.png")  # last: a result.png always has its record (resume relies on it)
        return rec

    todo = pending(cfg, out)
    records: list[SampleRecord] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in as_completed([pool.submit(one, s) for s in todo]):
            records.append(fut.result())
    return records
