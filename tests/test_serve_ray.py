"""The sampler as a service: the wire format and batch executor (no Ray), then the Ray Serve deployment against a
real local Ray (one 1-CPU replica of the tiny random model): same pixels as in-process, batches formed from concurrent
requests, a killed replica retried or reported in one line, HTTP through Serve's proxy on loopback."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageDraw

from luciddrag.agent.context import AgentContext
from luciddrag.agent.serving.client import Endpoint, ServeSampler, get_sampler, parse_endpoint, reset_clients
from luciddrag.agent.serving.protocol import (SampleJob, ServiceError, edit_result, group_jobs, image_from_b64,
                                              mask_b64, mask_from_b64, png_b64, run_sample_batch, sample_job)
from luciddrag.engine.errors import InputError
from luciddrag.engine.request import DragPair, EditRequest, GuidanceConfig

STEPS = 3
GUIDANCE = GuidanceConfig(edit_steps=2, kv_start_step=1)
DRAGS = [DragPair(handle=(20.0, 24.0), target=(40.0, 30.0))]


def _image(shift: int = 0) -> Image.Image:
    im = Image.new("RGB", (64, 64), (230, 230, 230))
    ImageDraw.Draw(im).ellipse((12 + shift, 16, 30 + shift, 34), fill=(200, 30, 30))
    return im


def _request(image: Image.Image, steps: int = STEPS, **kw) -> EditRequest:
    return EditRequest.create(image=image, drags=DRAGS, steps=steps, guidance_scale=1.0, seed=0, guidance=GUIDANCE,
                              **kw)


def _job(model: str, image: Image.Image, intentions, steps: int = STEPS) -> SampleJob:
    return sample_job(_request(image, steps), intentions, model=model)


def _ctx(model: str, steps: int = STEPS) -> AgentContext:
    return AgentContext(model=model, device="cpu", steps=steps, guidance_scale=1.0, seed=0, guidance=GUIDANCE)


# -- without Ray ----------------------------------------------------------------------------------------------

def test_endpoint_specs():
    assert parse_endpoint("") is None and parse_endpoint("local") is None
    assert parse_endpoint("serve:my-app") == Endpoint("serve", app="my-app")
    assert parse_endpoint("ray://head:10001") == Endpoint("ray", address="ray://head:10001")
    assert parse_endpoint("ray://head:10001/x").app == "x"
    assert parse_endpoint("http://127.0.0.1:8000/luciddrag-sampler/").url == "http://127.0.0.1:8000/luciddrag-sampler"
    with pytest.raises(InputError, match="LUCIDDRAG_SAMPLER"):
        parse_endpoint("redis://nope")


def test_get_sampler_is_in_process_by_default(monkeypatch):
    monkeypatch.delenv("LUCIDDRAG_SAMPLER", raising=False)
    assert get_sampler(AgentContext()) is None
    monkeypatch.setenv("LUCIDDRAG_SAMPLER", "serve:some-app")
    s = get_sampler(AgentContext())
    assert isinstance(s, ServeSampler) and s.endpoint.app == "some-app"
    assert get_sampler(AgentContext()) is s  # one client per endpoint
    reset_clients()


def test_serve_sampler_command():
    from typer.testing import CliRunner

    from luciddrag.agent.serving.cli import app

    res = CliRunner().invoke(app, ["sampler", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert all(opt in res.output for opt in ("--address", "--replicas", "--gpus-per-replica", "--max-batch-size"))
    bad = CliRunner().invoke(app, ["sampler", "--replicas", "0"])
    assert bad.exit_code == 2


def test_a_taken_http_port_is_one_line_and_exit_code_2(monkeypatch):
    """Serve's proxy reports a taken port from inside a Ray task (a traceback from another process); `luciddrag
    serve sampler` says which port, and what to do, in one line with exit code 2."""
    from typer.testing import CliRunner

    import luciddrag.agent.serving.cli as cli
    import luciddrag.agent.serving.ray_app as ray_app

    class FakeRay:
        def is_initialized(self):
            return True

    class FakeServe:
        def start(self, **kw):
            raise RuntimeError("ray::ProxyActor.ready() ... RuntimeError: Failed to bind to address '0.0.0.0:8000'.")

    monkeypatch.setattr(ray_app, "import_ray", lambda: (FakeRay(), FakeServe()))
    with pytest.raises(ray_app.PortInUseError, match=r"0\.0\.0\.0:8000 is already in use: pick another --http-port"):
        ray_app.start_sampler(ray_app.SamplerSettings(), http_host="0.0.0.0", http_port=8000)
    monkeypatch.setattr(cli, "start_sampler", ray_app.start_sampler)
    res = CliRunner().invoke(cli.app, ["sampler", "--http-host", "0.0.0.0", "--http-port", "8000"])
    assert res.exit_code == 2 and "already in use" in res.output and "Traceback" not in res.output, res.output

    class OtherFailure(FakeServe):
        def start(self, **kw):
            raise RuntimeError("something else")

    monkeypatch.setattr(ray_app, "import_ray", lambda: (FakeRay(), OtherFailure()))
    with pytest.raises(RuntimeError, match="something else"):  # not every failure is a port
        ray_app.start_sampler(ray_app.SamplerSettings(), http_host="0.0.0.0", http_port=8000)


def test_images_and_masks_cross_as_png_exactly():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(image_from_b64(png_b64(im))), np.asarray(im))
    mask = np.random.default_rng(1).random((9, 11)) > 0.5
    assert np.array_equal(mask_from_b64(mask_b64(mask)), mask)
    with pytest.raises(InputError, match="not a valid base64 PNG"):
        image_from_b64("bm90IGFuIGltYWdl")  # "not an image"


@pytest.mark.slow
def test_batch_merges_jobs_on_one_image_and_isolates_failures(tiny_editor, tiny_model_dir):
    model = str(tiny_model_dir)
    a1 = _job(model, _image(), [("a red circle", "a red circle on the right")])
    a2 = _job(model, _image(), [("a red circle", "a big red circle"), ("a red circle", "a small red circle")])
    other = _job("some/other-model", _image(5), [("x", "y")])
    assert group_jobs([a1, other, a2]) == [[0, 2], [1]]
    r1, r_other, r2 = run_sample_batch(tiny_editor, model, [a1, other, a2])
    # the two jobs on one image ran as one engine call: one inversion, three intentions in one UNet batch
    assert r1.shared_with == r2.shared_with == 2 and r1.batch_size == 3
    assert r1.stats["intentions"] == 3 and r1.stats["inversions"] == 1
    assert [tuple(p) for p in r1.prompts] == a1.intentions and [tuple(p) for p in r2.prompts] == a2.intentions
    assert len(r2.images_png) == 2 and r1.failure is None
    # a job for another model fails alone, with the project's error type and a line that says what to do
    assert r_other.failure is not None and r_other.failure.error_type == "InputError"
    with pytest.raises(InputError, match="serves .* asked for 'some/other-model'"):
        edit_result(r_other)
    res = edit_result(r1)
    assert res.image.size == (64, 64) and res.stats["shared_with"] == 2


@pytest.mark.slow
def test_a_single_job_matches_the_engine_exactly(tiny_editor, tiny_model_dir):
    job = _job(str(tiny_model_dir), _image(), [("a red circle", "a red circle on the right")])
    (reply,) = run_sample_batch(tiny_editor, str(tiny_model_dir), [job])
    direct = tiny_editor.edit(_request(_image()), intentions=[("a red circle", "a red circle on the right")])
    assert np.array_equal(np.asarray(edit_result(reply).image), np.asarray(direct.image))


# -- against a real local Ray Serve -----------------------------------------------------------------------------

APP = "luciddrag-sampler-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_app(tiny_model_dir):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'luciddrag[serve]' "
                                            "(.ci/run installs it)")
    from luciddrag.agent.serving.ray_app import SamplerSettings, import_ray, start_sampler

    from luciddrag.agent.serving.ray_app import PortInUseError

    ray, serve = import_ray()
    settings = SamplerSettings(model=str(tiny_model_dir), device="cpu", app_name=APP, num_cpus=1,
                               max_batch_size=4, batch_wait_timeout_s=0.5, health_check_period_s=1.0)
    # one CPU for the whole Ray (the machine is shared); controller and proxy reserve none; loopback only
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        for attempt in range(3):
            # a port free now can be taken before Serve's proxy binds it (Ray's own processes pick ports too):
            # the product says so in one line (PortInUseError); here, take another one
            port = _free_port()
            try:
                handle = start_sampler(settings, http_host="127.0.0.1", http_port=port)
                break
            except PortInUseError:
                serve.shutdown()
                if attempt == 2:
                    raise
        yield {"handle": handle, "model": str(tiny_model_dir), "url": f"http://127.0.0.1:{port}/{APP}"}
    finally:
        reset_clients()
        serve.shutdown()
        ray.shutdown()


def _client(**kw) -> ServeSampler:
    return ServeSampler(Endpoint("serve", app=APP), **kw)


@pytest.mark.slow
@pytest.mark.services
def test_deployment_edits_like_the_engine(serve_app, tiny_editor, monkeypatch):
    monkeypatch.setenv("LUCIDDRAG_SAMPLER", f"serve:{APP}")
    reset_clients()
    sampler = get_sampler(_ctx(serve_app["model"]))
    pairs = [("a red circle", "a red circle on the right")]
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:48, 8:56] = True  # a painted region crosses the wire as a 1-bit PNG
    res = sampler.edit(_request(_image(), mask=mask), pairs, model=serve_app["model"])
    direct = tiny_editor.edit(_request(_image(), mask=mask), intentions=pairs)
    # lossless PNG both ways; the replica runs torch with one thread, so allow float-order rounding of a level or two
    diff = np.abs(np.asarray(res.image, dtype=int) - np.asarray(direct.image, dtype=int))
    assert diff.max() <= 2, diff.max()
    assert res.stats["replica"] and res.stats["intentions"] == 1
    # the critic's tracking runs there too
    found = sampler.track(_ctx(serve_app["model"]), _image(), res.image, [(20.0, 24.0)], prompt="a red circle")
    assert len(found) == 1 and all(0 <= c < 64 for c in found[0])


@pytest.mark.slow
@pytest.mark.services
def test_concurrent_requests_form_batches(serve_app):
    client = _client()
    # 8 requests at once: two images, the first with 5 jobs (as 5 intentions of one edit sent separately would be)
    jobs = [_job(serve_app["model"], _image(0 if i < 5 else 6), [("a red circle", f"a red circle, take {i}")])
            for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(client.sample_job, jobs))
    assert all(r.failure is None for r in replies)
    assert [[tuple(p) for p in r.prompts] for r in replies] == [j.intentions for j in jobs]
    sizes = [r.batch_size for r in replies]
    assert max(sizes) >= 3, sizes  # @serve.batch gathered concurrent requests into one replica call
    shared = [r for r in replies if r.shared_with > 1]
    assert shared, [r.shared_with for r in replies]  # and same-image jobs shared one engine call
    assert all(r.stats["intentions"] >= r.shared_with for r in shared)


@pytest.mark.slow
@pytest.mark.services
def test_http_through_the_proxy(serve_app):
    client = ServeSampler(parse_endpoint(serve_app["url"]))
    reply = client.sample_job(_job(serve_app["model"], _image(), [("a red circle", "a red circle on the right")]))
    assert reply.failure is None and image_from_b64(reply.images_png[0]).size == (64, 64)
    bad = client.sample_job(_job("not/the-served-model", _image(), [("a", "b")]))
    assert bad.failure is not None and "serves" in bad.failure.message


@pytest.mark.slow
@pytest.mark.services
def test_agent_graph_and_dragbench_fan_out_sample_on_the_deployment(serve_app, tmp_path, monkeypatch):
    """With LUCIDDRAG_SAMPLER set, the agent never loads the model itself: sampling and the critic's tracking both go
    to the replica (the local loader is made to fail)."""
    import luciddrag.agent.tools as tools
    from luciddrag.agent.graph import build_graph
    from luciddrag.evals.dragbench import runner
    from luciddrag.evals.dragbench.fanout import edit_fanned_out, pending
    from luciddrag.evals.dragbench.fixtures import fixture_tasks, write_dragbench
    from luciddrag.evals.shapesworld.world import render_scene

    def no_local_model(ctx):
        raise AssertionError("the model was loaded in this process")

    monkeypatch.setattr(tools, "get_editor", no_local_model)
    monkeypatch.setenv("LUCIDDRAG_SAMPLER", f"serve:{APP}")
    reset_clients()
    sc = render_scene(5, n_shapes=1)
    cx, cy = sc.shapes[0].centroid
    ctx = AgentContext(model=serve_app["model"], device="cpu", steps=STEPS, locator="offline", reasoner="offline",
                       critic_ensemble=1, max_attempts=1, artifacts_dir=str(tmp_path / "art"))
    out = build_graph().invoke({"image": sc.image, "points": [(cx, cy), (cx - 12, cy)]}, context=ctx)
    assert out["result"] is not None and len(out["attempts"]) == 1
    assert out["attempts"][0].md_fraction is not None  # the critic tracked the handle (on the replica)

    # DragBench: the fan-out names its sampler itself; edits land in the runner's layout and resume
    monkeypatch.delenv("LUCIDDRAG_SAMPLER")
    tasks = fixture_tasks(1)
    bench = write_dragbench(tmp_path / "bench", tasks)
    cfg = runner.RunConfig(data=str(bench), method="no-intention", model=serve_app["model"], device="cpu",
                           steps=STEPS, metrics=["dai"], locator="offline", reasoner="offline")
    run_dir = tmp_path / "run"
    records = edit_fanned_out(cfg, run_dir, workers=2, sampler=f"serve:{APP}", log=lambda _: None)
    assert len(records) == len(tasks) and all(r.result and not r.errors and r.attempts == 1 for r in records)
    assert pending(cfg, run_dir) == [] and edit_fanned_out(cfg, run_dir, workers=2, sampler=f"serve:{APP}") == []

    def no_edit(*a, **kw):
        raise AssertionError("the runner edited a sample the fan-out had finished")

    monkeypatch.setattr(runner, "edit_sample", no_edit)
    scored = runner.run(cfg, run_dir, progress=False, log=lambda _: None)
    assert len(scored) == len(tasks) and all(any(k.startswith("dai_") for k in r.metrics) for r in scored)
    with pytest.raises(InputError, match="needs the sampler deployment"):
        edit_fanned_out(cfg, tmp_path / "run2", workers=2, sampler="local")


def _replica_pid(handle) -> tuple[int, str]:
    who = handle.whoami.remote().result(timeout_s=120)
    return who["pid"], who["replica"]


def _kill_during(client: ServeSampler, handle, job: SampleJob):
    """Send `job`, kill the replica (SIGKILL) while it works on it; returns the reply or the exception."""
    pid, _ = _replica_pid(handle)
    out: dict = {}

    def send():
        try:
            out["reply"] = client.sample_job(job)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.8)  # the request reached the replica (batch window 0.5 s) and the engine is running
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=240)
    assert not t.is_alive()
    return pid, out


@pytest.mark.slow
@pytest.mark.services
def test_a_killed_replica_is_retried_then_reported(serve_app):
    handle = serve_app["handle"]
    job = _job(serve_app["model"], _image(), [("a red circle", "a red circle on the right")], steps=150)
    # retried: Serve replaces the replica, the client sends the job again and gets the edit
    client = _client(retries=8, backoff_s=0.5)
    old_pid, out = _kill_during(client, handle, job)
    assert "error" not in out, out.get("error")
    assert not out["reply"].replica.startswith(f"{old_pid}@"), "the job finished before the kill: make it longer"
    assert out["reply"].failure is None and client.retried >= 1  # a new replica answered the retried job
    # no retries left: one clear line, not a Ray traceback
    client = _client(retries=0)
    _, out = _kill_during(client, handle, job)
    err = out.get("error")
    assert isinstance(err, ServiceError), out
    assert "replica died" in str(err) and "\n" not in str(err)
