"""MLflow tracking: sqlite in the working directory by default, any URI from the environment.

One experiment per dataset (tagged as a model-training experiment, so the UI opens on its
runs); one run per method × k × seed (k = 0 is the zero-shot level); re-running a stage
replaces its run (the old one is deleted for good once the new one is complete) instead of
piling up copies.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_KEY = "run_key"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> str:
    """'true' when tracked files differ from the commit (the run's code is not `git_commit`
    alone), 'false' when clean, 'unknown' outside git."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if proc.returncode != 0:
        return "unknown"
    return "true" if proc.stdout.strip() else "false"


# what the MLflow UI opens an experiment on: its training runs (not the GenAI traces page)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


_CLIENTS: dict = {}


def _client():
    """One client per tracking URI and process (opening a sqlite store checks its schema: ~0.5 s)."""
    uri = tracking_uri()
    if uri not in _CLIENTS:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        _CLIENTS[uri] = MlflowClient(uri)
    return _CLIENTS[uri]


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def _purge(client, run) -> None:
    """Delete a replaced run for good, artifacts included. MLflow's public API only
    soft-deletes (the run stays in the store, listed under "deleted"); permanent deletion is
    what `mlflow gc` does, with these two calls, for stores that support it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client.delete_run(run.info.run_id)
    store = client._tracking_client.store
    if not hasattr(store, "_hard_delete_run"):
        return
    try:
        get_artifact_repository(run.info.artifact_uri).delete_artifacts()
    except Exception:  # a moved or missing artifact folder: the record goes all the same
        pass
    store._hard_delete_run(run.info.run_id)


def sample_input(name: str, frame, source: str):
    """An MLflow dataset input (context `training`) for the rows a run trained on."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def log_run(experiment: str, key: str, run_name: str, params: dict, tags: dict[str, str],
            metrics: dict[str, float], step_metrics: list[dict] | None = None,
            artifacts: list[Path] | None = None, curves: dict[str, list[tuple[int, float]]] | None = None,
            inputs: list | None = None) -> str:
    """Create the run for `key`, log everything in batches, then replace the earlier runs of
    the key. `curves`: metric name -> (step, value) points (e.g. a metric against the level's
    training-set size, drawn by MLflow's own charts); `inputs`: dataset inputs (`sample_input`).
    Every run is tagged with the git commit and whether the work tree was dirty.

    Nothing half-made ever looks finished: the new run is marked FAILED from the moment it
    exists and FINISHED only once everything is logged; the earlier runs of the key are deleted
    only after that. A process killed while logging leaves the old run in place and the new one
    FAILED (the next run of the key deletes it), never an empty RUNNING run.
    """
    from mlflow.entities import Metric, Param, RunTag

    client = _client()
    exp_id = _experiment_id(client, experiment)
    earlier = client.search_runs([exp_id], filter_string=f"tags.{RUN_KEY} = '{key}'")
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    run = client.create_run(exp_id, run_name=run_name, tags={
        RUN_KEY: key, MLFLOW_GIT_COMMIT: git_commit(), "git_dirty": git_dirty(), **tags})
    rid = run.info.run_id
    client.set_terminated(rid, status="FAILED")  # until the last line below
    now = int(time.time() * 1000)
    flat: dict[str, str] = {}
    _flatten("", params, flat)
    batch_params = [Param(k, v) for k, v in flat.items()]
    batch_metrics = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for rec in step_metrics or []:
        step = int(rec["step"])
        batch_metrics += [Metric(f"train/{k}", float(v), now, step) for k, v in rec.items()
                          if k != "step" and v not in ("", None)]
    for name, points in (curves or {}).items():
        batch_metrics += [Metric(name, float(v), now, int(step)) for step, v in points]
    for i in range(0, len(batch_params), 100):
        client.log_batch(rid, params=batch_params[i:i + 100])
    for i in range(0, len(batch_metrics), 1000):
        client.log_batch(rid, metrics=batch_metrics[i:i + 1000])
    if inputs:
        client.log_inputs(rid, datasets=inputs)
    for path in artifacts or []:
        if Path(path).exists():
            client.log_artifact(rid, str(path))
    client.set_terminated(rid, status="FINISHED")
    for old in earlier:
        _purge(client, old)
    return rid
