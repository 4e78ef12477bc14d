#!/usr/bin/env bash
# The main job on its embedded default (sets the environment up first when it is missing): the whole TRACT
# pipeline of configs/quickstart.yaml (stage 1 -> CoT generation -> stage 2 -> evaluation) on a local Ray,
# tracked in ./mlflow.db. Extra arguments are config overrides (section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
SHARED=${TRACT_SHARED_DATA:-../shared/data}
DATA="$SHARED/prometheus-eval/vicuna_eval.json"
exec tract-dist pipeline configs/quickstart.yaml "data.train_path=$DATA" \
  "evaluation.benchmarks=[{name: vicuna, path: $DATA, format: prometheus-eval, offset: 8, max_examples: 8}]" "$@"
