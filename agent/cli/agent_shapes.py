"""``luciddrag eval agent-shapes``: the hidden-intent agent suite on ShapesWorld (rows (a)-(d), docs/agent-eval.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from luciddrag.agent.cli.common import fail, quiet_libraries
from luciddrag.engine.errors import LucidDragError


def _shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        fail(f"--shard {text!r} is not K/N (e.g. 0/2)")
    if not 0 <= k < n:
        fail(f"--shard {text}: K must be in 0..N-1")
    return k, n


def app(
    n: int = typer.Option(60, "--n", min=1, help="Tasks per family (move, resize, move+resize)."),
    families: str = typer.Option("move,resize,move+resize", help="Comma-separated families."),
    rows: str = typer.Option("plain,top1,agent,oracle", help="Rows: plain (a), top1 (b), agent (c), oracle (d)."),
    seed_base: Optional[int] = typer.Option(None, help="Scene seed base (default: the held-out agent seeds)."),
    steps: int = typer.Option(50, min=2, help="DDIM steps."),
    attempts: int = typer.Option(3, min=1, max=8, help="The agent's attempt budget (row c)."),
    critic_regions: bool = typer.Option(True, help="Use the region critic in the critique node."),
    shard: Optional[str] = typer.Option(None, help="K/N: run every N-th task from the K-th (parallel processes)."),
    out: Path = typer.Option(Path("runs/agent-shapes"), "--out", help="Folder for agent_shapes.json/.md and sheet."),
    sheet_tasks: int = typer.Option(2, help="Tasks per family on the contact sheet."),
    merge: Optional[List[Path]] = typer.Option(None, help="Only tabulate these agent_shapes.json files together."),
) -> None:
    """Drags whose meaning the agent is not told (moves, grow/shrink, move+resize; one or two points; with and
    without a user mask), scored exactly against the hidden ground truth: plain drag, reasoner top-1, the full agent
    and an oracle told the family. ShapesWorld model, CPU, offline."""
    quiet_libraries()
    from luciddrag.evals.shapesworld import agent_suite as suite

    if merge:
        try:
            recs = suite.load_records(merge)
        except (OSError, ValueError) as exc:
            fail(f"cannot read {', '.join(map(str, merge))}: {exc}")
        picked = [r for r in suite.ROWS if any(r in x.scores for x in recs)]
        suite.write_report(out, recs, {"merged": [str(p) for p in merge]})
        typer.echo(suite.table(recs, picked) + "\n\n" + suite.breakdown(recs, picked))
        typer.echo(f"wrote {out / 'agent_shapes.md'}")
        return
    fams = [f.strip() for f in families.split(",") if f.strip()]
    bad = [f for f in fams if f not in suite.FAMILIES]
    want = [r.strip() for r in rows.split(",") if r.strip()]
    if bad or not fams:
        fail(f"unknown family {', '.join(bad) or '(none)'}: choose from {', '.join(suite.FAMILIES)}")
    if not want or any(r not in suite.ROWS for r in want):
        fail(f"rows must be among {', '.join(suite.ROWS)}")
    k, of = _shard(shard)
    from luciddrag.agent.context import AgentContext, model_defaults
    from luciddrag.agent.tools import get_editor
    from luciddrag.evals.shapesworld import MODEL_DIR

    tasks = suite.generate_agent_tasks(n, seed_base if seed_base is not None else suite.AGENT_SEED_BASE, fams)
    # interleaved across families, so that a run stopped early (the JSON is rewritten after every task) is balanced
    mine = sorted(tasks[k::of], key=lambda t: (int(t.task.task_id.rsplit("-", 1)[1]), suite.FAMILIES.index(t.family)))
    sheet_ids = {t.task.task_id for f in fams for t in [x for x in mine if x.family == f][:sheet_tasks]}
    ctx = AgentContext(model=str(MODEL_DIR), device="cpu", steps=steps, max_attempts=attempts, locator="offline",
                       reasoner="offline", selection="argmax", critic_regions=critic_regions, judge="off",
                       artifacts_dir=str(out / "artifacts"), **model_defaults(MODEL_DIR))
    meta = {"n_per_family": n, "families": fams, "rows": want, "steps": steps, "attempts": attempts,
            "seed_base": seed_base, "shard": f"{k}/{of}", "critic_regions": critic_regions,
            "guidance": ctx.guidance.model_dump(), "guidance_scale": ctx.guidance_scale}
    recs: list = []

    def save(rec) -> None:
        recs.append(rec)
        suite.write_report(out, recs, meta)

    try:
        editor = get_editor(ctx)
        first = [t for t in mine if t.task.task_id in sheet_ids]
        rest = [t for t in mine if t.task.task_id not in sheet_ids]
        # the sheet's tasks first so their images are kept; then the rest
        kept = suite.run_suite(first, editor, ctx, want, keep_images=len(first), on_record=save)[1]
        suite.write_report(out, recs, meta, kept)
        suite.run_suite(rest, editor, ctx, want, on_record=save)
    except LucidDragError as exc:
        fail(str(exc))
    suite.write_report(out, recs, meta, kept)
    typer.echo(suite.table(recs, want) + "\n\n" + suite.breakdown(recs, want))
    typer.echo(f"wrote {out / 'agent_shapes.json'}, {out / 'agent_shapes.md'}")
