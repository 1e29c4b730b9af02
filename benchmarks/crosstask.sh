#!/usr/bin/env bash
# The cross-task IIMM study (README "Across tasks: predicting the change from IIMM"): one DVC
# experiment per task of the synthetic generator (prepare.synthetic.label), on reduced settings
# (one trial, one level, a smaller train split, one retention task, no WiSE-FT sweep), queued as
# a grid and run; then `python -m pipeline crosstask` fits the change on IIMM and each transfer
# score.
#
#   benchmarks/crosstask.sh                        # 4 tasks (shape, colour, texture, size)
#   LABELS=shape,size SEEDS='[0]' benchmarks/crosstask.sh -S finetune.train.max_steps=30   # more -S: appended
#   TRIAL=ft@lr=3.0e-5 benchmarks/crosstask.sh     # the trial kept (benchmarks/keep_trials.py)
#
# Run from the project root with its environment: PYTHON (default .venv/bin/python) is the
# interpreter, its bin folder goes first on PATH (the queue starts its workers as the `dvc`
# found there, and the stages as `python`). PYTHONPATH=. makes every stage import the code of
# its experiment's copy, not the installed working tree. The tiny CLIP's pre-training (and the
# vision-only counterpart's) depends on the caption corpus, code and model params, none of which
# a label changes: it runs once and DVC's run cache restores it for the other tasks (or from an
# earlier default run of the same code).
# Environment: LABELS, TRIAL (the one trial kept; its method is the one compared), LEVEL,
# SEEDS, N_TRAIN, JOBS (parallel experiments; 1 on 2 cores), OUT (the crosstask files).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
LABELS=${LABELS:-shape,colour,texture,size}
TRIAL=${TRIAL:-ft@lr=1.0e-4}  # a trial of params.yaml, or <method>@<hparam>=<value> (benchmarks/keep_trials.py)
LEVEL=${LEVEL:-16}
SEEDS=${SEEDS:-[0,1,2]}
N_TRAIN=${N_TRAIN:-1000}
JOBS=${JOBS:-1}
OUT=${OUT:-benchmarks/out/crosstask}
BIN=$(cd "$(dirname "$PY")" && pwd)
export PATH="$BIN:$PATH" PYTHONPATH=. DVC_NO_ANALYTICS=1
dvc() { "$PY" -m dvc "$@"; }

# a queued experiment is the last commit plus changes to tracked files: untracked ones are left out
untracked=$(git status --porcelain --untracked-files=all -- pipeline stages dvc.yaml params.yaml | grep '^??' || true)
if [ -n "$untracked" ]; then
    echo "error: untracked files would be missing from the queued experiments; commit them first:" >&2
    echo "$untracked" >&2
    exit 1
fi

# the grid runs TRIAL alone: params.yaml and trials.yaml reduced to it in the workspace (queued
# experiments take the workspace's changes), put back once the grid is queued
trap '"$PY" benchmarks/keep_trials.py --restore' EXIT
METHOD=$("$PY" benchmarks/keep_trials.py "$TRIAL")

start=$(date +%s)
dvc exp run --queue \
    -S "++prepare.synthetic.label=$LABELS" \
    -S "++prepare.synthetic.n_train=$N_TRAIN" -S "++prepare.synthetic.n_heldout=200" \
    -S "finetune.methods=[$METHOD]" \
    -S "sample.levels=[$LEVEL]" -S "sample.seeds=$SEEDS" \
    -S "retention.tasks=[synthetic/heldout-shapes]" -S "evaluate.wise_alphas=[1.0]" \
    "$@"
"$PY" benchmarks/keep_trials.py --restore
dvc queue start --jobs "$JOBS"
# (the status in a variable first: `grep -q` ending the pipe early would fail it under pipefail)
while status=$(dvc queue status) && grep -qE "Queued|Running" <<<"$status"; do sleep 10; done
echo "$status"
echo "grid: $(( $(date +%s) - start )) s"
"$PY" -m pipeline crosstask --method "$METHOD" --level "$LEVEL" --out "$OUT"
