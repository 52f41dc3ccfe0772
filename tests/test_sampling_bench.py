"""`luciddrag bench engine`'s engine side: every row counts its UNet passes and reports time and peak memory."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bench_rows_count_passes_and_report_ratios():
    from luciddrag.engine.bench import format_report, run_bench

    lines: list[str] = []
    r = run_bench("tiny", steps=4, intentions=2, device="cpu", switches=("parts", "fast", "checkpointing"), threads=1,
                  log=lines.append)
    rows = {row["config"]: row for row in r["rows"]}
    assert list(rows) == ["unguided", "guided", "guidance only (no K/V, no z_T copy)",
                          "K/V injection only (no guidance)", "K=2 batched", "K=2 sequential", "fast (25 steps)",
                          "fast K=2 batched", "gradient checkpointing"]
    # 4 steps: inversion 4 + sampling 4 x (cond + uncond); one backward per guided step (edit_steps 30 >= 4)
    assert rows["guided"]["unet_forward"] == 12 and rows["guided"]["unet_backward"] == 4
    assert rows["unguided"]["unet_backward"] == 0
    assert rows["guidance only (no K/V, no z_T copy)"]["unet_backward"] == 4
    assert rows["K/V injection only (no guidance)"]["unet_backward"] == 0
    # a gradient pass costs more than a forward, so the floor lies above 1 (and it is a ratio, not a time)
    assert r["gradient_pass_over_forward"] > 0 and 1 < r["exact_gradient_floor"] < 10
    assert 0.5 < r["unet_batch2_over_batch1"] < 4
    assert rows["K=2 sequential"]["unet_forward"] == 24 and rows["K=2 batched"]["unet_forward"] == 12
    assert rows["gradient checkpointing"]["unet_backward"] == 4
    assert rows["fast (25 steps)"]["steps"] == 4  # fewer steps than the preset already
    assert all(row["peak_mb"] > 0 and row["seconds"] > 0 for row in r["rows"])
    assert r["guided_over_unguided"] == rows["guided"]["over_unguided"]
    # one line per row as it finishes (a run cut short keeps them), with its passes
    assert [ln.split(":")[0] for ln in lines] == list(rows) and lines[1].endswith("UNet fwd/bwd 12/4")
    text = format_report(r)
    assert "| gradient checkpointing |" in text and "batched_k2_over_sequential" in text
    assert "exact_gradient_floor" in text


@pytest.mark.slow
def test_bench_engine_command_writes_json_and_refuses_unknown_switches(tmp_path):
    import json

    from typer.testing import CliRunner

    from luciddrag.agent.cli.main import app

    out = tmp_path / "b" / "bench.json"
    res = CliRunner().invoke(app, ["bench", "engine", "--steps", "2", "--intentions", "1", "--switches", "",
                                   "--threads", "1", "--no-floor", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())  # the numbers, as JSON (not the printed table)
    assert [r["config"] for r in data["rows"]] == ["unguided", "guided"]
    assert data["rows"][1]["unet_backward"] == 2 and "exact_gradient_floor" not in data
    assert "| guided |" in res.output
    bad = CliRunner().invoke(app, ["bench", "engine", "--switches", "parts,turbo"])
    assert bad.exit_code == 2 and "unknown switch 'turbo'" in bad.output
