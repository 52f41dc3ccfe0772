"""The hidden-intent agent suite (evals/shapesworld/agent_suite.py): balanced, reproducible tasks whose ground truth
is consistent with their drags; the rows' requests; a short end-to-end run of every row; the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from luciddrag.evals.shapesworld.agent_suite import (FAMILIES, TaskRecord, breakdown, generate_agent_tasks,
                                                     oracle_request, plain_request, row_stats, table)
from luciddrag.evals.shapesworld.scoring import score_task


@pytest.fixture(scope="module")
def tasks():
    return generate_agent_tasks(8, 123_000_000)


def test_tasks_are_balanced_and_reproducible(tasks) -> None:
    assert [t.family for t in tasks] == [f for f in FAMILIES for _ in range(8)]
    for fam in FAMILIES:
        fs = [t for t in tasks if t.family == fam]
        assert {(t.n_points, t.use_mask) for t in fs} == {(1, False), (1, True), (2, False), (2, True)}
        assert all(len(t.task.drags) == t.n_points for t in fs)
    again = generate_agent_tasks(8, 123_000_000)
    assert [t.model_dump() for t in again] == [t.model_dump() for t in tasks]
    assert {t.intent for t in tasks if t.family == "resize"} <= {"grow", "shrink"}
    assert {t.intent for t in tasks if t.family == "move+resize"} <= {"move+grow", "move+shrink"}


def test_ground_truth_follows_the_drags(tasks) -> None:
    """Every drag's target is where the ground-truth similarity (scale about the old centre, then the move) carries
    its handle; the ideal image scores as a success and the unedited input does not."""
    for at in tasks:
        t = at.task
        s = t.target.size / t.source.size
        for d in t.drags:
            want = (t.target.cx + s * (d.handle[0] - t.source.cx), t.target.cy + s * (d.handle[1] - t.source.cy))
            assert math.dist(want, d.target) < 1e-6, t.task_id
        if at.family == "move":
            assert s == 1 and len({(round(d.target[0] - d.handle[0], 6), round(d.target[1] - d.handle[1], 6))
                                   for d in t.drags}) == 1
        else:
            assert abs(math.log(s)) > 0.2
        assert score_task(t, np.asarray(t.ground_truth_scene().image)).success, t.task_id
        assert not score_task(t, np.asarray(t.scene().image)).success, t.task_id


def test_rows_requests(tasks) -> None:
    from luciddrag.engine.request import GuidanceConfig

    at = next(t for t in tasks if t.family == "resize" and t.use_mask)
    plain = plain_request(at, 10, GuidanceConfig(), 1.0)
    assert plain.source_prompt == plain.target_prompt == "" and not plain.handle_masks
    oracle = oracle_request(at, 10, GuidanceConfig(), 1.0)
    assert oracle.region_motion == "scale" and oracle.target_prompt == at.task.target_prompt
    assert oracle.handle_masks and len(oracle.handle_masks) == len(at.task.drags)
    move = next(t for t in tasks if t.family == "move" and not t.use_mask)
    assert oracle_request(move, 10, GuidanceConfig(), 1.0).region_motion == "translate"
    assert plain_request(move, 10, GuidanceConfig(), 1.0).mask is None


@pytest.mark.slow
def test_every_row_end_to_end_and_the_cli(tmp_path: Path) -> None:
    """Two tasks (a move with a mask, a resize), 4 DDIM steps: every row scored, the agent's trail recorded, the
    tables and the files written; --merge tabulates saved runs."""
    from luciddrag.agent.cli.main import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["eval", "agent-shapes", "--n", "2", "--families", "move,resize", "--steps", "4",
                                   "--shard", "1/2", "--sheet-tasks", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| (c) agent, <=3 attempts | move | 1 |" in res.output and "| (d) oracle" in res.output
    assert (out / "agent_shapes_sheet.png").is_file()
    from luciddrag.evals.shapesworld.agent_suite import load_records

    recs = load_records([out / "agent_shapes.json"])
    assert [r.task_id for r in recs] == ["move-001", "resize-001"]
    for r in recs:
        assert set(r.scores) == {"plain", "top1", "agent", "oracle"}
        assert 1 <= r.attempts <= 3 and len(r.trail) == r.attempts and r.intentions
        assert all(t["verdict"] in ("accepted", "rejected") for t in r.trail)
    merged = CliRunner().invoke(app, ["eval", "agent-shapes", "--merge", str(out / "agent_shapes.json"),
                                      "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0 and "| (a) plain drag | all | 2 |" in merged.output
    bad = CliRunner().invoke(app, ["eval", "agent-shapes", "--families", "spin", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown family spin" in bad.output


def test_tables_from_records() -> None:
    from luciddrag.evals.shapesworld.scoring import TaskScore

    def sc(ok: bool, md: float) -> TaskScore:
        return TaskScore(task_id="t", family="move", found=True, md_px=md, md_frac=md / 10, size_px=10,
                         size_error_px=0.5, class_kept=True, colour_kept=True, identity_kept=True,
                         preservation_psnr=30.0, ghost_fraction=0.0, extra_objects=0, success=ok)

    recs = [TaskRecord(task_id=f"m{i}", family="move", intent="move", n_points=1, use_mask=bool(i % 2),
                       scores={"top1": sc(i == 0, 5.0), "agent": sc(True, 1.0)}, attempts=1 + i, accepted=True,
                       trail=[], intentions=[], seconds=1.0) for i in range(2)]
    s = row_stats(recs, "agent")
    assert s["success"] == 1.0 and s["attempts"] == 1.5 and s["md_px"] == 1.0
    assert row_stats(recs, "top1")["success"] == 0.5 and row_stats(recs, "oracle") == {"n": 0}
    text = table(recs, ["top1", "agent"])
    assert "| (b) reasoner top-1 | move | 2 | 50% |" in text and "| (c) agent, <=3 attempts | all | 2 | 100% |" in text
    assert "| user mask | 1 | 0% | 100% |" in breakdown(recs, ["top1", "agent"])
