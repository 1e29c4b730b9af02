"""MLflow tracking (pipeline.core.tracking) on a real sqlite store: live runs, killed runs,
results added to a finished run, replacement and a store that moved."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import tracking

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A project folder with its own sqlite store, as a stage sees it. (An absolute URI: MLflow
    keeps one store per URI string in a process, and the tests share a process.)"""
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    monkeypatch.setattr(tracking, "_CLIENTS", {})
    return work


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri())


def runs_of(key: str) -> list:
    exp = client().get_experiment_by_name("exp")
    return client().search_runs([exp.experiment_id], filter_string=f"tags.run_key = '{key}'")


def test_a_live_run_shows_its_steps_before_it_finishes(store):
    parent = tracking.group_run("exp", "m/4", "m k=4", {"method": "m"})
    assert tracking.group_run("exp", "m/4", "m k=4", {"method": "m"}) == parent  # created once
    live = tracking.start_run("exp", "t/4/seed0", "t k=4 seed=0", {"lr": 0.1}, {"method": "m"}, parent=parent)
    for step in range(1, 4):
        live.log_step(step, {"step": step, "loss": 1.0 / step})
    live.flush()
    run = client().get_run(live.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["mlflow.parentRunId"] == parent
    assert [m.step for m in client().get_metric_history(live.run_id, "train/loss")] == [1, 2, 3]
    live.finish({"val/acc": 0.5}, tags={"weights_sha256": "abc"})
    run = client().get_run(live.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["val/acc"] == 0.5
    assert run.info.end_time >= run.info.start_time


def test_a_run_whose_process_died_is_marked_killed_not_left_running(store):
    code = ("import os\nfrom pipeline.core import tracking\n"
            "live = tracking.start_run('exp', 't/4/seed0', 'name', {}, {})\n"
            "live.log_step(1, {'loss': 1.0}); live.flush()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], cwd=store, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert [r.info.status for r in runs_of("t/4/seed0")] == ["RUNNING"]
    tracking.find_run("exp", "another/key", {})  # any stage opening the experiment sweeps it
    assert [r.info.status for r in runs_of("t/4/seed0")] == ["KILLED"]
    # the run that takes over (a resume) keeps its start time and replaces it at once
    (killed,) = runs_of("t/4/seed0")
    live = tracking.start_run("exp", "t/4/seed0", "name", {}, {}, resumed=True, history=[{"step": 1, "loss": 1.0}])
    (now,) = runs_of("t/4/seed0")
    assert now.info.run_id == live.run_id and now.info.start_time == killed.info.start_time
    assert [m.step for m in client().get_metric_history(live.run_id, "train/loss")] == [1]


def test_retraining_to_the_same_weights_keeps_the_evaluation(store, tmp_path):
    from mlflow.entities import ViewType

    def train(sha: str) -> str:
        live = tracking.start_run("exp", "t/4/seed0", "name", {"lr": 0.1}, {})
        running = [r.info.run_id for r in runs_of("t/4/seed0") if r.info.status == "RUNNING"]
        assert running == [live.run_id] and len(runs_of("t/4/seed0")) <= 2  # the finished one stays until replaced
        return live.finish({"val/acc": 0.5}, tags={"weights_sha256": sha}, carry=("weights_sha256", "evaluated"))

    first = train("abc")
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    tracking.add_to_run(first, {"test/acc": 0.4}, {"evaluated": "true", "selected": "true"},
                        artifacts=[report], marker="evaluated")
    second = train("abc")
    (run,) = runs_of("t/4/seed0")
    assert run.info.run_id == second != first
    assert run.data.metrics["test/acc"] == 0.4 and run.data.tags["selected"] == "true"
    assert [a.path for a in client().list_artifacts(second)] == ["metrics.json"]
    third = train("other")  # other weights: the evaluation does not apply to them
    (run,) = runs_of("t/4/seed0")
    assert run.info.run_id == third and "test/acc" not in run.data.metrics and "evaluated" not in run.data.tags
    exp = client().get_experiment_by_name("exp")
    assert not client().search_runs([exp.experiment_id], run_view_type=ViewType.DELETED_ONLY)  # purged


def test_an_addition_cut_short_says_so(store, monkeypatch):
    live = tracking.start_run("exp", "t/4/seed0", "name", {}, {})
    rid = live.finish({"val/acc": 0.5})

    def broken(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(tracking, "_log_metrics", broken)
    with pytest.raises(RuntimeError):
        tracking.add_to_run(rid, {"test/acc": 0.4}, {"evaluated": "true"}, marker="evaluated")
    run = client().get_run(rid)
    assert run.data.tags["evaluated"] == "partial" and run.info.status == "FINISHED"


def test_a_moved_project_logs_into_its_new_folder(store, monkeypatch, tmp_path):
    artifact = store / "metrics.json"
    artifact.write_text("{}")
    old = tracking.log_run("exp", "a", "a", {"p": 1}, {}, {"m": 1.0}, artifacts=[artifact])
    moved = tmp_path / "moved"
    shutil.move(store, moved)
    monkeypatch.chdir(moved)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{moved}/mlflow.db")
    monkeypatch.setattr(tracking, "_CLIENTS", {})  # a new process
    new = tracking.log_run("exp", "b", "b", {"p": 1}, {}, {"m": 1.0}, artifacts=[moved / "metrics.json"])
    for rid in (old, new):
        run = client().get_run(rid)
        assert run.info.artifact_uri.removeprefix("file://").startswith(str(moved)), run.info.artifact_uri
        assert [a.path for a in client().list_artifacts(rid)] == ["metrics.json"]
    assert client().get_experiment_by_name("exp").artifact_location.removeprefix("file://").startswith(str(moved))
    assert not store.exists()  # nothing written into the old folder


def test_the_displayed_uri_has_no_credentials(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret@mlflow.example.org/")
    assert tracking.display_uri() == "https://mlflow.example.org/"


def test_the_ui_links_open_the_model_training_view(store):
    tracking.log_run("exp", "a", "a", {}, {}, {"m": 1.0})
    pages = tracking.experiment_pages("http://127.0.0.1:5000/")
    exp = client().get_experiment_by_name("exp")
    assert pages == {"exp": f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"}
