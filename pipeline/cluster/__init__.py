"""Cluster execution: orchestration around DVC, beside the CLI and above the stages.

One process (the controller) runs DVC; the grid's stage commands (`finetune@…`, taken
unchanged from dvc.yaml) run as submitit jobs on SLURM or on this machine, and each finished
entry is recorded in dvc.lock only when its inputs still match what was submitted. The
library never imports this package, and this package never imports a stage module: it knows
stages by their DVC names and commands. See docs/scaling.md, "On a SLURM cluster".
"""
