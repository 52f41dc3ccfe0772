"""``luciddrag eval agent``: offline agent evals over recorded LLM answers (cassettes)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from luciddrag.engine.errors import LucidDragError


def app(
    prompt_version: Optional[int] = typer.Option(None, "--prompt-version", help="reason_intentions version (default: "
                                                                                 "the latest)."),
    replay: bool = typer.Option(True, "--replay/--record", help="Replay cassettes (free, offline; default) or record "
                                                                "new ones from the LLM (OPENAI_API_KEY / BASE_URL)."),
    cases: Optional[str] = typer.Option(None, help="Comma-separated case ids (default: all)."),
    out: Path = typer.Option(Path("runs/agent-eval"), "--out", help="Folder for <prompt label>.json."),
    cassettes: Optional[Path] = typer.Option(None, help="Cassette folder (default: the packaged one)."),
    model: Optional[str] = typer.Option(None, envvar="LUCIDDRAG_LLM_MODEL", help="Model to record with."),
    trajectories: bool = typer.Option(True, help="Also run the agent graph with a scripted critic."),
    compare: Optional[Path] = typer.Option(None, help="Another run's JSON to show side by side."),
) -> None:
    """Evaluate the intention reasoner and the agent's graph on the case set: schema validity, constraints, diversity
    and trajectories. Replays recorded answers by default; a changed prompt template is reported as a cassette miss.
    """
    from luciddrag.evals.agent.cases import load_cases
    from luciddrag.evals.agent.runner import compare_table, format_table, run_agent_eval

    try:
        selected = load_cases(only=[c.strip() for c in cases.split(",")] if cases else None)
        kw = {}
        if not replay:
            key, base = os.environ.get("OPENAI_API_KEY"), os.environ.get("OPENAI_BASE_URL")
            if not key and not base:
                raise LucidDragError("--record needs an LLM: set OPENAI_API_KEY (and optionally OPENAI_BASE_URL, "
                                     "LUCIDDRAG_LLM_MODEL)")
            kw = {"upstream": base, "api_key": key, "model": model,
                  "structured_output": os.environ.get("LUCIDDRAG_STRUCTURED_OUTPUT")}
        report = run_agent_eval(selected, version=prompt_version, mode="replay" if replay else "record",
                                cassette_root=cassettes, trajectories=trajectories, **kw)
    except LucidDragError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(format_table(report))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report.prompt}.json"
    path.write_text(report.model_dump_json(indent=1))
    typer.echo(f"wrote {path}")
    if compare is not None:
        typer.echo("\n" + compare_table(json.loads(compare.read_text()), report.model_dump()))
    if report.summary["cassette_misses"]:
        typer.secho(f"{report.summary['cassette_misses']} cassette miss(es): the prompt or request changed since "
                    "recording; re-record with --record", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)
