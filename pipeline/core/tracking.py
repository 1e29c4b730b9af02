"""MLflow tracking: sqlite in the working directory by default, any URI from the environment.

One experiment per dataset (tagged as a model-training experiment, so the UI opens on its
runs). Runs are keyed (tag `run_key`); re-running a stage replaces the runs of its keys (the
old ones are deleted for good once the new one is complete) instead of piling up copies.

- `group_run`: a parent run that only groups (one per method and level); it never replaces.
- `start_run` -> `LiveRun`: a run that exists while its work happens (a training run from its
  first step: losses as they are logged, real start and end), replacing the key's runs when it
  finishes. A run whose process died is marked KILLED by the next stage that opens the
  experiment, never left RUNNING (`_sweep`: a run of this host whose pid is gone, or a run
  of a SLURM job that SLURM no longer lists as active; a run on another host without a SLURM
  job is left alone: nothing here can see its process).
- `add_to_run`: results added to a finished run in one transaction (evaluation of a training
  run): the metrics land together or not at all.
- `log_run`: a complete run logged at once (zero-shot, the report).

The sqlite store records absolute artifact paths; `relocate` rewrites them when the project
folder moved, so a copied project never writes into the old folder.

The same code works against a tracking server (an http(s) URI; `pipeline.cluster.mlflow_server`
starts one on the project's store for jobs on many nodes): artifacts then go straight to the
artifact paths the server hands out (the project's `mlruns/` on a shared filesystem), and the
runs a job replaces are soft-deleted through the server and tagged `project.replaced`;
`purge_replaced` deletes them for good from the sqlite store once no server holds it.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.core.env import pid_alive

DEFAULT_URI = "sqlite:///mlflow.db"
RUN_KEY = "run_key"
RUN_KIND = "run_kind"  # group | train | zeroshot | report
PARENT = "mlflow.parentRunId"
ROOT_TAG = "project.artifact_root"  # the folder the experiment's artifact paths were made in
REPLACED = "project.replaced"  # a run deleted because another replaced it (for `purge_replaced`)
# run tag -> environment variable of a SLURM job (each element of a job array has its own job id)
SLURM_TAGS = {"slurm.job_id": "SLURM_JOB_ID", "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
              "slurm.array_task_id": "SLURM_ARRAY_TASK_ID", "slurm.cluster": "SLURM_CLUSTER_NAME"}


# set by `python -m pipeline study` in each of its workspaces: that experiment's name
STUDY_ENV = "PIPELINE_STUDY_EXPERIMENT"


def experiment_name(dataset: str) -> str:
    """The MLflow experiment that holds a dataset's runs: the dataset's name, or `<dataset>
    [<study experiment>]` in a workspace of `python -m pipeline study`, so that a study's runs
    never replace the project's own runs (or another study experiment's) of the same trial,
    level and seed. Where runs are logged, never what a stage computes."""
    study = os.environ.get(STUDY_ENV, "").strip()
    return f"{dataset} [{study}]" if study else dataset


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def is_server(uri: str | None = None) -> bool:
    """Whether the tracking URI is a tracking server (http or https)."""
    return (uri or tracking_uri()).startswith(("http://", "https://"))


def display_uri() -> str:
    """The tracking URI without credentials (user:password@ in a server URI)."""
    import re

    return re.sub(r"//[^/@]*@", "//", tracking_uri())


def experiment_pages(base_url: str) -> dict[str, str]:
    """name -> UI page of each of this project's experiments, in the UI's model-training view.
    (MLflow 3's UI opens on its GenAI pages unless the link says `workflowType=machine_learning`
    or the browser remembers the other choice; the experiment tag alone does not switch it.)"""
    client = _client()
    out = {}
    for exp in client.search_experiments():
        if exp.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]:
            out[exp.name] = f"{base_url.rstrip('/')}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    return out


def answer_pages(base_url: str) -> dict[str, str]:
    """label -> UI page of each answer, newest first by kind: the latest cross-experiment
    comparison (`python -m pipeline compare`), then each experiment's latest report run, opened
    on its artifacts tab at the file that answers (`compare.md`, `summary.md`)."""
    client = _client()
    base = base_url.rstrip("/")
    exps = {e.experiment_id: e.name for e in client.search_experiments()
            if e.tags.get(EXPERIMENT_KIND[0]) == EXPERIMENT_KIND[1]}
    out: dict[str, str] = {}
    if not exps:
        return out
    for kind, label, first in (("compare", "across experiments: ranks, CD diagrams", "compare.md"),
                               ("report", "report: tests per level", "summary.md")):
        runs = client.search_runs(list(exps), filter_string=f"tags.{RUN_KIND} = '{kind}' and attributes.status = "
                                                            "'FINISHED'", order_by=["attributes.start_time DESC"])
        seen = set()
        for run in runs:
            eid = run.info.experiment_id
            if eid in seen:
                continue
            seen.add(eid)
            out[label if kind == "compare" else f"{exps[eid]} {label}"] = f"{base}/#/experiments/{eid}/runs/{run.info.run_id}/artifacts/{first}"
    return out


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

        # through a server, MLflow prints two "View run" lines (and reads the run once more)
        # at every status change: two per run in `log_run`, noise in the stages' output
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

        mlflow.set_tracking_uri(uri)
        relocate(uri)
        _CLIENTS[uri] = MlflowClient(uri)
    return _CLIENTS[uri]


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).resolve()


def relocate(uri: str) -> int:
    """Point a moved sqlite store's artifact paths at its new folder.

    MLflow stores each experiment's artifact location and each run's artifact URI as absolute
    paths (`<folder>/mlruns/...`), so a project moved or copied elsewhere would log into (and
    read from) the old folder. Each experiment records the folder its paths were made in
    (tag `project.artifact_root`); when the store now sits in another folder, every path under
    the old one is rewritten to the same place under the new one. Artifact paths elsewhere (a
    server, a bucket) are left alone. Returns the number of rows rewritten."""
    db = _sqlite_file(uri)
    if db is None or not db.is_file():
        return 0
    new = str(db.parent)
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT experiment_id, value FROM experiment_tags WHERE key = ?", (ROOT_TAG,)).fetchall()
    except sqlite3.OperationalError:  # not (yet) an MLflow store
        con.close()
        return 0
    changed = 0
    with con:
        for exp_id, old in rows:
            if old == new:
                continue
            for table, column, where in (("experiments", "artifact_location", "experiment_id"),
                                         ("runs", "artifact_uri", "experiment_id")):
                for prefix in ("file://", ""):
                    changed += con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {where} = ? AND substr({column}, 1, ?) = ?",
                        (prefix + new, len(prefix + old) + 1, exp_id, len(prefix + old) + 1, prefix + old + "/"),
                    ).rowcount
            con.execute("UPDATE experiment_tags SET value = ? WHERE experiment_id = ? AND key = ?",
                        (new, exp_id, ROOT_TAG))
    con.close()
    return changed


def _artifact_root(exp) -> str | None:
    """The folder an experiment's artifact paths were made in: the sqlite store's folder, or,
    through a server, this project's folder when the server puts the experiment's artifacts in
    its `mlruns/` (as `pipeline.cluster.mlflow_server` does); None otherwise (a server's own
    storage: nothing `relocate` may rewrite)."""
    db = _sqlite_file(tracking_uri())
    if db is not None:
        return str(db.parent)
    location = exp.artifact_location.removeprefix("file://")
    project = Path.cwd().resolve()
    return str(project) if location.startswith(f"{project / 'mlruns'}/") else None


def _experiment_id(client, name: str) -> str:
    name = experiment_name(name)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp = client.get_experiment(client.create_experiment(name, tags=dict([EXPERIMENT_KIND])))
    exp_id = exp.experiment_id
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp_id)
    root = _artifact_root(exp)
    tags = dict([EXPERIMENT_KIND] + ([(ROOT_TAG, root)] if root else []))
    for k, v in tags.items():
        if k not in exp.tags or (k == EXPERIMENT_KIND[0] and exp.tags[k] != v):
            client.set_experiment_tag(exp_id, k, v)
    _sweep(client, exp_id)
    return exp_id


# SLURM job states after which none of the job's processes runs (squeue lists them a while)
_SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}
_SLURM_SWEEP_S = 60.0  # ask SLURM about an experiment's runs at most this often per process
_slurm_swept: dict[tuple[str, str], float] = {}


def slurm_active(job_ids: list[str]) -> set[str] | None:
    """The job ids among `job_ids` that SLURM lists as not yet ended (pending, running,
    requeued, completing...), or None when SLURM cannot be asked (no `squeue`, no controller)."""
    import shutil

    squeue = shutil.which("squeue")
    if squeue is None or not job_ids:
        return None
    try:
        proc = subprocess.run([squeue, "--noheader", "--format=%A|%T", f"--jobs={','.join(job_ids)}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # one job id that SLURM forgot: an error, not an empty list
        return set() if "invalid job id" in proc.stderr.lower() else None
    active = set()
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job and (state.split() or ["?"])[0] not in _SLURM_ENDED:
            active.add(job)
    return active


def _sweep(client, exp_id: str) -> None:
    """Mark KILLED the RUNNING runs whose process is gone: a killed stage's run never stays
    RUNNING once another stage opens the experiment. A run of this host is judged by its pid;
    a run of another host only by its SLURM job (tag `slurm.job_id`): it was killed when SLURM
    lists the job as ended or no more (a requeued job is still active: its next attempt takes
    the run over). A run of another host without a SLURM job, or while SLURM cannot be asked,
    is left alone: its process may well be running."""
    def killed(run) -> None:
        # read again once the process is known gone: it may have finished its run just before
        if client.get_run(run.info.run_id).info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")

    here = socket.gethostname()
    remote: dict[str, list] = {}
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("host") == here and tags.get("pid", "").isdigit():
            if not pid_alive(int(tags["pid"])):
                killed(run)
        elif tags.get("slurm.job_id", "").isdigit():
            remote.setdefault(tags["slurm.job_id"], []).append(run)
    key = (tracking_uri(), exp_id)
    if not remote or time.monotonic() - _slurm_swept.get(key, -_SLURM_SWEEP_S) < _SLURM_SWEEP_S:
        return
    _slurm_swept[key] = time.monotonic()
    active = slurm_active(sorted(remote))
    if active is None:
        return
    for job, runs in remote.items():
        if job not in active:
            for run in runs:
                killed(run)


def _runs(client, exp_id: str, key: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.{RUN_KEY} = '{key}'")


def _base_tags(key: str, kind: str) -> dict[str, str]:
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    slurm = {tag: os.environ[var] for tag, var in SLURM_TAGS.items() if os.environ.get(var)}
    return {RUN_KEY: key, RUN_KIND: kind, MLFLOW_GIT_COMMIT: git_commit(), "git_dirty": git_dirty(),
            "host": socket.gethostname(), "pid": str(os.getpid()), **slurm}


def _purge(client, run) -> None:
    """Delete a replaced run for good, artifacts included. MLflow's public API only
    soft-deletes (the run stays in the store, listed under "deleted"); permanent deletion is
    what `mlflow gc` does, with these two calls, for stores that support it. Through a
    server (no permanent deletion over REST) the run is tagged `project.replaced` and
    soft-deleted, its artifacts deleted where they are; `purge_replaced` finishes the job."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    store = client._tracking_client.store
    permanent = hasattr(store, "_hard_delete_run")
    if not permanent:
        client.set_tag(run.info.run_id, REPLACED, "true")
    client.delete_run(run.info.run_id)
    try:
        get_artifact_repository(run.info.artifact_uri).delete_artifacts()
    except Exception:  # a moved or missing artifact folder: the record goes all the same
        pass
    if permanent:
        store._hard_delete_run(run.info.run_id)


def purge_replaced(uri: str) -> int:
    """Delete for good the runs a server soft-deleted as replaced (tag `project.replaced`) from
    the store at `uri` (a database URI, not a server: run it when the server is stopped or
    before it starts). Returns how many."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    db = _sqlite_file(uri)
    if is_server(uri) or (db is not None and not db.is_file()):
        return 0
    client = MlflowClient(uri)
    store = client._tracking_client.store
    if not hasattr(store, "_hard_delete_run"):
        return 0
    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    count = 0
    while exp_ids:
        gone = client.search_runs(exp_ids, filter_string=f"tags.`{REPLACED}` = 'true'",
                                  run_view_type=ViewType.DELETED_ONLY)
        if not gone:
            break
        for run in gone:
            store._hard_delete_run(run.info.run_id)
        count += len(gone)
    return count


def sample_input(name: str, frame, source: str):
    """An MLflow dataset input (context `training`) for the rows a run trained on."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = mlflow.data.from_pandas(frame, source=source, name=name)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def _log_inputs(client, run_id: str, inputs: list, tries: int = 5) -> None:
    """`log_inputs`, again when it lost a race: the store gets or creates the dataset row of an
    input (experiment, name, digest) in two steps, so two runs that log the same sample at once
    (two trials at one level and seed, as jobs side by side) can both find none and both
    insert; the second insert fails on the unique key and its transaction is rolled back. The
    next try finds the row and links it. Any other error is raised as it is."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if "UNIQUE constraint failed" not in str(err) or attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def _params_batches(params: dict):
    from mlflow.entities import Param

    flat: dict[str, str] = {}
    _flatten("", params, flat)
    items = [Param(k, v) for k, v in flat.items()]
    return [items[i:i + 100] for i in range(0, len(items), 100)]


def _metric_list(metrics: dict[str, float], now: int, step: int = 0) -> list:
    from mlflow.entities import Metric

    return [Metric(k, float(v), now, step) for k, v in metrics.items()]


def _log_metrics(client, rid: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[i:i + 1000])


def _now() -> int:
    return int(time.time() * 1000)


def group_run(experiment: str, key: str, run_name: str, tags: dict[str, str]) -> str:
    """The parent run of `key` (created once, FINISHED at once: it holds no work of its own,
    only what its children's stages add to it); its id."""
    client = _client()
    exp_id = _experiment_id(client, experiment)
    found = [r for r in _runs(client, exp_id, key) if r.data.tags.get(RUN_KIND) == "group"]
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**_base_tags(key, "group"), **tags})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


class LiveRun:
    """A run logged while its work happens. `log_step` buffers per-step values and writes them
    every `flush_s` seconds (a sqlite write costs milliseconds, a training step may cost less);
    `finish` logs the results, carries over what `carry` says from the finished run it
    replaces, marks it FINISHED and deletes the replaced run for good. A process killed before
    `finish` leaves its run RUNNING until the next stage opens the experiment and marks it
    KILLED."""

    def __init__(self, client, run_id: str, replaces: list, flush_s: float = 5.0):
        self.client, self.run_id, self.replaces, self.flush_s = client, run_id, replaces, flush_s
        self._buffer: list = []
        self._last = time.monotonic()

    def log_step(self, step: int, values: dict, prefix: str = "train/") -> None:
        from mlflow.entities import Metric

        now = _now()
        self._buffer += [Metric(f"{prefix}{k}", float(v), now, int(step)) for k, v in values.items()
                         if k != "step" and v not in ("", None)]
        if time.monotonic() - self._last >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            _log_metrics(self.client, self.run_id, self._buffer)
            self._buffer = []
        self._last = time.monotonic()

    def finish(self, metrics: dict[str, float], tags: dict[str, str] | None = None,
               carry: tuple[str, str] | None = None) -> str:
        """`carry = (tag, marker)`: from the replaced run whose `tag` equals this run's (e.g. the
        weights digest) and whose `marker` tag is `true`, copy what was added to it later
        (metrics and tags this run lacks, artifacts): re-training to the same weights keeps
        their evaluation, since nothing downstream re-runs for unchanged outputs."""
        from mlflow.entities import RunTag

        self.flush()
        tags = dict(tags or {})
        _log_metrics(self.client, self.run_id, _metric_list(metrics, _now()))
        if carry is not None:
            tag, marker = carry
            same = [r for r in self.replaces if tag in tags and r.data.tags.get(tag) == tags[tag]
                    and r.data.tags.get(marker) == "true"]
            if same:
                snapshot = _Snapshot(self.client, same[0])
                try:
                    snapshot.copy_to(self.client, self.run_id, set(metrics), set(tags))
                finally:
                    snapshot.close()
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(self.run_id, status="FINISHED")
        for old in self.replaces:
            _purge(self.client, old)
        self.replaces = []
        return self.run_id

    def fail(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status="FAILED")


# tags every run gets for itself (never carried over from a replaced run)
_OWN_TAGS = {RUN_KEY, RUN_KIND, PARENT, "git_dirty", "host", "pid", REPLACED, *SLURM_TAGS}


class _Snapshot:
    """What a replaced run held (metrics, tags, artifacts in a temporary folder), for
    `LiveRun.finish` to carry over."""

    def __init__(self, client, run):
        import tempfile

        self.metrics = dict(run.data.metrics)
        self.tags = dict(run.data.tags)
        self._tmp = tempfile.TemporaryDirectory(prefix="mlflow-replaced-")
        self.artifacts = None
        try:
            if client.list_artifacts(run.info.run_id):
                self.artifacts = client.download_artifacts(run.info.run_id, "", self._tmp.name)
        except Exception:  # a missing artifact folder: metrics and tags still carry over
            self.artifacts = None

    def copy_to(self, client, run_id: str, metrics: set, tags: set) -> None:
        from mlflow.entities import Metric, RunTag

        now = _now()
        extra = [Metric(k, v, now, 0) for k, v in self.metrics.items()
                 if k not in metrics and not k.startswith("train/")]
        extra_tags = [RunTag(k, v) for k, v in self.tags.items()
                      if k not in tags and k not in _OWN_TAGS and not k.startswith("mlflow.")]
        if self.artifacts:
            client.log_artifacts(run_id, self.artifacts)
        _log_metrics(client, run_id, extra)
        client.log_batch(run_id, tags=extra_tags)

    def close(self) -> None:
        self._tmp.cleanup()


def start_run(experiment: str, key: str, run_name: str, params: dict, tags: dict[str, str],
              parent: str | None = None, history: list[dict] | None = None, resumed: bool = False,
              inputs: list | None = None) -> LiveRun:
    """Open the run of `key` for work that starts now. Runs of the key that never finished are
    deleted at once (a resumed run takes over the start time of the interrupted one and
    `history`, the steps logged before the interruption); a finished one stays until the new
    run finishes and replaces it (`LiveRun.finish`), so a run killed on the way loses nothing
    the finished one held: one finished run per key, and at most one more while it trains."""
    client = _client()
    exp_id = _experiment_id(client, experiment)
    earlier = _runs(client, exp_id, key)
    unfinished = [r for r in earlier if r.info.status != "FINISHED"]
    start = min((r.info.start_time for r in unfinished), default=None) if resumed else None
    for old in unfinished:
        _purge(client, old)
    run_tags = {**_base_tags(key, tags.pop(RUN_KIND, "train")), **tags}
    if parent:
        run_tags[PARENT] = parent
    run = client.create_run(exp_id, start_time=start, run_name=run_name, tags=run_tags)
    rid = run.info.run_id
    for batch in _params_batches(params):
        client.log_batch(rid, params=batch)
    if inputs:
        _log_inputs(client, rid, inputs)
    live = LiveRun(client, rid, [r for r in earlier if r.info.status == "FINISHED"])
    for rec in history or []:
        live.log_step(int(rec["step"]), rec)
    live.flush()
    return live


def find_run(experiment: str, key: str, tags: dict[str, str]):
    """The FINISHED run of `key` whose tags include `tags`, or None."""
    client = _client()
    exp_id = _experiment_id(client, experiment)
    for run in _runs(client, exp_id, key):
        if run.info.status == "FINISHED" and all(run.data.tags.get(k) == v for k, v in tags.items()):
            return run
    return None


def add_to_run(run_id: str, metrics: dict[str, float], tags: dict[str, str],
               artifacts: list[Path] | None = None, inputs: list | None = None, marker: str | None = None) -> None:
    """Add results to a finished run, then move its end time to now. Values of metrics logged
    before are replaced. With `marker` (a tag key in `tags`), that tag reads `partial` until
    every metric and artifact landed and gets its value last: a process killed on the way
    leaves a run that says so (MLflow's SQL store commits metrics and tags separately)."""
    from mlflow.entities import RunTag

    client = _client()
    if marker is not None:
        client.set_tag(run_id, marker, "partial")
    for path in artifacts or []:
        if Path(path).exists():
            client.log_artifact(run_id, str(path))
    if inputs:
        _log_inputs(client, run_id, inputs)
    _log_metrics(client, run_id, _metric_list(metrics, _now()))
    ordered = sorted(tags.items(), key=lambda kv: kv[0] == marker)  # the marker last
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in ordered])
    client.set_terminated(run_id, status="FINISHED")


def replace_run(run) -> None:
    """Delete a run for good (e.g. a run whose added results no longer apply)."""
    _purge(_client(), run)


def log_run(experiment: str, key: str, run_name: str, params: dict, tags: dict[str, str],
            metrics: dict[str, float], step_metrics: list[dict] | None = None,
            artifacts: list[Path] | None = None, curves: dict[str, list[tuple[int, float]]] | None = None,
            inputs: list | None = None, parent: str | None = None, start_time: int | None = None,
            end_time: int | None = None) -> str:
    """Create the run for `key`, log everything in batches, then replace the earlier runs of
    the key. `curves`: metric name -> (step, value) points (e.g. a metric against the level's
    training-set size, drawn by MLflow's own charts); `inputs`: dataset inputs (`sample_input`);
    `start_time`/`end_time` (ms): when the work it records happened, if not now.
    Every run is tagged with the git commit and whether the work tree was dirty.

    Nothing half-made ever looks finished: the new run is marked FAILED from the moment it
    exists and FINISHED only once everything is logged; the earlier runs of the key are deleted
    only after that. A process killed while logging leaves the old run in place and the new one
    FAILED (the next run of the key deletes it), never an empty RUNNING run.
    """
    from mlflow.entities import Metric

    client = _client()
    exp_id = _experiment_id(client, experiment)
    earlier = _runs(client, exp_id, key)
    run_tags = {**_base_tags(key, tags.pop(RUN_KIND, "result")), **tags}
    if parent:
        run_tags[PARENT] = parent
    run = client.create_run(exp_id, run_name=run_name, tags=run_tags, start_time=start_time)
    rid = run.info.run_id
    client.set_terminated(rid, status="FAILED")  # until the last line below
    now = _now()
    batch_metrics = _metric_list(metrics, now)
    for rec in step_metrics or []:
        step = int(rec["step"])
        batch_metrics += [Metric(f"train/{k}", float(v), now, step) for k, v in rec.items()
                          if k != "step" and v not in ("", None)]
    for name, points in (curves or {}).items():
        batch_metrics += [Metric(name, float(v), now, int(step)) for step, v in points]
    for batch in _params_batches(params):
        client.log_batch(rid, params=batch)
    _log_metrics(client, rid, batch_metrics)
    if inputs:
        _log_inputs(client, rid, inputs)
    for path in artifacts or []:
        if Path(path).exists():
            client.log_artifact(rid, str(path))
    client.set_terminated(rid, status="FINISHED", end_time=end_time)
    for old in earlier:
        _purge(client, old)
    return rid
