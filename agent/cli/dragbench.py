"""``luciddrag eval dragbench``: run a method over DragBench / Drag100 and write tables and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from luciddrag.agent.cli.common import quiet_libraries
from luciddrag.engine.errors import LucidDragError


def app(
    data: Path = typer.Option(..., "--data", help="DragBench folder (<category>/<sample>/meta_data.pkl) or Drag100 "
                                                  "folder (<sample>/points.json)."),
    out: Path = typer.Option(..., "--out", help="Run folder, e.g. runs/NAME (resumable: rerun to continue)."),
    method: str = typer.Option("agent", help="agent | fixed-intention | no-intention | results (score --results)."),
    results: Optional[Path] = typer.Option(None, help="Precomputed results to score with --method results."),
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_MODEL", help="Editing model (hub id or folder)."),
    device: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DEVICE", help="cpu / cuda (default: auto)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
    seed: int = typer.Option(0, help="Sampling seed."),
    k: int = typer.Option(3, min=1, max=8, help="Intentions reasoned per sample."),
    attempts: int = typer.Option(3, min=1, max=8, help="Attempt budget (agent method)."),
    locator: str = typer.Option("auto", help="auto | offline | openai | florence2 | osprey."),
    reasoner: str = typer.Option("auto", help="auto | llm | offline."),
    metrics: str = typer.Option("md,lpips,clip,dai,gscore", help="Comma-separated: md, lpips, clip, dai, gscore."),
    dift_model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_DIFT_MODEL",
                                             help="DIFT model for Mean Distance (default: SD 2.1)."),
    dift_ensemble: int = typer.Option(8, min=1, help="DIFT ensemble size (DragDiffusion: 8)."),
    clip_model: str = typer.Option("openai/clip-vit-base-patch32", help="CLIP for image similarity."),
    gscore_repeats: int = typer.Option(10, min=1, help="GScore repeats averaged (GoodDrag: 10)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N samples."),
    fmt: str = typer.Option("auto", "--format", help="auto | dragbench | drag100."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    sampler: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_SAMPLER",
                                          help="Edit on a sampler deployment (serve:APP, ray://HEAD:10001/APP, "
                                               "http://HOST:PORT/APP; docs/scale-out.md), WORKERS samples at a time."),
    workers: int = typer.Option(8, min=1, help="With --sampler: samples edited concurrently."),
) -> None:
    """Evaluate a drag-editing method on DragBench or Drag100: Mean Distance (DIFT), 1-LPIPS, CLIP, DAI, GScore.

    Writes OUT/tables.md + tables.json (per category, the paper's Tab. 4/5 layout), OUT/report.html + report.png,
    and a record per sample. Rerun the same command to resume; add a metric to --metrics to compute only that.
    """
    from luciddrag.evals.dragbench.data import load_dataset
    from luciddrag.evals.dragbench.metrics import DiftConfig
    from luciddrag.evals.dragbench.report import write_tables, write_visuals
    from luciddrag.evals.dragbench.runner import RunConfig, run

    quiet_libraries()
    try:
        dift = DiftConfig(ensemble=dift_ensemble, **({"model": dift_model} if dift_model else {}))
        cfg = RunConfig(data=str(data), format=fmt, method=method, results=str(results) if results else None,
                        model=model, device=device, steps=steps, seed=seed, k=k, attempts=attempts, locator=locator,
                        reasoner=reasoner, metrics=[m.strip() for m in metrics.split(",") if m.strip()], dift=dift,
                        clip_model=clip_model, gscore_repeats=gscore_repeats, limit=limit)
    except ValueError as exc:  # pydantic: a bad --method / --format
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        typer.secho(f"error: --{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    try:
        if sampler:  # edit everything on the deployment first (resumable); `run` then only scores
            # imported here like the other evals modules above: they pull in torch and the agent graph, and
            # `luciddrag --help` should not wait for them
            from luciddrag.evals.dragbench.fanout import edit_fanned_out

            edit_fanned_out(cfg, out, workers=workers, sampler=sampler, log=typer.echo)
        records = run(cfg, out, progress=progress, log=typer.echo)
        images = {s.sample_id: s.image_path for s in load_dataset(cfg.data, cfg.format)}
        label = method if method != "results" else (results.name if results else "results")
        tables = write_tables(out, {label: records})
        paths = write_visuals(out, records, images)
    except LucidDragError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    from luciddrag.evals.dragbench.report import tables_markdown

    typer.echo(tables_markdown(tables))
    failed = [r.sample_id for r in records if r.errors]
    if failed:
        typer.secho(f"{len(failed)} sample(s) failed: {', '.join(failed[:5])}", fg=typer.colors.YELLOW)
    typer.echo(f"wrote {out / 'tables.md'}, {out / 'tables.json'}, {paths['html']}"
               + (f", {paths['png']}" if "png" in paths else ""))
