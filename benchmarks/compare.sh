#!/usr/bin/env bash
# A critical-difference diagram from a real multi-task run (README "Which differences are real"):
# one DVC experiment per task of the synthetic generator (prepare.synthetic.label), each with a
# few methods (one trial each), two levels and three seeds, on the reduced settings of
# benchmarks/crosstask.sh (a smaller train split, one retention task, no WiSE-FT sweep); then
# `python -m pipeline compare` ranks the methods over the tasks (experiment × level) and tests
# them within each experiment.
#
#   benchmarks/compare.sh                                   # shape, colour, size; lp and ft; k = 1, 16
#   LABELS=shape,colour,size,texture TRIALS=lp@lr=1.0e-2,ft@lr=1.0e-4,flyp@lr=1.0e-4 benchmarks/compare.sh
#
# Run from the project root of a committed tree (queued experiments are the last commit plus
# changes to tracked files), with its environment: PYTHON (default .venv/bin/python).
# Environment: LABELS, TRIALS (one per method compared), LEVELS, SEEDS, N_TRAIN, JOBS, OUT.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
LABELS=${LABELS:-shape,colour,size}
TRIALS=${TRIALS:-lp@lr=1.0e-2,ft@lr=1.0e-4}  # trials of params.yaml or <method>@<hparam>=<value>
LEVELS=${LEVELS:-[1,16]}
SEEDS=${SEEDS:-[0,1,2]}
N_TRAIN=${N_TRAIN:-1000}
JOBS=${JOBS:-1}
OUT=${OUT:-benchmarks/out/compare}
BIN=$(cd "$(dirname "$PY")" && pwd)
export PATH="$BIN:$PATH" PYTHONPATH=. DVC_NO_ANALYTICS=1
dvc() { "$PY" -m dvc "$@"; }

untracked=$(git status --porcelain --untracked-files=all -- pipeline stages dvc.yaml params.yaml | grep '^??' || true)
if [ -n "$untracked" ]; then
    echo "error: untracked files would be missing from the queued experiments; commit them first:" >&2
    echo "$untracked" >&2
    exit 1
fi

# the grid runs TRIALS alone: params.yaml and trials.yaml reduced to them in the workspace (queued
# experiments take the workspace's changes), put back once the grid is queued
trap '"$PY" benchmarks/keep_trials.py --restore' EXIT
METHODS=$("$PY" benchmarks/keep_trials.py "$TRIALS")

start=$(date +%s)
dvc exp run --queue \
    -S "++prepare.synthetic.label=$LABELS" \
    -S "++prepare.synthetic.n_train=$N_TRAIN" -S "++prepare.synthetic.n_heldout=200" \
    -S "finetune.methods=[$METHODS]" \
    -S "sample.levels=$LEVELS" -S "sample.seeds=$SEEDS" \
    -S "retention.tasks=[synthetic/heldout-shapes]" -S "evaluate.wise_alphas=[1.0]" \
    "$@"
"$PY" benchmarks/keep_trials.py --restore
dvc queue start --jobs "$JOBS"
while status=$(dvc queue status) && grep -qE "Queued|Running" <<<"$status"; do sleep 10; done
echo "$status"
echo "grid: $(( $(date +%s) - start )) s"
"$PY" -m pipeline compare --out "$OUT"
echo "total: $(( $(date +%s) - start )) s"
