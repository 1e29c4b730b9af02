#!/usr/bin/env bash
# DiVE's comparison on the built-in data (README "The robust fine-tuning field on the built-in
# data"): FLYP, FLYP+replay, SnD, ARF, DiVE, Lipsum-FT, CaRot, CLIPood, Model Stock and FTP, each
# with its own search (two Sobol draws of its learning rate, DiVE of its λ, as the default
# params.yaml searches), at k = 1 and 16 with 3 seeds, the protocol's selection (evaluate.selection:
# auto), each method's greedy soup of its two trials as a row of its own (`flyp+greedy_soup`). One DVC experiment, `robust`, run by
# `python -m pipeline study` in its own workspace (.studies/robust) sharing the project's DVC
# cache, so the tiny CLIP pre-trained by the default run is reused.
#
#   benchmarks/robust.sh                      # then: cat .studies/robust/reports/summary.md
#   benchmarks/robust.sh -S sample.seeds=[0]  # more -S: appended (a quick look)
#
# Run from the project root with its environment (PYTHON, default .venv/bin/python). On a SLURM
# cluster, CLUSTER=slurm runs each entry as a job.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
CLUSTER=${CLUSTER:-local}
LR='{loguniform: [1.0e-5, 3.0e-4]}'
search="{"
for m in flyp flyp_replay snd arf lipsum_ft carot clipood model_stock ftp; do
    search+="$m: {space: {lr: $LR}, sampler: sobol, n: 2}, "
done
search+="dive: {space: {lam: {loguniform: [1.0, 1.0e+3]}}, sampler: sobol, n: 2}}"

start=$(date +%s)
"$PY" -m pipeline study --name robust --cluster "$CLUSTER" \
    -S "finetune.methods=[flyp, flyp_replay, snd, arf, dive, lipsum_ft, carot, clipood, model_stock, ftp]" \
    -S "finetune.search=$search" -S "finetune.trials={}" \
    -S "sample.levels=[1, 16]" -S "sample.seeds=[0, 1, 2]" -S "evaluate.soups=[greedy]" \
    "$@"
echo "robust: $(( $(date +%s) - start )) s"
