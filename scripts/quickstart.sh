#!/usr/bin/env bash
# The main job on its embedded default (sets the environment up first when it is missing).
# For now: read, render and tokenise the real Vicuna Bench judge set with SmolLM2's tokenizer and print the
# summary. Extra arguments go to `tract-dist data inspect`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
DATA=${TRACT_SHARED_DATA:-../shared/data}/prometheus-eval/vicuna_eval.json
exec tract-dist data inspect "$DATA" --format prometheus-eval --tokenizer smollm2 "$@"
