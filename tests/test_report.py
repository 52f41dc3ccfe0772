"""The run report (OUT.report.md): one row per attempt, a fidelity column only when a discriminator scored."""

from __future__ import annotations

from luciddrag.agent.artifacts import ImageRef
from luciddrag.agent.report import format_report
from luciddrag.agent.state import Attempt


def _attempt(quality: float | None, verdict: str = "accepted", reason: str = "handle arrived") -> Attempt:
    return Attempt(index=0, intention="move the red square to the right", source_prompt="a red square",
                   target_prompt="a red square on the right",
                   image=ImageRef(sha256="0" * 64, path="x.png", width=64, height=64, mode="RGB"),
                   md_px=1.25, md_fraction=0.1,
                   quality=quality, verdict=verdict, reason=reason)


def _attempt_rows(text: str) -> list[str]:
    part = text.split("## Attempts", 1)[1]
    return [line for line in part.splitlines() if line.startswith("|")]


def test_report_has_a_fidelity_column_only_when_attempts_were_scored():
    plain = _attempt_rows(format_report({"attempts": [_attempt(None)], "accepted": True, "status": "ok"}))
    assert "fidelity" not in plain[0] and plain[2] == "| 1 | move the red square to the right | accepted | 1.2 px | " \
                                                      "10% | handle arrived |"
    rows = _attempt_rows(format_report({"attempts": [_attempt(0.81), _attempt(None, "rejected", "drifted")],
                                        "accepted": True, "status": "ok"}))
    assert rows[0].split("|")[6].strip() == "fidelity"
    assert all(r.count("|") == rows[0].count("|") for r in rows)  # every row has the header's columns
    assert rows[2].split("|")[6].strip() == "0.81" and rows[3].split("|")[6].strip() == "-"
