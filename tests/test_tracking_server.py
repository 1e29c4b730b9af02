"""MLflow tracking (pipeline.core.tracking) against a real `mlflow server` on loopback, started
as the cluster controller starts it (pipeline.cluster.mlflow_server) on a project's sqlite
store: live runs, replacement, KILLED marking, artifacts, and the store read back without the
server. test_tracking.py holds the same behaviours on the sqlite store itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.cluster.mlflow_server import TrackingServerError, start_server, tracking_server
from pipeline.core import tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, on the sqlite store of a project folder."""
    project = tmp_path_factory.mktemp("served")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
    try:
        srv = start_server(project)
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    yield project, srv
    srv.stop()


@pytest.fixture
def http(server, monkeypatch, request):
    """A stage's view: the project as working directory, the server as tracking URI; an
    experiment of its own per test."""
    project, srv = server
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
    monkeypatch.setattr(tracking, "_CLIENTS", {})
    monkeypatch.setattr(tracking, "_slurm_swept", {})
    return project, srv, request.node.name


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


def runs_of(exp: str, key: str, view=None) -> list:
    from mlflow.entities import ViewType

    exp_id = client().get_experiment_by_name(exp).experiment_id
    return client().search_runs([exp_id], filter_string=f"tags.run_key = '{key}'",
                                run_view_type=view or ViewType.ACTIVE_ONLY)


def test_the_server_is_http_on_loopback_with_the_projects_artifact_root(http):
    project, srv, exp = http
    assert srv.uri.startswith("http://127.0.0.1:") and tracking.is_server()
    assert srv.env == {"MLFLOW_TRACKING_URI": srv.uri}
    tracking.log_run(exp, "a", "a", {}, {}, {"m": 1.0})
    experiment = client().get_experiment_by_name(exp)
    # the same artifact root a local stage gives an experiment, so relocate keeps working
    assert experiment.artifact_location.removeprefix("file://").startswith(f"{project}/mlruns/")
    assert experiment.tags[tracking.ROOT_TAG] == str(project)


def test_a_live_run_shows_its_steps_before_it_finishes(http):
    _, _, exp = http
    parent = tracking.group_run(exp, "m/4", "m k=4", {"method": "m"})
    assert tracking.group_run(exp, "m/4", "m k=4", {"method": "m"}) == parent
    live = tracking.start_run(exp, "t/4/seed0", "t k=4 seed=0", {"lr": 0.1}, {"method": "m"}, parent=parent)
    for step in range(1, 4):
        live.log_step(step, {"step": step, "loss": 1.0 / step})
    live.flush()
    run = client().get_run(live.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["host"] == socket.gethostname() and run.data.tags["pid"] == str(os.getpid())
    assert [m.step for m in client().get_metric_history(live.run_id, "train/loss")] == [1, 2, 3]
    live.finish({"val/acc": 0.5})
    run = client().get_run(live.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val/acc"] == 0.5


def test_a_dead_local_process_is_marked_killed_through_the_server(http):
    project, srv, exp = http
    code = ("import os, sys\nfrom pipeline.core import tracking\n"
            "tracking.log_run(sys.argv[1], 'done', 'done', {}, {}, {'m': 1.0})\n"
            "live = tracking.start_run(sys.argv[1], 't/4/seed0', 'name', {}, {})\n"
            "live.log_step(1, {'loss': 1.0}); live.flush()\nsys.stdout.flush()\nos._exit(0)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"}
    proc = subprocess.run([sys.executable, "-c", code, exp], cwd=project, check=True, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": srv.uri})
    assert "View run" not in proc.stdout  # no MLflow link per status change in a stage's output
    assert [r.info.status for r in runs_of(exp, "t/4/seed0")] == ["RUNNING"]
    tracking.find_run(exp, "another/key", {})  # any stage opening the experiment sweeps it
    (killed,) = runs_of(exp, "t/4/seed0")
    assert killed.info.status == "KILLED"
    live = tracking.start_run(exp, "t/4/seed0", "name", {}, {}, resumed=True, history=[{"step": 1, "loss": 1.0}])
    (now,) = runs_of(exp, "t/4/seed0")
    assert now.info.run_id == live.run_id and now.info.start_time == killed.info.start_time


def test_replacement_keeps_the_evaluation_and_its_artifacts(http, tmp_path):
    from mlflow.entities import ViewType

    project, srv, exp = http

    def train(sha: str) -> str:
        live = tracking.start_run(exp, "t/4/seed0", "name", {"lr": 0.1}, {})
        return live.finish({"val/acc": 0.5}, tags={"weights_sha256": sha}, carry=("weights_sha256", "evaluated"))

    first = train("abc")
    report = tmp_path / "metrics.json"
    report.write_text('{"acc": 0.4}')
    tracking.add_to_run(first, {"test/acc": 0.4}, {"evaluated": "true"}, artifacts=[report], marker="evaluated")
    first_dir = Path(client().get_run(first).info.artifact_uri.removeprefix("file://"))
    assert (first_dir / "metrics.json").is_file()  # written by the client, in the project's mlruns/
    assert str(first_dir).startswith(f"{project}/mlruns/")
    second = train("abc")
    (run,) = runs_of(exp, "t/4/seed0")
    assert run.info.run_id == second and run.data.metrics["test/acc"] == 0.4
    got = Path(client().download_artifacts(second, "metrics.json", str(tmp_path / "dl")))
    assert got.read_text() == '{"acc": 0.4}'
    # the UI reads it through the server
    with urllib.request.urlopen(f"{srv.uri}/get-artifact?path=metrics.json&run_uuid={second}", timeout=30) as r:
        assert r.read() == b'{"acc": 0.4}'
    # the replaced run: deleted with its artifacts, tagged for purge_replaced (no hard delete over REST)
    (gone,) = runs_of(exp, "t/4/seed0", ViewType.DELETED_ONLY)
    assert gone.info.run_id == first and gone.data.tags[tracking.REPLACED] == "true"
    assert not first_dir.exists()


def test_a_run_on_another_node_is_judged_by_its_slurm_job(http, tmp_path, monkeypatch):
    """A run of another host is KILLED only when SLURM lists its job as ended or no more. No
    SLURM controller runs in this unit test: `squeue` is a stand-in script printing what a file
    says, in the format and with the errors of the real one."""
    _, _, exp = http
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    job = tracking.start_run(exp, "t/4/seed0", "name", {}, {})
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var)
    plain = tracking.start_run(exp, "t/4/seed1", "name", {}, {})
    tags = client().get_run(job.run_id).data.tags
    assert (tags["slurm.job_id"], tags["slurm.array_job_id"], tags["slurm.array_task_id"]) == ("4242", "4240", "2")
    for run in (job, plain):  # as a job on another node would have logged them
        client().set_tag(run.run_id, "host", "node-b")
        client().set_tag(run.run_id, "pid", "1")

    bin_dir, listing, error = tmp_path / "bin", tmp_path / "squeue.out", tmp_path / "squeue.err"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/squeue.args\n/bin/cat {listing}\n'
                      f'if [ -s {error} ]; then /bin/cat {error} >&2; exit 1; fi\n')
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    with_squeue = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"

    def sweep(listed: str, err: str = "", path: str = with_squeue) -> dict:
        listing.write_text(listed)
        error.write_text(err)
        monkeypatch.setenv("PATH", path)
        monkeypatch.setattr(tracking, "_slurm_swept", {})
        tracking.find_run(exp, "another/key", {})
        return {r.data.tags["run_key"]: r.info.status for r in client().search_runs(
            [client().get_experiment_by_name(exp).experiment_id])}

    # no squeue here, or no SLURM controller answering: nothing can see node-b's processes
    assert sweep("", path="/nonexistent") == {"t/4/seed0": "RUNNING", "t/4/seed1": "RUNNING"}
    assert sweep("", "squeue: error: Unable to contact slurm controller\n")["t/4/seed0"] == "RUNNING"
    # the job still running (or requeued: pending) keeps its run
    assert sweep("4242|RUNNING\n")["t/4/seed0"] == "RUNNING"
    assert sweep("4242|PENDING\n")["t/4/seed0"] == "RUNNING"
    assert (tmp_path / "squeue.args").read_text().splitlines()[-1] == "--noheader --format=%A|%T --jobs=4242"
    # the job ended: its run is KILLED; the run without a SLURM job stays as it is
    assert sweep("4242|TIMEOUT\n") == {"t/4/seed0": "KILLED", "t/4/seed1": "RUNNING"}
    # a job SLURM forgot (squeue: "Invalid job id specified") ended too
    client().set_tag(plain.run_id, "slurm.job_id", "4243")
    assert sweep("", "slurm_load_jobs error: Invalid job id specified\n")["t/4/seed1"] == "KILLED"


def _slurm_answers() -> bool:
    import shutil

    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _slurm_answers(), reason="no SLURM cluster answers sinfo (.ci/slurm-up starts one)")
def test_a_run_of_a_real_slurm_job_on_another_node_is_killed_once_the_job_ends(http, tmp_path, monkeypatch):
    """The same rule against a real SLURM: a run whose job is pending or running stays
    RUNNING, and is KILLED once `scancel` ended the job."""
    _, _, exp = http
    job = subprocess.run(["sbatch", "--parsable", "--wrap", "sleep 300", "-o", str(tmp_path / "job.out")],
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(";")[0]
    try:
        monkeypatch.setenv("SLURM_JOB_ID", job)
        live = tracking.start_run(exp, "t/4/seed0", "name", {}, {})
        monkeypatch.delenv("SLURM_JOB_ID")
        client().set_tag(live.run_id, "host", "node-b")  # as a job on another node would have logged it

        def status() -> str:
            monkeypatch.setattr(tracking, "_slurm_swept", {})
            tracking.find_run(exp, "another/key", {})
            return client().get_run(live.run_id).info.status

        assert tracking.slurm_active([job]) == {job} and status() == "RUNNING"
    finally:
        subprocess.run(["scancel", job], timeout=60)
    deadline = time.monotonic() + 60
    while tracking.slurm_active([job]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status() == "KILLED"


def test_pipeline_ui_prints_the_servers_pages_and_starts_nothing(http):
    project, srv, exp = http
    tracking.log_run(exp, "a", "a", {}, {}, {"m": 1.0})
    proc = subprocess.run([sys.executable, "-m", "pipeline", "ui"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    exp_id = client().get_experiment_by_name(exp).experiment_id
    assert f"{srv.uri}/#/experiments/{exp_id}?workflowType=machine_learning" in proc.stdout


def test_a_taken_port_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(TrackingServerError, match=f"port {port} on 127.0.0.1 is taken"):
            start_server(tmp_path, port=port)


def test_a_port_taken_after_it_was_picked_is_not_taken_for_the_server(tmp_path, monkeypatch):
    """The port is picked free, then `mlflow server` binds it: if another server takes it in
    between, its /health answers OK, but the jobs would log to its store. The server is known
    by the process that listens, so the start fails with the server's own log instead."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the stdlib's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
        monkeypatch.setattr("pipeline.cluster.mlflow_server._free_port", lambda host: port)
        with pytest.raises(TrackingServerError, match="exited with code"):
            start_server(tmp_path, timeout_s=60)
    finally:
        other.shutdown()


def test_an_http_uri_is_passed_on_and_nothing_started(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://mlflow.example.org")
    with tracking_server() as srv:
        assert srv.uri == "https://mlflow.example.org" and srv.process is None


def test_the_store_reads_the_same_without_the_server_and_a_dead_server_is_an_error(tmp_path, monkeypatch):
    """A moved project's store is relocated before the server opens it; a second controller on
    the same store attaches to the running server (keep: the first one leaves it running);
    what jobs logged through it is in the project's sqlite store with paths a local stage
    reads; the runs they replaced are gone for good once it stops; a server that died is an
    error, not a silent loss of runs."""
    old, project = tmp_path / "old", tmp_path / "project"
    old.mkdir()
    monkeypatch.chdir(old)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{old}/mlflow.db")
    monkeypatch.setattr(tracking, "_CLIENTS", {})
    (old / "summary.json").write_text("{}")
    before = tracking.log_run("exp", "local", "local", {}, {}, {"m": 1.0}, artifacts=[old / "summary.json"])
    old.rename(project)
    monkeypatch.chdir(project)
    local_uri = f"sqlite:///{project}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_uri)
    artifact = project / "summary.json"
    with tracking_server(project) as first:
        first.keep = True  # a controller leaving with jobs still out
    assert first.check() is None and (project / "logs/mlflow-server.json").is_file()
    with pytest.raises(TrackingServerError, match="no longer answers"):
        with tracking_server(project) as srv:  # the next controller
            assert srv.uri == first.uri and srv.process is None and srv.pid == first.pid
            monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.uri)
            monkeypatch.setattr(tracking, "_CLIENTS", {})
            served = [tracking.log_run("exp", "job", "job", {}, {}, {"m": float(i)}, artifacts=[artifact])
                      for i in range(2)]  # the second replaces the first
            os.killpg(srv.pid, signal.SIGKILL)
            first.process.wait(timeout=30)
            with pytest.raises(TrackingServerError, match="exited with code"):
                first.check()
    assert not (project / "logs/mlflow-server.json").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local_uri)
    monkeypatch.setattr(tracking, "_CLIENTS", {})
    from mlflow.entities import ViewType

    exp_id = client().get_experiment_by_name("exp").experiment_id
    runs = {r.info.run_id: r for r in client().search_runs([exp_id], run_view_type=ViewType.ALL)}
    assert set(runs) == {before, served[1]}  # the replaced one deleted for good
    for rid in (before, served[1]):
        assert runs[rid].info.artifact_uri.removeprefix("file://").startswith(f"{project}/mlruns/")
        assert [a.path for a in client().list_artifacts(rid)] == ["summary.json"]
    assert not old.exists()
    assert runs[served[1]].data.metrics["m"] == 1.0


def test_a_server_two_controllers_share_stops_with_the_last(tmp_path, monkeypatch):
    """Two controllers on one store (two studies of one project, run side by side) share its
    server: the first to finish leaves it running for the other's jobs; the last one (the other
    one gone) stops it."""
    from pipeline.cluster import mlflow_server as ms

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    state = tmp_path / "logs/mlflow-server.json"
    other = subprocess.Popen(["sleep", "120"])  # the other controller, still running
    try:
        first = start_server(tmp_path)
        assert ms._users(state, add=[socket.gethostname(), other.pid]) == [ms._me(), [socket.gethostname(), other.pid]]
        first.stop()  # this one finishes first
        assert first.process.poll() is None and ms._answers(first.uri, timeout=10)
        assert json.loads(state.read_text())["users"] == [[socket.gethostname(), other.pid]]
        other.kill()
        other.wait()
        last = start_server(tmp_path)  # the next controller attaches to it...
        assert last.pid == first.pid and last.process is None
        last.stop()  # ...and, the other one gone, stops it
        first.process.wait(timeout=30)
        assert not state.exists()
    finally:
        other.kill()
        if first.process.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)


RACE = """
import sys, time
import pandas as pd
from pipeline.core import tracking
exp, key, at = sys.argv[1], sys.argv[2], float(sys.argv[3])
frame = pd.DataFrame({"row": [0, 1, 2], "y": [1, 0, 1]})
inputs = [tracking.sample_input("synthetic k=4 seed0", frame, "data/samples/4/seed0.json")]
client = tracking._client()
run = client.create_run(tracking._experiment_id(client, exp), run_name=key, tags={"run_key": key})
time.sleep(max(0.0, at - time.time()))  # every process sends its sample at the same moment
tracking._log_inputs(client, run.info.run_id, inputs)
"""


def test_runs_logging_the_same_sample_at_once_all_get_it(http):
    """Trials at one level and seed, as jobs side by side, log the same training sample to
    their runs at the same moment: the store creates the sample's dataset row once, and every
    run is linked to it (the insert that loses the race is tried again: tracking._log_inputs,
    which start_run uses)."""
    project, srv, exp = http
    tracking.group_run(exp, "g", "g", {})  # the experiment exists, as the stages above the grid make it
    at = time.time() + 8.0  # every process imported and waiting
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE, exp, f"t{i}", str(at)], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(8)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    for i in range(8):
        (run,) = runs_of(exp, f"t{i}")
        got = client().get_run(run.info.run_id).inputs.dataset_inputs
        assert [d.dataset.name for d in got] == ["synthetic k=4 seed0"], i
