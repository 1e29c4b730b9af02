#!/usr/bin/env bash
# A critical-difference diagram from a real multi-task run (README "Which differences are real"):
# one DVC experiment per task of the synthetic generator (prepare.synthetic.label), each with a
# few methods (one trial each, at its defaults), two levels and three seeds, on the reduced
# settings of benchmarks/crosstask.sh (a smaller train split, one retention task, no WiSE-FT
# sweep), run by `python -m pipeline study` (workspaces .studies/compare-<label>, sharing the
# project's DVC cache: the tiny CLIP is pre-trained once); then `python -m pipeline compare`
# ranks the methods over the tasks (experiment × level) and tests them within each experiment.
#
#   benchmarks/compare.sh                                   # shape, colour, texture, size; lp, ft, flyp, clip_adapter
#   LABELS=shape,size METHODS="lp ft" benchmarks/compare.sh -S sample.seeds=[0]   # more -S: appended
#
# Run from the project root with its environment (PYTHON, default .venv/bin/python).
# Environment: LABELS, METHODS, LEVELS, SEEDS, N_TRAIN, CLUSTER (local | slurm), OUT.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
LABELS=${LABELS:-shape,colour,texture,size}
METHODS=${METHODS:-lp ft flyp clip_adapter}
LEVELS=${LEVELS:-[1, 16]}
SEEDS=${SEEDS:-[0, 1, 2]}
N_TRAIN=${N_TRAIN:-1000}
CLUSTER=${CLUSTER:-local}
OUT=${OUT:-benchmarks/out/compare}
source "$(dirname "$0")/one_trial_each.sh"
trials=$(one_trial_each "$METHODS")

start=$(date +%s)
"$PY" -m pipeline study --name compare --cluster "$CLUSTER" \
    -S "prepare.synthetic.label=$LABELS" \
    -S "prepare.synthetic.n_train=$N_TRAIN" -S "prepare.synthetic.n_heldout=200" \
    -S "finetune.methods=[${METHODS// /, }]" -S "finetune.search={}" -S "finetune.trials=$trials" \
    -S "sample.levels=$LEVELS" -S "sample.seeds=$SEEDS" \
    -S "retention.tasks=[synthetic/heldout-shapes]" -S "evaluate.wise_alphas=[1.0]" \
    "$@"
echo "grid: $(( $(date +%s) - start )) s"
"$PY" -m pipeline compare --out "$OUT"
echo "total: $(( $(date +%s) - start )) s"
