#!/usr/bin/env bash
# The few-shot field on the built-in data (README "The few-shot baselines on the built-in data"):
# CoOp, CoCoOp, MaPLe, VPT-deep, AdaptFormer, Tip-Adapter, Tip-Adapter-F, LP++, CLAP and
# CLIP-LoRA beside LP, FT, CLIP-Adapter, LoRA and R-Adapter (zero-shot is the report's k = 0
# row), at k = 1, 4 and 16 with 3 seeds. Each method runs its paper's recipe (one trial: its
# defaults, `python -m pipeline methods`), as the few-shot literature reports them; what those
# recipes leave to validation is still selected on the protocol's split (Tip-Adapter's α and β,
# Tip-Adapter-F's epoch, WiSE-FT's α). One DVC experiment, `fewshot`, run by
# `python -m pipeline study` in its own workspace (.studies/fewshot) sharing the project's DVC
# cache, so the tiny CLIP pre-trained by the default run is reused.
#
#   benchmarks/fewshot.sh                       # then: cat .studies/fewshot/reports/summary.md
#   benchmarks/fewshot.sh -S sample.seeds=[0]   # more -S: appended (a quick look)
#
# Run from the project root with its environment (PYTHON, default .venv/bin/python). On a SLURM
# cluster, CLUSTER=slurm runs each entry as a job.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
CLUSTER=${CLUSTER:-local}
METHODS="lp ft clip_adapter lora radapter coop cocoop maple vpt_deep adaptformer tip_adapter tip_adapter_f lp_pp clap clip_lora"
source "$(dirname "$0")/one_trial_each.sh"
trials=$(one_trial_each "$METHODS")

start=$(date +%s)
"$PY" -m pipeline study --name fewshot --cluster "$CLUSTER" \
    -S "finetune.methods=[${METHODS// /, }]" \
    -S "finetune.search={}" -S "finetune.trials=$trials" \
    -S "sample.levels=[1, 4, 16]" -S "sample.seeds=[0, 1, 2]" \
    "$@"
echo "fewshot: $(( $(date +%s) - start )) s"
