"""cluster.yaml: the resources of the grid's jobs (not params: moving to another partition
invalidates nothing). Validated like params.yaml: one sentence naming the key, the value and
what is allowed, before anything is submitted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from pipeline.core.validation import Bool, Float, Int, ParamsError, Settings, Str, parse

DEFAULT_FILE = "cluster.yaml"


@dataclasses.dataclass(frozen=True)
class LocalSettings(Settings):
    """`--cluster local`: one machine, N entries at a time (`--jobs N`)."""

    # GPU indices to hand out, one set per job (empty: run on CPU, each job pinned to its own
    # share of the CPU cores)
    gpus: tuple[Int, ...] = ()
    # CPU cores to share between the jobs (default: every core this process may use)
    cpus: Int | None = None

    def __post_init__(self):
        if any(g < 0 for g in self.gpus):
            raise ValueError(f"gpus: {list(self.gpus)!r} is not allowed; GPU indices are >= 0")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"cpus: {self.cpus!r} is not allowed; at least 1")


@dataclasses.dataclass(frozen=True)
class ClusterSettings(Settings):
    """`--cluster slurm`: what every grid job asks SLURM for."""

    partition: Str | None = None
    gpus_per_job: Int = 0           # DDP entries (finetune.train.nproc_per_node > 1) ask for that many
    cpus_per_job: Int = 4
    mem_gb: Float | None = None     # None: the partition's default
    time_min: Int = 240             # the time limit; a job that reaches it is requeued and resumes
    array_parallelism: Int = 64     # at most this many elements of the array run at once
    max_requeues: Int = 3           # requeues after a time limit, per job (preemption is not counted)
    signal_delay_s: Int = 120       # SIGUSR2 this long before the time limit: checkpoint and requeue
    setup: tuple[Str, ...] = ()     # shell lines before the job (module load ..., source .venv/bin/activate)
    sbatch: dict[Str, Str | Int | Bool] = dataclasses.field(default_factory=dict)  # extra options: account, qos, constraint
    folder: Str = ".cluster"        # submission record and job logs, under the project
    poll_s: Float = 5.0             # how often the attached controller looks at the jobs
    # the interface the MLflow tracking server binds while jobs run (the compute nodes must
    # reach it: 0.0.0.0 or this host's cluster address on a real cluster)
    mlflow_host: Str = "127.0.0.1"
    local: LocalSettings = LocalSettings()

    def __post_init__(self):
        for key, low in (("gpus_per_job", 0), ("cpus_per_job", 1), ("time_min", 1), ("array_parallelism", 1),
                         ("max_requeues", 0), ("signal_delay_s", 0)):
            value = getattr(self, key)
            if value < low:
                raise ValueError(f"{key}: {value!r} is not allowed; at least {low}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb: {self.mem_gb!r} is not allowed; a positive number of GB")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s: {self.poll_s!r} is not allowed; a positive number of seconds")
        reserved = {"partition", "gpus-per-node", "gres", "cpus-per-task", "mem", "time", "array", "job-name",
                    "output", "error", "dependency"}
        clash = sorted(k for k in self.sbatch if k.replace("_", "-") in reserved)
        if clash:
            raise ValueError(f"sbatch: {clash[0]!r} is not allowed here; it is set by its own key "
                             f"(partition, gpus_per_job, cpus_per_job, mem_gb, time_min, array_parallelism)")


def load(path: str | Path | None, root: Path) -> ClusterSettings:
    """The cluster file (default: cluster.yaml at the project root, all defaults when absent).
    ParamsError starts with the file name and the dotted key."""
    named = path is not None
    file = Path(path) if named else root / DEFAULT_FILE
    if not file.is_absolute():
        file = root / file
    if not file.exists():
        if named:
            raise ParamsError(f"{file}: cluster file not found")
        return ClusterSettings()
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{file.name}: not valid YAML ({err})") from None
    try:
        return parse(ClusterSettings, data)
    except ParamsError as err:
        raise ParamsError(f"{file.name}: {err}") from None
