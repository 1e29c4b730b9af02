"""Cluster execution: orchestration around DVC, beside the CLI and above the stages.

One process (the controller) runs DVC; stage commands (taken unchanged from dvc.yaml) run as
submitit jobs: the grid's `finetune@…` entries on SLURM, or every stale stage of the DAG on
this machine, N at a time; each finished stage is recorded in dvc.lock only when its inputs
still match what it started with. The
library never imports this package, and this package never imports a stage module: it knows
stages by their DVC names and commands. See docs/scaling.md, "On a SLURM cluster".
"""
