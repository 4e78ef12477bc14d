#!/usr/bin/env bash
# The main job on its embedded default (sets the environment up first when it is missing): the whole TRACT
# pipeline of configs/quickstart.yaml (stage 1 -> CoT generation -> stage 2 -> evaluation) on a local Ray,
# tracked in ./mlflow.db, on the data that ship with the repository (data/quickstart/, see its NOTICE), so
# it needs nothing beside the checkout. Extra arguments are config overrides (section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
VENV=$(cd "${TRACT_VENV:-.venv}" && pwd)  # the environment setup-env.sh prepared (TRACT_VENV, else .venv)
export PATH="$VENV/bin:$PATH" TOKENIZERS_PARALLELISM=false
# This checkout's tract_dist, also when TRACT_VENV is an environment whose editable install points at another
# checkout: `python -m` from here for the driver, PYTHONPATH for the processes it starts (Ray workers, torchrun
# ranks), which would otherwise import the installed one.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m tract_dist.cli pipeline configs/quickstart.yaml "$@"
