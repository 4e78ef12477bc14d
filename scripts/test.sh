#!/usr/bin/env bash
# Runs the test suite (sets the environment up first when it is missing). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV=$(cd "${TRACT_VENV:-.venv}" && pwd)  # the environment setup-env.sh prepared (TRACT_VENV, else .venv)
export PATH="$VENV/bin:$PATH" DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
