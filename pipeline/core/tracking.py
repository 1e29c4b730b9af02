"""MLflow tracking: sqlite in the working directory by default, any URI from the environment.

One experiment per dataset; one run per method × k × seed (k = 0 is the zero-shot level);
re-running a stage replaces its run (the old one is deleted once the new one is complete)
instead of piling up copies.
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
        return client.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def log_run(experiment: str, key: str, run_name: str, params: dict, tags: dict[str, str],
            metrics: dict[str, float], step_metrics: list[dict] | None = None,
            artifacts: list[Path] | None = None) -> str:
    """Create the run for `key`, log everything in batches, then replace the earlier runs of
    the key.

    Nothing half-made ever looks finished: the new run is marked FAILED from the moment it
    exists and FINISHED only once everything is logged; the earlier runs of the key are deleted
    only after that. A process killed while logging leaves the old run in place and the new one
    FAILED (the next run of the key deletes it), never an empty RUNNING run.
    """
    from mlflow.entities import Metric, Param, RunTag

    client = _client()
    exp_id = _experiment_id(client, experiment)
    earlier = client.search_runs([exp_id], filter_string=f"tags.{RUN_KEY} = '{key}'")
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_KEY: key, **tags})
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
    for i in range(0, len(batch_params), 100):
        client.log_batch(rid, params=batch_params[i:i + 100])
    for i in range(0, len(batch_metrics), 1000):
        client.log_batch(rid, metrics=batch_metrics[i:i + 1000])
    for path in artifacts or []:
        if Path(path).exists():
            client.log_artifact(rid, str(path))
    client.set_terminated(rid, status="FINISHED")
    for old in earlier:
        client.delete_run(old.info.run_id)
    return rid
