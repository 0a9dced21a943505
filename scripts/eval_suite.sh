#!/usr/bin/env bash
# The paper's Table 1 for one model on lmms-eval: benchmarks x {full tokens, FastV, Turbo, Libra R=0.5/0.67/0.8}.
#
#   bash scripts/eval_suite.sh EXPORT [METHOD ...]
#
# EXPORT: an export (scripts/export.py), a training checkpoint or a transformers LLaVA directory.
# METHOD: full | export (its own merge config) | fastv | turbo | libra-0.5 | libra-0.67 | libra-0.8
#         (default: full fastv turbo libra-0.5 libra-0.67 libra-0.8; what each is: libra_train/integrations/
#         lmms_eval_suite.py). Needs lmms-eval (README, "Benchmarks with lmms-eval") and the benchmarks'
#         datasets reachable (the hub, or HF_HOME holding them).
# Environment: OUT (default results/eval_suite/<EXPORT name>), TASKS (default the paper's six:
#   gqa,scienceqa_img,textvqa_val,mme,mmbench_en_dev,pope; mmbench_en_dev asks an OpenAI judge for answers it
#   cannot match, mmbench_en_dev_static does not), BATCH_SIZE (8), LIMIT (questions per task, default all),
#   INCLUDE_PATH (a folder of extra task YAMLs), MODEL_ARGS (appended, e.g. dtype=bfloat16), LMMS_EVAL_ARGS
#   (more lmms-eval options, e.g. "--log_samples"), PYTHON.
# Writes OUT/<method>/ (lmms-eval's results + libra_stats.json) and OUT/table.md, OUT/table.json.
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,17p' "$0" >&2
    exit 2
fi
EXPORT=$1
shift
METHODS=("$@")
[ ${#METHODS[@]} -gt 0 ] || METHODS=(full fastv turbo libra-0.5 libra-0.67 libra-0.8)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
OUT=${OUT:-results/eval_suite/$(basename "$EXPORT")}
TASKS=${TASKS:-gqa,scienceqa_img,textvqa_val,mme,mmbench_en_dev,pope}
BATCH_SIZE=${BATCH_SIZE:-8}

for method in "${METHODS[@]}"; do
    method_args=$("$PYTHON" -m libra_train.integrations.lmms_eval_suite args "$EXPORT" "$method")
    model_args="pretrained=$EXPORT${method_args:+,$method_args},stats_path=$OUT/$method/libra_stats.json"
    model_args="$model_args${MODEL_ARGS:+,$MODEL_ARGS}"
    extra=()
    [ -z "${LIMIT:-}" ] || extra+=(--limit "$LIMIT")
    [ -z "${INCLUDE_PATH:-}" ] || extra+=(--include_path "$INCLUDE_PATH")
    read -r -a more <<< "${LMMS_EVAL_ARGS:-}"
    extra+=("${more[@]}")
    echo "== $method: --model_args $model_args"
    "$PYTHON" -m lmms_eval --model libra --model_args "$model_args" --tasks "$TASKS" \
        --batch_size "$BATCH_SIZE" --output_path "$OUT/$method" "${extra[@]}"
done
"$PYTHON" -m libra_train.integrations.lmms_eval_suite table "$OUT" "${METHODS[@]}"
echo "table: $OUT/table.md ($OUT/table.json)"
