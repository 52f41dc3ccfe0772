"""Offline agent evals: the replayed case suite (marker ``agent_eval``), cassette misses on a changed template,
recording through the real client against a local OpenAI-compatible server, and the metric functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from luciddrag.evals.agent.cases import load_cases
from luciddrag.evals.agent.cassette import CASSETTE_DIR, load_cassette, request_key
from luciddrag.evals.agent.metrics import case_constraints, changed_words, diversity, has_any, trajectory_checks
from luciddrag.evals.agent.runner import run_agent_eval
from luciddrag.evals.agent.scripted import ANSWERS
from tests.openai_server import FakeOpenAIServer, chat_completion, openai_server  # noqa: F401 - fixture
from luciddrag.tools.schemas import Intention


def _cli(args: list[str]):
    from luciddrag.agent.cli import app

    return CliRunner().invoke(app, ["eval", "agent", *args])


@pytest.mark.agent_eval
def test_replayed_agent_eval_suite(tmp_path: Path) -> None:
    """The whole case set replayed from the committed cassettes: no misses, every case meets its constraints and
    its graph trajectory (critique rejected -> next intention) is right."""
    res = _cli(["--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "reason_intentions.v1.json").read_text())
    s = report["summary"]
    assert s["cassette_misses"] == 0 and s["cases"] == len(load_cases()) >= 8
    assert s["schema_valid"] == 1.0 and s["trajectory_ok"] == 1.0 and s["passed"] == s["cases"]
    assert report["synthetic"] is True  # the committed cassettes say they are scripted, not an LLM's
    by = {c["case"]: c for c in report["cases"]}
    assert by["paper-a3-motorcycle"]["intentions"][0]["target_prompt"] == "a long red motorcycle."
    assert by["paper-a3-raccoon"]["tried"] == ["make the raccoon look sideways",
                                               "move the raccoon's head up and to the right"]  # rejected -> next
    assert by["paper-a3-raccoon"]["nodes"][-4:] == ["sample", "critique", "sample", "critique"]
    assert "SYNTHETIC" in res.output and "| paper-a3-raccoon | hit |" in res.output
    meta = load_cassette(CASSETTE_DIR, "reason_intentions.v1", "paper-a3-raccoon").meta
    assert meta.synthetic and "NOT a real LLM" in meta.note


@pytest.mark.agent_eval
def test_changed_template_is_a_cassette_miss_not_a_silent_replay(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from luciddrag.prompts import PACKAGE_DIR

    edited = (PACKAGE_DIR / "reason_intentions.v1.md").read_text().replace("the most likely first", "best first")
    (tmp_path / "reason_intentions.v1.md").write_text(edited)
    monkeypatch.setenv("LUCIDDRAG_PROMPTS_DIR", str(tmp_path))
    report = run_agent_eval(load_cases(only=["paper-a3-motorcycle"]), trajectories=False)
    (case,) = report.cases
    assert case.cassette == "miss" and not case.passed and report.summary["cassette_misses"] == 1
    assert "re-record" in case.warnings[0]
    res = _cli(["--cases", "paper-a3-motorcycle", "--no-trajectories", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "| paper-a3-motorcycle | miss |" in res.output


def test_record_through_a_local_openai_server_then_replay(tmp_path: Path, openai_server: FakeOpenAIServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--record forwards the rendered requests to the upstream (here a local server standing in for OpenAI) with the
    key, stores the answers, and a replay then answers from the new cassette without the upstream."""
    answer = json.dumps({"intentions": ANSWERS["a photo of a raccoon."]})
    openai_server.queue(chat_completion(answer), chat_completion(answer))
    monkeypatch.setenv("OPENAI_BASE_URL", openai_server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    root = tmp_path / "cassettes"
    res = _cli(["--record", "--cases", "paper-a3-raccoon", "--cassettes", str(root), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert len(openai_server.chat_requests) == 2  # the reasoner call and the graph's reason node
    assert openai_server.chat_requests[0].headers["authorization"] == "Bearer sk-test-key"
    cassette = load_cassette(root, "reason_intentions.v1", "paper-a3-raccoon")
    assert cassette is not None and len(cassette.entries) == 2 and not cassette.meta.synthetic
    assert cassette.meta.model == "gpt-4.1-mini-2025-04-14"
    assert cassette.entries[0].key == request_key(openai_server.chat_requests[0].body)
    monkeypatch.delenv("OPENAI_BASE_URL")
    res = _cli(["--cases", "paper-a3-raccoon", "--cassettes", str(root), "--out", str(tmp_path / "p"),
                "--compare", str(tmp_path / "r" / "reason_intentions.v1.json")])
    assert res.exit_code == 0, res.output
    assert len(openai_server.chat_requests) == 2 and "| paper-a3-raccoon | hit |" in res.output
    assert "| schema_valid | 1.0 | 1.0 |" in res.output
    assert _cli(["--record", "--cases", "nope"]).exit_code == 2


def test_agent_eval_metric_functions() -> None:
    assert changed_words("a short red motorcycle.", "a long red motorcycle.") == 1
    assert changed_words("a cat", "a cat") == 0
    assert changed_words("a rocket", "a rocket lifting off now") == 3
    assert has_any("make the raccoon look sideways", ["sideways"]) and not has_any("a longboat", ["long"])
    assert has_any("with its head raised", ["raise"]) and not has_any("make it up", ["upper"])
    a = Intention(intention="make it longer", source_prompt="a short car", target_prompt="a long car", confidence=0.6)
    b = Intention(intention="move it left", source_prompt="a car", target_prompt="a car on the left", confidence=0.4)
    assert diversity([a, b]) == 1.0 and diversity([a]) is None
    c = case_constraints([a, b], ["longer"], ["car"], 2, 3)
    assert c["family_any"] and c["family_top"] and c["mentions_object"] and c["k_distinct"] and c["minimal_edit"]
    assert not case_constraints([b, a], ["longer"], ["car"], 3, 3)["family_top"]

    class Att:
        def __init__(self, index, verdict):
            self.index, self.verdict = index, verdict

    nodes = ["ingest", "locate", "reason", "choose", "sample", "critique", "sample", "critique"]
    ok = trajectory_checks(nodes, [Att(0, "rejected"), Att(1, "accepted")], [a, b], ["left"], 3, True)
    assert all(ok.values())
    bad = trajectory_checks(nodes, [Att(1, "rejected"), Att(1, "accepted")], [a, b], ["left"], 3, True)
    assert not bad["no_repeats"] and not bad["confidence_order"]
