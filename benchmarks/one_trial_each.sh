# Sourced by the recipes (compare.sh, fewshot.sh): `one_trial_each "lp ft"` prints the
# `finetune.trials` value giving each method one trial at its defaults, named by the method:
# {lp: {method: lp}, ft: {method: ft}}.
one_trial_each() {
    local out="{" m
    for m in $1; do out+="$m: {method: $m}, "; done
    echo "${out%, }}"
}
