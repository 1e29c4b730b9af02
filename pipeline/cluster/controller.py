"""The controller: the one process that runs DVC while stage commands run elsewhere.

`repro` on SLURM: `dvc repro` of the stages above the grid; every stale `finetune@…` entry
submitted as one element of a job array; each finished entry recorded in dvc.lock (`dvc
commit`) only if its inputs (command, code, data, params: their DVC hashes) are those it was
submitted with; then `dvc repro` for selection, evaluate and report once every entry is
recorded. On this machine (the local backend): every stale stage of the DAG as a job, N at a
time, each once the stages above it are recorded, with the same check before it is recorded
(`_repro_dag`). The submission (job ids, entries, input digests, states) is written to
`<folder>/submission.json` before anything waits, so `collect` can re-attach after the
controller dies; it never resubmits or deletes what a submitted job owns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import submitit
import yaml

from pipeline.cluster import dvcstate
from pipeline.cluster.config import ClusterSettings
from pipeline.cluster.job import StageJob
from pipeline.core.progress import progress_bar

BACKENDS = ("slurm", "local", "debug")  # debug: in-process, submitit's DebugExecutor (tests)
DONE_STATES = ("recorded", "failed", "changed", "lost", "up to date", "blocked")  # the last two: local pipeline runs


class ClusterError(RuntimeError):
    """A user-facing problem: one line, exit 1."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --- the submission record ---------------------------------------------------------------


class Record:
    """`<folder>/submission.json`: one submission's jobs and what became of each entry."""

    def __init__(self, root: Path, settings: ClusterSettings):
        self.dir = root / settings.folder
        self.path = self.dir / "submission.json"
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    @property
    def entries(self) -> dict:
        return self.data.setdefault("entries", {})

    def open_entries(self) -> list[str]:
        return [k for k, v in self.entries.items() if v["state"] not in DONE_STATES]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)  # never a half-written record

    def close(self) -> None:
        """Keep the finished record beside the others (history), none is current."""
        done = self.dir / "history"
        done.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, done / f"submission-{self.data.get('submitted', _now()).replace(':', '')}.json")


class Lock:
    """One controller per project (fcntl lock on <folder>/controller.lock)."""

    def __init__(self, root: Path, settings: ClusterSettings):
        self.path = root / settings.folder / "controller.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = open(self.path, "a+")
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fd.seek(0)
            raise ClusterError(f"another controller holds {self.path} ({self.fd.read().strip() or 'unknown'}); "
                               "wait for it, or stop it and run `python -m pipeline cluster collect`") from None
        self.fd.seek(0)
        self.fd.truncate()
        self.fd.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fd.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.fd.close()


# --- backends ----------------------------------------------------------------------------


def _nproc(root: Path) -> int:
    """finetune.train.nproc_per_node from params.yaml (DDP entries ask for that many GPUs)."""
    try:
        params = yaml.safe_load((root / "params.yaml").read_text()) or {}
        return int(((params.get("finetune") or {}).get("train") or {}).get("nproc_per_node", 1) or 1)
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return 1


def slurm_executor(root: Path, settings: ClusterSettings, name: str = "finetune") -> submitit.SlurmExecutor:
    ex = submitit.SlurmExecutor(folder=root / settings.folder / "jobs" / "%j", max_num_timeout=settings.max_requeues)
    gpus = max(settings.gpus_per_job, _nproc(root)) if settings.gpus_per_job else 0
    params = dict(job_name=name, cpus_per_task=settings.cpus_per_job, time=settings.time_min,
                  array_parallelism=settings.array_parallelism, signal_delay_s=settings.signal_delay_s,
                  setup=list(settings.setup), additional_parameters=dict(settings.sbatch))
    if settings.partition:
        params["partition"] = settings.partition
    if gpus:
        params["gpus_per_node"] = gpus
    if settings.mem_gb is not None:
        params["mem"] = f"{int(settings.mem_gb * 1024)}M"
    ex.update_parameters(**params)
    return ex


class LocalSlots:
    """N slots on this machine, each with its own GPUs (local.gpus, split in order) or its own
    share of the CPU cores."""

    def __init__(self, root: Path, settings: ClusterSettings, jobs: int):
        cores = sorted(os.sched_getaffinity(0))[: settings.local.cpus or None]
        per_gpu = max(1, _nproc(root))
        gpus = list(settings.local.gpus)
        if gpus and len(gpus) < jobs * per_gpu:
            raise ClusterError(f"--jobs {jobs} with {per_gpu} GPU(s) each needs {jobs * per_gpu} GPUs; "
                               f"cluster file local.gpus lists {len(gpus)}")
        if not gpus and jobs > len(cores):
            raise ClusterError(f"--jobs {jobs} is more than the {len(cores)} CPU cores this process may use")
        share = len(cores) // jobs
        self.free = [dict(cpus=tuple(cores[i * share:(i + 1) * share]) if not gpus else (),
                          gpus=tuple(gpus[i * per_gpu:(i + 1) * per_gpu]),
                          threads=share if not gpus else None)
                     for i in range(jobs)]


MAX_AUTO_JOBS = 8  # `repro --jobs 0`: one stage per core this process may use, up to this many


def auto_jobs() -> int:
    return max(1, min(MAX_AUTO_JOBS, len(os.sched_getaffinity(0))))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _merged(slots: list[dict]) -> dict:
    """One job's resources from one or more `LocalSlots` slots."""
    if len(slots) == 1:
        return slots[0]
    threads = [s["threads"] for s in slots]
    return dict(cpus=tuple(c for s in slots for c in s["cpus"]), gpus=tuple(g for s in slots for g in s["gpus"]),
                threads=None if None in threads else sum(threads))


# --- the controller ----------------------------------------------------------------------


@dataclasses.dataclass
class Controller:
    root: Path
    settings: ClusterSettings
    backend: str
    jobs: int = 1
    echo: Callable[[str], None] = print

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ClusterError(f"--cluster {self.backend!r}: allowed values are slurm, local")
        self.record = Record(self.root, self.settings)
        self.folder = self.root / self.settings.folder / "jobs"

    # -- repro

    def repro(self, detach: bool = False, dvc_args: tuple[str, ...] = ()) -> int:
        with Lock(self.root, self.settings):
            if self.record.open_entries():
                raise ClusterError(f"{len(self.record.open_entries())} entries of an earlier submission "
                                   f"({self.record.path}) are not collected yet: run `python -m pipeline cluster "
                                   "collect` (nothing is submitted twice)")
            if self.backend == "local":
                if detach:
                    raise ClusterError("--detach needs --cluster slurm (local jobs end with this machine's session)")
                return self._repro_dag()
            upstream = dvcstate.upstream_stages(self.root)
            if upstream:
                self.echo(f"cluster: dvc repro {' '.join(upstream)}")
                rc = dvcstate.dvc(self.root, "repro", *upstream).returncode
                if rc:
                    return rc
            entries = dvcstate.stale_grid(self.root)
            if entries:
                if detach:
                    self._submit(entries, detach)
                    return 0
                with tracking_server_hook(self.root, self.settings.mlflow_host, self.echo):
                    self._submit(entries, detach)
                    rc = self._wait(final=False)
                return self._conclude() if rc is None else rc
            self.echo("cluster: every grid entry is up to date")
            return self._downstream()

    def _repro_dag(self) -> int:
        """The local backend: the whole pipeline, `jobs` stages at a time on this machine. A
        stage starts once every planned stage above it is recorded, if DVC still calls it
        changed then (as `dvc repro` decides); one DVC can restore from its run cache is
        restored by `dvc repro -s` here, every other runs as a job (its command unchanged, on
        its share of the cores) and is recorded by `dvc commit` when its inputs are those it
        started with. A failed stage stops only the stages below it."""
        plan = dvcstate.plan(self.root)
        if not plan.entries:
            self.echo("cluster: every stage is up to date")
            return 0
        with tracking_server_hook(self.root, self.settings.mlflow_host, self.echo):
            self._run_plan(plan)
        return self._conclude()

    def _run_plan(self, plan: dvcstate.Plan) -> None:
        self.record.data = {"backend": self.backend, "submitted": _now(), "jobs": self.jobs, "mode": "pipeline",
                            "folder": str(self.folder), "entries": {}}
        for name in plan.entries:
            self.record.entries[name] = {"digest": None, "state": "queued", "job_id": None, "log": None,
                                         "submitted": None, "ended": None}
        self.record.save()
        slots = LocalSlots(self.root, self.settings, self.jobs).free
        ex = submitit.LocalExecutor(folder=self.folder / "%j")
        ex.update_parameters(timeout_min=60 * 24 * 30, gpus_per_node=0)
        entries = self.record.entries
        running: dict[str, tuple[object, dict]] = {}
        poll = min(self.settings.poll_s, 0.5)
        bar = progress_bar(None, desc="stages", total=len(plan.entries))
        self.echo(f"cluster: {_n(len(plan.entries), 'stage')} to run, {self.jobs} at a time (logs under "
                  f"{self.folder.relative_to(self.root)})")
        try:
            while True:
                # the jobs that ended free their slots and are recorded before anything below them
                # starts (a commit may write inside a dependent's deps: DVC's .gitignore files)
                for name, (job, taken) in list(running.items()):
                    if job.done():
                        del running[name]
                        slots.extend(taken)
                        self._finish(name, job)
                        self.record.save()
                        bar.update(1)
                ready = []
                for name in plan.entries:
                    if entries[name]["state"] != "queued":
                        continue
                    above = [entries[u]["state"] for u in plan.after[name]]
                    if any(st in ("failed", "changed", "blocked") for st in above):
                        entries[name]["state"] = "blocked"
                        bar.update(1)
                    elif all(st in ("recorded", "up to date") for st in above):
                        ready.append(name)
                for name in ready:
                    if not slots:
                        break
                    look = dvcstate.launch_check(self.root, name)
                    if not look.stale:
                        entries[name]["state"] = "up to date"
                        bar.update(1)
                        continue
                    if look.restorable:
                        rc = dvcstate.dvc(self.root, "repro", "--single-item", name, capture=True)
                        entries[name].update(state="recorded" if rc.returncode == 0 else "failed", ended=_now(),
                                             submitted=entries[name]["submitted"] or _now())
                        if rc.returncode:
                            self.echo(f"cluster: {name}: restoring it from DVC's run cache failed: "
                                      f"{(rc.stderr or rc.stdout).strip()[-2000:]}")
                        else:
                            self.echo(f"cluster: {name} restored from DVC's run cache")
                        self.record.save()
                        bar.update(1)
                        continue
                    e = plan.entries[name]
                    entries[name]["digest"] = look.digest
                    # the one stage that can run now (the others wait for it) gets every free slot:
                    # its own parallelism (prepare's drawing processes) has the cores; params'
                    # `threads` still decides the arithmetic
                    if running or len(ready) > 1:
                        taken = [slots.pop(0)]
                    else:
                        taken, slots[:] = slots[:], []
                    job = ex.submit(StageJob(name, e.cmd, e.wdir, str(self.root), e.remove, **_merged(taken)))
                    running[name] = (job, taken)
                    self._started(name, job)
                    self.record.save()
                if not running and not any(v["state"] == "queued" for v in entries.values()):
                    break
                bar.set_postfix_str(f"{', '.join(running) or '-'} running")
                if running:
                    time.sleep(poll)
        finally:
            bar.close()

    def _submit(self, entries: list[dvcstate.Entry], detach: bool) -> None:
        digests = dvcstate.input_digests(self.root, [e.stage for e in entries])
        self.record.data = {"backend": self.backend, "submitted": _now(), "jobs": self.jobs,
                            "folder": str(self.folder), "entries": {}}
        calls = {e.stage: StageJob(e.stage, e.cmd, e.wdir, str(self.root), e.remove) for e in entries}
        for e in entries:
            self.record.entries[e.stage] = {"digest": digests[e.stage], "state": "queued", "job_id": None,
                                            "log": None, "submitted": None, "ended": None}
        if self.backend == "slurm":
            ex = slurm_executor(self.root, self.settings)
            with ex.batch():
                jobs = [ex.submit(calls[e.stage]) for e in entries]
            for e, job in zip(entries, jobs):
                self._started(e.stage, job)
            self.echo(f"cluster: submitted {len(jobs)} entries as SLURM job array {jobs[0].job_id.split('_')[0]} "
                      f"(logs under {self.folder.relative_to(self.root)})")
            if detach:
                fin = slurm_executor(self.root, self.settings, name="collect")
                fin.update_parameters(additional_parameters={**self.settings.sbatch,
                                                             "dependency": f"afterany:{jobs[0].job_id.split('_')[0]}"})
                job = fin.submit(Collect(str(self.root)))
                self.record.data["collector"] = job.job_id
                self.echo(f"cluster: detached; job {job.job_id} runs `python -m pipeline cluster collect` when the "
                          "array ends (then selection, evaluate, report). Meanwhile: `python -m pipeline cluster status`")
        else:
            if detach:
                raise ClusterError("--detach needs --cluster slurm (local jobs end with this machine's session)")
            self._calls = calls
        self.record.save()

    def _started(self, stage: str, job) -> None:
        e = self.record.entries[stage]
        e.update(state="submitted", job_id=str(job.job_id), log=str(job.paths.stdout), submitted=_now())

    # -- waiting and recording

    def _attach(self, stage: str):
        e = self.record.entries[stage]
        if self.backend == "slurm":
            return submitit.SlurmJob(folder=self.folder / "%j", job_id=e["job_id"])
        return _LocalAttached(self.folder / "%j", e["job_id"])

    def _wait(self, final: bool = True) -> int | None:
        entries = self.record.entries
        running: dict[str, object] = {k: self._attach(k) for k, v in entries.items()
                                      if v["state"] == "submitted"} if not hasattr(self, "_calls") else {}
        queue = [k for k, v in entries.items() if v["state"] == "queued"] if hasattr(self, "_calls") else []
        slots = LocalSlots(self.root, self.settings, self.jobs).free if self.backend == "local" else []
        held: dict[str, dict] = {}
        ex = None
        if self.backend == "local":
            ex = submitit.LocalExecutor(folder=self.folder / "%j")
            ex.update_parameters(timeout_min=60 * 24 * 30, gpus_per_node=0)
        elif self.backend == "debug":
            ex = submitit.DebugExecutor(folder=self.folder / "%j")
        total = len(entries)
        bar = progress_bar(None, desc="grid entries", total=total)
        bar.update(sum(v["state"] in DONE_STATES for v in entries.values()))
        try:
            while queue or running:
                while queue and (self.backend == "debug" or slots):
                    stage = queue.pop(0)
                    call = self._calls[stage]
                    if self.backend == "local":
                        held[stage] = slots.pop(0)
                        call = dataclasses.replace(call, **held[stage])
                    running[stage] = ex.submit(call)
                    self._started(stage, running[stage])
                    self.record.save()
                for stage, job in list(running.items()):
                    if job.done():
                        self._finish(stage, job)
                        del running[stage]
                        if stage in held:
                            slots.append(held.pop(stage))
                        self.record.save()
                        bar.update(1)
                bar.set_postfix_str(f"{len(running)} running, {len(queue)} waiting")
                if running:
                    time.sleep(self.settings.poll_s if self.backend != "debug" else 0)
        except KeyboardInterrupt:
            self.record.save()
            if self.backend == "slurm":
                self.echo("\ncluster: controller stopped; the jobs keep running. Later: `python -m pipeline cluster "
                          "collect` records what finished and waits for the rest")
            raise
        finally:
            bar.close()
        return self._conclude() if final else None

    def _finish(self, stage: str, job) -> None:
        """A job that ended: its error and log shown if it failed; else its stage recorded in
        dvc.lock if its inputs are those it started with."""
        e = self.record.entries[stage]
        e["ended"] = _now()
        try:
            job.result()
        except Exception as err:  # the stage failed, or the job died (sacct knows)
            e["state"] = "failed"
            self.echo(f"cluster: {stage} FAILED (job {e['job_id']}): {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
            self.echo(f"  log: {e['log']}  (and {Path(e['log']).with_suffix('.err')})")
            for line in _tail(Path(e["log"]).with_suffix(".err"), 25):
                self.echo(f"  | {line}")
            return
        state = dvcstate.record(self.root, stage, e["digest"])
        if state == "changed":
            self.echo(f"cluster: WARNING {stage} finished, but its inputs (code, params or data) changed since it was "
                      "submitted: not recorded in dvc.lock, it stays stale")
        elif state != "recorded":
            self.echo(f"cluster: {stage}: {state[-2000:]}")
            state = "failed"
        e["state"] = state

    def _conclude(self) -> int:
        entries = self.record.entries
        whole = self.record.data.get("mode") == "pipeline"  # a local run of the whole DAG: nothing after it
        bad = {k: v for k, v in entries.items() if v["state"] not in ("recorded", "up to date")}
        ran = sum(v["state"] == "recorded" for v in entries.values())
        fresh = len(entries) - ran - len(bad)
        self.echo(f"cluster: {_n(ran, 'stage')} recorded in dvc.lock" + (f", {fresh} found up to date" if fresh else "")
                  if whole else f"cluster: {ran} of {len(entries)} entries recorded in dvc.lock")
        self.record.save()
        if bad:
            for k, v in bad.items():
                self.echo(f"  {k}: {v['state']}" + (f"  log {v['log']}" if v["log"] else ""))
            if whole:
                self.echo("cluster: fix what failed and run `python -m pipeline repro --jobs "
                          f"{self.record.data.get('jobs', 1)}` again (only what is stale runs; finished seeds are kept)")
            else:
                self.echo("cluster: selection, evaluate and report not run; fix and run `python -m pipeline repro "
                          f"--cluster {self.backend}` again (only stale entries are submitted)")
            self.record.close()
            return 1
        self.record.close()
        if whole:
            return 0
        return self._downstream()

    def _downstream(self) -> int:
        left = [s for s in dvcstate.stale(self.root) if s.split("@", 1)[0] == dvcstate.GRID]
        if left:
            self.echo(f"cluster: {len(left)} grid entries are stale ({', '.join(left[:5])}…); not running the stages "
                      "after the grid")
            return 1
        self.echo("cluster: dvc repro (the stages after the grid)")
        return dvcstate.dvc(self.root, "repro").returncode

    # -- collect and status

    def collect(self) -> int:
        with Lock(self.root, self.settings):
            if not self.record.data:
                self.echo(f"cluster: nothing to collect ({self.record.path} does not exist)")
                return 0
            self.backend = self.record.data["backend"]
            if self.backend == "local" or any(v["state"] == "queued" for v in self.record.entries.values()):
                for k, v in self.record.entries.items():  # never started: the controller died first
                    if v["state"] == "queued":
                        v["state"] = "lost"
            self.echo(f"cluster: collecting {len(self.record.open_entries())} open entries of the submission of "
                      f"{self.record.data['submitted']}")
            if self.backend == "slurm" and (self.root / "logs" / "mlflow-server.json").is_file():
                # a controller left its tracking server up for the jobs: attach, stop it at the end
                with tracking_server_hook(self.root, self.settings.mlflow_host, self.echo):
                    rc = self._wait(final=False)
                return self._conclude() if rc is None else rc
            return self._wait()

    def status_lines(self) -> list[str]:
        record = self.record
        if not record.data:
            hist = sorted((record.dir / "history").glob("submission-*.json")) if (record.dir / "history").exists() else []
            if not hist:
                return [f"no submission under {record.dir}"]
            record.data = json.loads(hist[-1].read_text())
        entries = record.entries
        info = _sacct([v["job_id"] for v in entries.values() if v["job_id"]]) if record.data.get("backend") == "slurm" else {}
        rows = [("entry", "job", "state", "elapsed", "log")]
        for k, v in entries.items():
            state, elapsed = info.get(v["job_id"] or "", (None, None))
            if v["state"] in DONE_STATES or not state:
                state = v["state"] if not state else f"{v['state']} ({state})"
            if elapsed is None and v["submitted"]:
                end = dt.datetime.fromisoformat(v["ended"]) if v["ended"] else dt.datetime.now(dt.timezone.utc)
                elapsed = str(end - dt.datetime.fromisoformat(v["submitted"])).split(".")[0]
            rel = os.path.relpath(v["log"], self.root) if v["log"] else "-"
            rows.append((k, v["job_id"] or "-", state, elapsed or "-", rel))
        widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
        return ["  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]


@contextlib.contextmanager
def tracking_server_hook(root: Path, host: str, echo: Callable[[str], None]):
    """While the grid's jobs run, they log to one MLflow tracking server (an sqlite store on a
    shared filesystem breaks under writers on several hosts): `mlflow_server.tracking_server`
    starts one on the project's store unless MLFLOW_TRACKING_URI is already http (or attaches to
    the one a dead controller left running), and the jobs inherit its URI from the environment
    they are submitted from. If the controller leaves with jobs still out (an error, Ctrl-C),
    the server stays up for them; `cluster collect` attaches to it and stops it at the end."""
    from pipeline.cluster.mlflow_server import tracking_server

    before = os.environ.get("MLFLOW_TRACKING_URI")
    with tracking_server(project=root, host=host) as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.uri
        try:
            yield server
        except BaseException:
            if server.process is not None or server.pid is not None:
                server.keep = True
                echo(f"cluster: the MLflow tracking server {server.uri} stays up for the jobs still out; "
                     "`python -m pipeline cluster collect` stops it when they are recorded")
            raise
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


class _LocalAttached:
    """A local job seen from another controller: done when its result file exists or its
    process is gone."""

    def __init__(self, folder: Path, job_id: str):
        self.job = submitit.local.local.LocalJob(folder=folder, job_id=job_id)
        self.paths = self.job.paths
        self.job_id = job_id

    def done(self) -> bool:
        if self.paths.result_pickle.exists():
            return True
        try:
            os.kill(int(self.job_id), 0)
            return False
        except (OSError, ValueError):
            return True

    def result(self):
        if not self.paths.result_pickle.exists():
            raise RuntimeError(f"process {self.job_id} ended without a result")
        return self.job.result()


@dataclasses.dataclass
class Collect:
    """The last job of a detached chain: `python -m pipeline cluster collect` in the project."""

    root: str

    def __call__(self) -> int:
        rc = subprocess.call([sys.executable, "-m", "pipeline", "cluster", "collect"], cwd=self.root)
        if rc:
            raise RuntimeError(f"`python -m pipeline cluster collect` exited with {rc}")
        return rc


def _tail(path: Path, n: int) -> list[str]:
    """The last `n` lines the stage itself wrote to stderr: submitit appends its own trace of
    the job's exception (which only says the command exited non-zero) after them, so the lines
    from its "submitit ERROR" marker on are left out and the stage's error is what is shown."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return [f"({path} not readable)"]
    cut = next((i for i, line in enumerate(lines) if "submitit ERROR" in line), len(lines))
    return lines[:cut][-n:] or lines[-n:]


def _sacct(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Elapsed", "-j",
                              ",".join(sorted({j.split('_')[0] for j in job_ids}))],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    info = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            info[parts[0]] = (parts[1].split()[0], parts[2])
    return info
