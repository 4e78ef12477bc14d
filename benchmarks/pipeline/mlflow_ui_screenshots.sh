#!/usr/bin/env bash
# What a user sees in the MLflow UI after the quickstart, in a real browser (headless Chromium from Debian's
# packages: apt-get install chromium): the runs table the pipeline's printed URL opens, and the experiment's
# logged models. Run after `bash scripts/quickstart.sh` in the same folder:
#     bash benchmarks/pipeline/mlflow_ui_screenshots.sh [OUT_PREFIX]
# Writes OUT_PREFIX-runs.png and OUT_PREFIX-models.png (default benchmarks/results/mlflow-ui-cpu-2core).
set -euo pipefail
OUT=${1:-benchmarks/results/mlflow-ui-cpu-2core}
PORT=${PORT:-5055}
VENV=$(cd "${TRACT_VENV:-.venv}" && pwd)
"$VENV/bin/mlflow" ui --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port "$PORT" \
    >/tmp/mlflow-ui-$PORT.log 2>&1 &
UI=$!
trap 'kill $UI 2>/dev/null; pkill -f "port $PORT" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/")" = 200 ] && break
    sleep 2
done
# the runs URL as the pipeline prints it (tract_dist.tracking.mlflow_run.runs_url), on this port
URL=$("$VENV/bin/python" - "$PWD/mlflow.db" <<'PY'
import sys
from mlflow.tracking import MlflowClient
from tract_dist.tracking.mlflow_run import runs_url
uri = f"sqlite:///{sys.argv[1]}"
exp = MlflowClient(uri).get_experiment_by_name("tract-dist")
print(runs_url(uri, exp.experiment_id, view="tract-dist")[0])
PY
)
URL=${URL/5000/$PORT}
EXP=$(echo "$URL" | sed -E 's#.*/experiments/([0-9]+)/.*#\1#')
shot() { timeout 180 chromium --headless=new --no-sandbox --disable-gpu --window-size=1600,1000 --virtual-time-budget=30000 \
    --screenshot="$1" "$2" 2>/dev/null; }
shot "$OUT-runs.png" "$URL"
shot "$OUT-models.png" "http://127.0.0.1:$PORT/#/experiments/$EXP/models"
echo "$URL -> $OUT-runs.png; models -> $OUT-models.png"
